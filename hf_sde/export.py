"""Exporting SDE control as a ``custom_generate`` folder that works without hf-sde installed."""

from __future__ import annotations

import os
import re
import shutil

# Modules copied as they are, beside generate.py.
_MODULES = ("heads.py", "layers.py", "version.py")
# The control package, flattened: transformers' remote-code loader resolves only ``from .module import`` of
# files beside generate.py, so ``control/step.py`` travels as ``control_step.py`` and ``control/__init__.py``
# as ``control.py``, with the package's relative imports rewritten to match.
_PACKAGE = "control"

REQUIREMENTS = "transformers>=5.17\nhuggingface_hub>=1.0\nsafetensors>=0.4.3\n"


def _flat_imports(source: str) -> str:
    """``from .x import`` -> ``from .control_x import`` and ``from ..y import`` -> ``from .y import`` (the
    package imports names from modules, never ``from . import x``, which the remote-code loader does not follow)."""
    def relative(m: re.Match) -> str:
        indent, dots, name = m.groups()
        return f"{indent}from .{name if dots == '..' else f'{_PACKAGE}_{name}'} import"

    return re.sub(r"^(\s*)from (\.\.?)(\w+) import", relative, source, flags=re.MULTILINE)


def export_custom_generate(out_dir: str) -> str:
    """Write ``out_dir/custom_generate/`` (generate.py plus the modules it needs). Returns its path."""
    here = os.path.dirname(os.path.abspath(__file__))
    target = os.path.join(out_dir, "custom_generate")
    os.makedirs(target, exist_ok=True)
    shutil.copyfile(os.path.join(here, "custom_generate_entry.py"), os.path.join(target, "generate.py"))
    for name in _MODULES:
        shutil.copyfile(os.path.join(here, name), os.path.join(target, name))
    package = os.path.join(here, _PACKAGE)
    for name in sorted(os.listdir(package)):
        if not name.endswith(".py"):
            continue
        flat = f"{_PACKAGE}.py" if name == "__init__.py" else f"{_PACKAGE}_{name}"
        with open(os.path.join(package, name), encoding="utf-8") as f:
            source = _flat_imports(f.read())
        with open(os.path.join(target, flat), "w", encoding="utf-8") as f:
            f.write(source)
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
