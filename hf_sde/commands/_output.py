"""Output folders written by commands: refuse to overwrite unless asked, and publish atomically.

A command writes into ``.NAME.partial`` beside the target and renames it to ``NAME`` at the very end, so an
interrupted run leaves no folder that loads (only a ``.partial`` sibling, cleared by the next run).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def _describe(folder: Path) -> str:
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return "holds saved SDE heads"
    return "is not empty"


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Raise ``ValueError`` if ``out`` exists and is not an empty folder, unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} {_describe(out)}; choose a new folder or pass --overwrite to replace it "
                         "(everything in it is removed).")
    return out


def partial_path(out: str | os.PathLike) -> Path:
    """Where the sibling ``.NAME.partial`` folder of ``out`` is (the same in every process)."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.partial"


def partial_dir(out: str | os.PathLike) -> Path:
    """The sibling ``.NAME.partial`` folder a command writes into (emptied first)."""
    tmp = partial_path(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, out: str | os.PathLike) -> None:
    """Replace ``out`` with the finished ``tmp`` folder (rename; the old folder is removed afterwards)."""
    out = Path(out).absolute()
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool):
    """``with atomic_output_dir(out, overwrite) as tmp:`` write into ``tmp``; ``out`` appears only on success."""
    check_output_dir(out, overwrite)
    tmp = partial_dir(out)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out)


def json_safe(obj):
    """NaN / inf (e.g. the last step's surprise) as JSON null: ``json.dumps`` would write bare ``NaN``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def print_json(obj) -> None:
    print(json.dumps(json_safe(obj), allow_nan=False))
