"""Hugging Face Space / local launcher for the hf-sde demo (the app itself is ``hf_sde.demo``).

``python spaces/app.py`` serves it on http://127.0.0.1:7860 (Spaces set GRADIO_SERVER_NAME=0.0.0.0).
Defaults can be changed with HF_SDE_DEMO_MODEL, HF_SDE_DEMO_GGUF, HF_SDE_DEMO_REVISION, HF_SDE_DEMO_HEADS.
"""

import os
import sys

try:
    import hf_sde.demo as sde_demo
except ImportError:  # running from a checkout without the package installed, or with hf_sde/ copied beside us
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]
    import hf_sde.demo as sde_demo

model = os.environ.get("HF_SDE_DEMO_MODEL") or sde_demo.DEFAULT_MODEL
is_default = model == sde_demo.DEFAULT_MODEL
demo = sde_demo.build_demo(
    model,
    os.environ.get("HF_SDE_DEMO_GGUF", sde_demo.DEFAULT_GGUF if is_default else ""),
    os.environ.get("HF_SDE_DEMO_REVISION", sde_demo.DEFAULT_REVISION if is_default else ""),
    os.environ.get("HF_SDE_DEMO_HEADS") or None,
)

if __name__ == "__main__":
    sde_demo.launch(demo)
