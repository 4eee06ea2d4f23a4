"""Input limits and parameter checks of the demo, shared by the backend, the app and API callers.

Checks live here, away from Gradio, so that API calls and the page get the same readable messages.
"""

from __future__ import annotations

import math

from ..control import MODES

#: Input limits the app enforces (the functions enforce them too, for API callers).
MAX_PROMPT_CHARS = 1000
MAX_PROMPT_TOKENS = 256
MAX_NEW_TOKENS = 128
MAX_ABS_BETA = 5.0
MAX_ABS_ALPHA = 2.0
MAX_TEMPERATURE = 5.0
#: Simulated paths drawn behind the controlled path on the phase plane.
CLOUD_PATHS = 48
DIRECTIONS = ("drift", "attractor")

#: Prompts offered as examples in the app (the first suits an instruction model, the others stories260K).
EXAMPLE_PROMPTS = ("Write a short story about a cat who learns to swim.", "Once upon a time",
                   "Give three tips for staying healthy.")


class InputError(ValueError):
    """A user input the demo refuses; its message says what to fix (shown as is, logged in one line)."""


def _number(name: str, value, *, integer: bool = False) -> float:
    if value is None or isinstance(value, bool) or isinstance(value, str):
        raise InputError(f"{name} must be a number, got {value!r}.")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {type(value).__name__}.") from None
    if not math.isfinite(x):
        raise InputError(f"{name} must be a finite number, got {value!r}.")
    if integer and x != int(x):
        raise InputError(f"{name} must be a whole number, got {value!r}.")
    return int(x) if integer else x


def clean_prompt(prompt) -> tuple[str, list[str]]:
    """The prompt as valid text: lone surrogates (which no tokenizer accepts) become U+FFFD, with a warning."""
    if not isinstance(prompt, str):
        raise InputError(f"The prompt must be text, got {type(prompt).__name__}.")
    try:
        prompt.encode("utf-8")
        return prompt, []
    except UnicodeEncodeError:
        fixed = prompt.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return fixed, ["The prompt held invalid characters (lone surrogates); they were replaced by \ufffd."]


def _check_ranges(p: dict) -> None:
    if abs(p["beta"]) > MAX_ABS_BETA:
        raise InputError(f"beta must lie in [-{MAX_ABS_BETA:g}, {MAX_ABS_BETA:g}]; got {p['beta']:g}.")
    for name, key in (("Base temperature", "temperature"), ("Minimum temperature", "min_temperature"),
                      ("Maximum temperature", "max_temperature")):
        if not 0 < p[key] <= MAX_TEMPERATURE:
            raise InputError(f"{name} must lie in (0, {MAX_TEMPERATURE:g}]; got {p[key]:g}.")
    if p["min_temperature"] > p["max_temperature"]:
        raise InputError(f"Minimum temperature ({p['min_temperature']:g}) is above the maximum temperature "
                         f"({p['max_temperature']:g}): swap them or widen the range.")
    if abs(p["alpha"]) > MAX_ABS_ALPHA:
        raise InputError(f"Steering strength alpha must lie in [-{MAX_ABS_ALPHA:g}, {MAX_ABS_ALPHA:g}]; "
                         f"got {p['alpha']:g}.")
    if not 0 <= p["seed"] < 2**31:
        raise InputError(f"Seed must lie in [0, 2^31); got {p['seed']}.")
    if not 1 <= p["max_new_tokens"] <= MAX_NEW_TOKENS:
        raise InputError(f"Max new tokens must lie in [1, {MAX_NEW_TOKENS}]; got {p['max_new_tokens']}.")


def _warnings(p: dict) -> list[str]:
    mode, out = p["mode"], []
    if mode == "observe":
        out.append("Observe mode: the heads only watch, so both columns are the same sample.")
    if "temperature" in mode:
        if p["beta"] == 0:
            out.append("beta = 0: the SDE temperature is the constant base temperature (plain sampling).")
        if not p["min_temperature"] <= p["temperature"] <= p["max_temperature"]:
            out.append(f"The base temperature {p['temperature']:g} lies outside [{p['min_temperature']:g}, "
                       f"{p['max_temperature']:g}] and is clipped.")
    if "steer" in mode and p["alpha"] == 0:
        out.append("alpha = 0: steering adds nothing (plain generation).")
    if "steer" not in mode and p["alpha"] != 0:
        out.append(f"alpha = {p['alpha']:g} is ignored: only the steer modes steer.")
    return out


def validate_params(prompt, mode, beta, temperature, min_temperature, max_temperature, alpha, direction, seed,
                    max_new_tokens) -> tuple[dict, list[str]]:
    """Check the user's parameters; returns ``(params, warnings)`` or raises :class:`InputError` saying what to fix.

    Nothing is rounded: a seed of 1.5 is refused, not turned into 2.
    """
    prompt, warnings = clean_prompt(prompt)
    if not prompt.strip():
        raise InputError("Type a prompt to continue (it is empty).")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"The prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}.")
    if not isinstance(mode, str) or mode not in MODES:
        raise InputError(f"Mode must be one of {', '.join(MODES)}; got {mode!r}.")
    if not isinstance(direction, str) or direction not in DIRECTIONS:
        raise InputError(f"Steering direction must be 'drift' or 'attractor'; got {direction!r}.")
    params = {"prompt": prompt, "mode": mode, "direction": direction,
              "beta": _number("beta", beta), "temperature": _number("Base temperature", temperature),
              "min_temperature": _number("Minimum temperature", min_temperature),
              "max_temperature": _number("Maximum temperature", max_temperature),
              "alpha": _number("Steering strength alpha", alpha), "seed": _number("Seed", seed, integer=True),
              "max_new_tokens": _number("Max new tokens", max_new_tokens, integer=True)}
    _check_ranges(params)
    return params, warnings + _warnings(params)
