"""Simulating the fitted SDE ``dZ = mu(Z, t) dt + sigma(Z, t) dW`` forward from given states.

The default scheme is batched Euler-Maruyama in plain torch, which at the heads' own step ``dt = 1/T``
is exactly the transition model the heads were fitted with (``Z_{k+1} | Z_k ~ N(Z_k + mu dt, sigma^2 dt)``).
Milstein and stochastic Runge-Kutta go through `torchsde <https://github.com/google-research/torchsde>`_,
an optional dependency (``pip install hf-sde[sde]``), imported only when asked for.

Anything that has ``forward(z, t) -> (mu*dt, sigma*sqrt(dt))`` in increment units and a ``dt`` simulates:
:class:`~hf_sde.heads.SDEHeads` directly, the OU / Brownian baselines through :class:`BaselineSDE`.

Example:
    >>> paths = simulate(heads, z0, steps=255, n_paths=8, seed=0)          # (8 * B, 256, d)
    >>> ou_paths = simulate(BaselineSDE(result.baselines["ou"], heads.config.horizon), z0, seed=0)
"""

from __future__ import annotations

import math

import torch
from torch import nn

METHODS = ("euler", "milstein", "srk")


class BaselineSDE(nn.Module):
    """Wrap a fitted baseline (:class:`~hf_sde.fitting.OUBaseline` or ``BrownianBaseline``) as an SDE.

    The baselines predict ``(mean, std)`` of the next increment in increment units for a horizon ``T``;
    this adapter adds the ``dt``, ``drift`` / ``diffusion`` (time units) and torchsde's ``f`` / ``g`` that
    :func:`simulate` and :mod:`hf_sde.analysis` use for :class:`~hf_sde.heads.SDEHeads`.
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, baseline, horizon: float):
        super().__init__()
        if not hasattr(baseline, "predict"):
            raise TypeError(f"{type(baseline).__name__} has no predict(z, t); pass an OUBaseline or BrownianBaseline.")
        self.baseline = baseline
        self.horizon = float(horizon)

    @property
    def dt(self) -> float:
        return 1.0 / self.horizon

    def forward(self, z: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).expand(z.shape[:-1])
        mean, std = self.baseline.predict(z, t)
        return mean.to(z.dtype), std.to(z.dtype)

    def drift(self, z: torch.Tensor, t) -> torch.Tensor:
        return self(z, t)[0] / self.dt

    def diffusion(self, z: torch.Tensor, t) -> torch.Tensor:
        return self(z, t)[1] / math.sqrt(self.dt)

    def f(self, t, y):
        return self.drift(y, t)

    def g(self, t, y):
        return self.diffusion(y, t)


def as_sde(model, horizon: float | None = None):
    """``model`` as something :func:`simulate` accepts: SDEHeads / BaselineSDE as they are, baselines wrapped."""
    if hasattr(model, "predict") and not isinstance(model, nn.Module):
        if horizon is None:
            raise ValueError(f"Simulating a {type(model).__name__} needs horizon=T (e.g. heads.config.horizon).")
        return BaselineSDE(model, horizon)
    if not hasattr(model, "dt"):
        raise TypeError(f"{type(model).__name__} is not an SDE: it needs forward(z, t) -> (mu*dt, sigma*sqrt(dt)) and dt.")
    return model


def _generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator | None:
    if generator is not None:
        return generator
    if seed is not None:
        return torch.Generator().manual_seed(int(seed))
    return None


def _torchsde():
    try:
        import torchsde
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "method='milstein' and method='srk' use torchsde, which is not installed: "
            "pip install hf-sde[sde]  (or: pip install torchsde). method='euler' needs nothing extra."
        ) from e
    return torchsde


def simulate(
    heads,
    z0: torch.Tensor,
    steps: int | None = None,
    n_paths: int = 1,
    method: str = "euler",
    t0: float = 0.0,
    dt: float | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    horizon: float | None = None,
) -> torch.Tensor:
    """Simulate sample paths of the SDE from ``z0``.

    Args:
        heads: :class:`~hf_sde.heads.SDEHeads`, a :class:`BaselineSDE`, or a bare ``OUBaseline`` /
            ``BrownianBaseline`` (then ``horizon`` is required).
        z0: start state(s) in SDE coordinates, ``(d,)`` or ``(B, d)``.
        steps: number of time steps (default: ``round(T)``, one horizon).
        n_paths: independent paths per start state.
        method: ``"euler"`` (Euler-Maruyama, plain torch), ``"milstein"`` or ``"srk"`` (torchsde, Ito).
        t0: start time in SDE time units (``t_k = k / T``; a path starting at token position ``k`` has
            ``t0 = k / T``).
        dt: step size in time units (default: the heads' ``dt = 1/T``, where Euler reproduces the fitted
            transition model exactly).
        generator: randomness; wins over ``seed``.
        seed: randomness when no ``generator`` is given (for torchsde methods the seed is the Brownian
            interval's entropy, taken from the generator when only that is given).
        horizon: ``T`` for bare baselines.

    Returns:
        A tensor ``(B * n_paths, steps + 1, d)`` (``B = 1`` for a ``(d,)`` start): row ``b * n_paths + j``
        is path ``j`` from start ``b``, and ``[:, k]`` is the state at time ``t0 + k * dt``; ``[:, 0]`` is
        the start. No gradient is kept. Paths are returned as computed: a drift that explodes far from the
        data gives non-finite values rather than an error.
    """
    sde = as_sde(heads, horizon)
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
    if n_paths < 1:
        raise ValueError(f"n_paths must be >= 1, got {n_paths}")
    h = float(sde.dt)
    step = h if dt is None else float(dt)
    if step <= 0:
        raise ValueError(f"dt must be positive, got {step}")
    if steps is None:
        steps = int(round(1.0 / h))
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    z = _start_states(sde, z0, n_paths)
    gen = _generator(generator, seed)
    if method == "euler":
        return _euler_maruyama(sde, z, steps, t0, step, h, gen)
    return _torchsde_paths(sde, z, steps, t0, step, method, seed, gen)


def _start_states(sde, z0, n_paths: int) -> torch.Tensor:
    """``z0`` as ``(B * n_paths, d)`` on the SDE's device and floating dtype (float32 without parameters)."""
    z0 = torch.as_tensor(z0)
    if z0.dim() == 1:
        z0 = z0.unsqueeze(0)
    if z0.dim() != 2:
        raise ValueError(f"z0 must have shape (d,) or (B, d), got {tuple(z0.shape)}")
    params = list(sde.parameters()) if isinstance(sde, nn.Module) else []
    dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
    device = params[0].device if params else z0.device
    return z0.to(device=device, dtype=dtype).repeat_interleave(n_paths, dim=0)


def _euler_maruyama(sde, z: torch.Tensor, steps: int, t0: float, step: float, h: float, gen) -> torch.Tensor:
    """Euler-Maruyama paths ``(N, steps + 1, d)``: the fitted transition ``(mean, std)`` per ``h``, rescaled to ``step``."""
    scale_mean, scale_std = step / h, math.sqrt(step / h)
    out = torch.empty(z.shape[0], steps + 1, z.shape[1], dtype=z.dtype, device=z.device)
    out[:, 0] = z
    with torch.no_grad():
        for k in range(steps):
            mean, std = sde(z, t0 + k * step)
            noise = torch.randn(z.shape, generator=gen, dtype=z.dtype).to(z.device)
            z = z + mean * scale_mean + std * scale_std * noise
            out[:, k + 1] = z
    return out


def _torchsde_paths(sde, z: torch.Tensor, steps: int, t0: float, step: float, method: str, seed, gen) -> torch.Tensor:
    """torchsde (``milstein`` / ``srk``, Ito) paths ``(N, steps + 1, d)`` on a seeded Brownian interval."""
    torchsde = _torchsde()
    dtype, device = z.dtype, z.device
    ts = torch.tensor([t0 + k * step for k in range(steps + 1)], dtype=dtype, device=device)
    if steps == 0:
        return z.unsqueeze(1).detach()
    entropy = int(seed) if seed is not None else (
        int(torch.randint(0, 2**31 - 1, (1,), generator=gen)) if gen is not None else None)
    bm = torchsde.BrownianInterval(
        t0=float(ts[0]), t1=float(ts[-1]), size=tuple(z.shape), dtype=dtype, device=device, entropy=entropy,
        levy_area_approximation="space-time" if method == "srk" else "none",
    )
    ys = torchsde.sdeint(sde, z, ts, bm=bm, method=method, dt=step)
    return ys.detach().permute(1, 0, 2).contiguous()
