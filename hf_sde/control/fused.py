"""The heads' step as a few dense calls, built once per (heads, device) and reused by every call
(:func:`fused_heads`: rebuilt when the heads' weights, calibration or device change)."""

from __future__ import annotations

import functools
import math
import operator
import weakref

import torch


def _linears(net: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in net.modules() if isinstance(m, torch.nn.Linear)]


NETS = ("drift", "diffusion")


class _FusedNet:
    """One head MLP (drift or diffusion) as dense calls: ``out = silu(...silu(t_row + z W)...) W_out + (z L + b)``.

    The first layer's time part and bias form a table row per time index; for the drift net the row also holds
    the output bias plus the linear drift's bias, and the first layer's ``z`` part and the linear drift are one
    ``(d, w + d)`` matrix added to that row in place, so a step starts with two calls. The diffusion net (no
    linear part) has a ``(n, w)`` table, a ``(d, w)`` first matrix and its output bias as a vector.
    """

    @torch.no_grad()
    def __init__(self, net: torch.nn.Module, linear: torch.nn.Linear | None, d: int, f32: dict):
        layers = _linears(net)
        first, out = layers[0], layers[-1]
        self.width = first.out_features
        self.skip = d if linear is not None else 0          # columns of the linear drift after the first layer
        parts = [first.weight[:, :d]] + ([linear.weight] if linear is not None else [])
        self.first = torch.cat(parts).T.contiguous().to(**f32)                         # (d, w + skip)
        self._w_t = first.weight[:, d:].detach().T.to(**f32)                                     # (1 + 2F, w)
        self._b1 = first.bias.detach().to(**f32)
        self.b_out = (out.bias + (linear.bias if linear is not None else 0)).detach().to(**f32)
        self.hidden = [(a.weight.T.contiguous().to(**f32), a.bias.detach().to(**f32)) for a in layers[1:-1]]
        self.out_w = out.weight.T.contiguous().to(**f32)                                # (w, d)
        self.table: torch.Tensor | None = None

    def time_table(self, feats: torch.Tensor) -> torch.Tensor:
        """``(n, w + skip)``: ``[first layer's time part + bias | output bias]`` (the second part for the drift
        net only) for ``n`` time-feature rows."""
        row = torch.addmm(self._b1, feats, self._w_t)
        return torch.cat([row, self.b_out.expand(feats.shape[0], -1)], 1) if self.skip else row


class _FusedHeads:
    """The heads' step as a few dense calls per net on the model's device (shared by calls: :func:`fused_heads`).

    ``z = (h - m) @ (P / s)`` is one matmul; each net (:class:`_FusedNet`) then runs on its own, so a step runs
    only the nets its control reads (the diffusion net for the temperature, the drift net for drift steering) and
    the rest runs once over all steps when the trace is built. It equals ``heads(heads.project(h),
    heads.times(k))`` up to float rounding (tests/test_control_fused.py).
    """

    @torch.no_grad()
    def __init__(self, heads, device: torch.device, n_times: int):
        cfg = heads.config
        f32 = dict(device=device, dtype=torch.float32)
        d = self.d = cfg.proj_dim
        self.mean = heads.proj_mean.to(**f32)
        self.basis = (heads.proj_basis.double() / heads.proj_scale.double()).to(**f32)  # (D, d)
        self.nets = {"drift": _FusedNet(heads.drift_net, heads.drift_linear, d, f32),
                     "diffusion": _FusedNet(heads.diffusion_net, None, d, f32)}
        self.time_origin, self.horizon = getattr(cfg, "time_origin", "sequence"), float(cfg.horizon)
        self.time_tables(heads, n_times)
        self.lift = (heads.proj_basis * heads.proj_scale).T.contiguous().to(**f32)  # (d, D): v = dz @ lift
        # Scalars as 0-dim tensors: a Python number in a tensor op is wrapped into a new tensor at every call.
        scalar = functools.partial(torch.tensor, **f32)
        self.sigma_floor = scalar(cfg.sigma_floor)
        # diffusion s = ||sigma sqrt(dt)|| / sqrt(d dt); drift norm ||mu|| = ||mu dt|| / dt.
        self.diffusion_scale, self.drift_scale = scalar(1.0 / math.sqrt(d * cfg.dt)), scalar(1.0 / cfg.dt)
        # zscore = (log s - mean) / std = log s * z_scale + z_shift.
        self.z_scale = 1.0 / float(cfg.log_diffusion_std)
        self.z_shift = scalar(-float(cfg.log_diffusion_mean) * self.z_scale)

    @torch.no_grad()
    def time_tables(self, heads, n: int) -> None:
        """Each net's table over time indices ``0..n-1`` (grown with the step buffers). ``heads``: the heads this
        was built from (not kept here: the cache holds fused copies weakly by their heads)."""
        # The features are computed where the heads live (their frequencies), then moved to the model's device.
        k = torch.arange(n, device=heads.frequencies.device)
        feats = heads.time_features(k.to(torch.float32) / self.horizon).to(self.mean)
        for net in self.nets.values():
            net.table = net.time_table(feats)

    @property
    def n_times(self) -> int:
        return self.nets["drift"].table.shape[0]


_SETTINGS = ("proj_dim", "horizon", "dt", "sigma_floor", "log_diffusion_mean", "log_diffusion_std", "time_origin")


class _Built:
    """What one fused copy was built from, checked before every reuse: the heads' module tree (every entry of every
    module's ``_modules`` / ``_parameters`` / ``_buffers``, by identity, and how many each holds: a replaced or added
    module or tensor shows), the state of each tensor (in-place version counter, storage, shape, dtype:
    ``p.data = ...`` keeps the tensor and its version but not its storage), and the config's calibration and time
    settings. Flat lists, so a check is a few microseconds (walking ``heads.modules()`` costs more)."""

    def __init__(self, heads, fused: _FusedHeads):
        modules = list(heads.modules())
        self.dicts = [d for m in modules for d in (m._modules, m._parameters, m._buffers)]
        self.sizes = list(map(len, self.dicts))
        entries = [(d, key, value) for d in self.dicts for key, value in d.items()]
        self.owners, self.keys, self.values = (list(x) for x in zip(*entries, strict=True))
        self.tensors = [t for m in modules for d in (m._parameters, m._buffers) for t in d.values() if t is not None]
        self.states = list(map(_state, self.tensors))
        self.root = heads._modules
        self.settings = _settings(heads)
        self.fused = fused

    def matches(self, heads) -> bool:
        return (heads._modules is self.root
                and list(map(len, self.dicts)) == self.sizes
                and all(map(operator.is_, map(dict.get, self.owners, self.keys), self.values))
                and list(map(_state, self.tensors)) == self.states
                and _settings(heads) == self.settings)


def _state(t: torch.Tensor) -> tuple:
    return t._version, t.data_ptr(), t.shape, t.dtype


def _settings(heads) -> tuple:
    return tuple(getattr(heads.config, name, None) for name in _SETTINGS)


# heads -> {device: _Built}; weak, so the fused copies go with the heads.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fused_heads(heads, device: torch.device, n_times: int) -> _FusedHeads:
    """The fused step of ``heads`` on ``device`` with time tables of at least ``n_times`` rows.

    Built once and reused by later calls with the same heads and device: a repeated ``generate`` call pays no
    set-up. Rebuilt when any weight or buffer of the heads was replaced or changed in place (another tensor, or
    its version counter moved), when the calibration or time settings in its config changed, or for another
    device.
    """
    device = torch.device(device)
    per_device = _CACHE.setdefault(heads, {})
    built = per_device.get(device)
    if built is not None and built.matches(heads):
        if built.fused.n_times < n_times:
            built.fused.time_tables(heads, n_times)
        return built.fused
    fused = _FusedHeads(heads, device, n_times)
    per_device[device] = _Built(heads, fused)
    return fused
