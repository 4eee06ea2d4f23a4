"""The heads a vLLM server may use: an allowlist fixed at start, each heads loaded once per process.

``HF_SDE_VLLM_HEADS`` lists them, comma separated, as ``name=folder`` or ``name=user/repo`` (a hub id, read
through the hub cache), or a bare shipped name: ``smollm2`` (alias ``default``) is
:data:`hf_sde.pretrained.DEFAULT_HEADS`. Requests name heads (``sde_heads``); a request never passes a path,
so a client cannot make the server read arbitrary files. Unset or empty: SDE control is off and any request
with ``sde_*`` arguments is refused with a message saying how to turn it on.

Example::

    HF_SDE_VLLM_HEADS=smollm2,mine=/srv/heads/mine python -m vllm.entrypoints.openai.api_server ...
"""

from __future__ import annotations

import os
import threading

ENV = "HF_SDE_VLLM_HEADS"
SHIPPED = ("smollm2", "default")

_lock = threading.Lock()
_cache: dict[str, object] = {}


def allowlist(spec: str | None = None) -> dict[str, str]:
    """``{name: folder or repo id}`` from ``spec`` (default: the environment variable)."""
    from ..pretrained import DEFAULT_HEADS

    spec = os.environ.get(ENV, "") if spec is None else spec
    out: dict[str, str] = {}
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if "=" in entry:
            name, _, where = (s.strip() for s in entry.partition("="))
            if not name or not where:
                raise ValueError(f"{ENV}: entry {entry!r} must be name=folder_or_repo_id")
        elif entry in SHIPPED:
            name, where = entry, str(DEFAULT_HEADS)
        else:
            raise ValueError(f"{ENV}: bare entry {entry!r} is not a shipped heads name {SHIPPED}; "
                             "write name=folder_or_repo_id")
        if name in out:
            raise ValueError(f"{ENV}: heads name {name!r} is listed twice")
        out[name] = where
    return out


def enabled() -> bool:
    return bool(allowlist())


def resolve_heads(name: str | None):
    """``(name, SDEHeads)`` for a request's ``sde_heads`` (``None``: the only served heads, or ``default``)."""
    from ..fitting.heads import SDEHeads

    served = allowlist()
    if not served:
        raise ValueError(f"SDE control is not enabled on this vLLM instance: start it with {ENV}=smollm2 (the shipped "
                         "SmolLM2 heads) or name=folder entries, with hf-sde's logits processor loaded.")
    if name is None:
        if len(served) == 1:
            name = next(iter(served))
        elif "default" in served:
            name = "default"
        else:
            raise ValueError(f"several heads are served ({sorted(served)}): name one with sde_heads")
    if name not in served:
        raise ValueError(f"sde_heads={name!r} is not served here; served heads: {sorted(served)}")
    with _lock:
        key = f"{name}={served[name]}"
        heads = _cache.get(key)
        if heads is None:
            heads = SDEHeads.from_pretrained(served[name]).float().eval()
            for p in heads.parameters():
                p.requires_grad_(False)
            _cache[key] = heads
    return name, heads
