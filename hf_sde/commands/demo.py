"""``hf-sde demo``: serve the Gradio demo (the argument list and the app belong to :mod:`hf_sde.demo`)."""

from __future__ import annotations

HELP = "serve the Gradio demo: plain vs SDE-controlled sampling side by side"


def add_arguments(p) -> None:
    from ..demo import add_arguments as demo_arguments

    demo_arguments(p)


def run(args) -> int:
    from ..demo import run_from_args

    return run_from_args(args)
