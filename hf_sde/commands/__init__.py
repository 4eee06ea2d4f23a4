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

from ._args import HelpFormatter, positive_int
from ._smoke import SMOKE_ENV, apply_smoke

#: sub-command name -> module under hf_sde.commands (each has HELP, add_arguments(p), run(args), maybe SMOKE)
COMMANDS = {
    "fit": "fit",
    "extract": "extract",
    "push": "push",
    "generate": "generate",
    "analyze": "analyze",
    "score": "score",
    "demo": "demo",
    "export-generate": "export_generate",
    "fit-distributed": "fit_distributed",
    "control-vector": "control_vector",
}

EPILOG = (f"Environment: {SMOKE_ENV}=1 caps every command's work (documents, epochs, lengths, new tokens, "
          "simulated paths) for fast smoke runs such as the README test; its results are not meaningful. "
          "HF_HUB_OFFLINE=1 and HF_HUB_CACHE work as for transformers. HF_SDE_CACHE: where hf-sde caches "
          "(dequantized GGUF weights, extracted trajectories, demo heads); default ~/.cache/hf-sde. "
          "HF_SDE_TRAJECTORY_CACHE=0 turns the trajectory cache off (as --no-cache).")


def _module(name: str):
    return importlib.import_module(f"{__name__}.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-sde", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what each step does (INFO messages; default: warnings only)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        mod = _module(name)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP, epilog=EPILOG, formatter_class=HelpFormatter)
        mod.add_arguments(p)
        p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                       help="CPU threads for torch's operators (default: torch's, one per physical core). On cores "
                            "shared with other jobs, 1 is often several times faster: spinning threads wait on "
                            "each other")
        p.set_defaults(func=mod.run, smoke=getattr(mod, "SMOKE", {}), _parser=p)
    return parser


def _check(args) -> None:
    """A command's checks that involve several arguments (``check_args``), as argparse errors (exit 2, before
    any model loads)."""
    check = getattr(_module(args.command), "check_args", None)
    if check is not None:
        try:
            check(args)
        except ValueError as e:
            args._parser.error(str(e))


def _interrupted(args) -> str:
    """The one line printed on Ctrl-C: what was interrupted and what was (not) written."""
    describe = getattr(_module(args.command), "interrupted", None)
    if describe is not None:
        return describe(args)
    return f"hf-sde {args.command}: interrupted (Ctrl-C); nothing was written."


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check(args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    apply_smoke(args, args.smoke)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"hf-sde {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted(args), file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C


__all__ = ["COMMANDS", "SMOKE_ENV", "build_parser", "main"]
