"""Per-request SDE traces kept in the vLLM worker, fetched by request id or ``sde_trace_id``.

A trace holds, per generated token, what :class:`hf_sde.SDETrace` holds (diffusion, z-score, drift norm,
temperature, steering norm, position) plus the state ``z`` and the heads' ``(mu dt, sigma sqrt(dt))``, from which
the surprise is computed once when the trace is fetched (``SDEHeads.surprise``, as ``sde_generate`` does at the
end of a call). A preempted request that vLLM recomputes keeps its trace (keyed by vLLM's request id).

The store keeps the newest ``HF_SDE_VLLM_MAX_TRACES`` traces (default 4096); fetching pops by default.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch

from ..control.settings import _STATS, SDETrace

MAX_ENV = "HF_SDE_VLLM_MAX_TRACES"
_STEER = _STATS.index("steer_norm")

_lock = threading.Lock()
_by_request: OrderedDict[str, RequestTrace] = OrderedDict()
_by_trace_id: dict[str, str] = {}
_capacity = int(os.environ.get(MAX_ENV, "4096"))


class RequestTrace:
    """The recorded steps of one request (one row of an :class:`SDETrace`)."""

    def __init__(self, request, prompt_len: int, output_ids: list[int] | None, base_temperature: float):
        self.heads = request.control.heads
        self.trace_id = request.trace_id
        self.prompt_len = prompt_len
        self.output_ids = output_ids          # V1: vLLM's running list of generated tokens (a live reference)
        self.base_temperature = base_temperature
        self.stats: list[torch.Tensor] = []   # (5,) per step, _STATS order
        self.z: list[torch.Tensor] = []
        self.out: list[torch.Tensor] = []     # (2d,) [mu dt | sigma sqrt(dt)]
        self.positions: list[int] = []
        self.steer_norms: list[torch.Tensor | None] = []  # per step, on the model's device (None: not steered)

    def __len__(self) -> int:
        return len(self.stats)

    def record(self, stats: torch.Tensor, z: torch.Tensor, out: torch.Tensor, position: int) -> None:
        """One step, on the host: ``stats`` (5,) in ``_STATS`` order (steering norm 0 until set), the state ``z``
        (d,) and ``out`` (2d,) ``[mu dt | sigma sqrt(dt)]``."""
        self.stats.append(stats)
        self.z.append(z)
        self.out.append(out)
        self.positions.append(position)

    def add_steer_norm(self, value: torch.Tensor, first: bool = True) -> None:
        """The last step's steering norm (``first=False``: a later layer of a per-layer direction, summed). Kept
        where it was computed until the trace is fetched, so recording it never waits for the device."""
        norms = self.steer_norms
        while len(norms) < len(self.stats):
            norms.append(None)
        norms[-1] = value.detach() if first or norms[-1] is None else norms[-1] + value.detach()

    def to_trace(self) -> SDETrace:
        """An ``SDETrace`` of shape ``(1, n)``: the steps of the tokens vLLM generated for this request."""
        n = min(len(self.stats), len(self.output_ids)) if self.output_ids is not None else len(self.stats)
        if n == 0:
            empty = torch.zeros(1, 0)
            return SDETrace(**{name: empty.clone() for name in (*_STATS, "surprise")}, positions=empty.long())
        stats = torch.stack(self.stats[:n], dim=1)                  # (5, n)
        steered = [(i, v) for i, v in enumerate(self.steer_norms[:n]) if v is not None]
        if steered:  # one copy of the steering norms from the device, at fetch time
            stats[_STEER, [i for i, _ in steered]] = torch.stack([v for _, v in steered]).float().cpu()
        surprise = torch.full((1, n), float("nan"))
        if n > 1:
            z = torch.stack(self.z[:n])
            out = torch.stack(self.out[: n - 1])
            d = z.shape[-1]
            with torch.no_grad():
                surprise[0, : n - 1] = self.heads.surprise(z[1:] - z[:-1], out[:, :d], out[:, d:])
        fields = {name: stats[i].unsqueeze(0).float() for i, name in enumerate(_STATS)}
        return SDETrace(**fields, surprise=surprise, positions=torch.tensor([self.positions[:n]]))


def configure(vllm_config=None) -> None:
    global _capacity
    _capacity = max(int(os.environ.get(MAX_ENV, str(_capacity))), 1)


def get_or_start(req_id: str, request, prompt_len: int, output_ids: list[int] | None,
                 base_temperature: float = 1.0) -> RequestTrace:
    """The trace of ``req_id`` (continued after preemption), or a new one."""
    with _lock:
        trace = _by_request.get(req_id)
        if trace is None or trace.prompt_len != prompt_len:
            trace = RequestTrace(request, prompt_len, output_ids, base_temperature)
            _by_request[req_id] = trace
            while len(_by_request) > _capacity:
                old_id, old = _by_request.popitem(last=False)
                if old.trace_id is not None and _by_trace_id.get(old.trace_id) == old_id:
                    del _by_trace_id[old.trace_id]
        else:
            trace.output_ids = output_ids
            _by_request.move_to_end(req_id)
        if request.trace_id is not None:
            _by_trace_id[request.trace_id] = req_id
    return trace


def _lookup(key: str) -> str | None:
    if key in _by_trace_id:
        return _by_trace_id[key]
    if key in _by_request:
        return key
    # vLLM makes its internal request ids unique by appending "-<random>" to the caller's id.
    matches = [r for r in _by_request if r.startswith(key + "-")]
    return matches[-1] if len(matches) == 1 else None


def fetch(keys: list[str], pop: bool = True) -> dict[str, dict | None]:
    """``{key: SDETrace.to_dict() or None}`` for trace ids or request ids (``None``: no such trace)."""
    out: dict[str, dict | None] = {}
    with _lock:
        for key in keys:
            req_id = _lookup(key)
            trace = _by_request.get(req_id) if req_id is not None else None
            if trace is None:
                out[key] = None
                continue
            out[key] = trace.to_trace().to_dict()
            if pop:
                del _by_request[req_id]
                if trace.trace_id is not None and _by_trace_id.get(trace.trace_id) == req_id:
                    del _by_trace_id[trace.trace_id]
    return out


def clear() -> None:
    with _lock:
        _by_request.clear()
        _by_trace_id.clear()
