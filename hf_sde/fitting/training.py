"""The training loop of the fitting core.

:func:`train_heads` runs the epochs in a process-group environment: each process backpropagates its slice
of every global batch and the gradients are summed (a no-op in one process). Per-batch statistics stay on
tensors; nothing per batch goes through Python floats.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch.nn import functional as F

from .heads import SDEHeads

logger = logging.getLogger(__name__)

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
GRAD_CLIP = 10.0


class HeadsOnInputs:
    """``x = [z, time features(t)] -> (mu*dt, sigma*sqrt(dt))``: ``SDEHeads.forward`` on inputs whose time
    features were computed once per transition, not once per batch and epoch.

    Fusing drift and diffusion into one batched matmul per layer (stacked weights, ``baddbmm``) was measured
    and was not faster on CPU (90-105k against 110-114k transitions/s for a step at batch 4096, d = 32,
    one thread), so the two MLPs run as the heads define them.
    """

    def __init__(self, heads: SDEHeads):
        self.heads, self.d, self.floor = heads, heads.config.proj_dim, heads.config.sigma_floor
        self.params = list(heads.parameters())

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.heads
        mean = h.drift_linear(x[:, :self.d]) + h.drift_net(x)
        return mean, F.softplus(h.diffusion_net(x)) + self.floor

    def state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def load(self, state: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, state, strict=True):
                p.copy_(s)


def make_optimizer(heads: SDEHeads, lr: float, weight_decay: float, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW; the linear drift (already at its least-squares optimum) gets a 10x smaller step and no decay,
    so Adam's unit-size first steps do not knock it off while the MLPs learn the nonlinear correction.

    ``fused=True`` uses the one-kernel AdamW update (CPU and CUDA in torch >= 2.4): at batch 512 the
    per-tensor update was ~20 % of an epoch on CPU (1.1 ms of ~5 ms per batch). The same update rule, so
    the fit agrees with the unfused one up to float rounding. Where the fused kernel is refused (a device or
    dtype without it), the default implementation is used.
    """
    linear = list(heads.drift_linear.parameters())
    others = [p for n, p in heads.named_parameters() if not n.startswith("drift_linear.")]
    groups = [{"params": others, "lr": lr, "weight_decay": weight_decay},
              {"params": linear, "lr": lr * 0.1, "weight_decay": 0.0}]
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True)
        except (RuntimeError, ValueError) as e:
            logger.info("fused AdamW unavailable (%s); using the default implementation", e)
    return torch.optim.AdamW(groups)


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


def batch_parts(model: HeadsOnInputs, x: torch.Tensor, dz: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """Summed ``[drift, diffusion]`` NLL parts of one batch, per dimension (the training objective's terms).

    ``bf16``: the heads' forward (and so its backward) under bfloat16 autocast, the mixed precision of
    ``TrainingArguments(bf16=True)``: the products and the activations they produce in bfloat16, the weights,
    their gradients and the optimizer state in float32, and the loss in float32 on the outputs cast back.
    The activations are what an epoch spends its time moving (every elementwise pass over a (batch x width)
    activation is memory-bound at batch 4096), so halving their bytes is what pays."""
    if bf16:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            mean, std = model(x)
        mean, std = mean.float(), std.float()
    else:
        mean, std = model(x)
    r = (dz - mean) / std
    return torch.stack([0.5 * r.pow(2).sum(), std.log().sum()]) / model.d


class BatchLoss:
    """:func:`batch_parts` as the loop calls it: eager, or ``torch.compile``-d (inductor; the backward through
    AOTAutograd) for the one batch shape that repeats.

    The compiled graph is specialised to ``rows`` rows (``dynamic=False``: no shape guards, no symbolic
    shapes); any other batch (the last, partial one of an epoch) runs eagerly, so every transition is still
    trained on exactly as in eager mode. With ``rows=None`` (per-process batch sizes that vary, e.g. the
    multi-process exact fit) one dynamic-shape graph serves all batches.
    """

    def __init__(self, model: HeadsOnInputs, compile: bool = False, rows: int | None = None, bf16: bool = False):
        self.model, self.rows, self.bf16 = model, rows, bf16
        self.compiled = None
        if compile:
            self.compiled = torch.compile(self._eager, dynamic=rows is None, fullgraph=True)

    def _eager(self, x: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
        return batch_parts(self.model, x, dz, self.bf16)

    def __call__(self, x: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
        if self.compiled is None or (self.rows is not None and x.shape[0] != self.rows):
            return self._eager(x, dz)
        try:
            return self.compiled(x, dz)
        except Exception as e:  # inductor needs a working C++ (CPU) or Triton (GPU) toolchain
            raise RuntimeError(f"compile=True: torch.compile of the training loss failed ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}). Fit without --compile / "
                               "compile=False (same result, eager speed).") from e


def _train_epoch(model: HeadsOnInputs, opt: torch.optim.Optimizer, data, env, epoch: int,
                 loss: BatchLoss | None = None) -> tuple[int, torch.Tensor]:
    """One pass over the global batches; returns (transitions seen, summed [drift, diffusion] parts)."""
    params = model.params
    loss = loss or BatchLoss(model)
    seen, sums = 0, torch.zeros(2, dtype=torch.float64)
    sync = env.world_size > 1
    for batch, count in data.batches(epoch):
        for p in params:
            p.grad = None
        if batch is not None and len(batch):
            parts = loss(batch.x, batch.dz)
            (parts.sum() / (count or 1)).backward()
            parts = parts.detach()
        else:
            parts = torch.zeros(2)
        if sync or count is None:
            count, parts = _sync(params, parts, 0 if batch is None else len(batch), count, env)
            if count == 0:  # stream mode: every process is out of batches
                break
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        seen += count
        sums += parts
    return seen, sums


def train_heads(model: HeadsOnInputs, data, env, has_es: bool, epochs, *, lr: float, weight_decay: float,
                patience: int, evaluate: Callable, compile: bool = False,
                bf16: bool = False) -> tuple[dict[str, list[float]], int]:
    """AdamW with a cosine schedule and early stopping on the early-stopping data (else the training loss);
    the best state (epoch -1: the OU starting point) is restored. Returns (history, best epoch).
    ``bf16``: the training batches' forward under bfloat16 autocast (:func:`batch_parts`), so the ``train_*``
    history is that forward's loss; the evaluations that early stopping compares run outside autocast (without
    early-stopping data it compares those training losses).
    ``compile``: :class:`BatchLoss` compiles the per-batch loss for ``data.full_rows``-row batches."""
    opt = make_optimizer(model.heads, lr, weight_decay)
    loss = BatchLoss(model, compile, data.full_rows, bf16)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(len(epochs), 1), eta_min=lr * 0.05)
    history: dict[str, list[float]] = {f"{s}_{p}": [] for s in ("train", "val") for p in ("total", "drift", "diffusion")}
    history["early_stopping"] = []

    def monitor(train_total: float) -> float:
        es = evaluate(model, data.chunks("es"), env) if has_es else None
        return es["total"] if es is not None and es["count"] > 0 else train_total

    best, bad = (monitor(math.inf), -1, model.state()), 0
    for epoch in epochs:
        seen, sums = _train_epoch(model, opt, data, env, epoch, loss)
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
