"""Decoding-time SDE control: ``model.generate(..., sde_control=SDEControl(heads, ...))``.

Per decoding step, one forward hook at the heads' layer reads the hidden state of the newest position,
projects it, and evaluates drift and diffusion. A logits processor turns the calibrated diffusion
z-score into a temperature; a hook (the same one when the layers coincide) adds a steering vector to
the newest position only, so positions already in the KV cache are never steered twice. Everything is
installed for one ``generate`` call and removed afterwards, even when generation raises.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .heads import SDEHeads
from .layers import register_block_hook, resolve_layer

MODES = ("observe", "temperature", "steer", "temperature+steer")
GATES = ("always", "threshold", "sigmoid")


@dataclass
class SDETrace:
    """Per-step statistics, each ``(batch, new_tokens)``; NaN after a row's EOS.

    Step ``k`` is the state that produced new token ``k``. ``surprise[:, k]`` is the standardized NLL of the
    increment from step ``k`` to ``k + 1`` (so the last step has none).
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
    """What a streaming ``callback`` receives at every step (tensors of shape ``(batch,)``)."""

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
    """How the SDE heads observe or control one ``generate`` call.

    Args:
        heads: fitted :class:`SDEHeads` (or a folder / hub id to load them from).
        mode: ``"observe"`` (trace only), ``"temperature"``, ``"steer"`` or ``"temperature+steer"``.
        beta: temperature law ``tau = clip(temperature * exp(-beta * z), min_temperature, max_temperature)``;
            ``beta > 0`` cools sampling where the path is locally noisy, ``beta = 0`` is plain sampling.
        alpha: steering strength; ``h <- h + alpha * gate(z) * ||h|| * unit(v)`` at the newest position.
        direction: ``"drift"`` (``v = P mu``), ``"attractor"`` (``v = P (z* - z)``) or a hidden-size tensor.
        attractor: ``z*`` in SDE coordinates for ``direction="attractor"`` (default: the origin, i.e. the
            mean training state).
        gate: ``"always"``, ``"threshold"`` (steer where ``z > gate_threshold``) or ``"sigmoid"``
            (``sigmoid(gate_sharpness * (z - gate_threshold))``).
        steer_layer: decoder layer to steer (default: the heads' layer; must not precede it).
        callback: called with an :class:`SDEStep` at every step (live stats while streaming).

    Example:
        >>> enable_sde_control(model)
        >>> ctl = SDEControl(heads, mode="temperature", beta=1.0)
        >>> out = model.generate(**inputs, do_sample=True, sde_control=ctl, return_dict_in_generate=True)
        >>> out.sde_trace.temperature.shape   # (batch, new_tokens)
    """

    heads: SDEHeads | str
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
    last_trace: SDETrace | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if isinstance(self.heads, str):
            self.heads = SDEHeads.from_pretrained(self.heads)
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

    def gate_value(self, zscore: torch.Tensor) -> torch.Tensor:
        if self.gate == "always":
            return torch.ones_like(zscore)
        if self.gate == "threshold":
            return (zscore > self.gate_threshold).to(zscore.dtype)
        return torch.sigmoid(self.gate_sharpness * (zscore - self.gate_threshold))


class SDETemperatureLogitsProcessor(LogitsProcessor):
    """Divides logits by the SDE temperature of the current step (and records the step's statistics).

    Installed by ``generate(..., sde_control=...)``; it reads the state the forward hook saw for this
    step. Runs after the other logits processors and before top-k / top-p / min-p, like the stock
    temperature.

    Example:
        >>> out = model.generate(**inputs, do_sample=True, top_p=0.9, sde_control=SDEControl(heads))
    """

    def __init__(self, runtime: _Runtime):
        self.runtime = runtime

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.runtime.on_logits(scores)


class _Runtime:
    """The per-call state shared by the hooks and the logits processor."""

    def __init__(self, control: SDEControl, model, base_temperature: float, prompt_width: int | None = None):
        self.control = control
        self.heads = control.heads
        self.model = model
        self.base_temperature = base_temperature
        self.read_layer = self.heads.config.layer
        self.steer_layer = resolve_layer(model, control.steer_layer) if control.steer_layer is not None else self.read_layer
        if control.steers and self.steer_layer < self.read_layer:
            raise ValueError(
                f"steer_layer={self.steer_layer} precedes the heads' layer {self.read_layer}: the steering direction "
                "is computed from the state at the heads' layer, so steer at that layer or a later one."
            )
        self.step = 0
        self.prompt_width = prompt_width
        # True during a non-final chunk of a chunked prefill (generate(prefill_chunk_size=...)): that chunk's last
        # position is not the newest one, so it is neither read nor steered.
        self.partial_prefill = False
        self.positions: torch.Tensor | None = None
        self.prefill_len: int | None = None
        self.records: dict[str, list[torch.Tensor]] = {k: [] for k in
                                                       ("diffusion", "zscore", "drift_norm", "temperature",
                                                        "steer_norm", "surprise", "positions")}
        self.prev: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.current: dict[str, torch.Tensor] = {}
        self.unit_direction: torch.Tensor | None = None
        self.handles: list = []

    # -- hooks ----------------------------------------------------------------------------------------
    def on_forward_pre(self, _module, args, kwargs):
        mask = kwargs.get("attention_mask")
        position_ids = kwargs.get("position_ids")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None and mask.dim() == 2:
            self.partial_prefill = (self.step == 0 and self.prompt_width is not None
                                    and mask.shape[1] < self.prompt_width)
        if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2:
            # The positions the model itself uses (a static cache passes a 4D mask, whose sum means nothing).
            self.positions = position_ids[:, -1]
        elif mask is not None and mask.dim() == 2:
            self.positions = mask.sum(-1) - 1
        else:
            ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            if self.prefill_len is None:
                self.prefill_len = ref.shape[1]
            pos = self.prefill_len - 1 + self.step
            self.positions = torch.full((ref.shape[0],), pos, device=ref.device, dtype=torch.long)

    def on_read(self, hidden: torch.Tensor):
        if self.partial_prefill:
            return None
        heads = self.heads
        if heads.proj_basis.device != hidden.device:
            heads.to(hidden.device)
        last = hidden[:, -1].float()
        z = heads.project(last)
        positions = self.positions.to(hidden.device)
        mean, std = heads(z, heads.times(positions))
        magnitude = heads.diffusion_magnitude(std)
        zscore = heads.zscore(magnitude)
        drift = mean / heads.dt
        cur = {"z": z, "mean": mean, "std": std, "diffusion": magnitude, "zscore": zscore,
               "drift_norm": drift.norm(dim=-1), "positions": positions}
        if self.prev is not None:
            pz, pmean, pstd = self.prev
            if pz.shape == z.shape:
                cur["surprise_previous"] = heads.surprise(z - pz, pmean, pstd)
        self.prev = (z, mean, std)
        self.current = cur
        ctl = self.control
        if ctl.steers:
            if isinstance(ctl.direction, torch.Tensor):
                v = ctl.direction.to(hidden.device, torch.float32).expand_as(last)
            elif ctl.direction == "drift":
                v = heads.lift(mean)
            else:
                target = ctl.attractor.to(z) if ctl.attractor is not None else torch.zeros_like(z)
                v = heads.lift(target - z)
            unit = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            self.unit_direction = ctl.alpha * ctl.gate_value(zscore).unsqueeze(-1) * unit
            if self.steer_layer == self.read_layer:
                return self._steer(hidden)
        return None

    def on_steer(self, hidden: torch.Tensor):
        if self.partial_prefill:
            return None
        return self._steer(hidden)

    def _steer(self, hidden: torch.Tensor) -> torch.Tensor:
        last = hidden[:, -1]
        delta = last.float().norm(dim=-1, keepdim=True) * self.unit_direction
        self.current["steer_norm"] = delta.norm(dim=-1)
        out = hidden.clone()
        out[:, -1] = (last.float() + delta).to(hidden.dtype)
        return out

    def on_logits(self, scores: torch.Tensor) -> torch.Tensor:
        cur = self.current
        if not cur:
            raise RuntimeError("SDE control saw logits without a hidden state for this step (unsupported decoding).")
        ctl = self.control
        if ctl.controls_temperature:
            tau = ctl.temperature_law(cur["zscore"])
            scores = scores / tau.to(scores.device, scores.dtype).unsqueeze(-1)
        else:
            tau = torch.full_like(cur["zscore"], self.base_temperature)
        steer = cur.get("steer_norm", torch.zeros_like(tau))
        rec = self.records
        rec["diffusion"].append(cur["diffusion"])
        rec["zscore"].append(cur["zscore"])
        rec["drift_norm"].append(cur["drift_norm"])
        rec["temperature"].append(tau)
        rec["steer_norm"].append(steer)
        rec["positions"].append(cur["positions"])
        if "surprise_previous" in cur:
            rec["surprise"].append(cur["surprise_previous"])
        if ctl.callback is not None:
            ctl.callback(SDEStep(self.step, cur["diffusion"], cur["zscore"], cur["drift_norm"], tau, steer,
                                 cur.get("surprise_previous")))
        self.current = {}
        self.step += 1
        return scores

    # -- install / remove -----------------------------------------------------------------------------
    def install(self) -> None:
        self.handles.append(self.model.register_forward_pre_hook(self.on_forward_pre, with_kwargs=True))
        self.handles.append(register_block_hook(self.model, self.read_layer, self.on_read))
        if self.control.steers and self.steer_layer != self.read_layer:
            self.handles.append(register_block_hook(self.model, self.steer_layer, self.on_steer))

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def trace(self, sequences: torch.Tensor, prompt_width: int, eos_ids: list[int]) -> SDETrace:
        rec = self.records
        # One record per logits call. transformers may run one more step than it returns (the deferred stop
        # check undoes it, on MPS), so keep only the steps whose tokens came back.
        n = min(len(rec["diffusion"]), max(sequences.shape[1] - prompt_width, 0))
        rec = {k: v[: n - 1 if k == "surprise" else n] for k, v in rec.items()}
        if n == 0:
            empty = torch.zeros(sequences.shape[0], 0)
            return SDETrace(*(empty.clone() for _ in range(6)), empty.long())
        stacked = {k: torch.stack(v, dim=1).float() for k, v in rec.items() if k not in ("surprise", "positions") and v}
        surprise = torch.full_like(stacked["diffusion"], float("nan"))
        if rec["surprise"]:
            s = torch.stack(rec["surprise"], dim=1).float()
            surprise[:, : s.shape[1]] = s
        new = sequences[:, prompt_width: prompt_width + n].to(surprise.device)
        if eos_ids and new.numel():
            is_eos = torch.isin(new, torch.tensor(eos_ids, device=new.device))
            # Step k is valid if no EOS came before it (the EOS step itself is kept).
            finished_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long() > 0
        else:
            finished_before = torch.zeros_like(surprise, dtype=torch.bool)
        # A step's surprise needs the next state, which does not exist at or after EOS.
        finished_at = torch.cumsum(is_eos.long(), dim=1) > 0 if eos_ids and new.numel() else finished_before
        out = {}
        for k, v in stacked.items():
            out[k] = v.masked_fill(finished_before, float("nan"))
        surprise = surprise.masked_fill(finished_at, float("nan"))
        positions = torch.stack(rec["positions"], dim=1).masked_fill(finished_before, -1)
        return SDETrace(out["diffusion"], out["zscore"], out["drift_norm"], out["temperature"], out["steer_norm"],
                        surprise, positions)


@contextlib.contextmanager
def sde_hooks(model, control: SDEControl, base_temperature: float = 1.0, prompt_width: int | None = None):
    """Install the SDE hooks for one generation; always removes them. Yields the runtime."""
    runtime = _Runtime(control, model, base_temperature, prompt_width)
    runtime.install()
    try:
        yield runtime
    finally:
        runtime.remove()


def _eos_ids(model, kwargs) -> list[int]:
    gc = kwargs.get("generation_config") or model.generation_config
    eos = kwargs.get("eos_token_id", getattr(gc, "eos_token_id", None))
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def sde_generate(model, *args, sde_control: SDEControl | None = None, _generate=None, **kwargs):
    """``model.generate`` with optional SDE control (see :class:`SDEControl`).

    With ``sde_control=None`` this is exactly the stock ``generate``.
    """
    generate = _generate or functools.partial(type(model).generate, model)
    if sde_control is None:
        return generate(*args, **kwargs)
    if not isinstance(sde_control, SDEControl):
        raise TypeError(f"sde_control must be an SDEControl, got {type(sde_control).__name__}")
    ctl = sde_control
    ctl.heads.check_compatible(model)
    gc = kwargs.get("generation_config")
    num_beams = kwargs.get("num_beams", getattr(gc or model.generation_config, "num_beams", None) or 1)
    if num_beams and num_beams > 1:
        raise NotImplementedError("SDE control supports greedy decoding and sampling, not beam search (num_beams > 1).")
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
        raise NotImplementedError("SDE control does not support assisted / speculative decoding.")
    use_cache = kwargs.get("use_cache", getattr(gc or model.generation_config, "use_cache", True))
    if ctl.steers and use_cache is False:
        raise NotImplementedError(
            "Steering with use_cache=False would re-run and un-steer past positions; generate with the KV cache."
        )
    base_temperature = 1.0
    if ctl.controls_temperature:
        passed = kwargs.get("temperature")
        if passed is not None and passed != 1.0:
            raise ValueError(
                f"generate(temperature={passed}) conflicts with SDE temperature control: set the base temperature "
                "with SDEControl(temperature=...) instead."
            )
        # The SDE law replaces the static temperature, so switch the stock one off.
        if gc is not None:
            import copy

            kwargs["generation_config"] = gc = copy.deepcopy(gc)
            gc.temperature = 1.0
        else:
            kwargs["temperature"] = 1.0
    else:
        temp = kwargs.get("temperature", getattr(gc or model.generation_config, "temperature", None))
        base_temperature = float(temp) if temp is not None else 1.0
    input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if input_ids is None and kwargs.get("inputs_embeds") is None:
        raise ValueError("generate(..., sde_control=...) needs input_ids (or inputs / inputs_embeds).")
    prompt_width = input_ids.shape[1] if input_ids is not None else kwargs["inputs_embeds"].shape[1]
    return_dict = kwargs.get("return_dict_in_generate", getattr(gc or model.generation_config,
                                                                "return_dict_in_generate", False))
    with sde_hooks(model, ctl, base_temperature, prompt_width) as runtime:
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(SDETemperatureLogitsProcessor(runtime))
        out = generate(*args, logits_processor=processors, **kwargs)
    sequences = out.sequences if return_dict else out
    if input_ids is None:  # inputs_embeds only: generate returns just the new tokens
        prompt_width = 0
    trace = runtime.trace(sequences, prompt_width, _eos_ids(model, kwargs))
    ctl.last_trace = trace
    if return_dict:
        data = {k: v for k, v in out.items()}
        return SDEGenerateOutput(**data, sde_trace=trace)
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
