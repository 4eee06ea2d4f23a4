"""The SDE baselines every fit reports: Brownian motion and Ornstein-Uhlenbeck, fitted by maximum likelihood.

Both are built from summed sufficient statistics of the training transitions (:class:`TransitionStats`:
count, sums of ``dz`` and ``dz^2``, ``X^T X`` and ``X^T dz`` with ``X = [z, 1]``). Sums add across chunks and
across processes, so one process and N processes (or one pass over shards) produce the same baselines.
(The decoding baselines, e.g. EDT, are logits processors: :mod:`hf_sde.processors`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: The smallest per-dimension std a baseline reports (a constant dimension would give -inf NLL).
MIN_STD = 1e-6


@dataclass
class TransitionStats:
    """Sufficient statistics of transitions ``(z, dz)`` for both baselines, in float64; ``a + b`` pools them."""

    n: torch.Tensor        # () count
    sum_dz: torch.Tensor   # (d,)
    sum_dz2: torch.Tensor  # (d,)
    xtx: torch.Tensor      # (d + 1, d + 1), X = [z, 1]
    xtdz: torch.Tensor     # (d + 1, d)

    @classmethod
    def zeros(cls, d: int) -> TransitionStats:
        f = torch.float64
        return cls(torch.zeros((), dtype=f), torch.zeros(d, dtype=f), torch.zeros(d, dtype=f),
                   torch.zeros(d + 1, d + 1, dtype=f), torch.zeros(d + 1, d, dtype=f))

    @classmethod
    def of(cls, z: torch.Tensor, dz: torch.Tensor) -> TransitionStats:
        x = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], dim=1).double()
        dz = dz.double()
        return cls(torch.tensor(float(z.shape[0]), dtype=torch.float64), dz.sum(0), dz.pow(2).sum(0), x.T @ x,
                   x.T @ dz)

    def __add__(self, other: TransitionStats) -> TransitionStats:
        return TransitionStats(*(a + b for a, b in zip(self._fields(), other._fields(), strict=True)))

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return self.n, self.sum_dz, self.sum_dz2, self.xtx, self.xtdz

    def all_reduce(self, env) -> TransitionStats:
        """The statistics summed over every process of ``env`` (one collective call)."""
        flat = env.all_reduce_(torch.cat([f.flatten() for f in self._fields()]))
        out, off = [], 0
        for f in self._fields():
            out.append(flat[off:off + f.numel()].view_as(f))
            off += f.numel()
        return TransitionStats(*out)


@dataclass
class BrownianBaseline:
    """Brownian motion with constant drift and per-dimension sigma (maximum likelihood)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, tr) -> BrownianBaseline:
        """Fit on transitions (anything with ``z`` and ``dz``)."""
        return cls.from_stats(TransitionStats.of(tr.z, tr.dz))

    @classmethod
    def from_stats(cls, s: TransitionStats) -> BrownianBaseline:
        mean = s.sum_dz / s.n
        var = (s.sum_dz2 / s.n - mean.pow(2)).clamp_min(0)
        return cls(mean.float(), var.sqrt().float().clamp_min(MIN_STD))

    def predict(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean.expand_as(z), self.std.expand_as(z)


@dataclass
class OUBaseline:
    """Ornstein-Uhlenbeck: linear drift ``A z + b`` by least squares, constant per-dimension sigma."""

    weight: torch.Tensor  # (d + 1, d): [A^T; b]
    std: torch.Tensor

    @classmethod
    def fit(cls, tr, ridge: float = 1e-6) -> OUBaseline:
        """Fit on transitions (anything with ``z`` and ``dz``)."""
        return cls.from_stats(TransitionStats.of(tr.z, tr.dz), ridge)

    @classmethod
    def from_stats(cls, s: TransitionStats, ridge: float = 1e-6) -> OUBaseline:
        """Normal equations, then the residual moments expanded in the same sums (no second pass)."""
        eye = torch.eye(s.xtx.shape[0], dtype=torch.float64)
        w = torch.linalg.solve(s.xtx + ridge * s.n * eye, s.xtdz)
        # sum_k r_kj^2 = sum dz_j^2 - 2 w_j . (X^T dz)_j + w_j^T X^T X w_j, and sum_k r_kj = sum dz_j - w_j . sum x.
        ssr = s.sum_dz2 - 2 * (w * s.xtdz).sum(0) + (w * (s.xtx @ w)).sum(0)
        r_mean = (s.sum_dz - w.T @ s.xtx[-1]) / s.n
        var = (ssr / s.n - r_mean.pow(2)).clamp_min(0)
        return cls(w.float(), var.sqrt().float().clamp_min(MIN_STD))

    def predict(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = z @ self.weight[:-1] + self.weight[-1]
        return mean, self.std.expand_as(mean)

    @property
    def matrix(self) -> torch.Tensor:
        """``A`` in increment units (``dz ~ A z + b``)."""
        return self.weight[:-1].T

    @property
    def bias(self) -> torch.Tensor:
        return self.weight[-1]
