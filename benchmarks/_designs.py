"""Three SDE-driven decoding designs of the decoding study (``eval_frontier.py``), built on ``SDEControl``'s
step callback (which runs in the forward hook, so a logits processor of the same step sees that step's
statistics):

1. :class:`LearnedTemperature`: ``tau = c * head(features)``, a small network on the step's SDE statistics
   (diffusion z-score, incoming-increment surprise, drift norm, time) and/or the model's entropy, fitted by
   maximizing the likelihood of human response tokens under ``softmax(logits / tau)`` (a per-token temperature
   calibration, :func:`fit_temperature_head`); ``c`` is the setting swept at matched diversity.
2. :class:`SurpriseCooling`: when the increment just taken was improbable under the fitted SDE (surprise above
   a threshold: the path left its tube), sample the next ``hold`` tokens at ``cool * tau0``.
3. :class:`SDEGatedMinP`: min-p truncation whose threshold follows the diffusion z-score,
   ``p_min = clip(base * exp(gamma * z), 0, 0.5)``.

They live here, not in ``hf_sde``: the library ships a mode only where the evaluation shows it wins
(``eval_frontier.py``, ``eval_temperature_head.py``). Every processor keeps per-row state on the device and
reads no tensor value on the host.
"""

from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor

# Temperature bounds of every design (those of the SDE temperature law in eval_frontier).
TAU_BOUNDS = (0.3, 1.5)
# Inverse temperatures on which logsumexp(s * logits) is tabulated for fitting (linear in s: lse is convex in s);
# step 1/24, so s = 1 (tau = 1) is a grid point.
GRID = torch.linspace(1 / TAU_BOUNDS[1], 1 / TAU_BOUNDS[0], 65)
INPUTS = {
    "entropy": ("entropy",),
    "sde": ("zscore", "surprise", "drift_norm", "time"),
    "sde+entropy": ("zscore", "surprise", "drift_norm", "time", "entropy"),
}


class StepReader:
    """The ``SDEControl(callback=...)`` that keeps the current :class:`hf_sde.SDEStep` for the processors."""

    def __init__(self):
        self.step = None

    def __call__(self, step) -> None:
        self.step = step


def _entropy(scores: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(scores.float(), -1)
    return -(logp.exp() * logp.nan_to_num(0.0)).sum(-1)


# ----- 1. learned temperature ------------------------------------------------------------------------------
class TemperatureHead(torch.nn.Module):
    """``tau = lo * (hi / lo) ** sigmoid(mlp(standardized features))``: bounded, smooth, 1 at initialization
    when ``lo < 1 < hi`` (the output bias is set so)."""

    def __init__(self, inputs: tuple[str, ...], mean: torch.Tensor, std: torch.Tensor, width: int = 16,
                 horizon: float = 1.0, bounds: tuple[float, float] = TAU_BOUNDS):
        super().__init__()
        self.inputs, self.horizon, self.bounds = tuple(inputs), float(horizon), bounds
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float().clamp_min(1e-6))
        self.net = torch.nn.Sequential(torch.nn.Linear(len(inputs), width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, 1))
        lo, hi = bounds
        u = math.log(1 / lo) / math.log(hi / lo)  # sigmoid(bias) = u gives tau = 1
        with torch.no_grad():
            self.net[-1].weight.mul_(0.01)
            self.net[-1].bias.fill_(math.log(u / (1 - u)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.bounds
        u = torch.sigmoid(self.net((x - self.mean) / self.std)[..., 0])
        return lo * (hi / lo) ** u


def feature_matrix(seqs: list[dict], inputs: tuple[str, ...], horizon: float) -> torch.Tensor:
    """``(positions, len(inputs))`` from the per-sequence feature dicts of ``eval_uncertainty.features``."""
    cols = []
    for name in inputs:
        key = "position" if name == "time" else name
        v = torch.cat([torch.as_tensor(s[key], dtype=torch.float32) for s in seqs])
        cols.append(v / horizon if name == "time" else v)
    return torch.stack(cols, 1).nan_to_num(0.0)


def token_nll(tau: torch.Tensor, target: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of the human token under ``softmax(logits / tau)``: ``lse(s l) - s l_y`` with ``s = 1/tau``,
    ``lse`` linearly interpolated on :data:`GRID` (``lse``: ``(n, len(GRID))``)."""
    s = (1.0 / tau).clamp(float(GRID[0]), float(GRID[-1]))
    u = (s - GRID[0]) / (GRID[1] - GRID[0])
    i = u.floor().long().clamp(0, len(GRID) - 2)
    w = u - i
    table = lse.gather(1, torch.stack([i, i + 1], 1))
    return (1 - w) * table[:, 0] + w * table[:, 1] - s * target


def fit_temperature_head(seqs: list[dict], inputs: tuple[str, ...], horizon: float, steps: int = 600,
                         lr: float = 0.02, seed: int = 0) -> TemperatureHead:
    """Maximize the likelihood of the human tokens under ``softmax(logits / tau(features))`` (full batch, Adam)."""
    torch.manual_seed(seed)
    x = feature_matrix(seqs, inputs, horizon)
    target = torch.cat([torch.as_tensor(s["target_logit"]) for s in seqs]).float()
    lse = torch.cat([torch.as_tensor(s["lse"]) for s in seqs]).float()
    head = TemperatureHead(inputs, x.mean(0), x.std(0), horizon=horizon)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = token_nll(head(x), target, lse).mean()
        loss.backward()
        opt.step()
    return head.eval()


def fixed_temperature_nll(seqs: list[dict]) -> torch.Tensor:
    """Mean human-token NLL at every fixed temperature of :data:`GRID` (``(len(GRID),)``)."""
    target = torch.cat([torch.as_tensor(s["target_logit"]) for s in seqs]).float()
    lse = torch.cat([torch.as_tensor(s["lse"]) for s in seqs]).float()
    return (lse - GRID[None, :] * target[:, None]).mean(0)


class LearnedTemperature(LogitsProcessor):
    """Divides the logits by ``clip(scale * head(features of this step), *TAU_BOUNDS)``."""

    def __init__(self, reader: StepReader, head: TemperatureHead, scale: float = 1.0):
        self.reader, self.head, self.scale = reader, head, scale

    @torch.no_grad()
    def __call__(self, input_ids, scores):
        step = self.reader.step
        have = {"zscore": step.zscore, "drift_norm": step.drift_norm,
                "surprise": step.surprise_previous if step.surprise_previous is not None else torch.zeros_like(step.zscore),
                "time": torch.full_like(step.zscore, step.index / self.head.horizon)}
        if "entropy" in self.head.inputs:
            have["entropy"] = _entropy(scores)
        x = torch.stack([have[name].float() for name in self.head.inputs], -1).nan_to_num(0.0)
        tau = (self.scale * self.head(x)).clamp(*TAU_BOUNDS)
        return scores / tau.unsqueeze(-1).to(scores.dtype)


# ----- 2. surprise-triggered cooling -----------------------------------------------------------------------
class SurpriseCooling(LogitsProcessor):
    """``tau = tau0``, or ``cool * tau0`` for ``hold`` steps after an increment with surprise above ``threshold``
    (surprise: the increment's NLL under the fitted SDE, standardized on held-out data)."""

    def __init__(self, reader: StepReader, tau0: float = 1.0, threshold: float = 2.0, cool: float = 0.5,
                 hold: int = 4):
        self.reader, self.tau0, self.threshold, self.cool, self.hold = reader, tau0, threshold, cool, hold
        self.left: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, input_ids, scores):
        if self.left is None or self.left.shape[0] != scores.shape[0]:
            self.left = torch.zeros(scores.shape[0], device=scores.device)
        s = self.reader.step.surprise_previous
        if s is not None:
            self.left = torch.where(s.nan_to_num(0.0) > self.threshold, torch.full_like(self.left, self.hold),
                                    (self.left - 1).clamp_min(0))
        tau = torch.where(self.left > 0, self.cool * self.tau0, self.tau0)
        return scores / tau.unsqueeze(-1).to(scores.dtype)


# ----- 3. SDE-gated truncation -----------------------------------------------------------------------------
class SDEGatedMinP(LogitsProcessor):
    """Min-p with a per-step threshold ``clip(base * exp(gamma * z), 0, 0.5)`` (z: the diffusion z-score):
    ``gamma > 0`` truncates harder where the path is locally noisy, ``gamma < 0`` where it is calm."""

    def __init__(self, reader: StepReader, base: float = 0.1, gamma: float = 0.5):
        self.reader, self.base, self.gamma = reader, base, gamma

    @torch.no_grad()
    def __call__(self, input_ids, scores):
        z = self.reader.step.zscore.float().nan_to_num(0.0)
        p_min = (self.base * torch.exp(self.gamma * z)).clamp(0.0, 0.5)
        probs = torch.softmax(scores.float(), -1)
        cut = probs < p_min.unsqueeze(-1) * probs.max(-1, keepdim=True).values
        return scores.masked_fill(cut, -float("inf"))
