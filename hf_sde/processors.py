"""Decoding baselines (logits processors) that SDE control is compared against.

:class:`EntropyDynamicTemperatureLogitsProcessor` is entropy-based dynamic temperature (EDT; Zhang et al.,
"EDT: Improving Large Language Models' Generation by Entropy-based Dynamic Temperature Sampling",
arXiv:2403.14541): at every step the temperature is ``T = T0 * N ** (theta / H)`` with ``H`` the entropy of
the step's next-token distribution. With a base ``0 < N < 1`` (the paper uses 0.8), confident steps
(small ``H``) are cooled towards 0 and uncertain ones approach ``T0``.
"""

from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor


class EntropyDynamicTemperatureLogitsProcessor(LogitsProcessor):
    r"""Entropy-based dynamic temperature (EDT): divide the logits by ``T = T0 * N ** (theta / H)``.

    ``H`` is the Shannon entropy (nats) of ``softmax(scores)`` for each row, computed on the scores this
    processor receives (so after the processors before it, e.g. repetition penalties). The temperature is
    clipped to ``[min_temperature, max_temperature]`` (``max_temperature`` defaults to ``T0``, which EDT
    never exceeds for ``N < 1``); ``min_temperature`` keeps near-deterministic steps finite.

    Args:
        temperature: ``T0``, the temperature approached when the distribution is flat.
        base: ``N`` in ``(0, 1)`` for the paper's behaviour (0.8 by default).
        theta: ``theta > 0``; larger values cool more.
        min_temperature: lower clip (default 0.05).
        max_temperature: upper clip (default ``T0``).

    The temperature of the last call is kept in ``last_temperature`` (shape ``(batch,)``) and, if
    ``record=True``, every step's in ``temperatures``.

    Example:
        >>> from transformers import LogitsProcessorList
        >>> from hf_sde.processors import EntropyDynamicTemperatureLogitsProcessor
        >>> edt = EntropyDynamicTemperatureLogitsProcessor(temperature=1.0, base=0.8, theta=0.5)
        >>> out = model.generate(**inputs, do_sample=True, top_k=0,
        ...                      logits_processor=LogitsProcessorList([edt]))
        >>> edt.last_temperature    # the temperature of each row at the last step

    Pass it through ``logits_processor``: transformers runs custom processors before its own temperature,
    top-k, top-p and min-p warpers, so EDT composes with them like a temperature (leave ``temperature``
    at 1.0).
    """

    def __init__(self, temperature: float = 1.0, base: float = 0.8, theta: float = 1.0,
                 min_temperature: float = 0.05, max_temperature: float | None = None, record: bool = False):
        if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature (T0) must be a positive finite number, got {temperature!r}")
        if not (isinstance(base, (int, float)) and base > 0 and math.isfinite(base)):
            raise ValueError(f"base (N) must be a positive finite number, got {base!r}")
        if not (isinstance(theta, (int, float)) and math.isfinite(theta)):
            raise ValueError(f"theta must be a finite number, got {theta!r}")
        max_temperature = float(temperature) if max_temperature is None else float(max_temperature)
        if not 0 < min_temperature <= max_temperature:
            raise ValueError(f"need 0 < min_temperature <= max_temperature, got {min_temperature}, {max_temperature}")
        self.temperature = float(temperature)
        self.base = float(base)
        self.theta = float(theta)
        self.min_temperature = float(min_temperature)
        self.max_temperature = max_temperature
        self.record = record
        self.last_temperature: torch.Tensor | None = None
        self.temperatures: list[torch.Tensor] = []

    @staticmethod
    def entropy(scores: torch.Tensor) -> torch.Tensor:
        """Entropy in nats of ``softmax(scores)`` per row; ``-inf`` scores (masked tokens) contribute 0."""
        logp = torch.log_softmax(scores.float(), dim=-1)
        p = logp.exp()
        return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)

    def temperature_for(self, entropy: torch.Tensor) -> torch.Tensor:
        """``clip(T0 * N ** (theta / H))``; ``H = 0`` gives the limit (0 for ``N < 1``), then the clip."""
        exponent = self.theta / entropy.clamp_min(1e-12)
        tau = self.temperature * torch.exp(exponent * math.log(self.base))
        return torch.nan_to_num(tau, nan=self.min_temperature, posinf=self.max_temperature).clamp(
            self.min_temperature, self.max_temperature)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tau = self.temperature_for(self.entropy(scores))
        self.last_temperature = tau
        if self.record:
            self.temperatures.append(tau)
        return scores / tau.to(scores.dtype).unsqueeze(-1)
