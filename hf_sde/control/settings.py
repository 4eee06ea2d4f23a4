"""The user-facing settings of SDE control and what a call returns: :class:`SDEControl`, :class:`SDETrace`,
:class:`SDEStep`, :class:`SDEGenerateOutput`."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..fitting.heads import SDEHeads
from .laws import gate_value, steer_delta, steering_unit, temperature_law

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
        direction: ``"drift"`` (``v = P mu``), ``"attractor"`` (``v = P (z* - z)``), a hidden-size tensor, or
            a dict of layer -> hidden-size tensor that steers each of those layers along its own vector (what
            :func:`hf_sde.load_control_vector` reads from a llama.cpp / repeng GGUF control vector; every layer
            at or after the heads' layer, whose state gives the gate). Each vector is normalized; at each layer
            the step is ``alpha * gate(z) * ||h|| * unit(v_layer)``, and the trace's ``steer_norm`` sums them.
        attractor: ``z*`` in SDE coordinates for ``direction="attractor"`` (default: the origin, i.e. the
            mean training state).
        gate: ``"always"``, ``"threshold"`` (steer where ``z > gate_threshold``) or ``"sigmoid"``
            (``sigmoid(gate_sharpness * (z - gate_threshold))``).
        steer_layer: decoder layer to steer (default: the heads' layer; must not precede it). Not with a
            per-layer ``direction``, which names its layers.
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
    direction: str | torch.Tensor | Mapping[int, torch.Tensor] = "drift"
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
        for name in ("beta", "alpha", "temperature"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if isinstance(self.direction, str) and self.direction not in ("drift", "attractor"):
            raise ValueError(f"direction must be 'drift', 'attractor', a tensor or a dict of layer -> tensor, got "
                             f"{self.direction!r}")
        if isinstance(self.direction, Mapping):
            self.direction = self._per_layer(self.direction)
        if isinstance(self.direction, torch.Tensor) and self.direction.shape != (self.heads.config.hidden_size,):
            raise ValueError(
                f"a steering vector must have shape ({self.heads.config.hidden_size},), got {tuple(self.direction.shape)}"
            )
        origin = getattr(self.heads.config, "time_origin", "sequence")
        if origin not in TIME_ORIGINS:
            raise ValueError(f"heads.config.time_origin={origin!r} is not one of {TIME_ORIGINS}")

    def _per_layer(self, direction: Mapping) -> dict[int, torch.Tensor]:
        """A per-layer direction checked once, for every user of it (generate, compiled generate, vLLM): int layers
        resolved against the heads' model (negative counts from the end), each once, none before the heads'
        layer (whose state gives the gate), each a finite non-zero hidden-size vector; sorted by layer."""
        cfg = self.heads.config
        hidden, n, read = cfg.hidden_size, cfg.num_layers, cfg.layer
        if not direction:
            raise ValueError("direction is an empty dict: give at least one layer -> vector (a control vector file "
                             "read with hf_sde.load_control_vector holds one per layer)")
        if self.steer_layer is not None:
            raise ValueError(f"steer_layer={self.steer_layer} with a per-layer direction: the dict's keys are the "
                             "layers it steers; drop steer_layer (or keep only the layers you want in the dict)")
        out: dict[int, torch.Tensor] = {}
        for given, v in direction.items():
            if not isinstance(given, int) or isinstance(given, bool):
                raise TypeError(f"a per-layer direction's keys are decoder layer indices (int), got {given!r}")
            if not -n <= given < n:
                raise ValueError(f"the per-layer direction's layer {given} is out of range for the heads' model with "
                                 f"{n} decoder layers (valid: {-n}..{n - 1})")
            layer = given % n
            if layer in out:
                raise ValueError(f"the per-layer direction names decoder layer {layer} twice: give each layer once")
            if not isinstance(v, torch.Tensor) or v.shape != (hidden,):
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"the steering vector for layer {given} must be a tensor of shape ({hidden},) (the "
                                 f"heads' hidden size), got {shape}: was the control vector made for another model?")
            if not torch.isfinite(v).all() or not v.abs().max() > 0:
                raise ValueError(f"the steering vector for layer {given} is zero or not finite: it has no direction")
            out[layer] = v
        early = sorted(layer for layer in out if layer < read)
        if early:
            raise ValueError(
                f"the per-layer direction steers layer(s) {early}, before the heads' layer {read}: the gate and the "
                f"trace come from the state at the heads' layer, so every steered layer must be at or after it. Keep "
                f"the layers >= {read} (a file from hf_sde.load_control_vector has non-negative keys: "
                f"{{k: v for k, v in vectors.items() if k >= {read}}}), or use heads fitted on an earlier layer.")
        return dict(sorted(out.items()))

    def unit_directions(self, device: torch.device | str | None = None) -> dict[int, torch.Tensor]:
        """A per-layer direction's unit vectors (float32, on ``device``), by layer."""
        return {layer: (v.to(device, torch.float32) / v.norm().clamp_min(1e-12).to(device))
                for layer, v in self.direction.items()}

    def gain(self, zscore: torch.Tensor, alpha: torch.Tensor | float | None = None) -> torch.Tensor:
        """``alpha * gate(z)`` per row, ``(N, 1)``: a per-layer direction's steering step before each layer's unit
        vector and the ``||h||`` scale."""
        alpha = self.alpha if alpha is None else alpha
        return alpha * self.gate_value(zscore).unsqueeze(-1)

    @property
    def per_layer(self) -> bool:
        """Whether ``direction`` is a dict of layer -> vector."""
        return isinstance(self.direction, dict)

    @property
    def controls_temperature(self) -> bool:
        return "temperature" in self.mode

    @property
    def steers(self) -> bool:
        return "steer" in self.mode

    def temperature_law(self, zscore: torch.Tensor) -> torch.Tensor:
        """``clip(tau_0 * exp(-beta * z), tau_min, tau_max)`` (:func:`hf_sde.control.laws.temperature_law`)."""
        return temperature_law(zscore, self.temperature, self.beta, self.min_temperature, self.max_temperature)

    def steering_vector(self, mean: torch.Tensor, z: torch.Tensor, zscore: torch.Tensor, lift: Callable,
                        fixed: torch.Tensor | None = None, attractor: torch.Tensor | None = None,
                        alpha: torch.Tensor | float | None = None) -> torch.Tensor:
        """``alpha * gate(z) * unit(v)`` per row (``(N, hidden)``): the steering step before it is scaled by ``||h||``.

        ``mean`` / ``z`` / ``zscore``: the heads' drift increment, state and z-score of the rows; ``lift`` maps SDE
        coordinates to hidden space (``heads.lift``, or a precomputed matrix product); ``fixed``: the unit vector
        of ``direction`` when it is a tensor (normalized here otherwise); ``attractor``: ``z*`` on the rows' device;
        ``alpha``: ``self.alpha`` as a 0-dim tensor (a compiled step then does not specialize on its value).
        The one implementation, used by ``generate`` and by the vLLM processor.
        """
        if attractor is None and self.attractor is not None:
            attractor = self.attractor.to(z)
        unit = steering_unit(self.direction, mean, z, lift, fixed=fixed, attractor=attractor)
        alpha = self.alpha if alpha is None else alpha
        return unit * (alpha if self.gate == "always" else alpha * self.gate_value(zscore).unsqueeze(-1))

    @staticmethod
    def steer_delta(step: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """What steering adds to ``state`` (float32 rows): ``step * ||state||`` (``step``: :meth:`steering_vector`)."""
        return steer_delta(step, state)

    def gate_value(self, zscore: torch.Tensor) -> torch.Tensor:
        """The gate per row (:func:`hf_sde.control.laws.gate_value`)."""
        return gate_value(zscore, self.gate, self.gate_threshold, self.gate_sharpness)
