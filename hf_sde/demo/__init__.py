"""The hf-sde demo: plain and SDE-controlled sampling side by side, in a Gradio app (``hf-sde demo``, the Space).

* :mod:`.settings` — input limits and the parameter checks (readable messages, nothing rounded);
* :mod:`.backend` — :class:`DemoBackend`: the configured model and heads (shipped, given, or demo heads fitted
  once and cached by :mod:`.demo_heads`), chat formatting, an allowlist for local model choice;
* :mod:`.batching` — one worker thread per model batching concurrent requests, per-row seeded sampling;
* :mod:`.comparison` — :func:`stream_comparison` / :func:`generate_comparison`;
* :mod:`.rendering` — token HTML and figures; :mod:`.app` — the Gradio page and the ``hf-sde demo`` arguments.

gradio is imported only inside :func:`build_demo`, so ``import hf_sde.demo`` works without it.

Example:
    >>> from hf_sde.loading import STORIES260K
    >>> loaded = DemoBackend(STORIES260K).load()
    >>> result = generate_comparison(loaded, "Once upon a time", mode="temperature", beta=1.0, seed=0)
    >>> result.plain.continuation, result.controlled.continuation
"""

from __future__ import annotations

from .app import add_arguments, build_demo, launch, run_from_args
from .backend import DemoBackend, LoadedModel
from .comparison import Comparison, RunResult, generate_comparison, stream_comparison
from .demo_heads import DEMO_FIT, DEMO_STORIES, demo_corpus, demo_heads
from .rendering import phase_figure, render_tokens, trace_figure
from .settings import MAX_NEW_TOKENS, InputError, validate_params

__all__ = [
    "DEMO_FIT", "DEMO_STORIES", "MAX_NEW_TOKENS", "Comparison", "DemoBackend", "InputError", "LoadedModel",
    "RunResult", "add_arguments", "build_demo", "demo_corpus", "demo_heads", "generate_comparison", "launch",
    "phase_figure", "render_tokens", "run_from_args", "stream_comparison", "trace_figure",
    "validate_params",
]
