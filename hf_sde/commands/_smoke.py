"""Fast settings for smoke runs (the README test, CI): ``HF_SDE_SMOKE=1`` caps work-size arguments.

Each command module declares ``SMOKE = {dest: cap}``; with the variable set, every such argument is lowered
to its cap (``None``, meaning "all", counts as above it), and one line on stderr says what was capped.
Only the command layer reads this variable; the library never changes behaviour with it.
"""

from __future__ import annotations

import os
import sys

SMOKE_ENV = "HF_SDE_SMOKE"


def smoke_enabled() -> bool:
    return os.environ.get(SMOKE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def apply_smoke(args, caps: dict) -> dict:
    """Lower ``args``' attributes to ``caps`` when smoke mode is on; return what changed."""
    if not smoke_enabled() or not caps:
        return {}
    changed = {}
    for dest, cap in caps.items():
        value = getattr(args, dest, None)
        if not hasattr(args, dest):
            continue
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > cap):
            setattr(args, dest, cap)
            changed[dest] = cap
    if changed:
        settings = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in changed.items())
        print(f"{SMOKE_ENV}=1: fast smoke settings ({settings}); results are not meaningful.", file=sys.stderr)
    return changed
