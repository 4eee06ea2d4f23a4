"""Exporting SDE control as a ``custom_generate`` folder that works without hf-sde installed."""

from __future__ import annotations

import os
import shutil

_MODULES = ("control.py", "heads.py", "layers.py", "version.py")

REQUIREMENTS = "transformers>=5.0\nhuggingface_hub>=1.0\nsafetensors>=0.4.3\n"


def export_custom_generate(out_dir: str) -> str:
    """Write ``out_dir/custom_generate/`` (generate.py plus the modules it needs). Returns its path."""
    here = os.path.dirname(os.path.abspath(__file__))
    target = os.path.join(out_dir, "custom_generate")
    os.makedirs(target, exist_ok=True)
    shutil.copyfile(os.path.join(here, "custom_generate_entry.py"), os.path.join(target, "generate.py"))
    for name in _MODULES:
        shutil.copyfile(os.path.join(here, name), os.path.join(target, name))
    with open(os.path.join(target, "requirements.txt"), "w") as f:
        f.write(REQUIREMENTS)
    readme = os.path.join(out_dir, "README.md")
    if not os.path.exists(readme):
        with open(readme, "w") as f:
            f.write("---\nlibrary_name: transformers\ntags:\n- custom_generate\n- hf-sde\n---\n\n"
                    "# SDE-controlled generation (hf-sde)\n\n```python\n"
                    "out = model.generate(**inputs, custom_generate=REPO, trust_remote_code=True,\n"
                    "                     sde_control={'heads': HEADS_REPO, 'mode': 'temperature'},\n"
                    "                     return_dict_in_generate=True)\nout.sde_trace.diffusion\n```\n")
    return target
