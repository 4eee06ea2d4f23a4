"""Decoding-time SDE control: ``model.generate(..., sde_control=SDEControl(heads, ...))``.

Per decoding step, one forward hook at the heads' layer reads the hidden state of the newest position and
runs the fused step (:class:`_FusedHeads`): one matmul for the projection, then only the nets the step reads
(the diffusion net for the temperature or a gate, the drift net for drift steering, both for a live callback,
none otherwise), each as a few
dense calls with its time features looked up in a table built once per call. Statistics are computed in a work
row whose views are bound once and saved into buffers preallocated per call; the nets no step reads run once
over all steps when the trace is built. Nothing in the step path reads a tensor value on the host, so it never waits for the
device. In temperature modes the step's temperature divides the LM head's input where that equals dividing the
logits (:func:`_temperature_head`), else a logits processor divides the logits; a hook (the same one when the
layers coincide) adds a steering vector to the newest position only, so positions already in the KV cache
are never steered twice. Everything is installed for one ``generate`` call and removed afterwards, even when
generation raises. A forward that ``generate`` would compile (``compile_config``, static cache on GPU) runs
eagerly for SDE calls, since dynamo does not call module hooks added after it traced a forward. Only this
module (plus heads.py, layers.py, version.py) is copied by the custom_generate export, so it imports nothing
else from hf_sde.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import os
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .heads import SDEHeads
from .layers import register_block_hook, resolve_layer

MODES = ("observe", "temperature", "steer", "temperature+steer")
GATES = ("always", "threshold", "sigmoid")
TIME_ORIGINS = ("sequence", "prompt_end")
# Rows of the per-call statistics buffer, in SDETrace's field order (surprise is computed once, at the end).
_STATS = ("diffusion", "zscore", "drift_norm", "temperature", "steer_norm")


@dataclass
class SDETrace:
    """Per-step statistics, each ``(batch, new_tokens)``; NaN after a row's EOS.

    Step ``k`` is the state that produced new token ``k``; ``positions[:, k]`` is that state's token position
    (-1 after EOS). The heads' time is ``t = positions / T`` for ``time_origin="sequence"`` heads and ``t = k / T``
    for ``"prompt_end"`` heads. ``surprise[:, k]`` is the standardized NLL of the increment from step ``k`` to
    ``k + 1`` (so the last step has none).
    """

    diffusion: torch.Tensor
    zscore: torch.Tensor
    drift_norm: torch.Tensor
    temperature: torch.Tensor
    steer_norm: torch.Tensor
    surprise: torch.Tensor
    positions: torch.Tensor

    def to_dict(self) -> dict[str, list]:
        return {f.name: getattr(self, f.name).tolist() for f in fields(self)}

    def __getitem__(self, row: int) -> SDETrace:
        return SDETrace(*(getattr(self, f.name)[row: row + 1] for f in fields(self)))


@dataclass
class SDEStep:
    """What a streaming ``callback`` receives at every step (tensors of shape ``(batch,)``, on the model's device)."""

    index: int
    diffusion: torch.Tensor
    zscore: torch.Tensor
    drift_norm: torch.Tensor
    temperature: torch.Tensor
    steer_norm: torch.Tensor
    surprise_previous: torch.Tensor | None


@dataclass
class SDEGenerateOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` plus the SDE trace."""

    sde_trace: SDETrace | None = None


@dataclass
class SDEControl:
    """How the SDE heads observe or control one ``generate`` call (a reusable setting: it keeps no results).

    Args:
        heads: fitted :class:`SDEHeads` (or a folder / hub id to load them from).
        mode: ``"observe"`` (trace only), ``"temperature"``, ``"steer"`` or ``"temperature+steer"``.
        beta: temperature law ``tau = clip(temperature * exp(-beta * z), min_temperature, max_temperature)``;
            ``beta > 0`` cools sampling where the path is locally noisy, ``beta = 0`` is plain sampling.
            Under greedy decoding (``do_sample=False``) temperatures change nothing: a warning says so once.
        alpha: steering strength; ``h <- h + alpha * gate(z) * ||h|| * unit(v)`` at the newest position.
        direction: ``"drift"`` (``v = P mu``), ``"attractor"`` (``v = P (z* - z)``) or a hidden-size tensor.
        attractor: ``z*`` in SDE coordinates for ``direction="attractor"`` (default: the origin, i.e. the
            mean training state).
        gate: ``"always"``, ``"threshold"`` (steer where ``z > gate_threshold``) or ``"sigmoid"``
            (``sigmoid(gate_sharpness * (z - gate_threshold))``).
        steer_layer: decoder layer to steer (default: the heads' layer; must not precede it).
        callback: called with an :class:`SDEStep` at every step (live stats while streaming), from the forward
            hook as soon as the step's statistics exist: every logits processor of that step (the caller's
            ``logits_processor=`` included) runs after it, so a custom processor can read the current step.
        on_trace: called with the finished :class:`SDETrace` at the end of every call; the way to get the
            trace with ``return_dict_in_generate=False`` (e.g. ``traces = []; SDEControl(heads, on_trace=
            traces.append)``). With ``return_dict_in_generate=True`` it is also ``out.sde_trace``.

    Example:
        >>> enable_sde_control(model)
        >>> ctl = SDEControl(heads, mode="temperature", beta=1.0)
        >>> out = model.generate(**inputs, do_sample=True, sde_control=ctl, return_dict_in_generate=True)
        >>> out.sde_trace.temperature.shape   # (batch, new_tokens)
    """

    heads: SDEHeads | str | os.PathLike
    mode: str = "temperature"
    beta: float = 1.0
    temperature: float = 1.0
    min_temperature: float = 0.3
    max_temperature: float = 1.5
    alpha: float = 0.0
    direction: str | torch.Tensor = "drift"
    attractor: torch.Tensor | None = None
    gate: str = "always"
    gate_threshold: float = 1.0
    gate_sharpness: float = 4.0
    steer_layer: int | None = None
    callback: Callable[[SDEStep], None] | None = None
    on_trace: Callable[[SDETrace], None] | None = None

    def __post_init__(self):
        if isinstance(self.heads, (str, os.PathLike)):
            self.heads = SDEHeads.from_pretrained(os.fspath(self.heads))
        # Duck-typed so heads from an installed hf_sde work with an exported custom_generate copy and back.
        if not all(hasattr(self.heads, a) for a in ("project", "lift", "diffusion_magnitude", "config")):
            raise TypeError(f"heads must be SDEHeads or a path / repo id, got {type(self.heads).__name__}")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {MODES}")
        if self.gate not in GATES:
            raise ValueError(f"gate={self.gate!r} is not one of {GATES}")
        if not 0 < self.min_temperature <= self.max_temperature:
            raise ValueError(
                f"need 0 < min_temperature <= max_temperature, got {self.min_temperature}, {self.max_temperature}"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not all(math.isfinite(x) for x in (self.beta, self.alpha, self.temperature)):
            raise ValueError("beta, alpha and temperature must be finite numbers")
        if isinstance(self.direction, str) and self.direction not in ("drift", "attractor"):
            raise ValueError(f"direction must be 'drift', 'attractor' or a tensor, got {self.direction!r}")
        if isinstance(self.direction, torch.Tensor) and self.direction.shape != (self.heads.config.hidden_size,):
            raise ValueError(
                f"a steering vector must have shape ({self.heads.config.hidden_size},), got {tuple(self.direction.shape)}"
            )
        origin = getattr(self.heads.config, "time_origin", "sequence")
        if origin not in TIME_ORIGINS:
            raise ValueError(f"heads.config.time_origin={origin!r} is not one of {TIME_ORIGINS}")

    @property
    def controls_temperature(self) -> bool:
        return "temperature" in self.mode

    @property
    def steers(self) -> bool:
        return "steer" in self.mode

    def temperature_law(self, zscore: torch.Tensor) -> torch.Tensor:
        """``clip(tau_0 * exp(-beta * z), tau_min, tau_max)``."""
        tau = self.temperature * torch.exp(-self.beta * zscore)
        return tau.clamp(self.min_temperature, self.max_temperature)

    def steering_vector(self, mean: torch.Tensor, z: torch.Tensor, zscore: torch.Tensor, lift: Callable,
                        fixed: torch.Tensor | None = None, attractor: torch.Tensor | None = None) -> torch.Tensor:
        """``alpha * gate(z) * unit(v)`` per row (``(N, hidden)``): the steering step before it is scaled by ``||h||``.

        ``mean`` / ``z`` / ``zscore``: the heads' drift increment, state and z-score of the rows; ``lift`` maps SDE
        coordinates to hidden space (``heads.lift``, or a precomputed matrix product); ``fixed``: the unit vector
        of ``direction`` when it is a tensor (normalized here otherwise); ``attractor``: ``z*`` on the rows' device.
        The one implementation, used by ``generate`` and by the vLLM processor.
        """
        if isinstance(self.direction, torch.Tensor):
            unit = fixed if fixed is not None else self.direction.to(z) / self.direction.norm().clamp_min(1e-12)
            unit = unit.expand(z.shape[0], -1)
        else:
            if self.direction == "drift":
                v = lift(mean)
            else:
                target = attractor if attractor is not None else (
                    self.attractor.to(z) if self.attractor is not None else torch.zeros_like(z[0]))
                v = lift(target - z)
            unit = v.div_(torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min_(1e-12))
        return unit * (self.alpha if self.gate == "always" else self.alpha * self.gate_value(zscore).unsqueeze(-1))

    @staticmethod
    def steer_delta(step: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """What steering adds to ``state`` (float32 rows): ``step * ||state||`` (``step``: :meth:`steering_vector`)."""
        return step * torch.linalg.vector_norm(state, dim=-1, keepdim=True)

    def gate_value(self, zscore: torch.Tensor) -> torch.Tensor:
        if self.gate == "always":
            return torch.ones_like(zscore)
        if self.gate == "threshold":
            return (zscore > self.gate_threshold).to(zscore.dtype)
        return torch.sigmoid(self.gate_sharpness * (zscore - self.gate_threshold))


# ----- the fused step ----------------------------------------------------------------------------------
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
    """The heads' step as a few dense calls per net, built once per ``generate`` call on the model's device.

    ``z = (h - m) @ (P / s)`` is one matmul; each net (:class:`_FusedNet`) then runs on its own, so a step runs
    only the nets its control reads (the diffusion net for the temperature, the drift net for drift steering) and
    the rest runs once over all steps when the trace is built. It equals ``heads(heads.project(h),
    heads.times(k))`` up to float rounding (tests/test_control_fused.py).
    """

    @torch.no_grad()
    def __init__(self, heads, device: torch.device, n_times: int, time_origin: str, control: SDEControl):
        cfg = heads.config
        f32 = dict(device=device, dtype=torch.float32)
        d = self.d = cfg.proj_dim
        self.mean = heads.proj_mean.to(**f32)
        self.basis = (heads.proj_basis.double() / heads.proj_scale.double()).to(**f32)  # (D, d)
        self.nets = {"drift": _FusedNet(heads.drift_net, heads.drift_linear, d, f32),
                     "diffusion": _FusedNet(heads.diffusion_net, None, d, f32)}
        self.time_origin, self.horizon = time_origin, float(cfg.horizon)
        self._heads = heads
        self.time_tables(n_times)
        self.lift = (heads.proj_basis * heads.proj_scale).T.contiguous().to(**f32)  # (d, D): v = dz @ lift
        # Scalars as 0-dim tensors: a Python number in a tensor op is wrapped into a new tensor at every call.
        scalar = functools.partial(torch.tensor, **f32)
        self.sigma_floor = scalar(cfg.sigma_floor)
        # diffusion s = ||sigma sqrt(dt)|| / sqrt(d dt); drift norm ||mu|| = ||mu dt|| / dt.
        self.diffusion_scale, self.drift_scale = scalar(1.0 / math.sqrt(d * cfg.dt)), scalar(1.0 / cfg.dt)
        # zscore = (log s - mean) / std = log s * z_scale + z_shift.
        self.z_scale = 1.0 / float(cfg.log_diffusion_std)
        self.z_shift = scalar(-float(cfg.log_diffusion_mean) * self.z_scale)
        # The temperature law's ops (SDEControl.temperature_law) with these factors: bitwise the same values. (A
        # power of the norm would skip the log / exp, but differs from the law of the recorded z-score by 1e-4.)
        self.neg_beta, self.tau0 = scalar(-control.beta), scalar(control.temperature)
        self.tau_bounds = (control.min_temperature, control.max_temperature)

    @torch.no_grad()
    def time_tables(self, n: int) -> None:
        """Each net's table over time indices ``0..n-1`` (grown with the step buffers)."""
        k = torch.arange(n, device=self.mean.device)
        feats = self._heads.time_features(k.to(torch.float32) / self.horizon).to(self.mean)
        for net in self.nets.values():
            net.table = net.time_table(feats)

    @property
    def n_times(self) -> int:
        return self.nets["drift"].table.shape[0]


# A step's record is one row of 3d + 5 floats: z | mu dt | sigma sqrt(dt) | these statistics.
_COLS = ("diffusion", "drift_norm", "zscore", "temperature", "steer_norm")


def _column(d: int, name: str) -> int:
    """Where statistic ``name`` sits in a step's record."""
    return 3 * d + _COLS.index(name)


class _Rows:
    """Named views of a block of step records ``(N, 3d + 5)`` plus each net's work tensors over it.

    Bound once (for the current step, and for the deferred pass over all steps): a view costs microseconds,
    which the step path would otherwise pay a dozen times per token.
    """

    def __init__(self, block: torch.Tensor, fused: _FusedHeads, nets: tuple[str, ...]):
        d, n = fused.d, block.shape[0]
        e = functools.partial(torch.empty, device=block.device, dtype=torch.float32)
        self.block = block
        self.z, self.mean, self.std = block[:, :d], block[:, d:2 * d], block[:, 2 * d:3 * d]
        for name in _COLS:
            setattr(self, name, block[:, _column(d, name)])
        tau = _column(d, "temperature")
        self.tau = block[:, tau:tau + 1]                       # (N, 1): divides the logits
        self.dest = {"drift": self.mean, "diffusion": self.std}
        # Per net that runs over these rows: the first layer's output [pre-activation | output bias + linear
        # drift] (the diffusion net: the pre-activation, and its output bias as a vector), and a spare for the
        # hidden layers (they alternate between the pre-activation view and the spare).
        self.work = {}
        for name in nets:
            net = fused.nets[name]
            first = e(n, net.width + net.skip)
            out_base = first[:, net.width:] if net.skip else net.b_out
            self.work[name] = (first, first[:, :net.width], out_base, e(n, net.width))
        self.zero = torch.zeros(n, d, device=block.device) if "diffusion" in nets else None  # softplus's 0


@dataclass
class _StepBuffers:
    """Preallocated per call (first read): the records of every step and the current step's work space.

    The current step is computed in ``cur`` (views bound once) and copied into ``records`` with one copy when
    the next step starts (or the trace is built), after steering and the logits have used it.
    """

    records: torch.Tensor    # (capacity, batch, 3d + 5) float32
    positions: torch.Tensor  # (capacity, batch) long
    cur: _Rows               # the step being computed: (batch, 3d + 5)
    cur_positions: torch.Tensor  # (batch,) long
    centered: torch.Tensor   # (batch, D)

    @classmethod
    def allocate(cls, fused: _FusedHeads, nets: tuple[str, ...], batch: int, hidden_size: int, capacity: int,
                 base_temperature: float):
        dev = fused.basis.device
        width = 3 * fused.d + len(_COLS)
        cur = _Rows(torch.full((batch, width), float("nan"), device=dev), fused, nets)
        cur.temperature.fill_(base_temperature)
        cur.steer_norm.zero_()
        return cls(torch.empty(capacity, batch, width, device=dev), torch.full((capacity, batch), -1, device=dev,
                                                                                 dtype=torch.long),
                   cur, torch.zeros(batch, device=dev, dtype=torch.long),
                   torch.empty(batch, hidden_size, device=dev))

    @property
    def capacity(self) -> int:
        return self.records.shape[0]

    def save(self, k: int) -> None:
        """Copy the current step into record ``k``."""
        self.records[k].copy_(self.cur.block)
        self.positions[k].copy_(self.cur_positions)

    def stat(self, name: str, steps: slice | int) -> torch.Tensor:
        """One statistic of the records ``steps``: ``(n, batch)`` for a slice, ``(batch,)`` for one step."""
        return self.records[steps, :, _column(self.cur.z.shape[1], name)]

    def grown(self) -> _StepBuffers:
        """Twice the capacity (generate ran more steps than max_new_tokens said; rare, never per step)."""
        return _StepBuffers(torch.cat([self.records, torch.empty_like(self.records)]),
                            torch.cat([self.positions, torch.full_like(self.positions, -1)]),
                            self.cur, self.cur_positions, self.centered)


class SDETemperatureLogitsProcessor(LogitsProcessor):
    """Divides logits by the SDE temperature of the current step.

    Installed by ``generate(..., sde_control=...)`` in temperature modes; it reads
    the temperature the forward hook computed for this step. Runs after the other logits processors and
    before top-k / top-p / min-p, like the stock temperature.

    Example:
        >>> out = model.generate(**inputs, do_sample=True, top_p=0.9, sde_control=SDEControl(heads))
    """

    def __init__(self, runtime: _Runtime):
        self.runtime = runtime

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.runtime.on_logits(scores)

    # ``LogitsProcessorList`` calls ``inspect.signature`` on every processor at every step; a precomputed
    # ``__signature__`` (the one inspect would derive) makes that 3.5 instead of 10 us per step.
    __call__.__signature__ = inspect.signature(__call__)


@dataclass
class _CallSetup:
    """What one ``generate`` call fixes before the first forward (from the resolved generation config)."""

    prompt_width: int        # tokens of the prompt (1 for generation from BOS)
    returned_prompt: int     # prompt tokens in the returned sequences (0 for inputs_embeds only)
    capacity: int            # steps to preallocate (grown if generate runs more)
    base_temperature: float
    eos_ids: list[int]
    scores_private: bool = False  # no output_logits: the logits processor may divide the scores in place
    scale_head_input: bool = False  # the temperature divides the LM head's input (see _temperature_head)


def _nets_per_step(control: SDEControl) -> tuple[str, ...]:
    """The nets whose output a step of ``control`` reads before its token is sampled."""
    if control.callback is not None:  # live statistics: everything, every step
        return NETS
    need = set()
    if control.controls_temperature or (control.steers and control.gate != "always"):
        need.add("diffusion")
    if control.steers and isinstance(control.direction, str) and control.direction == "drift":
        need.add("drift")
    return tuple(n for n in NETS if n in need)


def _stats_per_step(control: SDEControl) -> tuple[str, ...]:
    """The nets whose statistics a step of ``control`` reads (the drift norm is read by callbacks only)."""
    if control.callback is not None:
        return NETS
    return ("diffusion",) if control.controls_temperature or (control.steers and control.gate != "always") else ()


class _Runtime:
    """The per-call state shared by the hooks and the logits processor (lives for one ``generate`` call)."""

    def __init__(self, control: SDEControl, model, setup: _CallSetup):
        self.control, self.model, self.setup = control, model, setup
        self.heads = control.heads
        self.read_layer = self.heads.config.layer
        self.steer_layer = resolve_layer(model, control.steer_layer) if control.steer_layer is not None else self.read_layer
        if control.steers and self.steer_layer < self.read_layer:
            raise ValueError(
                f"steer_layer={self.steer_layer} precedes the heads' layer {self.read_layer}: the steering direction "
                "is computed from the state at the heads' layer, so steer at that layer or a later one."
            )
        device = _model_device(model)
        self.origin = getattr(self.heads.config, "time_origin", "sequence")
        # One table row per position the call can reach (prompt_end needs fewer; positions are recorded anyway).
        self.fused = _FusedHeads(self.heads, device, setup.capacity + setup.prompt_width + 1, self.origin, control)
        self.attractor: torch.Tensor | None = None
        self.direction = self._fixed_direction(device)
        self.buf: _StepBuffers | None = None
        self.step = 0            # index of the next step to record
        self.current = -1        # index of the step being computed (read -> steer -> logits)
        self.consumed = 0        # prompt tokens forwarded so far (chunked prefill)
        self.prefilled = False
        self.partial_prefill = False
        self.positions: torch.Tensor | None = None
        self.unit: torch.Tensor | None = None
        self.handles: list = []
        # The nets a step needs now (what its control reads); the others run once over all steps in trace().
        self.now, self.stats_now = _nets_per_step(control), _stats_per_step(control)
        self.later = tuple(n for n in NETS if n not in self.now)
        self.stats_later = tuple(n for n in NETS if n not in self.stats_now)
        # Temperature applied to the LM head's input (a few hundred numbers per row) instead of the logits (the
        # vocabulary): set by install() where that gives the same scores (see _temperature_head).
        self.head_scaled = 0     # steps whose LM-head input was divided by their temperature

    def _fixed_direction(self, device) -> torch.Tensor | None:
        ctl = self.control
        if isinstance(ctl.direction, torch.Tensor):
            v = ctl.direction.to(device, torch.float32)
            return v / v.norm().clamp_min(1e-12)
        if ctl.direction == "attractor":
            target = ctl.attractor if ctl.attractor is not None else torch.zeros(self.fused.d)
            self.attractor = target.to(device, torch.float32)
        return None

    # -- hooks (no host sync below this line: tests/test_control_fused.py) ------------------------------
    def on_forward_pre(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        width = (ids if ids is not None else kwargs["inputs_embeds"]).shape[1]
        # A non-final chunk of a chunked prefill (generate(prefill_chunk_size=...)) ends before the newest
        # position, so it is neither read nor steered. Shapes only: no tensor value is read.
        if not self.prefilled:
            self.consumed += width
            self.prefilled = self.consumed >= self.setup.prompt_width
        self.partial_prefill = not self.prefilled
        position_ids = kwargs.get("position_ids")
        mask = kwargs.get("attention_mask")
        if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2:
            self.positions = position_ids[:, -1]  # what the model itself uses, whatever its mask looks like
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self.positions = mask.sum(-1) - 1
        else:  # no position ids and a 4D / per-layer-type dict mask (or none): count
            self.positions = None

    def on_read(self, hidden: torch.Tensor):
        if self.partial_prefill:
            return None
        k = self.current = self.step
        self.step += 1
        buf = self._buffers(hidden, k)
        if k:
            buf.save(k - 1)  # the previous step is complete (steered, logits processed)
        f, cur = self.fused, buf.cur
        torch.sub(hidden[:, -1], f.mean, out=buf.centered)  # float32 whatever the model's dtype
        torch.mm(buf.centered, f.basis, out=cur.z)
        pos = torch.clamp(self._positions(k, hidden), 0, f.n_times - 1, out=buf.cur_positions)
        for name in self.now:  # none for observe without a callback: the heads then run in trace()
            self._net_step(cur, name, pos if self.origin == "sequence" else k)
        for name in self.stats_now:
            self._stats(cur, name)
        if self.control.controls_temperature:
            self._temperature(cur)
        steered = None
        if self.control.steers:
            self._direction(cur)
            if self.steer_layer == self.read_layer:
                steered = self._steer(hidden)
        if self.control.callback is not None:
            # Here, not in the logits processor: every logits processor of this step (the caller's too) sees it.
            # The stats are views of the step's record, so a later steer layer's steer_norm shows up there
            # when the step is saved again.
            buf.save(k)
            self.control.callback(SDEStep(k, *(buf.stat(name, k) for name in _STATS), self._surprise_previous(k)))
        return steered

    def _net_step(self, rows: _Rows, name: str, time: torch.Tensor | int) -> None:
        """Net ``name`` (``"drift"`` / ``"diffusion"``) on ``rows.z`` (N, d) into ``rows.mean`` / ``rows.std``.

        ``time`` is the rows' time indices (N,) into the net's table, or one index shared by all rows. The one
        implementation of the step: per decoding step (N = batch) and, for the nets no control reads, once over
        every step of the call (N = steps * batch).
        """
        f = self.fused
        net = f.nets[name]
        first, act, out_base, spare = rows.work[name]
        if isinstance(time, int):
            first.copy_(net.table[time])
        else:
            torch.index_select(net.table, 0, time, out=first)
        first.addmm_(rows.z, net.first)               # [first layer | linear drift + output bias]
        torch.nn.functional.silu(act, inplace=True)
        for w, b in net.hidden:
            torch.addmm(b, act, w, out=spare)
            torch.nn.functional.silu(spare, inplace=True)
            act, spare = spare, act
        out = rows.dest[name]
        torch.addmm(out_base, act, net.out_w, out=out)
        if name == "diffusion":
            torch.logaddexp(out, rows.zero, out=out)  # softplus
            out.add_(f.sigma_floor)

    def _stats(self, rows: _Rows, name: str) -> None:
        """The statistics of net ``name``'s output: the drift norm, or the diffusion magnitude and its z-score."""
        f = self.fused
        if name == "drift":
            torch.linalg.vector_norm(rows.mean, dim=-1, out=rows.drift_norm).mul_(f.drift_scale)
            return
        torch.linalg.vector_norm(rows.std, dim=-1, out=rows.diffusion).mul_(f.diffusion_scale)
        torch.log(rows.diffusion, out=rows.zscore)
        torch.add(f.z_shift, rows.zscore, alpha=f.z_scale, out=rows.zscore)

    def _temperature(self, rows: _Rows) -> None:
        """:meth:`SDEControl.temperature_law` of the rows' z-score, with the same ops (bitwise the same values)."""
        f = self.fused
        torch.mul(rows.zscore, f.neg_beta, out=rows.temperature).exp_().mul_(f.tau0).clamp_(*f.tau_bounds)

    def _run_deferred(self, n: int) -> None:
        """The nets and statistics no step read, over the ``n`` recorded steps at once (the same calls, N = n * batch)."""
        buf = self.buf
        batch = buf.records.shape[1]
        rows = _Rows(buf.records[:n].view(n * batch, -1), self.fused, self.later)
        if self.origin == "sequence":
            time = buf.positions[:n].reshape(-1)
        else:  # prompt_end: step k's time index is k for every sequence
            time = torch.arange(n, device=buf.positions.device).repeat_interleave(batch)
        for name in self.later:
            self._net_step(rows, name, time)
        for name in self.stats_later:
            self._stats(rows, name)

    def _direction(self, cur: _Rows) -> None:
        self.unit = self.control.steering_vector(cur.mean, cur.z, cur.zscore, lambda v: v @ self.fused.lift,
                                                 fixed=self.direction, attractor=self.attractor)

    def on_steer(self, hidden: torch.Tensor):
        if self.partial_prefill:
            return None
        return self._steer(hidden)

    def _steer(self, hidden: torch.Tensor) -> torch.Tensor:
        last = hidden[:, -1].float()
        delta = SDEControl.steer_delta(self.unit, last)
        torch.linalg.vector_norm(delta, dim=-1, out=self.buf.cur.steer_norm)
        out = hidden.clone()
        if out.dtype == torch.float32:
            out[:, -1].add_(delta)  # the same sum as below, without a temporary
        else:
            out[:, -1] = last + delta
        return out

    def on_head_input(self, _module, args):
        """LM-head pre-hook (where :func:`_temperature_head` allows it): divide its input by the temperature."""
        if self.partial_prefill or self.current < 0:
            return None
        self.head_scaled += 1
        hidden = args[0]
        return (hidden / self.buf.cur.tau.unsqueeze(-1), *args[1:])

    def on_logits(self, scores: torch.Tensor) -> torch.Tensor:
        k = self.current
        if k < 0:
            raise RuntimeError("SDE control saw logits without a hidden state for this step (unsupported decoding).")
        if self.control.controls_temperature:
            tau = self.buf.cur.tau if scores.dtype == torch.float32 else self.buf.cur.tau.to(scores.dtype)
            # In place when nothing else holds these scores (generate keeps raw logits only for output_logits).
            scores = scores.div_(tau) if self.setup.scores_private else scores / tau
        self.current = -1
        return scores

    # -- helpers ----------------------------------------------------------------------------------------
    def _positions(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.positions is not None:
            return self.positions
        return self.buf.positions.new_full((hidden.shape[0],), self.setup.prompt_width - 1 + k)

    def _buffers(self, hidden: torch.Tensor, k: int) -> _StepBuffers:
        if self.buf is None:
            self.buf = _StepBuffers.allocate(self.fused, self.now, hidden.shape[0], hidden.shape[-1], self.setup.capacity,
                                             self.setup.base_temperature)
        while k >= self.buf.capacity:
            self.buf = self.buf.grown()
            self.fused.time_tables(self.buf.capacity + self.setup.prompt_width + 1)
        return self.buf

    def _surprise_previous(self, k: int) -> torch.Tensor | None:
        if k == 0:
            return None
        rec, d = self.buf.records, self.fused.d
        prev = rec[k - 1]
        return self.heads.surprise(rec[k, :, :d] - prev[:, :d], prev[:, d:2 * d], prev[:, 2 * d:3 * d])

    # -- install / remove -----------------------------------------------------------------------------
    def install(self, head: torch.nn.Module | None = None) -> None:
        """Add the hooks; ``head``: the LM head whose input takes the temperature (see :func:`_temperature_head`)."""
        # Under a compiled forward (generate's compile_config, torch.compile) the hooks run eagerly between
        # compiled pieces: they keep Python state that dynamo would otherwise specialize on at every step.
        disable = torch.compiler.disable
        self.handles.append(self.model.register_forward_pre_hook(disable(self.on_forward_pre), with_kwargs=True))
        self.handles.append(register_block_hook(self.model, self.read_layer, disable(self.on_read)))
        if self.control.steers and self.steer_layer != self.read_layer:
            self.handles.append(register_block_hook(self.model, self.steer_layer, disable(self.on_steer)))
        if head is not None and self.control.controls_temperature:
            self.handles.append(head.register_forward_pre_hook(disable(self.on_head_input)))

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def trace(self, sequences: torch.Tensor) -> SDETrace:
        """The statistics of the returned tokens, by field name; NaN (positions -1) after each row's EOS."""
        # transformers may run one more step than it returns (the deferred stop check undoes it, on MPS), so
        # keep only the steps whose tokens came back.
        generated = max(sequences.shape[1] - self.setup.returned_prompt, 0)
        if self.step < generated:
            raise RuntimeError(
                f"The SDE hooks saw {self.step} of {generated} decoding steps: the model's forward ran without them "
                "(a torch.compile'd forward traced before they were installed does not call hooks added later). "
                "Generate with SDE control on an uncompiled forward (generate's own compile_config is handled: that "
                "call runs eagerly)."
            )
        if self.setup.scale_head_input and self.control.controls_temperature and self.head_scaled < self.step:
            raise RuntimeError(
                f"The SDE temperature reached the LM head in {self.head_scaled} of {self.step} steps: this model "
                "computes its logits without calling get_output_embeddings() as a module, so the sampled tokens did "
                "not get the SDE temperature. Please report the model; meanwhile pass any logits_processor (the "
                "temperature then divides the logits)."
            )
        n = min(self.step, generated)
        rows = sequences.shape[0] if self.buf is None else self.buf.records.shape[1]
        if n == 0 or self.buf is None:
            empty = torch.zeros(rows, 0)
            return SDETrace(**{name: empty.clone() for name in (*_STATS, "surprise")}, positions=empty.long())
        buf, d = self.buf, self.fused.d
        buf.save(self.step - 1)
        if self.later or self.stats_later:
            self._run_deferred(n)
        stats = {name: buf.stat(name, slice(n)).T.float().cpu() for name in _STATS}
        surprise = torch.full((rows, n), float("nan"))
        if n > 1:
            rec = buf.records[:n]
            out = rec[: n - 1]
            surprise[:, : n - 1] = self.heads.surprise(rec[1:, :, :d] - rec[:-1, :, :d], out[..., d:2 * d],
                                                       out[..., 2 * d:3 * d]).T.cpu()
        positions = buf.positions[:n].T.cpu()
        new = sequences[:, self.setup.returned_prompt: self.setup.returned_prompt + n].cpu()
        if self.setup.eos_ids:
            is_eos = torch.isin(new, torch.tensor(self.setup.eos_ids)).long()
            finished_at = torch.cumsum(is_eos, dim=1) > 0
            finished_before = (torch.cumsum(is_eos, dim=1) - is_eos) > 0  # the EOS step itself is kept
        else:
            finished_at = finished_before = torch.zeros(rows, n, dtype=torch.bool)
        stats = {k: v.masked_fill(finished_before, float("nan")) for k, v in stats.items()}
        # A step's surprise needs the next state, which does not exist at or after EOS.
        return SDETrace(**stats, surprise=surprise.masked_fill(finished_at, float("nan")),
                        positions=positions.masked_fill(finished_before, -1))


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@contextlib.contextmanager
def sde_hooks(model, control: SDEControl, setup: _CallSetup | None = None, *, prompt_width: int = 1,
              max_new_tokens: int = 256, base_temperature: float = 1.0):
    """Install the SDE hooks for one generation; always removes them. Yields the runtime.

    ``sde_generate`` passes its resolved ``setup``; direct users give the prompt width and step budget.
    """
    setup = setup or _CallSetup(prompt_width, prompt_width, max_new_tokens + 1, base_temperature, [])
    runtime = _Runtime(control, model, setup)
    runtime.install(model.get_output_embeddings() if setup.scale_head_input else None)
    try:
        yield runtime
    finally:
        runtime.remove()


# ----- generate ----------------------------------------------------------------------------------------
_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=4)


def _resolve_generation_config(model, kwargs: dict):
    """The generation config ``generate`` will use (model defaults, ``generation_config``, kwargs), resolved once."""
    passed = kwargs.get("generation_config")
    rest = {k: v for k, v in kwargs.items() if k != "generation_config"}
    prepare = getattr(model, "_prepare_generation_config", None)
    if prepare is not None:
        with contextlib.suppress(TypeError, ValueError):
            return prepare(passed, **rest)[0]
    gc = copy.deepcopy(passed or model.generation_config)
    gc.update(**rest)
    return gc


def _refuse_unsupported(gc, kwargs: dict, ctl: SDEControl) -> None:
    if (gc.num_beams or 1) > 1:
        raise NotImplementedError("SDE control supports greedy decoding and sampling, not beam search (num_beams > 1).")
    if kwargs.get("assistant_model") is not None or kwargs.get("assistant_early_exit"):
        raise NotImplementedError("SDE control does not support assisted / speculative decoding (assistant_model).")
    if getattr(gc, "prompt_lookup_num_tokens", None):
        raise NotImplementedError(
            "SDE control does not support prompt-lookup decoding (prompt_lookup_num_tokens): it verifies several "
            "tokens per forward, while the heads read one state per token. Drop prompt_lookup_num_tokens."
        )
    if ctl.steers and gc.use_cache is False:
        raise NotImplementedError(
            "Steering with use_cache=False would re-run and un-steer past positions; generate with the KV cache."
        )


def _temperature_kwargs(gc, kwargs: dict, ctl: SDEControl) -> float:
    """Switch the stock temperature off under SDE temperature control; return the temperature to record."""
    if not ctl.controls_temperature:
        return float(gc.temperature) if gc.temperature is not None else 1.0
    passed = kwargs.get("temperature")
    if passed is not None and passed != 1.0:
        raise ValueError(
            f"generate(temperature={passed}) conflicts with SDE temperature control: set the base temperature "
            "with SDEControl(temperature=...) instead."
        )
    if not gc.do_sample:
        _warn_once("greedy", "SDE temperature control under greedy decoding (do_sample=False): temperatures do not "
                   "change the argmax, so the tokens are those of plain greedy decoding; the trace records the "
                   "temperatures the law would apply. Pass do_sample=True to sample with them.")
    _set_generation_option(kwargs, "temperature", 1.0)
    return 1.0


def _set_generation_option(kwargs: dict, name: str, value) -> None:
    """Set one option for this call, on the caller's generation_config (copied) if there is one."""
    if kwargs.get("generation_config") is not None:
        kwargs["generation_config"] = gc = copy.deepcopy(kwargs["generation_config"])
        setattr(gc, name, value)
    else:
        kwargs[name] = value


def _decline_compile(model, gc, kwargs: dict) -> None:
    """Run this call's forward eagerly where generate would compile it (compile_config / static cache on GPU).

    dynamo does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``): a forward
    compiled before the SDE hooks were installed runs without them, so the trace would stop after the prefill
    and temperature / steering would silently not apply. Eager forwards give the same tokens (bit for bit
    where the compiled kernels are bitwise eager, e.g. backend="eager").
    """
    if gc.disable_compile:
        return
    static = gc.cache_implementation in ("static", "offloaded_static") or getattr(
        kwargs.get("past_key_values"), "is_compileable", False)
    all_devices = bool(getattr(gc.compile_config, "_compile_all_devices", False))
    if static and (_model_device(model).type != "cpu" or all_devices):
        _warn_once("compile", "SDE control runs generate's forward eagerly (disable_compile=True for this call): a "
                   "compiled forward does not see the SDE hooks (dynamo skips module-hook guards).")
    _set_generation_option(kwargs, "disable_compile", True)


def _prompt_widths(args, kwargs: dict) -> tuple[int, int]:
    """(prompt width, prompt tokens in the returned sequences); no prompt means generation from BOS."""
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return ids.shape[1], ids.shape[1]
    embeds = kwargs.get("inputs_embeds")
    if embeds is not None:
        return embeds.shape[1], 0
    return 1, 1  # stock generate starts from the BOS token, which it returns


def _check_horizon(model, heads, prompt_width: int, capacity: int) -> None:
    cfg = heads.config
    context = getattr(model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config,
                      "max_position_embeddings", None)
    if context and prompt_width + capacity - 1 > context:
        _warn_once(f"context-{id(model)}", (
            f"prompt ({prompt_width} tokens) plus new tokens reach past the model's context ({context} positions): "
            "the model's hidden states there are out of distribution, and so are the heads' statistics."))
    origin = getattr(cfg, "time_origin", "sequence")
    last = (prompt_width - 1 if origin == "sequence" else 0) + capacity - 1
    if last > 2 * cfg.horizon:
        counted = "positions in the text" if origin == "sequence" else "tokens generated after the prompt"
        _warn_once(f"horizon-{id(heads)}-{origin}", (
            f"these heads were fitted on paths of up to T={cfg.horizon:g} {counted}; this call reaches "
            f"{last}, i.e. t = k/T up to {last / cfg.horizon:.1f}. Past t = 1 drift and diffusion are "
            "extrapolated and z-scores are not calibrated there."))


def _call_setup(model, args, kwargs: dict, ctl: SDEControl) -> _CallSetup:
    """Resolve the generation config once, refuse what is not supported, fix the per-call sizes."""
    gc = _resolve_generation_config(model, kwargs)
    _refuse_unsupported(gc, kwargs, ctl)
    base_temperature = _temperature_kwargs(gc, kwargs, ctl)
    _decline_compile(model, gc, kwargs)
    prompt_width, returned = _prompt_widths(args, kwargs)
    if gc.max_new_tokens is not None:
        steps = gc.max_new_tokens
    else:
        steps = max((gc.max_length or 20) - (prompt_width if returned else 0), 1)
    eos = gc.eos_token_id
    eos_ids = [] if eos is None else [int(e) for e in (eos.tolist() if isinstance(eos, torch.Tensor) else
                                                       eos if isinstance(eos, (list, tuple)) else [eos])]
    _check_horizon(model, ctl.heads, prompt_width, steps + 1)
    keeps_logits = bool(gc.return_dict_in_generate and gc.output_logits)
    private = not keeps_logits and not kwargs.get("logits_processor")
    return _CallSetup(prompt_width, returned, steps + 1, base_temperature, eos_ids, scores_private=private,
                      scale_head_input=private and ctl.controls_temperature and _temperature_head(model, gc) is not None)


# Generation options whose logits processors run before the temperature and do not commute with dividing the
# logits by it (they add to the logits, mix in another forward or read early layers through the LM head).
_SCALE_SENSITIVE = ("sequence_bias", "watermarking_config", "exponential_decay_length_penalty", "dola_layers")
# Scale the head's input only where the vocabulary is this many times the hidden size: below it (stories260K: 512
# vs 64) the logits are divided as cheaply as the hook on the head costs (~15 us per step on 2 CPU cores).
HEAD_SCALING_MIN_RATIO = 16


def _temperature_head(model, gc) -> torch.nn.Module | None:
    """The LM head whose input the SDE temperature may divide instead of the logits, or ``None``.

    ``lm_head(h / tau) = lm_head(h) / tau`` for a bias-free float32 linear head whose output the model does not
    transform further (no logit soft-capping), and the processors that run before the temperature in ``generate``
    (repetition penalty, bad words, min length, ...) commute with dividing by a positive number; the ones that
    do not are refused by ``_SCALE_SENSITIVE`` and classifier-free guidance. The division then touches
    ``hidden_size`` numbers per row instead of the vocabulary: on SmolLM2, 576 instead of 49,152. Callers that
    keep the raw logits (``output_logits``) or pass their own processors get the scores divided instead.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or head.weight.dtype != torch.float32:
        return None
    if head.out_features < HEAD_SCALING_MIN_RATIO * head.in_features:
        return None  # a small vocabulary: dividing the logits is cheaper than one more module hook
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "final_logit_softcapping", None) is not None:
        return None
    if any(getattr(gc, name, None) for name in _SCALE_SENSITIVE) or (gc.guidance_scale or 1) != 1:
        return None
    return head


def sde_generate(model, *args, sde_control: SDEControl | None = None, _generate=None, **kwargs):
    """``model.generate`` with optional SDE control (see :class:`SDEControl`).

    With ``sde_control=None`` this is exactly the stock ``generate``. With ``return_dict_in_generate=True``
    the output has ``sde_trace``; otherwise ``SDEControl(on_trace=...)`` receives it.
    """
    generate = _generate or functools.partial(type(model).generate, model)
    if sde_control is None:
        return generate(*args, **kwargs)
    if not isinstance(sde_control, SDEControl):
        raise TypeError(f"sde_control must be an SDEControl, got {type(sde_control).__name__}")
    ctl = sde_control
    ctl.heads.check_compatible(model)
    setup = _call_setup(model, args, kwargs, ctl)
    with sde_hooks(model, ctl, setup) as runtime:
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        if ctl.controls_temperature and not setup.scale_head_input:
            # (transformers inspects every processor's signature at every step: none is added where the head
            # takes the temperature)
            processors.append(SDETemperatureLogitsProcessor(runtime))
        out = generate(*args, logits_processor=processors, **kwargs)
    return_dict = not isinstance(out, torch.Tensor)
    trace = runtime.trace(out.sequences if return_dict else out)
    if ctl.on_trace is not None:
        ctl.on_trace(trace)
    if return_dict:
        return SDEGenerateOutput(**dict(out.items()), sde_trace=trace)
    return out


def enable_sde_control(model):
    """Let ``model.generate`` accept ``sde_control=``. Returns the model; undo with :func:`disable_sde_control`.

    Only this model object changes (its ``generate`` attribute); no global state is touched.
    """
    if getattr(model, "_hf_sde_enabled", False):
        return model
    original = model.generate
    # Keep the unbound function and bind it to ``self`` at call time: a deep copy of the model (a reference
    # model, say) must generate with its own weights, not with those of the object that was enabled.
    original_func = original.__func__ if getattr(original, "__self__", None) is model else None

    def generate(self, *args, sde_control: SDEControl | None = None, **kwargs):
        base = types.MethodType(original_func, self) if original_func is not None else original
        return sde_generate(self, *args, sde_control=sde_control, _generate=base, **kwargs)

    generate.__doc__ = (original.__doc__ or "") + "\n\nhf-sde: also accepts ``sde_control=SDEControl(...)``."
    model.generate = types.MethodType(generate, model)
    model._hf_sde_enabled = True
    return model


def disable_sde_control(model):
    """Undo :func:`enable_sde_control`."""
    if getattr(model, "_hf_sde_enabled", False):
        del model.generate
        del model._hf_sde_enabled
    return model


class SDEGenerationMixin:
    """Mix into a ``PreTrainedModel`` subclass (before it) so that ``generate`` accepts ``sde_control=``.

    Example:
        >>> class MyLlama(SDEGenerationMixin, LlamaForCausalLM):
        ...     pass
    """

    def generate(self, *args, sde_control: SDEControl | None = None, **kwargs):
        return sde_generate(self, *args, sde_control=sde_control,
                            _generate=functools.partial(super().generate), **kwargs)
