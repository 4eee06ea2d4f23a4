"""The ``hf-sde`` command line: one module per sub-command, one shared model-argument resolver.

Fast settings: set HF_SDE_SMOKE=1 to cap documents, epochs, lengths, new tokens and simulation sizes of
every command (smoke runs such as the README test; the results are not meaningful). Each command lists
its caps in its module's ``SMOKE``.

The library never imports this package; it sits on top of everything else.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ._smoke import SMOKE_ENV, apply_smoke

#: sub-command name -> module under hf_sde.commands (each has HELP, add_arguments(p), run(args), maybe SMOKE)
COMMANDS = {
    "fit": "fit",
    "push": "push",
    "generate": "generate",
    "analyze": "analyze",
    "score": "score",
    "demo": "demo",
    "export-generate": "export_generate",
    "fit-distributed": "fit_distributed",
}

EPILOG = (f"Environment: {SMOKE_ENV}=1 caps every command's work (documents, epochs, lengths, new tokens, "
          "simulated paths) for fast smoke runs such as the README test; its results are not meaningful. "
          "HF_HUB_OFFLINE=1 and HF_HUB_CACHE work as for transformers. HF_SDE_CACHE: where hf-sde caches "
          "(dequantized GGUF weights, demo heads); default ~/.cache/hf-sde.")


def _module(name: str):
    return importlib.import_module(f"{__name__}.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-sde", description=__doc__.split("\n\n")[0], epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        mod = _module(name)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP, epilog=EPILOG)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run, smoke=getattr(mod, "SMOKE", {}))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    apply_smoke(args, args.smoke)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"hf-sde {args.command}: error: {e}", file=sys.stderr)
        return 2


__all__ = ["COMMANDS", "SMOKE_ENV", "build_parser", "main"]
