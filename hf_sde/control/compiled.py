"""The step inside ``generate``'s compiled forward (static cache + ``compile_config``).

Three things make the step part of the compiled graph and keep stock compiled generation untouched:

- **Wrapper modules, not hooks.** For one call the decoder block at the heads' layer (and the steer layer) is
  replaced by :class:`_StepBlock` and, where the temperature divides the LM head's input, the head by
  :class:`_TemperatureHead`; both are restored afterwards. dynamo guards on which module sits there, so a
  graph traced with them never runs without them, and stock's graphs never run with them (hooks give no such
  guarantee: dynamo does not guard a hook dict that was empty when it traced).
- **A compiled function of our own.** ``generate`` asks ``model.get_compiled_call(compile_config)`` for its
  decoding forward; for the call an instance attribute answers with :func:`compiled_forward`, a
  ``torch.compile`` of a small function with its own code object per (compile config, control structure). The
  SDE graphs are cached there, apart from stock's (which all models' forwards share, with their recompile limit).
- **State in tensors only.** The step reads no Python value that changes from step to step or call to call:
  a token counter ``seen`` (advanced by every forward's width) tells the prefill from the steps (a forward is a
  step once it reaches the prompt's last token: the whole prefill, the last chunk of a chunked one, every
  decoding forward), and the step index picks the record row (forwards before the prompt's end write a spare
  row and steer by zero). Temperature, bounds and steering strength are tensors, so new values do not
  recompile. The maths is :class:`~.step._Runtime`'s, unchanged; the same code runs eagerly for the prefill.
"""

from __future__ import annotations

import functools
import types
from collections import OrderedDict

import torch

from ..data.layers import block_output, decoder_layers, replace_block_output
from .step import _Runtime, _StepBuffers

# (compile config, model class, shapes, control structure) -> a compiled copy of _sde_forward, most recent last
_COMPILED: OrderedDict[tuple, object] = OrderedDict()
_MAX_COMPILED = 64


def _sde_forward(model, **kwargs):
    """The decoding forward SDE calls compile: the model with the step's wrapper modules in place."""
    return model(**kwargs)


def _config_key(compile_config) -> tuple:
    """The compile config as a key: by value (``to_dict()`` deep-copies its fields, so identities change)."""
    items = compile_config.to_dict().items()
    return tuple(sorted((k, v if isinstance(v, (str, bool, int, float, type(None))) else repr(v)) for k, v in items))


def compiled_forward(compile_config, key: tuple):
    """``torch.compile`` of the decoding forward for one model class, batch and step budget, and control
    structure (``key``), built once and reused.

    Each key compiles its own copy of :func:`_sde_forward` (its own code object): dynamo's recompile limit
    counts per code object, so one key's graphs (a chunked prefill's chunks, say) never spend another's budget
    nor stock generate's. The least recently used copies beyond ``_MAX_COMPILED`` are dropped.
    """
    key = (_config_key(compile_config), *key)
    fn = _COMPILED.get(key)
    if fn is None:
        code = _sde_forward.__code__.replace(co_name=f"_sde_forward_{abs(hash(key))}")
        fn = _COMPILED[key] = torch.compile(types.FunctionType(code, _sde_forward.__globals__, code.co_name),
                                            **compile_config.to_dict())
        while len(_COMPILED) > _MAX_COMPILED:
            _COMPILED.popitem(last=False)
    _COMPILED.move_to_end(key)
    return fn


class _Passthrough(torch.nn.Module):
    """A module wrapping another for one call; unknown attributes are read from the wrapped one (models read
    e.g. ``attention_type`` of their blocks)."""

    def __init__(self, inner: torch.nn.Module, runtime: _CompiledRuntime):
        super().__init__()
        self.inner = inner
        self.runtime = runtime  # a plain attribute: its tensors are graph inputs

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


class _StepBlock(_Passthrough):
    """Decoder block ``l`` followed by the step on its output (what the eager runtime's forward hook does)."""

    def __init__(self, inner, runtime, fn):
        super().__init__(inner, runtime)
        self.fn = fn

    def forward(self, hidden_states, *args, **kwargs):
        out = self.inner(hidden_states, *args, **kwargs)
        new = self.fn(block_output(out), kwargs.get("position_ids"))
        return replace_block_output(out, new)


class _TemperatureHead(_Passthrough):
    """The LM head with its input divided by the step's temperature (``lm_head(h / tau) = lm_head(h) / tau``)."""

    def forward(self, hidden_states, *args, **kwargs):
        self.runtime.head_calls.add_(1)
        tau = self.runtime.buf.cur.tau.unsqueeze(-1)
        return self.inner(hidden_states / tau.to(hidden_states.dtype), *args, **kwargs)


class _CompiledRuntime(_Runtime):
    """The per-call state of a call whose decoding forward is compiled: the step's bookkeeping in tensors."""

    def __init__(self, control, model, setup):
        super().__init__(control, model, setup)
        device = self.fused.mean.device
        scalar = functools.partial(torch.tensor, device=device, dtype=torch.long)
        self.seen = scalar(0)                                          # tokens forwarded in this call
        self.prefill_end = scalar(setup.prefill_width or setup.prompt_width)
        # Step 0's position per row where the blocks get no position ids: from the attention mask, else counted.
        self.first_position = (setup.last_positions.to(device) if setup.last_positions is not None
                               else scalar(setup.prompt_width - 1))
        self.spare = setup.capacity                                    # the record row of non-step forwards
        self.k = scalar(0)
        self.head_calls = scalar(0)                                    # forwards through _TemperatureHead
        self.active = torch.zeros((), device=device)
        hidden = self.heads.config.hidden_size
        # One spare row past the capacity; allocated before the first forward, so no graph allocates.
        self.buf = _StepBuffers.allocate(self.fused, self.now, setup.batch, hidden, setup.capacity + 1,
                                         setup.base_temperature, separate=True)
        self.swapped: list[tuple[torch.nn.ModuleList | None, int, torch.nn.Module]] = []

    # -- the step (no Python state that changes per step: the same code eager and traced) ------------------
    def on_block(self, hidden: torch.Tensor, position_ids) -> torch.Tensor:
        seen = self.seen.add_(hidden.shape[1])
        k = seen - self.prefill_end
        active = k >= 0
        self.active.copy_(active)
        self.k.copy_(k.clamp(0, self.spare - 1))
        row = torch.where(active & (k < self.spare), k, self.spare).reshape(1)
        buf = self.buf
        if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2:
            pos = position_ids[:, -1]
        else:
            pos = (self.first_position + self.k).expand(hidden.shape[0])  # (a per-row mask position, or one)
        pos = torch.clamp(pos, 0, self.fused.n_times - 1, out=buf.cur_positions)
        steered = self._compute(hidden, pos if self.origin == "sequence" else self.k.expand(hidden.shape[0]))
        buf.records.index_copy_(0, row, buf.cur.row().unsqueeze(0))
        buf.positions.index_copy_(0, row, buf.cur_positions.unsqueeze(0))
        return hidden if steered is None else steered

    def on_steer_block(self, hidden: torch.Tensor, _position_ids, layer: int) -> torch.Tensor:
        steered = self._steer(hidden, layer)
        row = torch.where(self.active.bool(), self.k, self.spare).reshape(1)
        self.buf.records.index_copy_(0, row, self.buf.cur.row().unsqueeze(0))  # with its steer norm
        return steered

    def _direction(self, cur) -> None:
        super()._direction(cur)
        self.unit = self.unit * self.active  # forwards before the prompt's end are not steered

    def on_logits(self, scores: torch.Tensor) -> torch.Tensor:
        return self._divide(scores)  # the step index lives in a tensor: nothing to check on the host

    # -- install / remove ---------------------------------------------------------------------------------
    def structure(self) -> tuple:
        """What a compiled graph specializes on: the model class, shapes and the control's structure (its
        values are tensors)."""
        c = self.control
        return (type(self.model), self.setup.batch, self.setup.capacity, c.mode, self.now, self.stats_now,
                self.read_layer, self.steer_layers, self.origin,
                "tensor" if isinstance(c.direction, torch.Tensor) else "per-layer" if c.per_layer else c.direction,
                c.gate, c.gate_threshold,
                c.gate_sharpness, self.setup.scale_head_input)

    def install(self, head: torch.nn.Module | None = None) -> None:
        layers = decoder_layers(self.model)
        self._swap(layers, self.read_layer, _StepBlock(layers[self.read_layer], self, self.on_block))
        if self.control.steers:
            for layer in self.steer_layers:
                if layer != self.read_layer:
                    step = functools.partial(self.on_steer_block, layer=layer)
                    self._swap(layers, layer, _StepBlock(layers[layer], self, step))
        if head is not None and self.control.controls_temperature:
            self.model.set_output_embeddings(_TemperatureHead(head, self))
            self.swapped.append((None, -1, head))
        default, structure, model = self.model._default_compile_config, self.structure(), self.model

        def get_compiled_call(compile_config):
            return functools.partial(compiled_forward(compile_config or default(), structure), model)

        self.model.get_compiled_call = get_compiled_call  # an instance attribute: shadows the method

    def _swap(self, layers, index: int, module: torch.nn.Module) -> None:
        self.swapped.append((layers, index, layers[index]))
        layers[index] = module

    def remove(self) -> None:
        self.model.__dict__.pop("get_compiled_call", None)
        while self.swapped:
            layers, index, original = self.swapped.pop()
            if layers is None:
                self.model.set_output_embeddings(original)
            else:
                layers[index] = original

    def release(self) -> None:
        self.buf = None  # allocated per call, before the first forward (not from the pool)

    def trace(self, sequences: torch.Tensor):
        # The steps taken: one per forward from the prompt's end on (read once, at the end of the call).
        self.step = min(max(int(self.seen) - int(self.prefill_end) + 1, 0), self.spare)
        self.head_scaled = int(self.head_calls)  # checked against the steps: a model that skips the head module
        return super().trace(sequences)
