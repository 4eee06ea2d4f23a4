"""Deprecated location of the ``hf-sde`` command line; it lives in :mod:`hf_sde.commands` now.

Kept so that ``python -m hf_sde.cli`` and old imports keep working (and the single-module demo's
``register_cli``, until the demo package lands). TODO(integrator): remove once nothing imports it.
"""

from __future__ import annotations

import sys

from .commands import build_parser, main
from .commands._model import add_model_args, load_model_from_args

__all__ = ["add_model_args", "build_parser", "load_model_from_args", "main"]

if __name__ == "__main__":
    sys.exit(main())
