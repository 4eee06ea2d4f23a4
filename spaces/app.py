"""Hugging Face Space launcher for the hf-sde demo (the app itself is ``hf_sde.demo``).

The served model and heads are fixed here, from the Space's configuration read once at start; visitors (page or
API) cannot change them. ``python spaces/app.py`` serves on http://127.0.0.1:7860 (Spaces set
GRADIO_SERVER_NAME=0.0.0.0). Configuration (all optional):

* ``HF_SDE_DEMO_MODEL`` hub id (default SmolLM2-135M-Instruct; known ids fill in their pinned GGUF file and
  revision), ``HF_SDE_DEMO_GGUF``, ``HF_SDE_DEMO_REVISION``;
* ``HF_SDE_DEMO_HEADS`` heads folder or hub id (default: the heads shipped with hf-sde, else demo heads fitted once);
* ``HF_SDE_DEMO_MAX_BATCH`` rows per batched generate call (16), ``HF_SDE_DEMO_CONCURRENCY`` requests in flight
  (16), ``HF_SDE_DEMO_MAX_QUEUE`` waiting requests (32); ``HF_SDE_CACHE`` moves the demo-heads cache.
"""

import ctypes
import os
import sys

# Few malloc arenas: Gradio runs handlers on a pool of up to 40 threads, and with one arena per thread the freed
# memory of each request's figures and HTML stays spread over them (resident memory creeps up for a long time).
try:
    ctypes.CDLL("libc.so.6").mallopt(-8, int(os.environ.get("MALLOC_ARENA_MAX", 2)))  # M_ARENA_MAX
except (OSError, AttributeError):
    pass

try:
    import hf_sde.demo as sde_demo
except ImportError:  # running from a checkout without the package installed, or with hf_sde/ copied beside us
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]
    import hf_sde.demo as sde_demo
from hf_sde.data.loading import resolve_model_spec


def _env(name: str, default=None):
    return os.environ.get(name, "").strip() or default


backend = sde_demo.DemoBackend(
    resolve_model_spec(_env("HF_SDE_DEMO_MODEL"), _env("HF_SDE_DEMO_GGUF"), _env("HF_SDE_DEMO_REVISION")),
    _env("HF_SDE_DEMO_HEADS"),
    max_batch=int(_env("HF_SDE_DEMO_MAX_BATCH", 16)),
)
demo = sde_demo.build_demo(backend, allow_model_choice=False,
                           concurrency_limit=int(_env("HF_SDE_DEMO_CONCURRENCY", 16)),
                           max_queue=int(_env("HF_SDE_DEMO_MAX_QUEUE", 32)))

if __name__ == "__main__":
    sde_demo.launch(demo)
