"""The step that runs inside the forward: hooks at the heads' layer (read, steer) and at the LM head (temperature),
the per-step buffers, and the trace built from them at the end of the call."""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from ..data.layers import register_block_hook, resolve_layer
from .fused import NETS, _FusedHeads, fused_heads
from .settings import _STATS, SDEControl, SDEStep, SDETrace
from .setup import _CallSetup, _model_device

_COLS = _STATS  # the statistics' columns in a step's record, in SDETrace's order


def _column(d: int, name: str) -> int:
    """Where statistic ``name`` sits in a step's record."""
    return 3 * d + _COLS.index(name)


class _Rows:
    """Named views of a block of step records ``(N, 3d + 5)`` plus each net's work tensors over it.

    Bound once (for the current step, and for the deferred pass over all steps): a view costs microseconds,
    which the step path would otherwise pay a dozen times per token. ``block=None`` gives each field its own
    contiguous tensor instead (what a compiled step needs: dynamo refuses ``out=`` into a strided view), and
    :meth:`row` assembles the record.
    """

    def __init__(self, block: torch.Tensor | None, fused: _FusedHeads, nets: tuple[str, ...], n: int = 0,
                 device: torch.device | None = None):
        d = fused.d
        n, device = (block.shape[0], block.device) if block is not None else (n, device)
        e = functools.partial(torch.empty, device=device, dtype=torch.float32)
        self.block = block
        if block is not None:
            self.z, self.mean, self.std = block[:, :d], block[:, d:2 * d], block[:, 2 * d:3 * d]
            for name in _COLS:
                setattr(self, name, block[:, _column(d, name)])
        else:
            self.z, self.mean, self.std = e(n, d), e(n, d), e(n, d)
            for name in _COLS:
                setattr(self, name, torch.full((n,), float("nan"), device=device))
        self.tau = self.temperature.unsqueeze(-1)              # (N, 1): divides the logits
        self.dest = {"drift": self.mean, "diffusion": self.std}
        # Per net that runs over these rows: the first layer's output [pre-activation | output bias + linear
        # drift] (the diffusion net: the pre-activation, and its output bias as a vector), and two spares the
        # hidden layers alternate between.
        self.work = {}
        for name in nets:
            net = fused.nets[name]
            first = e(n, net.width + net.skip)
            out_base = first[:, net.width:] if net.skip else net.b_out
            self.work[name] = (first, first[:, :net.width], out_base, (e(n, net.width), e(n, net.width)))
        self.zero = torch.zeros(n, d, device=device) if "diffusion" in nets else None  # softplus's 0

    def row(self) -> torch.Tensor:
        """The rows as records ``(N, 3d + 5)``."""
        if self.block is not None:
            return self.block
        return torch.cat([self.z, self.mean, self.std, *(getattr(self, c).unsqueeze(-1) for c in _COLS)], 1)


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
    deferred: tuple | None = None  # (n, rows over the first n records, their time indices or None)

    @classmethod
    def allocate(cls, fused: _FusedHeads, nets: tuple[str, ...], batch: int, hidden_size: int, capacity: int,
                 base_temperature: float, separate: bool = False):
        dev = fused.basis.device
        width = 3 * fused.d + len(_COLS)
        cur = (_Rows(None, fused, nets, batch, dev) if separate else
               _Rows(torch.empty(batch, width, device=dev), fused, nets))
        buf = cls(torch.empty(capacity, batch, width, device=dev), torch.full((capacity, batch), -1, device=dev,
                                                                                dtype=torch.long),
                  cur, torch.zeros(batch, device=dev, dtype=torch.long),
                  torch.empty(batch, hidden_size, device=dev))
        buf.reset(base_temperature)
        return buf

    def reset(self, base_temperature: float) -> None:
        """The current step as a new call starts it: statistics unknown, the base temperature, no steering."""
        cur = self.cur
        if cur.block is not None:
            cur.block.fill_(float("nan"))
        else:
            for name in (*_COLS, "z", "mean", "std"):
                getattr(cur, name).fill_(float("nan"))
        cur.temperature.fill_(base_temperature)
        cur.steer_norm.zero_()

    def deferred_rows(self, n: int, fused: _FusedHeads, nets: tuple[str, ...], prompt_end: bool) -> tuple:
        """The first ``n`` records as rows for the nets no step ran (bound once per ``n``), and for ``prompt_end``
        heads their time indices (step ``k``'s is ``k`` in every sequence)."""
        if self.deferred is None or self.deferred[0] != n:
            batch = self.records.shape[1]
            time = torch.arange(n, device=self.records.device).repeat_interleave(batch) if prompt_end else None
            self.deferred = (n, _Rows(self.records[:n].view(n * batch, -1), fused, nets), time)
        return self.deferred[1:]

    @property
    def capacity(self) -> int:
        return self.records.shape[0]

    def save(self, k: int) -> None:
        """Copy the current step into record ``k``."""
        self.records[k].copy_(self.cur.row())
        self.positions[k].copy_(self.cur_positions)

    def stat(self, name: str, steps: slice | int) -> torch.Tensor:
        """One statistic of the records ``steps``: ``(n, batch)`` for a slice, ``(batch,)`` for one step."""
        return self.records[steps, :, _column(self.cur.z.shape[1], name)]

    def grown(self) -> _StepBuffers:
        """Twice the capacity (generate ran more steps than max_new_tokens said; rare, never per step)."""
        return _StepBuffers(torch.cat([self.records, torch.empty_like(self.records)]),
                            torch.cat([self.positions, torch.full_like(self.positions, -1)]),
                            self.cur, self.cur_positions, self.centered)


# Step buffers of finished calls, reused by the next call with the same heads, control structure and shapes
# (allocating them costs ~50 us on CPU): at most a few, and none of a size whose allocation would not show.
_POOL: OrderedDict[tuple, _StepBuffers] = OrderedDict()
_POOL_SIZE = 4
_POOL_MAX_BYTES = 16 << 20


def _pool_key(fused: _FusedHeads, nets: tuple[str, ...], batch: int, hidden: int, capacity: int) -> tuple:
    return fused, nets, batch, hidden, capacity


def _acquire(key: tuple, base_temperature: float) -> _StepBuffers | None:
    buf = _POOL.pop(key, None)
    if buf is not None:
        buf.reset(base_temperature)
    return buf


def _release(key: tuple, buf: _StepBuffers) -> None:
    if buf.records.nbytes <= _POOL_MAX_BYTES:
        _POOL[key] = buf
        while len(_POOL) > _POOL_SIZE:
            _POOL.popitem(last=False)


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


class _LawScalars:
    """The temperature law's factors and the steering strength for one call, as 0-dim tensors on the model's device (a Python number in a
    tensor op is wrapped into a new tensor at every call). The law's own ops with these factors give bitwise the
    values of :meth:`SDEControl.temperature_law` (a power of the norm would skip the log / exp, but differs from
    the law of the recorded z-score by 1e-4)."""

    def __init__(self, control: SDEControl, device: torch.device):
        # Tensors, not Python numbers: a compiled step reads them as inputs, so new values never recompile. One
        # tensor, five views, shared by the calls with the same values (read only).
        values = _constant((-control.beta, control.temperature, control.min_temperature, control.max_temperature,
                            control.alpha), device, torch.float32)
        self.neg_beta, self.tau0, low, high, self.alpha = values.unbind()
        self.tau_bounds = (low, high)


_CONSTANTS: OrderedDict[tuple, torch.Tensor] = OrderedDict()


def _constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A read-only tensor of ``values``, made once per (values, device, dtype): building a tensor from Python
    numbers costs ~10 us; the last 64 are kept."""
    key = (values, device, dtype)
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = torch.tensor(values, device=device, dtype=dtype)
        while len(_CONSTANTS) > 64:
            _CONSTANTS.popitem(last=False)
    return t


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
        # The layers steered, in forward order: one, or a per-layer direction's (each with its own unit vector).
        self.steer_layers: tuple[int, ...] = (self.steer_layer,)
        if control.steers and control.per_layer:  # resolved and checked by SDEControl
            self.steer_layers = tuple(control.direction)
            self.steer_layer = self.steer_layers[0]
        self.single = not (control.steers and control.per_layer)  # one steering vector (not one per layer)
        device = setup.device if setup.device is not None else _model_device(model)
        self.origin = getattr(self.heads.config, "time_origin", "sequence")
        # One table row per position the call can reach (prompt_end needs fewer; positions are recorded anyway).
        self.fused = fused_heads(self.heads, device, setup.capacity + setup.prompt_width + 1)
        self.law = _LawScalars(control, device)
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

    def _fixed_direction(self, device) -> torch.Tensor | dict[int, torch.Tensor] | None:
        """The unit vector of a fixed direction (per steered layer for a per-layer one); ``None`` for the
        state-dependent directions."""
        ctl = self.control
        if ctl.steers and ctl.per_layer:
            return ctl.unit_directions(device)
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
            self.prefilled = self.consumed >= (self.setup.prefill_width or self.setup.prompt_width)
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
        pos = torch.clamp(self._positions(k, hidden), 0, self.fused.n_times - 1, out=buf.cur_positions)
        steered = self._compute(hidden, pos if self.origin == "sequence" else k)
        if self.control.callback is not None:
            # Here, not in the logits processor: every logits processor of this step (the caller's too) sees it.
            # The stats are views of the step's record, so a later steer layer's steer_norm shows up there
            # when the step is saved again.
            buf.save(k)
            self.control.callback(SDEStep(k, *(buf.stat(name, k) for name in _STATS), self._surprise_previous(k)))
        return steered

    def _compute(self, hidden: torch.Tensor, time: torch.Tensor | int) -> torch.Tensor | None:
        """The step's maths on the newest position, into the current row: projection, the nets and statistics
        the control reads, the temperature and the steering (the steered hidden states when the steer layer is
        this one). ``time``: the rows' time indices into the nets' tables, or one index for all rows. Shared by
        the eager and the compiled runtime."""
        f, buf = self.fused, self.buf
        cur = buf.cur
        torch.sub(hidden[:, -1], f.mean, out=buf.centered)  # float32 whatever the model's dtype
        torch.mm(buf.centered, f.basis, out=cur.z)
        for name in self.now:  # none for observe without a callback: the heads then run in trace()
            self._net_step(cur, name, time)
        for name in self.stats_now:
            self._stats(cur, name)
        if self.control.controls_temperature:
            self._temperature(cur)
        if self.control.steers:
            self._direction(cur)
            if self.steer_layer == self.read_layer:
                return self._steer(hidden, self.read_layer)
        return None

    def _net_step(self, rows: _Rows, name: str, time: torch.Tensor | int) -> None:
        """Net ``name`` (``"drift"`` / ``"diffusion"``) on ``rows.z`` (N, d) into ``rows.mean`` / ``rows.std``.

        ``time`` is the rows' time indices (N,) into the net's table, or one index shared by all rows. The one
        implementation of the step: per decoding step (N = batch) and, for the nets no control reads, once over
        every step of the call (N = steps * batch).
        """
        f = self.fused
        net = f.nets[name]
        first, act, out_base, spares = rows.work[name]
        if isinstance(time, int):
            first.copy_(net.table[time])
        else:
            torch.index_select(net.table, 0, time, out=first)
        first.addmm_(rows.z, net.first)               # [first layer | linear drift + output bias]
        torch.nn.functional.silu(act, inplace=True)
        for i, (w, b) in enumerate(net.hidden):
            spare = spares[i % 2]
            torch.addmm(b, act, w, out=spare)
            torch.nn.functional.silu(spare, inplace=True)
            act = spare
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
        law = self.law
        torch.mul(rows.zscore, law.neg_beta, out=rows.temperature).exp_().mul_(law.tau0).clamp_(*law.tau_bounds)

    def _run_deferred(self, n: int) -> None:
        """The nets and statistics no step read, over the ``n`` recorded steps at once (the same calls, N = n * batch)."""
        buf = self.buf
        rows, time = buf.deferred_rows(n, self.fused, self.later, self.origin == "prompt_end")
        if time is None:
            time = buf.positions[:n].view(-1)
        for name in self.later:
            self._net_step(rows, name, time)
        for name in self.stats_later:
            self._stats(rows, name)

    def _direction(self, cur: _Rows) -> None:
        """The step's steering vectors before the ``||h||`` scale: ``self.unit``, or ``self.units`` per layer."""
        ctl = self.control
        if self.single:
            self.unit = ctl.steering_vector(cur.mean, cur.z, cur.zscore, lambda v: v @ self.fused.lift,
                                            fixed=self.direction, attractor=self.attractor, alpha=self.law.alpha)
            return
        # per layer: the gate is the step's (one z-score), each layer's unit its own
        self.unit = ctl.gain(cur.zscore, self.law.alpha)  # (N, 1)

    def on_steer(self, hidden: torch.Tensor, layer: int):
        if self.partial_prefill:
            return None
        return self._steer(hidden, layer)

    def _steer(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        last = hidden[:, -1].float()
        unit = self.unit if self.single else self.unit * self.direction[layer]
        delta = SDEControl.steer_delta(unit, last)
        if layer == self.steer_layers[0]:
            torch.linalg.vector_norm(delta, dim=-1, out=self.buf.cur.steer_norm)
        else:  # a later layer of a per-layer direction: the trace sums the layers' norms
            self.buf.cur.steer_norm.add_(torch.linalg.vector_norm(delta, dim=-1))
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
            raise RuntimeError(
                "SDETemperatureLogitsProcessor ran without a hidden state read for this step: it divides the logits "
                "by the temperature that SDE control's hook computed in the same forward, so it works only inside "
                "generate(..., sde_control=...). Do not pass it in logits_processor yourself.")
        self.current = -1
        return self._divide(scores)

    def _divide(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores divided by the step's temperature (in temperature modes)."""
        if not self.control.controls_temperature:
            return scores
        tau = self.buf.cur.tau if scores.dtype == torch.float32 else self.buf.cur.tau.to(scores.dtype)
        # In place when nothing else holds these scores (generate keeps raw logits only for output_logits).
        return scores.div_(tau) if self.setup.scores_private else scores / tau

    # -- helpers ----------------------------------------------------------------------------------------
    def _positions(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.positions is not None:
            return self.positions
        return self.buf.positions.new_full((hidden.shape[0],), self.setup.prompt_width - 1 + k)

    def _buffers(self, hidden: torch.Tensor, k: int) -> _StepBuffers:
        if self.buf is None:
            batch, size, setup = hidden.shape[0], hidden.shape[-1], self.setup
            self.buf = (_acquire(_pool_key(self.fused, self.now, batch, size, setup.capacity), setup.base_temperature)
                        or _StepBuffers.allocate(self.fused, self.now, batch, size, setup.capacity,
                                                 setup.base_temperature))
        while k >= self.buf.capacity:
            self.buf = self.buf.grown()
            self.fused.time_tables(self.heads, self.buf.capacity + self.setup.prompt_width + 1)
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
        bind = functools.partial
        self.handles.append(self.model.register_forward_pre_hook(bind(_forward_pre_hook, self), with_kwargs=True))
        self.handles.append(register_block_hook(self.model, self.read_layer, bind(_read_hook, self)))
        if self.control.steers:
            for layer in self.steer_layers:
                if layer != self.read_layer:
                    self.handles.append(register_block_hook(self.model, layer, bind(_steer_hook, self, layer)))
        if head is not None and self.control.controls_temperature:
            self.handles.append(head.register_forward_pre_hook(bind(_head_input_hook, self)))

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def release(self) -> None:
        """Hand this call's step buffers to the next call of the same shapes (after the trace was built; never
        where a callback may have kept views of them)."""
        buf, self.buf = self.buf, None
        if buf is not None and self.control.callback is None and buf.capacity == self.setup.capacity:
            _release(_pool_key(self.fused, self.now, *buf.centered.shape, buf.capacity), buf)

    def trace(self, sequences: torch.Tensor) -> SDETrace:
        """The statistics of the returned tokens, by field name; NaN (positions -1) after each row's EOS."""
        # transformers may run one more step than it returns (the deferred stop check undoes it, on MPS), so
        # keep only the steps whose tokens came back.
        generated = max(sequences.shape[1] - self.setup.returned_prompt, 0)
        if self.step < generated:
            raise RuntimeError(
                f"The SDE hooks saw {self.step} of {generated} decoding steps: the model's forward ran without calling "
                f"its decoder block {self.read_layer} as a hooked module. The usual cause is a forward compiled by the "
                "caller (model.forward = torch.compile(...), model.compile()) before SDE control installed its hooks: "
                "compiled code does not call hooks added later. Generate from the uncompiled model; for compiled "
                "decoding pass generate's own compile_config with a static cache instead."
            )
        if self.setup.scale_head_input and self.control.controls_temperature and self.head_scaled < self.step:
            raise RuntimeError(
                f"The SDE temperature reached the LM head in {self.head_scaled} of {self.step} steps: this model "
                "computes its logits without calling get_output_embeddings() as a module, so the sampled tokens did "
                "not get the SDE temperature. Pass a logits_processor with at least one processor (e.g. "
                "LogitsProcessorList([TemperatureLogitsWarper(1.0)]), which changes nothing else): the SDE "
                "temperature then divides the logits instead."
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
        rec = buf.records[:n]
        # The statistics and the surprise as one (6, rows, n) block: masked after EOS and moved to the host at once.
        block = torch.empty(len(_STATS) + 1, rows, n, device=rec.device)
        block[:-1].copy_(rec[..., 3 * d:].permute(2, 1, 0))
        surprise = block[-1]
        surprise[:, -1].fill_(float("nan"))  # a step's surprise needs the next state
        if n > 1:
            prev = rec[:-1]
            surprise[:, :-1] = self.heads.surprise(rec[1:, :, :d] - prev[..., :d], prev[..., d:2 * d],
                                                   prev[..., 2 * d:3 * d]).T
        positions = buf.positions[:n].T
        if self.setup.eos_ids:
            new = sequences[:, self.setup.returned_prompt: self.setup.returned_prompt + n].to(rec.device)
            is_eos = torch.isin(new, _constant(tuple(self.setup.eos_ids), rec.device, new.dtype))
            ends = torch.cumsum(is_eos, dim=1)
            finished_before = ends > is_eos  # the EOS step itself is kept
            block[:-1].masked_fill_(finished_before, float("nan"))
            surprise.masked_fill_(ends > 0, float("nan"))  # no next state at or after EOS
            positions = positions.masked_fill(finished_before, -1)
        else:
            positions = positions.clone()
        # Each field its own tensor (not views of one block, nor of these buffers, which the next call reuses).
        fields = [t.clone() for t in block.cpu().unbind()]
        return SDETrace(*fields, positions=positions.cpu())


# The hooks' entry points, made once (wrapping a call's methods costs ~6 us each) and bound to a call's runtime with
# functools.partial. Disabled for dynamo: under a forward compiled by the caller they run eagerly between compiled
# pieces, since they keep Python state that dynamo would otherwise specialize on at every step.
@torch.compiler.disable
def _forward_pre_hook(runtime: _Runtime, module, args, kwargs):
    return runtime.on_forward_pre(module, args, kwargs)


@torch.compiler.disable
def _read_hook(runtime: _Runtime, hidden: torch.Tensor):
    return runtime.on_read(hidden)


@torch.compiler.disable
def _steer_hook(runtime: _Runtime, layer: int, hidden: torch.Tensor):
    return runtime.on_steer(hidden, layer)


@torch.compiler.disable
def _head_input_hook(runtime: _Runtime, module, args):
    return runtime.on_head_input(module, args)
