"""Exporting SDE control as a ``custom_generate`` folder that works without hf-sde installed."""

from __future__ import annotations

import os
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # hf_sde/
ENTRY = "serving/custom_generate_entry.py"
# transformers' remote-code loader resolves only ``from .module import`` of files beside generate.py, so every
# module the entry point reaches travels flattened (``control/step.py`` as ``control_step.py``, a package's
# ``__init__.py`` under the package's name) with its relative imports rewritten to match.
_IMPORT = re.compile(r"^(\s*)from (\.+)([\w.]*) import (.*)$", re.MULTILINE)

REQUIREMENTS = "transformers>=5.17\nhuggingface_hub>=1.0\nsafetensors>=0.4.3\n"


def _module_file(dotted: str) -> Path:
    """``control.step`` -> ``hf_sde/control/step.py``; ``control`` -> ``hf_sde/control/__init__.py``."""
    base = PACKAGE.joinpath(*dotted.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _dotted(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _flat(dotted: str) -> str:
    return dotted.replace(".", "_")


def _resolve(path: Path, dots: str, rest: str) -> str:
    package = _dotted(path).split(".") if path.name == "__init__.py" else _dotted(path).split(".")[:-1]
    package = [p for p in package if p]
    up = len(dots) - 1
    base = package[: len(package) - up] if up else package
    return ".".join(base + ([rest] if rest else []))


def _flatten(path: Path) -> tuple[str, list[str]]:
    """The module's source with flat relative imports, and the dotted names of the modules it imports."""
    reached = []

    def rewrite(m: re.Match) -> str:
        indent, dots, rest, names = m.groups()
        if not rest:
            raise ValueError(f"{path.relative_to(PACKAGE)}: 'from {dots} import {names}' cannot travel in a "
                             "custom_generate folder (the remote-code loader follows only 'from .module import')")
        target = _resolve(path, dots, rest)
        reached.append(target)
        return f"{indent}from .{_flat(target)} import {names}"

    return _IMPORT.sub(rewrite, path.read_text(encoding="utf-8")), reached


def export_custom_generate(out_dir: str) -> str:
    """Write ``out_dir/custom_generate/`` (generate.py plus every module it reaches). Returns its path."""
    target = os.path.join(out_dir, "custom_generate")
    os.makedirs(target, exist_ok=True)
    entry = PACKAGE / ENTRY
    todo, done = [entry], set()
    while todo:
        path = todo.pop()
        if path in done:
            continue
        done.add(path)
        source, reached = _flatten(path)
        name = "generate.py" if path == entry else f"{_flat(_dotted(path))}.py"
        with open(os.path.join(target, name), "w", encoding="utf-8") as f:
            f.write(source)
        todo.extend(_module_file(d) for d in reached)
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
