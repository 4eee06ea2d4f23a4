"""Per-request SDE arguments for vLLM (``SamplingParams.extra_args`` offline, ``vllm_xargs`` over HTTP).

The arguments map one to one onto :class:`hf_sde.SDEControl` (its own checks run on them, so a request is
accepted by vLLM exactly when ``SDEControl`` would accept the same values), plus the heads name and the trace
id. Heads are named, never given as paths by a request: the server operator lists the heads it serves in
``HF_SDE_VLLM_HEADS`` (see :mod:`hf_sde.vllm.heads_registry`). Every error is a ``ValueError`` whose message
names the offending key; vLLM turns it into HTTP 400 on the server.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..control import GATES, MODES, SDEControl
from .heads_registry import resolve_heads

#: ``extra_args`` key -> (SDEControl field or None, accepted python types, description).
FLOAT = (int, float)
KEYS: dict[str, tuple[str | None, tuple[type, ...], str]] = {
    "sde_heads": (None, (str,), "name of served heads (HF_SDE_VLLM_HEADS)"),
    "sde_mode": ("mode", (str,), f"one of {MODES}"),
    "sde_beta": ("beta", FLOAT, "temperature law slope"),
    "sde_temperature": ("temperature", FLOAT, "base temperature tau_0"),
    "sde_min_temperature": ("min_temperature", FLOAT, "lower clip of the temperature"),
    "sde_max_temperature": ("max_temperature", FLOAT, "upper clip of the temperature"),
    "sde_alpha": ("alpha", FLOAT, "steering strength"),
    "sde_direction": ("direction", (str, list, dict), "'drift', 'attractor', a hidden-size list of floats, or "
                      "{layer: hidden-size list} to steer each layer along its own vector (a GGUF control vector "
                      "read with hf_sde.load_control_vector, as {str(k): v.tolist()})"),
    "sde_attractor": ("attractor", (list,), "z* for direction='attractor' (proj_dim floats)"),
    "sde_gate": ("gate", (str,), f"one of {GATES}"),
    "sde_gate_threshold": ("gate_threshold", FLOAT, "gate threshold on the z-score"),
    "sde_gate_sharpness": ("gate_sharpness", FLOAT, "sigmoid gate sharpness"),
    "sde_steer_layer": ("steer_layer", (int,), "decoder layer to steer (default the heads' layer)"),
    "sde_trace_id": (None, (str,), "key under which the request's trace is kept"),
}


@dataclass
class SDERequest:
    """One request's SDE settings, parsed and checked."""

    heads_name: str
    control: SDEControl
    trace_id: str | None


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join("number" if t is float else "int" if t is int else t.__name__ for t in types
                       if not (t is int and float in types))


def _check_value(key: str, value: Any, types: tuple[type, ...]) -> Any:
    if isinstance(value, bool) or not isinstance(value, types):
        name = _type_name(types)
        article = "an" if name[0] in "aeiou" else "a"
        raise ValueError(f"{key} must be {article} {name}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key} must be finite, got {value!r}")
    if isinstance(value, list):
        if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                for v in value):
            raise ValueError(f"{key} must be a non-empty list of finite numbers")
    return value


def _per_layer_direction(value: dict) -> dict:
    """``{layer: [floats]}`` (JSON keys are strings) -> ``{layer: tensor}``; SDEControl checks the layers (range,
    repeats, none before the heads' layer) and the vectors' size, as for a direction given in Python."""
    import torch

    out: dict[int, torch.Tensor] = {}
    for key, vector in value.items():
        text = str(key) if isinstance(key, (str, int)) and not isinstance(key, bool) else ""
        if not re.fullmatch(r"-?\d+", text):
            raise ValueError(f"sde_direction's keys are decoder layer indices (integers), got {key!r}")
        out[int(text)] = torch.tensor(_check_value(f"sde_direction[{key!r}]", vector, (list,)), dtype=torch.float32)
    return out


def has_sde_args(extra_args: dict | None) -> bool:
    return bool(extra_args) and any(str(k).startswith("sde_") for k in extra_args)


def parse_request(extra_args: dict | None) -> SDERequest | None:
    """``None`` for a request without ``sde_*`` keys; else the checked settings (``ValueError`` otherwise)."""
    import torch

    if not has_sde_args(extra_args):
        return None
    unknown = sorted(k for k in extra_args if str(k).startswith("sde_") and k not in KEYS)
    if unknown:
        raise ValueError(f"unknown SDE argument(s) {unknown}; valid keys: {sorted(KEYS)}")
    values = {k: _check_value(k, v, KEYS[k][1]) for k, v in extra_args.items() if k in KEYS}
    name, heads = resolve_heads(values.get("sde_heads"))
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        field = KEYS[key][0]
        if field is None:
            continue
        if key == "sde_direction" and isinstance(value, list):
            value = torch.tensor(value, dtype=torch.float32)
        elif key == "sde_direction" and isinstance(value, dict):
            value = _per_layer_direction(value)
        elif key == "sde_attractor":
            if len(value) != heads.config.proj_dim:
                raise ValueError(f"sde_attractor must have proj_dim={heads.config.proj_dim} numbers, got {len(value)}")
            value = torch.tensor(value, dtype=torch.float32)
        elif key == "sde_steer_layer":
            n = heads.config.num_layers
            if not -n <= value < n:
                raise ValueError(f"sde_steer_layer={value} is out of range for a model with {n} decoder layers")
            value %= n
            if value < heads.config.layer:
                raise ValueError(f"sde_steer_layer={value} precedes the heads' layer {heads.config.layer}: steer at "
                                 "that layer or a later one (the direction is computed there)")
        kwargs[field] = value
    kwargs.setdefault("mode", "observe")
    try:
        control = SDEControl(heads, **kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"invalid SDE arguments: {e} (keys are sde_<name>, e.g. sde_min_temperature)") from e
    trace_id = values.get("sde_trace_id")
    if trace_id is not None and not (0 < len(trace_id) <= 200):
        raise ValueError("sde_trace_id must be 1 to 200 characters")
    return SDERequest(name, control, trace_id)


def check_sampling(params, request: SDERequest) -> None:
    """Refuse sampling settings the SDE control cannot honour exactly as ``sde_generate`` does."""
    ctl = request.control
    if getattr(params, "n", 1) > 1:
        raise ValueError("SDE control serves one sequence per request (n=1): send n requests instead of n>1 "
                         "(each gets its own trace).")
    if ctl.controls_temperature:
        t = params.temperature
        if t not in (0.0, 1.0):
            raise ValueError(f"temperature={t} conflicts with SDE temperature control: leave temperature at 1.0 "
                             "and set the base temperature with sde_temperature (temperature=0 means greedy).")
        if params.min_p and params.min_p > 0:
            raise ValueError("min_p with SDE temperature control is refused: vLLM applies min_p before custom logits "
                             "processors, while hf-sde applies the SDE temperature first, so the result would differ "
                             "from generate(sde_control=...). Use top_p / top_k, or mode='observe'/'steer'.")
