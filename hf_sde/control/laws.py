"""The control laws: what a step does with the heads' statistics (temperature, gate, steering direction).

Each law is a plain function of tensors, shared by ``generate`` (through :class:`SDEControl`'s methods) and the
vLLM processor, so both apply the same maths.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def temperature_law(zscore: torch.Tensor, tau0: float, beta: float, low: float, high: float) -> torch.Tensor:
    """``clip(tau0 * exp(-beta * z), low, high)``: cools sampling where the path is locally noisy (``beta > 0``)."""
    tau = tau0 * torch.exp(-beta * zscore)
    return tau.clamp(low, high)


def gate_value(zscore: torch.Tensor, gate: str, threshold: float, sharpness: float) -> torch.Tensor:
    """How much of the steering step applies per row: 1 (``"always"``), ``z > threshold`` or a sigmoid of it."""
    if gate == "always":
        return torch.ones_like(zscore)
    if gate == "threshold":
        return (zscore > threshold).to(zscore.dtype)
    return torch.sigmoid(sharpness * (zscore - threshold))


def steering_unit(direction: str | torch.Tensor, mean: torch.Tensor, z: torch.Tensor, lift: Callable,
                  fixed: torch.Tensor | None = None, attractor: torch.Tensor | None = None) -> torch.Tensor:
    """The unit steering direction per row (``(N, hidden)``).

    ``direction``: ``"drift"`` (``v = P mu``), ``"attractor"`` (``v = P (z* - z)``) or a hidden-size vector
    (a per-layer direction uses :meth:`SDEControl.gain` and its layers' unit vectors instead);
    ``mean`` / ``z``: the rows' drift increment and state; ``lift`` maps SDE coordinates to hidden space;
    ``fixed``: the unit vector of a tensor ``direction`` (normalized here otherwise); ``attractor``: ``z*``
    (the origin, i.e. the mean training state, when ``None``).
    """
    if fixed is not None:
        return fixed.expand(z.shape[0], -1)
    if isinstance(direction, torch.Tensor):
        return (direction.to(z) / direction.norm().clamp_min(1e-12)).expand(z.shape[0], -1)
    if direction == "drift":
        v = lift(mean)
    else:
        v = lift((attractor if attractor is not None else torch.zeros_like(z[0])) - z)
    return v.div_(torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min_(1e-12))


def steer_delta(step: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """What steering adds to ``state`` (float32 rows): ``step * ||state||``, so ``alpha`` is relative to the norm."""
    return step * torch.linalg.vector_norm(state, dim=-1, keepdim=True)
