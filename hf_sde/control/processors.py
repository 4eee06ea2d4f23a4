"""Decoding baselines (logits processors) that SDE control is compared against.

Besides transformers' own temperature, top-p, min-p, typical and eta warpers: entropy-based dynamic temperature
(:class:`EntropyDynamicTemperatureLogitsProcessor`) and the truncation samplers top-nσ
(:class:`TopNSigmaLogitsProcessor`) and p-less (:class:`PLessLogitsProcessor`).

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
            raise ValueError(f"need 0 < min_temperature <= max_temperature, got {min_temperature}, {max_temperature} "
                             "(max_temperature defaults to temperature: pass a lower min_temperature or a "
                             "max_temperature)")
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


def _check_filter_value(filter_value: float) -> float:
    if not isinstance(filter_value, (int, float)) or math.isnan(filter_value) or filter_value == math.inf:
        raise ValueError(f"filter_value must be a finite number or -inf (the default), got {filter_value!r}")
    return float(filter_value)


class TopNSigmaLogitsProcessor(LogitsProcessor):
    r"""Top-nσ truncation (Tang et al., "Top-nσ: Not All Logits Are You Need", arXiv:2411.07641): keep the tokens
    whose logit is within ``n`` standard deviations of the row's largest, ``l >= max(l) - n * std(l)``.

    The statistics are taken over the row's finite logits (tokens an earlier processor removed do not count). The
    kept set does not change with the temperature (dividing the logits divides ``max - l`` and ``std`` alike), which
    is the method's point: it stays stable where top-p and min-p admit ever more tokens as the temperature rises.

    Args:
        n: how many standard deviations below the maximum are kept (the paper's default 1.0); ``n > 0``.
        filter_value: what removed tokens' logits become (``-inf``).

    Example:
        >>> from transformers import LogitsProcessorList
        >>> from hf_sde.processors import TopNSigmaLogitsProcessor
        >>> out = model.generate(**inputs, do_sample=True, top_k=0, temperature=1.5,
        ...                      logits_processor=LogitsProcessorList([TopNSigmaLogitsProcessor(n=1.0)]))
    """

    def __init__(self, n: float = 1.0, filter_value: float = -float("inf")):
        if not (isinstance(n, (int, float)) and n > 0 and math.isfinite(n)):
            raise ValueError(f"n must be a positive finite number of standard deviations, got {n!r}")
        self.n = float(n)
        self.filter_value = _check_filter_value(filter_value)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float()
        finite = torch.isfinite(logits)
        count = finite.sum(-1, keepdim=True).clamp_min(1)
        values = torch.where(finite, logits, torch.zeros_like(logits))
        mean = values.sum(-1, keepdim=True) / count
        var = (torch.where(finite, logits - mean, torch.zeros_like(logits)) ** 2).sum(-1, keepdim=True) / count
        top = torch.where(finite, logits, torch.full_like(logits, -float("inf"))).amax(-1, keepdim=True)
        keep = logits >= top - self.n * var.sqrt()
        return scores.masked_fill(~keep, self.filter_value)


class PLessLogitsProcessor(LogitsProcessor):
    r"""p-less truncation (Tan et al., "p-less Sampling: A Robust Hyperparameter-Free Approach for LLM Decoding",
    arXiv:2509.23234): keep the tokens whose probability is at least ``sum_v p(v)^2``, the probability that two
    draws from the step's distribution coincide. No hyperparameter: a peaked distribution keeps few tokens, a flat
    one many.

    The threshold is computed on the distribution that is sampled. transformers runs the processors passed in
    ``logits_processor`` before its own temperature, so pass that temperature here too (``temperature=``, the
    same value as ``generate``'s): the threshold is then computed on ``softmax(scores / temperature)`` while the
    scores are left for ``generate`` to divide. (The paper's normalized variant is not implemented.)

    Args:
        temperature: the temperature ``generate`` applies after this processor (1.0 without one).
        filter_value: what removed tokens' logits become (``-inf``).

    Example:
        >>> from transformers import LogitsProcessorList
        >>> from hf_sde.processors import PLessLogitsProcessor
        >>> out = model.generate(**inputs, do_sample=True, top_k=0, temperature=1.3,
        ...                      logits_processor=LogitsProcessorList([PLessLogitsProcessor(temperature=1.3)]))
    """

    def __init__(self, temperature: float = 1.0, filter_value: float = -float("inf")):
        if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive finite number (generate's), got {temperature!r}")
        self.temperature = float(temperature)
        self.filter_value = _check_filter_value(filter_value)

    @staticmethod
    def threshold(probs: torch.Tensor) -> torch.Tensor:
        """``sum_v p(v)^2`` per row, ``(batch, 1)``."""
        return (probs * probs).sum(-1, keepdim=True)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        keep = probs >= self.threshold(probs)
        return scores.masked_fill(~keep, self.filter_value)
