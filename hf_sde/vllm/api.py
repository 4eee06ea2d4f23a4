"""hf-sde's vLLM helpers for callers (re-exported by :mod:`hf_sde.vllm`, which loads this module on first use)."""

from __future__ import annotations

import uuid

import torch

from ..control import SDETrace
from .args import KEYS, parse_request

PROCESSOR = "hf_sde.vllm:SDELogitsProcessor"
WORKER_EXTENSION = "hf_sde.vllm.worker.SDEWorkerExtension"
MIDDLEWARE = "hf_sde.vllm.middleware.SDETraceMiddleware"


def llm_kwargs(**overrides) -> dict:
    """Keyword arguments for ``vllm.LLM`` that hf-sde needs: its processor and worker extension, eager mode,
    float32 (exact comparisons with transformers)."""
    kwargs = dict(worker_extension_cls=WORKER_EXTENSION, enforce_eager=True, dtype="float32")
    if not entry_point_installed():
        kwargs["logits_processors"] = [PROCESSOR]
    kwargs.update(overrides)
    return kwargs


def entry_point_installed() -> bool:
    """Whether vLLM loads hf-sde's processor by itself (the ``vllm.logits_processors`` entry point)."""
    from importlib.metadata import entry_points

    return any(ep.value.replace(":", ".") == PROCESSOR.replace(":", ".")
               for ep in entry_points(group="vllm.logits_processors"))


def sde_args(heads: str | None = None, mode: str = "temperature", trace_id: str | None = None, **control) -> dict:
    """``SamplingParams.extra_args`` for one SDE request (``control``: SDEControl fields, e.g. ``beta=1.0``;
    tensors, and a per-layer ``direction`` dict such as :func:`hf_sde.load_control_vector` returns, become JSON).

    A fresh ``sde_trace_id`` is set unless given. The arguments are checked here as vLLM will check them.
    """
    args = {"sde_mode": mode, "sde_trace_id": trace_id or f"sde-{uuid.uuid4().hex}"}
    if heads is not None:
        args["sde_heads"] = heads
    for name, value in control.items():
        key = f"sde_{name}"
        if key not in KEYS:
            raise TypeError(f"unknown SDE argument {name!r}; valid: {sorted(k[4:] for k in KEYS)}")
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        elif isinstance(value, dict):  # a per-layer direction (e.g. hf_sde.load_control_vector): JSON keys are str
            value = {str(k): v.tolist() if isinstance(v, torch.Tensor) else v for k, v in value.items()}
        args[key] = value
    parse_request(args)
    return args


def sde_prompt(prompt, extra_args: dict | None = None):
    """A prompt for ``LLM.generate`` with its own ``cache_salt`` when the request steers.

    Steered positions' KV cache must not be shared with other requests through prefix caching; a unique salt
    per steered request guarantees that. Plain strings become ``{"prompt": ...}``, token lists
    ``{"prompt_token_ids": ...}``.
    """
    request = parse_request(extra_args)
    if request is None or not request.control.steers:
        return prompt
    if isinstance(prompt, str):
        prompt = {"prompt": prompt}
    elif isinstance(prompt, list):
        prompt = {"prompt_token_ids": prompt}
    else:
        prompt = dict(prompt)
    prompt.setdefault("cache_salt", f"hf-sde-steer-{uuid.uuid4().hex}")
    return prompt


def trace_from_dict(data: dict) -> SDETrace:
    """The :class:`SDETrace` of ``SDETrace.to_dict()`` output (NaN for ``None`` entries, as JSON carries them)."""
    def tensor(name, value):
        if name == "positions":
            return torch.tensor(value, dtype=torch.long)
        return torch.tensor([[float("nan") if v is None else v for v in row] for row in value], dtype=torch.float32)

    return SDETrace(**{k: tensor(k, v) for k, v in data.items()})


def get_traces(llm, keys: list[str], pop: bool = True) -> list[SDETrace | None]:
    """The traces of ``keys`` (``sde_trace_id`` values or request ids) from an offline ``vllm.LLM``."""
    keys = [str(k) for k in keys]
    result = llm.collective_rpc("hf_sde_traces", args=(keys, pop))[0]
    return [trace_from_dict(result[k]) if result.get(k) is not None else None for k in keys]
