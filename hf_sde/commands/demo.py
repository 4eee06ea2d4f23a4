"""``hf-sde demo``: serve the Gradio demo (the argument list and the app belong to :mod:`hf_sde.demo`)."""

from __future__ import annotations

HELP = "serve the Gradio demo: plain vs SDE-controlled sampling side by side"


def add_arguments(p) -> None:
    from .. import demo

    if hasattr(demo, "add_arguments"):
        demo.add_arguments(p)
    else:  # TODO(integrator): drop once the demo package (SPACE) with add_arguments/run_from_args is merged
        from ._model import add_model_args

        add_model_args(p)
        _legacy_arguments(p)


def run(args) -> int:
    from .. import demo

    if hasattr(demo, "run_from_args"):
        return demo.run_from_args(args)
    # TODO(integrator): legacy path for the single-module demo.py.
    from ..loading import resolve_model_spec

    spec = resolve_model_spec(args.model, args.gguf_file, args.revision)
    args.model, args.gguf_file, args.revision = spec.name_or_path, spec.gguf_file, spec.revision
    return demo._demo(args)


def _legacy_arguments(p) -> None:
    p.add_argument("--heads", default=None, help="heads folder or hub id (default: fit demo heads, cached)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    p.add_argument("--cache-dir", default=None, help="where demo heads are cached")
    p.add_argument("--fit-epochs", type=int, default=None, help="epochs for demo heads")
    p.add_argument("--concurrency", type=int, default=1, help="generations served at once")
    p.add_argument("--max-queue", type=int, default=16, help="requests allowed to wait")
    p.add_argument("--lock-model", action="store_true", help="make the model / heads boxes read-only")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (needs the network)")
