"""The training loop of the fitting core: drift and diffusion as one fused computation, data-parallel steps.

:class:`FusedSDE` holds the heads' MLP weights stacked (drift and diffusion side by side), so one batched
matmul per layer evaluates both networks; it is what the optimiser updates (AdamW is elementwise, so the
stacking changes nothing but speed) and it writes the weights back into the heads at the end.
:func:`train_heads` runs the epochs in a process-group environment: each process backpropagates its slice
of every global batch and the gradients are summed (a no-op in one process). Per-batch statistics stay on
tensors; nothing per batch goes through Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .heads import SDEHeads

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
GRAD_CLIP = 10.0


def _linears(net: nn.Sequential) -> list[nn.Linear]:
    return [m for m in net if isinstance(m, nn.Linear)]


class FusedSDE:
    """``x = [z, time features] -> (mu*dt, sigma*sqrt(dt))`` with the drift and diffusion MLPs batched together.

    Equal to ``SDEHeads.forward`` (same weights, same operations per network) up to float rounding.
    """

    def __init__(self, heads: SDEHeads):
        self.d, self.floor = heads.config.proj_dim, heads.config.sigma_floor
        pairs = list(zip(_linears(heads.drift_net), _linears(heads.diffusion_net), strict=True))
        self.weights = [torch.stack([a.weight.detach().T, b.weight.detach().T]).contiguous().requires_grad_()
                        for a, b in pairs]  # (2, in, out)
        self.biases = [torch.stack([a.bias.detach(), b.bias.detach()]).unsqueeze(1).contiguous().requires_grad_()
                       for a, b in pairs]  # (2, 1, out)
        self.linear = [heads.drift_linear.weight.detach().T.contiguous().requires_grad_(),
                       heads.drift_linear.bias.detach().clone().requires_grad_()]

    @property
    def mlp_params(self) -> list[torch.Tensor]:
        return self.weights + self.biases

    @property
    def params(self) -> list[torch.Tensor]:
        return self.mlp_params + self.linear

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.expand(2, *x.shape)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(b, h, w)
            if i < last:
                h = F.silu(h)
        mean = torch.addmm(self.linear[1], x[:, :self.d], self.linear[0]) + h[0]
        std = F.softplus(h[1]) + self.floor
        return mean, std

    def state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def load(self, state: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, state, strict=True):
                p.copy_(s)

    def write_to(self, heads: SDEHeads) -> None:
        """Copy the (stacked) weights back into the heads' own modules."""
        with torch.no_grad():
            for k, (a, b) in enumerate(zip(_linears(heads.drift_net), _linears(heads.diffusion_net), strict=True)):
                for j, lin in enumerate((a, b)):
                    lin.weight.copy_(self.weights[k][j].T)
                    lin.bias.copy_(self.biases[k][j, 0])
            heads.drift_linear.weight.copy_(self.linear[0].T)
            heads.drift_linear.bias.copy_(self.linear[1])


def make_optimizer(model: FusedSDE, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; the linear drift (already at its least-squares optimum) gets a 10x smaller step and no decay,
    so Adam's unit-size first steps do not knock it off while the MLPs learn the nonlinear correction."""
    return torch.optim.AdamW([{"params": model.mlp_params, "lr": lr, "weight_decay": weight_decay},
                              {"params": model.linear, "lr": lr * 0.1, "weight_decay": 0.0}])


def _sync(params: list[torch.Tensor], parts: torch.Tensor, n_local: int, count: int | None, env) -> tuple[int, torch.Tensor]:
    """Sum gradients, loss parts and row counts over processes in one all-reduce; divide the gradients by the
    global row count when it was not known in advance (stream mode). Returns ``(global rows, parts)``."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    bundle = torch.cat([g.flatten().double() for g in grads] + [parts.double(),
                                                                 torch.tensor([float(n_local)], dtype=torch.float64)])
    env.all_reduce_(bundle)
    n = int(bundle[-1])
    flat = bundle[:-3] / (n if count is None and n else 1)
    off = 0
    for p in params:
        p.grad = flat[off:off + p.numel()].view_as(p).to(p.dtype)
        off += p.numel()
    return n, bundle[-3:-1]


def _train_epoch(model: FusedSDE, opt: torch.optim.Optimizer, data, env, epoch: int) -> tuple[int, torch.Tensor]:
    """One pass over the global batches; returns (transitions seen, summed [drift, diffusion] parts)."""
    d, params = model.d, model.params
    seen, sums = 0, torch.zeros(2, dtype=torch.float64)
    for batch, count in data.batches(epoch):
        for p in params:
            p.grad = None
        parts = torch.zeros(2)
        if batch is not None and len(batch):
            mean, std = model(batch.x)
            r = (batch.dz - mean) / std
            parts = torch.stack([0.5 * r.pow(2).sum(), std.log().sum()]) / d
            (parts.sum() / (count or 1)).backward()
            parts = parts.detach()
        if env.world_size > 1 or count is None:
            count, parts = _sync(params, parts, 0 if batch is None else len(batch), count, env)
            if count == 0:  # stream mode: every process is out of batches
                break
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        seen += count
        sums += parts
    return seen, sums


def train_heads(model: FusedSDE, data, env, has_es: bool, epochs, *, lr: float, weight_decay: float,
                patience: int, evaluate: Callable) -> tuple[dict[str, list[float]], int]:
    """AdamW with a cosine schedule and early stopping on the early-stopping data (else the training loss);
    the best state (epoch -1: the OU starting point) is restored. Returns (history, best epoch)."""
    opt = make_optimizer(model, lr, weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(len(epochs), 1), eta_min=lr * 0.05)
    history: dict[str, list[float]] = {f"{s}_{p}": [] for s in ("train", "val") for p in ("total", "drift", "diffusion")}
    history["early_stopping"] = []

    def monitor(train_total: float) -> float:
        es = evaluate(model, data.chunks("es"), env) if has_es else None
        return es["total"] if es is not None and es["count"] > 0 else train_total

    best, bad = (monitor(math.inf), -1, model.state()), 0
    for epoch in epochs:
        seen, sums = _train_epoch(model, opt, data, env, epoch)
        sched.step()
        drift, diffusion = float(sums[0]) / max(seen, 1), float(sums[1]) / max(seen, 1) + HALF_LOG_2PI
        for k, v in (("drift", drift), ("diffusion", diffusion), ("total", drift + diffusion)):
            history[f"train_{k}"].append(v)
        val = evaluate(model, data.chunks("heldout"), env)
        for k in ("total", "drift", "diffusion"):
            history[f"val_{k}"].append(val[k])
        history["early_stopping"].append(monitor(drift + diffusion))
        if hasattr(epochs, "set_postfix"):
            epochs.set_postfix(train=f"{drift + diffusion:.3f}", val=f"{val['total']:.3f}")
        if history["early_stopping"][-1] < best[0] - 1e-4:
            best, bad = (history["early_stopping"][-1], epoch, model.state()), 0
        else:
            bad += 1
            if bad >= patience:
                break
    if hasattr(epochs, "close"):
        epochs.close()
    model.load(best[2])
    return history, best[1]
