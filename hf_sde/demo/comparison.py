"""Plain vs SDE-controlled sampling of one prompt with the same seed, streamed as the worker produces tokens.

:func:`stream_comparison` submits both runs to the model's batching worker at once (so they share a batch
when their hooks allow it) and yields the :class:`Comparison` as tokens arrive; leaving the generator early
cancels both runs, so an abandoned request stops costing compute.

Example:
    >>> loaded = DemoBackend(STORIES260K).load()
    >>> result = generate_comparison(loaded, "Once upon a time", mode="temperature", beta=1.0, seed=0)
    >>> result.plain.continuation, result.controlled.continuation
    >>> result.controlled.trace.zscore.shape        # (1, new_tokens)
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..analysis.tokens import token_pieces
from ..control import SDEControl, SDETrace
from .backend import LoadedModel
from .batching import RowOutput, RowRequest
from .settings import CLOUD_PATHS, MAX_PROMPT_TOKENS, InputError, validate_params


@dataclass
class RunResult:
    """One sampled continuation, filled in as it streams.

    ``steps`` holds the per-step statistics as they arrive; ``trace`` (``(1, new_tokens)``) and ``path`` (SDE
    states of the whole sequence, prompt included, ``(prompt_tokens + new_tokens, d)``) are set when it finishes.
    """

    label: str
    mode: str
    token_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    steps: dict[str, list[float]] = field(
        default_factory=lambda: {"diffusion": [], "zscore": [], "temperature": [], "steer_norm": []})
    text: str = ""
    continuation: str = ""
    trace: SDETrace | None = None
    path: torch.Tensor | None = None
    seconds: float = 0.0
    done: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Comparison:
    """Plain and controlled runs of one prompt with the same seed, plus simulated paths for the phase plane."""

    prompt: str
    prompt_ids: list[int]
    params: dict
    plain: RunResult
    controlled: RunResult
    warnings: list[str] = field(default_factory=list)
    cloud: torch.Tensor | None = None
    done: bool = False
    chat: bool = False


def _simulate_cloud(heads, z0: torch.Tensor, steps: int, n_paths: int, t0: float, seed: int) -> torch.Tensor:
    from ..analysis.simulate import simulate

    return simulate(heads, z0, steps=steps, n_paths=n_paths, t0=t0, generator=torch.Generator().manual_seed(seed))


def _prepare(loaded: LoadedModel, prompt, kwargs: dict) -> Comparison:
    params, warnings = validate_params(prompt, **kwargs)
    heads = loaded.heads
    prompt_ids = loaded.encode_prompt(params["prompt"])
    if len(prompt_ids) > MAX_PROMPT_TOKENS:
        raise InputError(f"The prompt is {len(prompt_ids)} tokens long; the limit is {MAX_PROMPT_TOKENS}.")
    limit, new = loaded.max_positions, params["max_new_tokens"]
    if len(prompt_ids) + new > limit:
        raise InputError(f"Prompt ({len(prompt_ids)} tokens) plus {new} new tokens exceed the model's {limit} "
                         "positions; shorten the prompt or ask for fewer tokens.")
    span = new if getattr(heads.config, "time_origin", "sequence") == "prompt_end" else len(prompt_ids) + new
    if span > heads.config.horizon:
        warnings.append(f"The sequence runs past the heads' horizon T = {heads.config.horizon:g} tokens: the SDE "
                        "extrapolates in time there.")
    return Comparison(params["prompt"], prompt_ids, params, RunResult("Plain sampling", "observe"),
                      RunResult("SDE-controlled", params["mode"]), warnings, chat=loaded.chat)


def _rows(loaded: LoadedModel, cmp: Comparison, events: queue.SimpleQueue) -> list[RowRequest]:
    p = cmp.params
    control = SDEControl(loaded.heads, mode=p["mode"], beta=p["beta"], temperature=p["temperature"],
                         min_temperature=p["min_temperature"], max_temperature=p["max_temperature"],
                         alpha=p["alpha"], direction=p["direction"])
    observe = SDEControl(loaded.heads, mode="observe")
    common = dict(prompt_ids=cmp.prompt_ids, seed=p["seed"], max_new_tokens=p["max_new_tokens"],
                  temperature=p["temperature"], events=events)
    return [RowRequest("plain", control=observe, **common), RowRequest("controlled", control=control, **common)]


def _add_token(loaded: LoadedModel, cmp: Comparison, run: RunResult, tok: int, stats: dict, start: float) -> None:
    pieces = token_pieces(loaded.tokenizer, [tok], context=cmp.prompt_ids + run.token_ids, show_special=not cmp.chat)
    run.token_ids.append(tok)
    run.pieces.extend(pieces)
    for name in run.steps:
        run.steps[name].append(float(stats.get(name, float("nan"))))
    run.seconds = time.perf_counter() - start


def _finish(loaded: LoadedModel, cmp: Comparison, run: RunResult, out: RowOutput, start: float) -> None:
    tok = loaded.tokenizer
    if out.token_ids != run.token_ids:  # the stream is a preview; the returned sequence is the truth
        run.token_ids = list(out.token_ids)
        run.pieces = token_pieces(tok, run.token_ids, context=cmp.prompt_ids, show_special=not cmp.chat)
    run.trace, run.path = out.trace, out.path
    run.continuation = tok.decode(run.token_ids, skip_special_tokens=True)
    # A chat prompt's template is not shown: the text is the user's prompt and the assistant's answer.
    run.text = (f"{cmp.prompt}\n{run.continuation}" if cmp.chat
                else tok.decode(cmp.prompt_ids + run.token_ids, skip_special_tokens=True))
    run.seconds, run.done = time.perf_counter() - start, True


def _cloud(loaded: LoadedModel, cmp: Comparison, cloud_paths: int) -> None:
    heads, ctl = loaded.heads, cmp.controlled
    steps = max(cmp.plain.num_tokens, ctl.num_tokens)
    if cloud_paths > 0 and ctl.path is not None and steps > 0:
        p = len(cmp.prompt_ids) - 1
        t0 = 0.0 if getattr(heads.config, "time_origin", "sequence") == "prompt_end" else p / heads.config.horizon
        cmp.cloud = _simulate_cloud(heads, ctl.path[p].to(heads.proj_basis.device), steps, cloud_paths, t0,
                                    cmp.params["seed"]).cpu()


def stream_comparison(loaded: LoadedModel, prompt: str, mode: str = "temperature", beta: float = 1.0,
                      temperature: float = 1.0, min_temperature: float = 0.3, max_temperature: float = 1.5,
                      alpha: float = 0.1, direction: str = "drift", seed: int = 0, max_new_tokens: int = 48,
                      cloud_paths: int = CLOUD_PATHS, timeout: float | None = None) -> Iterator[Comparison]:
    """Like :func:`generate_comparison`, as a generator: yields the same :class:`Comparison`, updated in place,
    after every token of either run, and once more when all is done.

    Raises :class:`InputError` (a ``ValueError``) before the first yield for bad parameters. Closing the
    generator early cancels both runs.
    """
    cmp = _prepare(loaded, prompt, dict(mode=mode, beta=beta, temperature=temperature,
                                        min_temperature=min_temperature, max_temperature=max_temperature,
                                        alpha=alpha, direction=direction, seed=seed, max_new_tokens=max_new_tokens))
    events: queue.SimpleQueue = queue.SimpleQueue()
    rows = _rows(loaded, cmp, events)
    runs = {"plain": cmp.plain, "controlled": cmp.controlled}
    start = time.perf_counter()
    loaded.scheduler.submit(rows)
    try:
        while not (cmp.plain.done and cmp.controlled.done):
            tag, kind, payload = events.get(timeout=timeout)
            if kind == "error":
                raise payload
            if kind == "token":
                _add_token(loaded, cmp, runs[tag], *payload, start)
            else:
                _finish(loaded, cmp, runs[tag], payload, start)
            yield cmp
    finally:
        for row in rows:
            row.cancelled.set()  # a no-op for finished rows; stops abandoned ones
    _cloud(loaded, cmp, cloud_paths)
    cmp.done = True
    yield cmp


def generate_comparison(loaded: LoadedModel, prompt: str, **params) -> Comparison:
    """Sample ``prompt`` plainly and under SDE control with the same seed; return both runs and their traces.

    Keyword arguments: ``mode`` (one of :data:`hf_sde.control.MODES`), ``beta``, ``temperature`` (the base
    temperature ``tau_0``, also the plain run's temperature), ``min_temperature``, ``max_temperature``,
    ``alpha``, ``direction`` (``"drift"`` / ``"attractor"``), ``seed``, ``max_new_tokens``, ``cloud_paths``.
    With ``beta=0`` in a temperature mode (and ``tau_0`` inside the bounds) or ``alpha=0`` when steering, the
    two continuations are identical. Raises ``ValueError`` for bad parameters.
    """
    last = None
    for snapshot in stream_comparison(loaded, prompt, **params):
        last = snapshot
    return last
