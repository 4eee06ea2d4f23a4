"""The trajectory-reuse options shared by ``fit``, ``analyze``, ``score`` and ``extract``: ``--no-cache`` and
``--trajectories FOLDER`` (see :mod:`hf_sde.trajectory_cache`)."""

from __future__ import annotations


def add_no_cache(p) -> None:
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the trajectory cache ($HF_SDE_CACHE/trajectories, else "
                        "~/.cache/hf-sde/trajectories): extract again")


def add_trajectories(p, what: str) -> None:
    p.add_argument("--trajectories", default=None, metavar="FOLDER",
                   help=f"read the hidden paths from FOLDER, written by hf-sde extract --out, {what}; refused when it "
                        "was made for another model or layer (default: none, extract them)")


def cache_flag(args) -> bool:
    return not getattr(args, "no_cache", False)


def explicit(args, dest: str) -> bool:
    """Whether ``--dest`` was given a value other than its parser default."""
    parser = getattr(args, "_parser", None)
    default = parser.get_default(dest) if parser is not None else None
    return getattr(args, dest, None) != default


def adopt_corpus_options(args, manifest: dict, folder: str,
                         dests=("template", "text_column", "limit", "max_length")) -> None:
    """With ``--trajectories``: a data option not given takes the folder's value; one given must equal it."""
    from ..trajectories.cache import TrajectoryFolderError

    recorded = {**(manifest.get("corpus") or {}), "max_length": (manifest.get("key") or {}).get("max_length")}
    for dest in dests:
        if not explicit(args, dest):
            setattr(args, dest, recorded.get(dest))
        elif getattr(args, dest) != recorded.get(dest):
            flag = "--" + dest.replace("_", "-")
            raise TrajectoryFolderError(f"--trajectories {folder} was extracted with {flag} {recorded.get(dest)}, "
                                        f"not {getattr(args, dest)}; leave {flag} out to use the folder's, or "
                                        "extract again.")
