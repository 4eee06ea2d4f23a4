"""Whether the neural SDE beats its baselines on held-out paths: a margin, not a point estimate.

The held-out NLL difference (neural minus baseline, nats/dim) gets a percentile interval from a paired bootstrap
over held-out sequences (both models' NLLs of a sequence move together, so whole sequences are resampled). The
neural SDE "beats" a baseline only when that interval lies below 0 and the gain is at least ``MIN_NLL_GAIN``.
``hf-sde fit``, :func:`~hf_sde.fit_heads` and the analysis report all use this one rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .heads import gaussian_nll
from .transitions import make_transitions

#: Resamples of the paired bootstrap behind every verdict, and its level.
BOOTSTRAP_RESAMPLES, BOOTSTRAP_LEVEL = 2000, 0.95
#: A held-out NLL gain below this (nats/dim) is a tie whatever the interval says: float rounding of a fit that
#: kept its OU starting point is ~1e-7, and early stopping counts less than 1e-4 as no improvement.
MIN_NLL_GAIN = 1e-4
BASELINES = ("ou", "brownian")
NAMES = {"ou": "OU", "brownian": "Brownian", "neural": "neural"}


def paired_bootstrap(diff_sums, counts, *, resamples: int = BOOTSTRAP_RESAMPLES, level: float = BOOTSTRAP_LEVEL,
                     seed: int = 0) -> tuple[float, float] | None:
    """Percentile interval of the transition-weighted mean difference ``sum(diff) / sum(count)``, resampling
    whole sequences (paired: both models' NLLs of a sequence move together); ``None`` below 2 sequences."""
    diff, n_tr = np.asarray(diff_sums, dtype=float), np.asarray(counts, dtype=float)
    if len(diff) < 2:
        return None
    rng = np.random.default_rng(seed)
    boots = []
    for start in range(0, resamples, 256):  # bounded memory: 256 resamples of all sequences at a time
        idx = rng.integers(0, len(diff), size=(min(256, resamples - start), len(diff)))
        boots.append(diff[idx].sum(1) / n_tr[idx].sum(1))
    boots = np.concatenate(boots)
    tail = (1 - level) / 2
    return float(np.quantile(boots, tail)), float(np.quantile(boots, 1 - tail))


@torch.no_grad()
def compare_on_paths(predict: dict[str, Callable], paths: Sequence[torch.Tensor], horizon: float) -> dict:
    """neural - OU and neural - Brownian held-out NLL (nats/dim) with paired bootstrap intervals.

    ``predict`` maps ``"neural"``, ``"ou"`` and ``"brownian"`` to ``f(z, t) -> (mean, std)`` of the next increment;
    ``paths`` are held-out paths in SDE coordinates ``(L_i, d)``. Returns the differences, their intervals, whether
    the neural SDE beats each baseline and ``neural_beats_baselines`` (both), with the bootstrap's settings.
    """
    sums: dict[str, list[float]] = {k: [] for k in predict}
    counts = []
    for z in paths:
        if z.shape[0] < 2:
            continue
        tr = make_transitions([z.float()], horizon)
        for k, f in predict.items():
            mean, std = f(tr.z, tr.t)
            sums[k].append(float(gaussian_nll(tr.dz, mean, std).mean(-1).double().sum()))
        counts.append(len(tr))
    total = sum(counts)
    out = {"sequences": len(counts), "transitions": total, "resamples": BOOTSTRAP_RESAMPLES,
           "level": BOOTSTRAP_LEVEL, "min_gain": MIN_NLL_GAIN}
    beats = True
    for b in BASELINES:
        diff = [a - c for a, c in zip(sums["neural"], sums[b], strict=True)]
        mean = sum(diff) / total if total else math.nan
        interval = paired_bootstrap(diff, counts)
        wins = interval is not None and interval[1] < 0 and mean <= -MIN_NLL_GAIN
        beats = beats and wins
        out[b] = {"difference": mean, "interval": list(interval) if interval else None, "neural_better": wins}
    out["neural_beats_baselines"] = beats
    return out


def heldout_comparison(result, trajectories) -> dict:
    """:func:`compare_on_paths` of a :class:`~hf_sde.FitResult` on its own held-out sequences of ``trajectories``."""
    heads = result.heads
    predict = {"neural": heads, "ou": result.baselines["ou"].predict, "brownian": result.baselines["brownian"].predict}
    paths = [heads.project(trajectories.states[i].float()) for i in result.heldout_indices]
    return compare_on_paths(predict, paths, heads.config.horizon)


def interval_text(iv) -> str:
    return "no interval" if iv is None else f"{BOOTSTRAP_LEVEL:.0%} interval [{iv[0]:+.4f}, {iv[1]:+.4f}]"


def reasons_not_better(cmp: dict) -> list[str]:
    """Why the neural SDE is not shown to beat each baseline it does not beat (one phrase per baseline; needs an
    interval, i.e. at least 2 held-out sequences)."""
    why = []
    for b in BASELINES:
        if cmp[b]["neural_better"]:
            continue
        iv, d = cmp[b]["interval"], cmp[b]["difference"]
        if iv[0] <= 0 <= iv[1]:
            why.append(f"the interval of neural - {NAMES[b]} includes 0")
        elif abs(d) < MIN_NLL_GAIN:
            why.append(f"neural and {NAMES[b]} differ by less than {MIN_NLL_GAIN:g} nats/dim (a tie)")
        elif iv[0] > 0:
            why.append(f"it is worse than {NAMES[b]} (the interval lies above 0)")
        else:
            why.append(f"its gain over {NAMES[b]} is not clear")
    return why
