"""The paper's analyses as one reproducible, offline report: ``build_report`` and ``hf-sde analyze``.

``build_report`` extracts the model's hidden paths on a corpus, projects them with the heads, and
writes ``index.html`` (static, images referenced relatively), ``metrics.json`` and one PNG per
figure into ``out_dir``. Every number comes from :mod:`hf_sde.analysis`; simulations from
:mod:`hf_sde.simulate`.

Held-out paths. Analyses that judge the model (residual tests, simulation against reality, theory
checks on the data) use sequences the heads were not trained on whenever that is knowable:

1. ``heldout_indices`` recorded in the fit summary (``fit_history.json``), if the corpus matches;
2. else, when the corpus file name and sequence count match what the heads record
   (``config.data``), the fit's seeded split is recomputed with :func:`hf_sde.fitting.split_sequences`
   (seed from the summary, else the CLI default 0; prompt groups kept together) and checked: the
   training states of that split must reproduce the heads' PCA mean (``verified``);
3. else a seeded held-out split of the given data (``heldout_fraction``, groups kept together); if the
   heads record another corpus none of these texts was used in training, otherwise they may have been.

The OU and Brownian baselines are refitted on the training side of that split (the data the heads saw,
when the split is recorded or verified), so neural and baselines are judged on the same held-out paths.
"""

from __future__ import annotations

import html
import inspect
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..fitting.compare import BASELINES, NAMES, compare_on_paths, interval_text, reasons_not_better
from ..fitting.fit import BrownianBaseline, OUBaseline, _evaluate, make_transitions, split_sequences
from . import diagnostics as an
from .simulate import BaselineSDE, simulate
from .tokens import token_pieces

logger = logging.getLogger(__name__)

STEPS = ("extract trajectories", "split and baselines", "drift and diffusion", "process properties",
         "simulation", "theory checks", "per-token diffusion", "figures", "write report")


# ----- inputs -----------------------------------------------------------------------------------------
def _normalize_history(history) -> tuple[dict | None, dict | None]:
    """``(per-epoch history, fit summary)`` from a fit_history.json dict / path, a FitResult or a bare history."""
    if history is None:
        return None, None
    if isinstance(history, (str, os.PathLike)):
        with open(history) as f:
            history = json.load(f)
    if hasattr(history, "history") and hasattr(history, "summary"):
        return dict(history.history), history.summary()
    if isinstance(history, dict) and "history" in history:
        return history["history"], history.get("summary")
    if isinstance(history, dict):
        return history, None
    raise TypeError(f"history must be a fit_history.json path or dict, a FitResult or None, not {type(history).__name__}")


def choose_split(n: int, groups: list | None, heads, summary: dict | None, data_name: str | None,
                 heldout_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int], str]:
    """Train / held-out sequence indices for the analysis and how they were chosen (see the module doc).

    Returns ``(train, heldout, source)`` with ``source`` one of ``"recorded"``, ``"reconstructed"``,
    ``"new-split-unseen-corpus"``, ``"new-split"``. Verification against the PCA mean happens in
    :func:`build_report`, which has the states.
    """
    cfg_data = dict(getattr(heads.config, "data", {}) or {})
    summary = summary or {}
    same_corpus = data_name is not None and cfg_data.get("corpus") == data_name
    if same_corpus and summary.get("heldout_indices") is not None and cfg_data.get("sequences") == n:
        held = [int(i) for i in summary["heldout_indices"]]
        train = [int(i) for i in summary.get("train_indices", [i for i in range(n) if i not in set(held)])]
        return train, held, "recorded"
    n_held = summary.get("num_heldout_sequences", cfg_data.get("heldout_sequences"))
    n_train = summary.get("num_train_sequences", cfg_data.get("train_sequences"))
    if same_corpus and cfg_data.get("sequences") == n and n_held is not None:
        fit_seed = int(summary.get("seed", 0))
        keys = list(range(n)) if groups is None or len(set(groups)) < 2 else groups
        n_unique = len(set(keys))
        for n_val in range(1, n_unique):
            train, held = split_sequences(n, n_val / n_unique, fit_seed, groups)
            if len(held) == n_held and (n_train is None or len(train) == n_train):
                return train, held, "reconstructed"
            if len(held) > n_held:
                break
    train, held = split_sequences(n, heldout_fraction, seed, groups)
    unseen = cfg_data.get("corpus") is not None and data_name is not None and not same_corpus
    return train, held, "new-split-unseen-corpus" if unseen else "new-split"


SPLIT_TEXT = {
    "recorded": "the fit's own held-out sequences (indices recorded in the fit summary)",
    "reconstructed": "the fit's held-out sequences (seeded split recomputed{verified})",
    "new-split-unseen-corpus": "a seeded held-out split of a corpus the heads were not fitted on "
                               "(no sequence here was used in training)",
    "new-split": "a seeded held-out split of the given data: the heads may have been trained on some of "
                 "these texts, so held-out numbers may be optimistic",
}


def _scalars(d: dict, drop: tuple[str, ...] = ()) -> dict:
    """The dict without long per-position curves (those live in the figures, not in metrics.json)."""
    out = {}
    for k, v in d.items():
        if k in drop:
            continue
        if isinstance(v, dict):
            out[k] = _scalars(v, drop)
        else:
            out[k] = v
    return out


# ----- the analysis steps -----------------------------------------------------------------------------
@dataclass
class Analysis:
    """Everything the report computes, step by step (the figures and the HTML read it by field name)."""

    heads: object
    seed: int = 0
    # extraction
    paths: list = field(default_factory=list)
    kept: list = field(default_factory=list)
    kept_ids: list = field(default_factory=list)
    kept_context: list = field(default_factory=list)
    groups: list | None = None
    states: list = field(default_factory=list)
    skipped: int = 0
    data_name: str | None = None
    # split and baselines
    train_idx: list = field(default_factory=list)
    held_idx: list = field(default_factory=list)
    split_source: str = ""
    verified: bool | None = None
    held_paths: list = field(default_factory=list)
    held_tr: object = None
    models: dict = field(default_factory=dict)
    nll: dict = field(default_factory=dict)
    comparison: dict = field(default_factory=dict)
    # results of the later steps (dicts of analysis outputs)
    profiles: dict = field(default_factory=dict)
    plane: dict = field(default_factory=dict)
    process: dict = field(default_factory=dict)
    sim: dict = field(default_factory=dict)
    theory: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)

    @property
    def horizon(self) -> float:
        return float(self.heads.config.horizon)


def extract_paths(a: Analysis, model, tokenizer, data, *, template, text_column, limit, max_length,
                  batch_size, progress: bool = False, cache=None, trajectories=None) -> None:
    """Step 1: the corpus's hidden paths at the heads' layer, projected to SDE coordinates.

    ``cache`` as :func:`~hf_sde.trajectories.extract_trajectories`; ``trajectories``: paths already extracted
    from this corpus with these options (an ``hf-sde extract`` folder's), checked against its tokens.
    """
    from ..data.corpus import load_texts
    from ..trajectories.extract import corpus_description, extract_documents, tokenize_documents

    heads = a.heads
    heads.check_compatible(model)
    docs, groups = load_texts(data, template=template, text_column=text_column, limit=limit, return_groups=True)
    # Texts or conversations (chat templates: the path is the response, read in the context of its prompt).
    max_context = getattr(model.config, "max_position_embeddings", None)  # as the fit's extraction
    ids, starts = tokenize_documents(tokenizer, docs, max_length, max_context, template=template)
    first = starts or [0] * len(ids)
    if trajectories is None:
        trajectories = extract_documents(model, tokenizer, docs, heads.config.layer, groups=groups,
                                         max_length=max_length, max_context=max_context, batch_size=batch_size,
                                         template=template, progress=progress, cache=cache,
                                         corpus=corpus_description(data, template, text_column, limit),
                                         tokens=(ids, starts))
    traj = trajectories
    a.kept = list(traj.meta["kept_indices"])
    usable = [i for i in range(len(ids)) if len(ids[i]) - first[i] >= 2]
    if a.kept != usable or any(s.shape[0] != len(ids[i]) - first[i] for i, s in zip(a.kept, traj.states, strict=True)):
        raise ValueError("The trajectories do not match the corpus's tokens (other documents, template or "
                         "max length); extract them again from this corpus.")
    a.groups = [groups[i] for i in a.kept] if groups is not None else None
    a.kept_ids = [ids[i][first[i]:] for i in a.kept]  # the tokens at the path's positions
    a.kept_context = [ids[i][: first[i]] for i in a.kept]
    a.skipped = traj.skipped
    a.paths = [heads.project(s).detach().float() for s in traj.states]
    a.states = traj.states
    a.data_name = os.path.basename(str(data).rstrip("/")) if isinstance(data, str) else None


def split_and_baselines(a: Analysis, summary: dict | None, heldout_fraction: float) -> None:
    """Step 2: the held-out split (module doc), its verification, OU / Brownian refitted on the training side."""
    heads = a.heads
    a.train_idx, a.held_idx, a.split_source = choose_split(len(a.paths), a.groups, heads, summary, a.data_name,
                                                           heldout_fraction, a.seed)
    if a.split_source in ("recorded", "reconstructed"):
        train_mean = torch.cat([a.states[i].float() for i in a.train_idx]).mean(0)
        tol = 1e-3 * (1 + float(heads.proj_mean.abs().max()))
        a.verified = bool((train_mean - heads.proj_mean).abs().max() < tol)
    T = a.horizon
    train_tr = make_transitions([a.paths[i] for i in a.train_idx], T)
    a.held_paths = [a.paths[i] for i in a.held_idx]
    a.held_tr = make_transitions(a.held_paths, T)
    a.models = {"neural": heads, "ou": BaselineSDE(OUBaseline.fit(train_tr), T),
                "brownian": BaselineSDE(BrownianBaseline.fit(train_tr), T)}
    a.nll = {k: _evaluate(m, a.held_tr) for k, m in a.models.items()}
    a.comparison = compare_on_paths(a.models, a.held_paths, T)


def split_description(a: Analysis) -> str:
    if a.verified is None:
        verified = ""
    elif a.verified:
        verified = ": verified, its training states reproduce the heads' PCA mean"
    else:
        verified = (": same rows and prompt groups, but the texts differ from the fit's (template or max length), "
                    "so it could not be verified against the heads' PCA mean")
    return SPLIT_TEXT[a.split_source].format(verified=verified)


def drift_and_diffusion(a: Analysis) -> None:
    """Step 3: drift / diffusion profiles over time and the field on the PC1-PC2 plane."""
    a.profiles = {k: an.drift_diffusion_profile(m, a.held_tr) for k, m in a.models.items() if k != "brownian"}
    held_z = a.held_tr.z
    lo = torch.quantile(held_z[:, :2], 0.01, dim=0).tolist()
    hi = torch.quantile(held_z[:, :2], 0.99, dim=0).tolist()
    a.plane = an.phase_plane(a.heads, (lo[0], hi[0]), (lo[1], hi[1]), n=21, t=float(a.held_tr.t.median()))


def process_properties(a: Analysis) -> None:
    """Step 4: residual Gaussianity and whiteness, increment ACF, quadratic variation."""
    tr = a.held_tr
    resid = an.standardized_residuals(a.heads, tr)
    a.process = {
        "gaussianity": an.gaussianity(resid, seed=a.seed),
        "qq": an.qq_points(resid),
        "acf_residuals": an.autocorrelation(an.split_by_sequence(resid, tr.seq)),
        "acf_increments": an.autocorrelation(an.split_by_sequence(tr.dz, tr.seq)),
        "quadratic_variation": an.quadratic_variation(a.heads, a.held_paths),
        "gaussianity_ou": an.gaussianity(an.standardized_residuals(a.models["ou"], tr), seed=a.seed),
    }


def _increments(paths) -> torch.Tensor:
    return torch.cat([p[1:] - p[:-1] for p in paths])


def simulation(a: Analysis, *, n_paths: int, max_starts: int, method: str) -> None:
    """Step 5: simulate every model from held-out starts and compare with the real paths."""
    held = a.held_paths
    n_starts = min(max_starts, len(held))
    pick = np.unique(np.linspace(0, len(held) - 1, n_starts).round().astype(int)).tolist()
    real = [held[i] for i in pick]
    lengths = [p.shape[0] for p in real]
    z0 = torch.stack([p[0] for p in real])
    s = {"real": real, "lengths": lengths, "paths": {}, "curves": {"real": an.moment_curves(real)}, "errors": {},
         "sw": {}, "sw_inc": {}, "nonfinite": {}}
    real_states, real_inc = torch.cat(real), _increments(real)
    for k, m in a.models.items():
        sims = simulate(m, z0, steps=max(lengths) - 1, n_paths=n_paths, method=method, seed=a.seed)
        s["paths"][k] = an.truncate_to_lengths(sims, lengths, n_paths)
        sim_states = torch.cat(s["paths"][k])
        s["nonfinite"][k] = float((~torch.isfinite(sim_states).all(-1)).double().mean())
        s["curves"][k] = an.moment_curves(s["paths"][k])
        s["errors"][k] = an.curve_errors(s["curves"]["real"], s["curves"][k])
        s["sw"][k] = an.sliced_wasserstein(real_states, sim_states, seed=a.seed)
        s["sw_inc"][k] = an.sliced_wasserstein(real_inc, _increments(s["paths"][k]), seed=a.seed)
    if len(real) >= 2:
        s["sw"]["real_vs_real"] = an.sliced_wasserstein(torch.cat(real[0::2]), torch.cat(real[1::2]), seed=a.seed)
        s["sw_inc"]["real_vs_real"] = an.sliced_wasserstein(_increments(real[0::2]), _increments(real[1::2]),
                                                            seed=a.seed)
    sw = s["sw"]
    s["neural_closer"] = bool(sw["neural"] < sw["ou"])
    # Two halves of the real paths differ by sampling alone; a neural-OU gap below that is not a difference.
    s["within_noise"] = bool(abs(sw["neural"] - sw["ou"]) < sw["real_vs_real"]) if "real_vs_real" in sw else None
    s["method"], s["n_paths"] = method, n_paths
    a.sim = s


def theory_checks(a: Analysis, max_samples: int) -> None:
    """Step 6: Lipschitz / growth constants, attractor, Lyapunov generator, Ito moment equations."""
    heads, tr = a.heads, a.held_tr
    g = torch.Generator().manual_seed(a.seed)
    sel = torch.randperm(len(tr), generator=g)[:max_samples]
    zs, ts = tr.z[sel], tr.t[sel]
    attractor = an.estimate_attractor(heads, zs, ts)
    z_star = attractor["z_star"]
    a.theory = {
        "lipschitz_growth": an.lipschitz_growth(heads, zs, ts, seed=a.seed),
        "attractor": attractor,
        "lyapunov": an.lyapunov(heads, zs, ts, z_star),
        "lv": an.generator_lv(heads, zs, ts, z_star),
        "lv_dist": (zs.double() - torch.tensor(z_star, dtype=torch.float64)).norm(dim=-1),
        "ito_real": an.ito_moments(heads, a.held_paths),
        "ito_sim": an.ito_moments(heads, [p for p in a.sim["paths"]["neural"] if torch.isfinite(p).all()]),
    }


def token_examples(a: Analysis, tokenizer, n_examples: int) -> None:
    """Step 7: per-token diffusion z-scores on held-out texts spread over the held-out set (32+ tokens first)."""
    pool = [i for i in a.held_idx if a.paths[i].shape[0] >= 32] or a.held_idx
    n_ex = min(n_examples, len(pool))
    a.examples = []
    for i in [pool[j * len(pool) // n_ex] for j in range(n_ex)]:
        td = an.token_diffusion(a.heads, a.paths[i])
        a.examples.append({"sequence": int(a.kept[i]), "tokens": token_pieces(tokenizer, a.kept_ids[i], a.kept_context[i]),
                           "zscore": td["zscore"], "diffusion": td["diffusion"]})


_ITO_CURVES = ("t", "empirical_mean", "ito_mean", "empirical_second", "ito_second", "em_second")


def collect_metrics(a: Analysis, *, data, template, max_length, summary) -> dict:
    """The metrics dict (``metrics.json``): scalars of every step, long curves left to the figures."""
    cfg, nll, s, th, pr = a.heads.config, a.nll, a.sim, a.theory, a.process
    return {
        "hf_sde_version": cfg.library_version,
        "heads": {"base_model": cfg.base_model, "revision": cfg.base_model_revision, "gguf_file": cfg.gguf_file,
                  "layer": cfg.layer, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                  "proj_dim": cfg.proj_dim, "horizon": a.horizon, "fit_data": dict(cfg.data or {})},
        "data": {"source": data if isinstance(data, str) else "<list>", "template": template,
                 "max_length": max_length, "n_sequences": len(a.paths), "skipped_short_texts": a.skipped,
                 "n_train": len(a.train_idx), "n_heldout": len(a.held_idx), "n_heldout_transitions": len(a.held_tr),
                 "heldout_source": a.split_source, "heldout_verified": a.verified,
                 "heldout_description": split_description(a)},
        "fit": summary,
        "heldout_nll": {k: v["total"] for k, v in nll.items()},
        "heldout_nll_parts": nll,
        "neural_beats_baselines": bool(a.comparison["neural_beats_baselines"]),
        "heldout_comparison": a.comparison,
        "drift_diffusion": a.profiles,
        "process": {"gaussianity": pr["gaussianity"], "gaussianity_ou": pr["gaussianity_ou"],
                    "acf_residuals": pr["acf_residuals"], "acf_increments": pr["acf_increments"],
                    "quadratic_variation": _scalars(pr["quadratic_variation"],
                                                    ("curve_t", "curve_realized", "curve_integrated"))},
        "simulation": {"method": s["method"], "n_starts": len(s["real"]), "n_paths": s["n_paths"],
                       "steps": max(s["lengths"]) - 1, "curve_errors": s["errors"], "sliced_wasserstein": s["sw"],
                       "sliced_wasserstein_increments": s["sw_inc"], "nonfinite_share": s["nonfinite"],
                       "neural_closer_than_ou": s["neural_closer"], "neural_ou_gap_within_noise": s["within_noise"]},
        "theory": {"lipschitz_growth": th["lipschitz_growth"],
                   "attractor": _scalars(th["attractor"], ("linear_A", "linear_b")),
                   "lyapunov": th["lyapunov"],
                   "ito_moments": {"real": _scalars(th["ito_real"], _ITO_CURVES),
                                   "simulated": _scalars(th["ito_sim"], _ITO_CURVES)}},
        "examples": a.examples,
    }


# ----- verdicts (one wording for the HTML and the terminal) ------------------------------------------------
def verdicts(m: dict, bold=lambda s: s) -> dict[str, str]:
    """The report's two headline sentences from its metrics; ``bold`` marks the verdict words (HTML: ``<b>``).

    ``hf-sde analyze`` prints these too, so the terminal never says more than the report (a neural-OU gap
    within sampling noise is a tie, not "closer").
    """
    nll = m["heldout_nll"]
    beats = m["neural_beats_baselines"]
    sim = m["simulation"]
    sw = sim["sliced_wasserstein"]
    noise = sim["neural_ou_gap_within_noise"]
    if noise:
        relation = "as close to (a tie within sampling noise)"
    else:
        relation = "closer to" if sim["neural_closer_than_ou"] else "NOT closer to"
    floor = f"; two halves of the real paths differ by {sw['real_vs_real']:.4g}" if "real_vs_real" in sw else ""
    tail = {True: ", so the neural-OU difference is within sampling noise.",
            False: ", so the difference is larger than sampling noise."}.get(noise, ".")
    cmp = m.get("heldout_comparison")
    margin = ""
    if cmp is not None:
        intervals = "; ".join(f"neural - {NAMES[b]} {cmp[b]['difference']:+.4f}, {interval_text(cmp[b]['interval'])}"
                              for b in BASELINES)
        margin = f" ({intervals}; paired bootstrap over {cmp['sequences']} held-out sequences)"
        if not beats:
            why = reasons_not_better(cmp) if cmp["sequences"] >= 2 else [
                f"{cmp['sequences']} held-out sequence gives no interval"]
            margin += f": {'; '.join(why)}"
    return {
        "nll": (f"On held-out transitions the neural SDE {bold('beats' if beats else 'does NOT beat')} both "
                f"baselines: NLL {nll['neural']:.4f} (neural) vs {nll['ou']:.4f} (OU) and {nll['brownian']:.4f} "
                f"(Brownian) nats/dim{margin}."),
        "simulation": (f"Simulated neural-SDE paths are {bold(relation)} the held-out paths "
                       f"{'as' if noise else 'than'} simulated OU paths: sliced Wasserstein {sw['neural']:.4g} "
                       f"(neural) vs {sw['ou']:.4g} (OU), {sw['brownian']:.4g} (Brownian){floor}{tail}"),
    }


# ----- the report -------------------------------------------------------------------------------------
def _check_template(heads, template: str | None, trajectories) -> None:
    """Warn when the texts are made with another template than the heads' training texts: their paths (and, for
    ``prompt_end`` heads, their time) are not the ones the heads model, so every comparison says little."""
    fitted = (heads.config.data or {}).get("template")
    if trajectories is not None or fitted is None or template == fitted:
        return
    warnings.warn(f"the heads were fitted on texts made with template {fitted!r}, these with "
                  f"{template!r}: their hidden-state paths differ from the ones the heads model (the prompt, the "
                  f"time origin), so the report compares the heads on paths they were not fitted for. Pass "
                  f"template={fitted!r} (hf-sde analyze --template {fitted}).", UserWarning, stacklevel=3)


def build_report(
    model,
    tokenizer,
    heads,
    data,
    out_dir: str,
    template: str | None = None,
    max_length: int | None = None,
    history=None,
    *,
    text_column: str | None = None,
    limit: int | None = None,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    n_paths: int = 4,
    max_starts: int = 64,
    method: str = "euler",
    n_examples: int = 3,
    max_samples: int = 4000,
    batch_size: int = 8,
    progress: bool = True,
    cache=None,
    trajectories=None,
) -> dict:
    """Run every analysis and write ``out_dir/index.html``, ``out_dir/metrics.json`` and the figures.

    Args:
        model: the causal LM the heads were fitted on (checked with ``heads.check_compatible``).
        tokenizer: its tokenizer.
        heads: fitted :class:`~hf_sde.heads.SDEHeads`.
        data: a corpus :func:`hf_sde.corpus.load_texts` reads (path, hub dataset id or list of strings).
        template: how rows become texts (as for ``hf-sde fit``).
        text_column: the column holding the text, where no template is given.
        limit: the number of rows read.
        max_length: token truncation (default: what the heads record, else 256).
        history: ``fit_history.json`` (path or loaded dict, as ``hf-sde fit`` writes it), a ``FitResult``
            or ``None`` (then the loss-curve figure is replaced by a note).
        heldout_fraction: the held-out share when the fit's own split cannot be recovered (module doc).
        seed: that split's seed.
        n_paths: simulated paths from each start state.
        max_starts: held-out start states simulated from (for each held-out path's length).
        method: the solver, as in :func:`simulate`.
        n_examples: held-out texts shown with per-token diffusion z-scores.
        max_samples: data points (held-out transitions) for Jacobians, attractor and Lyapunov checks.
        batch_size: extraction batch size (documents per forward).
        progress: the step bar and the extraction's own bar (per batch, with an ETA).
        cache: reuse / store the extracted paths (as :func:`~hf_sde.trajectories.extract_trajectories`).
        trajectories: the paths at the heads' layer already extracted from ``data`` with these options (e.g. an
            ``hf-sde extract`` folder's), instead of extracting them; checked against the corpus's tokens.

    Returns:
        The metrics dict also written to ``metrics.json``.
    """
    t_start = time.time()
    _check_template(heads, template, trajectories)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heads.eval()
    hist, summary = _normalize_history(history)
    if max_length is None:
        max_length = dict(heads.config.data or {}).get("max_length") or 256
    a = Analysis(heads=heads, seed=seed)
    steps = [
        lambda: extract_paths(a, model, tokenizer, data, template=template, text_column=text_column, limit=limit,
                              max_length=max_length, batch_size=batch_size, progress=progress, cache=cache,
                              trajectories=trajectories),
        lambda: split_and_baselines(a, summary, heldout_fraction),
        lambda: drift_and_diffusion(a),
        lambda: process_properties(a),
        lambda: simulation(a, n_paths=n_paths, max_starts=max_starts, method=method),
        lambda: theory_checks(a, max_samples),
        lambda: token_examples(a, tokenizer, n_examples),
    ]
    bar = tqdm(total=len(STEPS), desc="hf-sde analyze", disable=not progress, unit="step")
    for name, run in zip(STEPS, steps, strict=False):
        bar.set_postfix_str(name)
        run()
        bar.update()
    metrics = collect_metrics(a, data=data, template=template, max_length=max_length, summary=summary)
    bar.set_postfix_str("figures")
    figs = draw_figures(out, a, hist, summary)
    bar.update()
    bar.set_postfix_str("write report")
    metrics["figures"] = [f["file"] for f in figs]
    metrics["runtime_s"] = time.time() - t_start
    with open(out / "metrics.json", "w") as f:
        json.dump(_jsonable(metrics), f, indent=1, allow_nan=False)
    (out / "index.html").write_text(_html(metrics, figs))
    bar.update()
    bar.close()
    return metrics


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None  # strict JSON has no NaN / inf
    return x


# ----- figures ----------------------------------------------------------------------------------------
def _new_fig(w=7.0, h=4.0, **adjust):
    """An Agg-drawable Figure (no pyplot, no global backend change) with fixed margins.

    Fixed margins instead of constrained layout: that layout engine draws every figure twice and was
    most of the report's run time.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    margins = {"left": 0.8 / w, "right": 1 - 0.25 / w, "bottom": 0.55 / h, "top": 1 - 0.35 / h, "wspace": 0.28}
    margins.update(adjust)
    fig.subplots_adjust(**margins)
    return fig


def _smooth(p: torch.Tensor, window: int = 16) -> np.ndarray:
    """Running mean of a path along positions (the token-level path is jumpy; its local mean shows the flow)."""
    x = p.numpy()
    w = max(1, min(window, len(x)))
    c = np.cumsum(np.vstack([np.zeros((1, x.shape[1])), x]), axis=0)
    return (c[w:] - c[:-w]) / w


COLORS = {"real": "black", "neural": "tab:red", "ou": "tab:blue", "brownian": "tab:green"}


def _first_paths(k: str, ps: list, n_real: int) -> list:
    """One path per start (simulations hold ``n_paths`` per start), non-finite rows dropped."""
    step = 1 if k == "real" else max(1, len(ps) // max(1, n_real))
    return [p[torch.isfinite(p).all(-1)] for p in ps[::step]]


def _cloud(ps: list, n: int = 4000, seed: int = 0) -> np.ndarray:
    """Up to ``n`` finite states of the paths (a seeded subsample)."""
    x = torch.cat(ps)
    x = x[torch.isfinite(x).all(-1)]
    if len(x) > n:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]]
    return x.numpy()


def _phase_groups(a: Analysis) -> tuple:
    """Token-level paths jump, so states are drawn as a point cloud and the paths as their running means."""
    paths = a.sim["paths"]
    return (("real", a.sim["real"]), ("neural", paths["neural"]), ("ou", paths["ou"]))


def fig_loss_curves(a: Analysis, hist: dict | None, summary: dict | None):
    """Loss curves.

    Training (solid) and held-out (dashed) NLL per epoch with its drift and diffusion parts; the neural
    curve should end below the dotted OU and Brownian lines, and val rising while train falls means
    overfitting.
    """
    if not hist:
        return None
    fig = _new_fig(11, 3.4)
    axes = fig.subplots(1, 3)
    for ax, part in zip(axes, ("total", "drift", "diffusion"), strict=True):
        for split, style in (("train", "-"), ("val", "--")):
            ys = hist.get(f"{split}_{part}")
            if ys:
                ax.plot(range(1, len(ys) + 1), ys, style, label=split)
        ax.set_title(f"{part} NLL" + (" (nats/dim)" if part == "total" else " part"))
        ax.set_xlabel("epoch")
    if summary and summary.get("heldout_nll"):
        for k in ("ou", "brownian"):
            if k in summary["heldout_nll"]:
                axes[0].axhline(summary["heldout_nll"][k], color=COLORS[k], ls=":", label=f"{k} held-out")
    axes[0].legend(fontsize=8)
    return fig


def fig_drift_vs_t(a: Analysis, hist: dict | None, summary: dict | None):
    """Drift norm over time.

    Mean drift norm on held-out states per time bin (band: quartiles), neural vs OU; a falling curve means
    the deterministic pull weakens as the text goes on.
    """
    profiles = a.profiles
    fig = _new_fig()
    ax = fig.subplots()
    for k in ("neural", "ou"):
        b = profiles[k]["bins"]
        ax.plot(b["t"], b["drift_norm_mean"], color=COLORS[k], label=f"{k} mean ||mu||")
        ax.fill_between(b["t"], b["drift_norm_q25"], b["drift_norm_q75"], color=COLORS[k], alpha=0.2)
    ax.set_xlabel("t = position / T")
    ax.set_ylabel("||mu(Z_t, t)|| (time units)")
    ax.legend()
    return fig


def _plane_figure(plane: dict):
    """``(fig, ax, x, y)`` for a field drawn on the PC1-PC2 phase plane (``x``, ``y``: the grid axes)."""
    fig = _new_fig(6.5, 5.5, right=0.9)
    ax = fig.subplots()
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    return fig, ax, np.asarray(plane["x"]), np.asarray(plane["y"])


def _draw_held_paths(ax, held_paths, *, color: str | None = None, raw: int = 0, arrow: bool = False, **style):
    """Draw up to four held-out paths on the plane as running means (``_smooth``) with ``style``.

    ``color``: one colour for all (default: ``C1``, ``C2``, ...); ``raw``: also draw the first ``raw`` paths
    themselves, thin; ``arrow``: an arrowhead at each running mean's end.
    """
    for j, p in enumerate(held_paths[:4]):
        c = color or f"C{j + 1}"
        if j < raw:
            ax.plot(p[:, 0], p[:, 1], lw=0.4, alpha=0.2, color=c)
        sm = _smooth(p)
        ax.plot(sm[:, 0], sm[:, 1], color=c, **style)
        if arrow:
            ax.plot(sm[-1, 0], sm[-1, 1], ">", color=c, ms=6)


def fig_drift_quiver(a: Analysis, hist: dict | None, summary: dict | None):
    """Drift field on the PCA phase plane.

    Drift direction (arrows; colour = strength) on the PC1-PC2 plane at t = {a.plane[t]:.2f}, other
    coordinates at the training mean, with two held-out paths (thin) and four paths' 16-token running
    means (bold, arrowhead at the end): the running means should flow along the arrows.
    """
    plane = a.plane
    fig, ax, x, y = _plane_figure(plane)
    u, v = np.asarray(plane["u"]), np.asarray(plane["v"])
    speed = np.hypot(u, v)
    q = ax.quiver(x, y, u / (speed + 1e-12), v / (speed + 1e-12), speed, cmap="viridis", angles="xy",
                  pivot="mid", scale=30)
    fig.colorbar(q, ax=ax, label="|drift| in the plane")
    _draw_held_paths(ax, a.held_paths, raw=2, arrow=True, lw=2)
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(y[0], y[-1])
    return fig


def fig_diffusion_vs_t(a: Analysis, hist: dict | None, summary: dict | None):
    """Diffusion over time.

    Model diffusion magnitude per time bin (band: quartiles) against the realized residual size (dashed):
    the red curve should track the dashed one; OU is constant by construction.
    """
    profiles = a.profiles
    fig = _new_fig()
    ax = fig.subplots()
    b = profiles["neural"]["bins"]
    ax.plot(b["t"], b["diffusion_mean"], color=COLORS["neural"], label="neural s (mean)")
    ax.fill_between(b["t"], b["diffusion_q25"], b["diffusion_q75"], color=COLORS["neural"], alpha=0.2)
    ax.plot(b["t"], b["realized_diffusion"], "k--", label="realized sqrt(mean (dZ - mu dt)^2 / dt)")
    ax.plot(profiles["ou"]["bins"]["t"], profiles["ou"]["bins"]["diffusion_mean"], color=COLORS["ou"], label="OU s")
    ax.set_xlabel("t = position / T")
    ax.set_ylabel("diffusion magnitude s (time units)")
    ax.legend(fontsize=8)
    return fig


def fig_diffusion_plane(a: Analysis, hist: dict | None, summary: dict | None):
    """Diffusion on the PCA phase plane.

    Diffusion magnitude over the PC1-PC2 plane at t = {a.plane[t]:.2f} with running means of held-out
    paths (white): bright regions are where the model expects the path to be noisy.
    """
    plane = a.plane
    fig, ax, x, y = _plane_figure(plane)
    cs = ax.contourf(x, y, np.asarray(plane["s"]), levels=20, cmap="magma")
    fig.colorbar(cs, ax=ax, label="diffusion magnitude s")
    _draw_held_paths(ax, a.held_paths, color="w", lw=1.5, alpha=0.9)
    return fig


def fig_sim_moments(a: Analysis, hist: dict | None, summary: dict | None):
    """Simulation vs reality: mean and variance.

    Mean and variance curves of held-out paths (black) and of paths simulated from the same starts (axes
    follow the real curves): the closer a model's curves to black (and the lower its sliced Wasserstein,
    SW), the better.
    """
    curves, sw, T = a.sim["curves"], a.sim["sw"], a.horizon
    fig = _new_fig(11, 3.4)
    axes = fig.subplots(1, 3)
    for k in ("real", "neural", "ou", "brownian"):
        c = curves[k]
        n = len(c["count"])
        tt = np.arange(n) / T
        mean = np.asarray(c["mean"])
        lab = k if k == "real" else f"{k} sim (SW {sw[k]:.3f})"
        axes[0].plot(tt, mean[:, 0], color=COLORS[k], lw=1.5 if k == "real" else 1, label=lab)
        axes[1].plot(tt, mean[:, 1], color=COLORS[k], lw=1.5 if k == "real" else 1)
        axes[2].plot(tt, c["total_var"], color=COLORS[k], lw=1.5 if k == "real" else 1)
    # Axes follow the real curves (with margin): a simulation that runs away leaves the panel visibly.
    for ax, ys in zip(axes, (np.asarray(curves["real"]["mean"])[:, 0], np.asarray(curves["real"]["mean"])[:, 1],
                             np.asarray(curves["real"]["total_var"])), strict=True):
        lo_, hi_ = float(np.nanmin(ys)), float(np.nanmax(ys))
        r = max(hi_ - lo_, 0.1 * max(abs(hi_), abs(lo_)), 1e-3)
        ax.set_ylim(lo_ - r, hi_ + r)
    axes[0].set_title("E[Z_1] (PC1)")
    axes[1].set_title("E[Z_2] (PC2)")
    axes[2].set_title("total variance sum_i Var Z_i")
    for ax in axes:
        ax.set_xlabel("t")
    axes[0].legend(fontsize=7)
    return fig


def fig_process(a: Analysis, hist: dict | None, summary: dict | None):
    """Stochastic-process properties.

    Left: residual autocorrelation inside the grey white-noise band means the Markov/independent-increment
    assumption holds; middle: points on the diagonal mean Gaussian residuals; right: realized QV on the
    integrated sigma^2 means calibrated diffusion.
    """
    pr = a.process
    acf_resid, acf_inc, qq, gauss, qv = (pr["acf_residuals"], pr["acf_increments"], pr["qq"], pr["gaussianity"],
                                         pr["quadratic_variation"])
    fig = _new_fig(11, 3.4)
    axes = fig.subplots(1, 3)
    ax = axes[0]
    ax.bar(np.asarray(acf_resid["lags"]) - 0.2, acf_resid["acf"], width=0.4, label="standardized residuals")
    ax.bar(np.asarray(acf_inc["lags"]) + 0.2, acf_inc["acf"], width=0.4, label="raw increments")
    ax.axhspan(-acf_resid["band"], acf_resid["band"], color="grey", alpha=0.3)
    ax.set_xlabel("lag")
    ax.set_title("autocorrelation")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(qq["theoretical"], qq["sample"], ".", ms=3)
    lim = [min(qq["theoretical"][0], qq["sample"][0]), max(qq["theoretical"][-1], qq["sample"][-1])]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set_xlabel("N(0,1) quantile")
    ax.set_ylabel("residual quantile")
    ax.set_title(f"QQ: KS {gauss['ks_statistic']:.3f}, p={gauss['ks_pvalue']:.2g}")
    ax = axes[2]
    ax.plot(qv["curve_t"], qv["curve_realized"], "k", label="realized QV")
    ax.plot(qv["curve_t"], qv["curve_integrated"], color=COLORS["neural"], label="integrated sum sigma^2 dt")
    ax.set_xlabel("t")
    ax.set_title(f"quadratic variation (ratio {qv['ratio']:.2f})")
    ax.legend(fontsize=7)
    return fig


def fig_phase_2d(a: Analysis, hist: dict | None, summary: dict | None):
    """Phase space (2-D).

    States of held-out and simulated paths on PC1-PC2 (same axes; lines: 16-token running means of three
    paths): a good model fills the same region with the same shape and drifts the same way.
    """
    real = a.sim["real"]
    groups = _phase_groups(a)
    # the paths as their running means (one start's paths in each panel, same start for all three).
    fig = _new_fig(11, 3.8)
    axes = fig.subplots(1, 3, sharex=True, sharey=True)
    for ax, (k, ps) in zip(axes, groups, strict=True):
        pts = _cloud(ps)
        ax.scatter(pts[:, 0], pts[:, 1], s=3, alpha=float(np.clip(1000 / max(len(pts), 1), 0.25, 0.7)),
                   color=COLORS[k], rasterized=True, linewidths=0)
        for j, p in enumerate(_first_paths(k, ps, len(real))[:3]):
            sm = _smooth(p)
            ax.plot(sm[:, 0], sm[:, 1], lw=1.8, color=f"C{j + 4}")
        ax.set_title("held-out states" if k == "real" else f"{k}-simulated states")
        ax.set_xlabel("PC1")
    axes[0].set_ylabel("PC2")
    lo = torch.quantile(torch.cat(real)[:, :2], 0.005, dim=0)
    hi = torch.quantile(torch.cat(real)[:, :2], 0.995, dim=0)
    pad = 0.2 * (hi - lo)
    axes[0].set_xlim(float(lo[0] - pad[0]), float(hi[0] + pad[0]))
    axes[0].set_ylim(float(lo[1] - pad[1]), float(hi[1] + pad[1]))
    return fig


def fig_phase_3d(a: Analysis, hist: dict | None, summary: dict | None):
    """Phase space (3-D).

    Held-out (left) and neural-simulated (right) states in the first three PCA coordinates (same axes;
    lines: running means of three paths): compare the shape and extent of the two clouds.
    """
    real = a.sim["real"]
    groups = _phase_groups(a)
    fig = _new_fig(10, 4.6, left=0.02, right=0.96, bottom=0.04, top=0.92, wspace=0.15)
    for j, (k, ps) in enumerate(groups[:2]):
        ax = fig.add_subplot(1, 2, j + 1, projection="3d")
        pts = _cloud(ps, n=2500)
        ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], s=4, alpha=float(np.clip(1000 / max(len(pts), 1), 0.3, 0.7)),
                   color=COLORS[k], linewidths=0)
        for i, p in enumerate(_first_paths(k, ps, len(real))[:3]):
            sm = _smooth(p)
            ax.plot(sm[:, 0], sm[:, 1], sm[:, 2], lw=1.8, color=f"C{i + 4}")
        ax.set_title("held-out states" if k == "real" else "neural-simulated states")
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
        ax.set_zlabel("PC3")
        if k == "real":
            lims = [ax.get_xlim(), ax.get_ylim(), ax.get_zlim()]
        else:
            ax.set_xlim(*lims[0])
            ax.set_ylim(*lims[1])
            ax.set_zlim(*lims[2])
    return fig


def fig_theory(a: Analysis, hist: dict | None, summary: dict | None):
    """Theory checks: Lyapunov and Ito moments.

    Left: LV < 0 (blue) beyond the dashed ball means the attractor pulls paths back; middle and right:
    dashed Ito-integrated moments on the black empirical ones mean drift and diffusion explain the moment
    dynamics (dotted: with the Euler-Maruyama E||mu dt||^2 term; axes follow the data).
    """
    th = a.theory
    lv, lv_dist, lyap, ito_real, ito_sim = th["lv"], th["lv_dist"], th["lyapunov"], th["ito_real"], th["ito_sim"]
    fig = _new_fig(11, 3.4)
    axes = fig.subplots(1, 3)
    ax = axes[0]
    lvn = lv.numpy()
    ax.scatter(lv_dist.numpy(), lvn, s=2, c=np.where(lvn < 0, "tab:blue", "tab:red"), alpha=0.5)
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(lyap["radius"], color="grey", ls="--", label=f"ball r={lyap['radius']:.2f}")
    ax.set_xlabel("||z - z*||")
    ax.set_ylabel("LV")
    finite_lv = np.abs(lvn[np.isfinite(lvn)])
    ax.set_yscale("symlog", linthresh=max(float(np.median(finite_lv)) * 0.1, 1e-6) if finite_lv.size else 1.0)
    share = lyap["share_negative_outside"]
    ax.set_title("Lyapunov: LV<0 outside ball " + (f"{100 * share:.0f}%" if math.isfinite(share) else "(none outside)"))
    ax.legend(fontsize=7)
    ax = axes[1]
    tt = np.asarray(ito_real["t"])
    ax.plot(tt, np.asarray(ito_real["empirical_mean"])[:, 0], "k", label="held-out E[Z_1]")
    ax.plot(tt, np.asarray(ito_real["ito_mean"])[:, 0], color=COLORS["neural"], ls="--", label="Ito-integrated")
    ax.set_xlabel("t")
    ax.set_title("Ito: d E[Z]/dt = E[mu] (PC1)")
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.plot(tt, ito_real["empirical_second"], "k", label="held-out E||Z||^2")
    ax.plot(tt, ito_real["ito_second"], color=COLORS["neural"], ls="--", label="Ito-integrated")
    ax.plot(tt, ito_real["em_second"], color="tab:purple", ls=":", lw=2, label="Euler-Maruyama form")
    ts = np.asarray(ito_sim["t"])
    ax.plot(ts, ito_sim["empirical_second"], color="tab:orange", lw=0.8, label="neural-simulated E||Z||^2")
    both = np.concatenate([np.asarray(ito_real["empirical_second"]), np.asarray(ito_real["em_second"])])
    lo_, hi_ = float(np.nanmin(both)), float(np.nanmax(both))
    r = max(hi_ - lo_, 0.1 * abs(hi_), 1e-3)
    ax.set_ylim(lo_ - 0.5 * r, hi_ + 0.5 * r)
    ax.set_xlabel("t")
    ax.set_title("Ito: d E||Z||^2/dt (held-out)")
    ax.legend(fontsize=7)
    return fig


#: the report's figures, in page order: each ``fig_NAME(a, hist, summary)`` returns a Figure (or None to skip)
#: and documents itself (see :func:`figure_text`)
FIGURES = (fig_loss_curves, fig_drift_vs_t, fig_drift_quiver, fig_diffusion_vs_t, fig_diffusion_plane,
           fig_sim_moments, fig_process, fig_phase_2d, fig_phase_3d, fig_theory)


def figure_text(make, a: Analysis) -> dict:
    """A figure function's file (``fig_NAME`` draws ``NAME.png``), title and caption (from its docstring).

    The docstring's first line is the title; the paragraph after it is the caption, formatted with the
    analysis as ``a`` (e.g. ``{a.plane[t]:.2f}``).
    """
    title, _, caption = inspect.cleandoc(make.__doc__).partition("\n")
    return {"file": make.__name__.removeprefix("fig_") + ".png", "title": title.rstrip("."),
            "caption": " ".join(caption.split()).format(a=a)}


def draw_figures(out: Path, a: Analysis, hist: dict | None, summary: dict | None) -> list[dict]:
    """Step 8: every figure of :data:`FIGURES` saved as a PNG in ``out``; their file, title and caption."""
    figs = []
    for make in FIGURES:
        fig = make(a, hist, summary)
        if fig is None:
            continue
        text = figure_text(make, a)
        fig.savefig(out / text["file"])
        figs.append(text)
    return figs


# ----- HTML -------------------------------------------------------------------------------------------
def _fmt(x, digits=4) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.{digits}g}"
    return html.escape(str(x))


def _zscore_color(z: float) -> str:
    """A token's background: red above 0 (noisier than usual), blue below (calmer), opaque from |z| = 3."""
    a = min(abs(z) / 3.0, 1.0) * 0.85
    return f"rgba(214,39,40,{a:.2f})" if z > 0 else f"rgba(31,119,180,{a:.2f})"


def _zscore_html(ex: dict) -> str:
    spans = []
    for tok, z, s in zip(ex["tokens"], ex["zscore"], ex["diffusion"], strict=True):
        text = html.escape(tok).replace("\n", "&#8629;<br>")
        spans.append(f'<span style="background:{_zscore_color(z)}" title="z={z:.2f}, s={s:.3g}">{text}</span>')
    return "".join(spans)


def _zscore_legend() -> str:
    """The colour key of the per-token z-scores (the same colours as the tokens)."""
    keys = "".join(f'<span class="key" style="background:{_zscore_color(z)}">&nbsp;z = {z:+d}&nbsp;</span> '
                   for z in range(-3, 4))
    return (f"<p class='legend'>Colour key: {keys}<br>Blue: the diffusion at that token is below its usual level "
            "(a calm, predictable step), red: above it (a noisy step, where the model's path is least certain); "
            "white: the usual level (z = 0). The colour saturates at |z| = 3. z is the diffusion magnitude's "
            "log, standardized by its mean and spread over the training transitions; &#8629; marks a line break.</p>")


CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}figure{margin:1.5em 0}img{max-width:100%}figcaption{color:#444;font-size:.95em}
.verdict{font-size:1.1em;padding:.6em;border-left:4px solid #888;background:#f7f7f7}
.tokens{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.7;border:1px solid #ddd;padding:.6em}
.tokens span{border-radius:2px}.legend span{font-family:ui-monospace,monospace;border-radius:2px}"""


def _theory_rows(m: dict) -> str:
    th = m["theory"]
    lip, att, ly, ito = th["lipschitz_growth"], th["attractor"], th["lyapunov"], th["ito_moments"]
    rows = [
        ("Lipschitz constant of mu (max / p95 Jacobian spectral norm)",
         f"{_fmt(lip['drift']['jacobian_max'])} / {_fmt(lip['drift']['jacobian_p95'])}",
         "finite on the data region: local Lipschitz condition holds there"),
        ("Lipschitz constant of sigma (max / p95)",
         f"{_fmt(lip['diffusion']['jacobian_max'])} / {_fmt(lip['diffusion']['jacobian_p95'])}",
         "finite on the data region: the noise level changes smoothly there, as existence and uniqueness need; "
         "a max far above the p95 means a few places where it changes sharply"),
        ("Largest difference quotient mu / sigma over random pairs",
         f"{_fmt(lip['drift']['pair_ratio_max'])} / {_fmt(lip['diffusion']['pair_ratio_max'])}",
         "a lower bound of the Lipschitz constant; should not exceed the Jacobian max by much"),
        ("Linear-growth constant max ||f|| / (1 + ||z||), mu / sigma",
         f"{_fmt(lip['drift']['growth_max'])} / {_fmt(lip['diffusion']['growth_max'])}",
         "finite: neither field grows faster than linearly on the data (the growth condition), so paths cannot "
         "blow up in finite time there"),
        ("Attractor z*: residual drift / data RMS drift",
         f"{_fmt(att['residual_drift'])} / {_fmt(att['data_drift_norm'])}",
         "a small ratio means the drift field has a true zero"),
        ("z* distance from the data mean (data RMS radii)", _fmt(att["distance_from_data_mean"]),
         "below ~1: the attractor lies inside the data cloud"),
        ("Linearized drift: largest real part of eig(A)", _fmt(att["linear_eig_real_max"]),
         "negative: near z* the drift pulls a displaced state back (linearly stable); positive: it pushes it away "
         "along some direction"),
        (f"Share of data points with LV &lt; 0 outside the ball r = {ly['radius']:.3g}",
         _fmt(ly["share_negative_outside"]), "near 1: mean reversion dominates noise far from z*"),
        ("Share with LV &lt; 0 overall / critical radius", f"{_fmt(ly['share_negative_all'])} / {_fmt(ly['critical_radius'])}",
         "beyond the critical radius every sampled point has LV &lt; 0"),
        ("Linearized mean reversion per token, -Re eig(A) dt (min - max)",
         f"{_fmt(att['reversion_per_step_min'])} - {_fmt(att['reversion_per_step_max'])}",
         "near 1: the drift undoes most of a step within one token (far from the small-dt regime)"),
        ("Ito mean equation d E[Z]/dt = E[mu], held-out: RMS gap / sampling-noise floor / RMS change of E[Z]",
         f"{_fmt(ito['real']['mean_rmse'])} / {_fmt(ito['real']['mean_noise_floor'])} / {_fmt(ito['real']['mean_scale'])}",
         "gap near the noise floor: the drift explains how the mean moves"),
        ("Ito second-moment equation, held-out: gap / change of E||Z||^2, continuous-time / Euler-Maruyama",
         f"{_fmt(ito['real']['second_ratio'])} / {_fmt(ito['real']['second_em_ratio'])}",
         "the Euler-Maruyama form adds E||mu dt||^2 per step; a large continuous-time ratio means dt is not small"),
        ("Euler-Maruyama second moment, held-out: gap / sampling-noise floor",
         _fmt(ito['real']['second_em_gap_over_noise']), "near 1: drift and diffusion explain how the spread moves"),
        ("Same on neural-simulated paths: mean gap / noise, second-moment (EM) gap / noise",
         f"{_fmt(ito['simulated']['mean_gap_over_noise'])} / {_fmt(ito['simulated']['second_em_gap_over_noise'])}",
         "consistency of the simulator with the equations (near 1)"),
    ]
    return "".join(f"<tr><td>{a}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in rows)


def _process_rows(m: dict) -> str:
    gau = m["process"]["gaussianity"]
    qv = m["process"]["quadratic_variation"]
    acf = m["process"]["acf_residuals"]
    return "".join(f"<tr><td>{a}</td><td>{b}</td></tr>" for a, b in (
        ("KS statistic / p-value of standardized residuals vs N(0,1) "
         f"(n={gau['n_tested']})", f"{_fmt(gau['ks_statistic'])} / {_fmt(gau['ks_pvalue'])}"),
        ("Residual skewness / excess kurtosis", f"{_fmt(gau['skewness'])} / {_fmt(gau['excess_kurtosis'])}"),
        ("Residual ACF at lag 1 / max |ACF| (white-noise band)",
         f"{_fmt(acf['lag1'])} / {_fmt(acf['max_abs_acf'])} (±{_fmt(acf['band'])})"),
        ("Realized QV / integrated sigma^2 (drift-corrected)", f"{_fmt(qv['ratio'])} ({_fmt(qv['ratio_drift_corrected'])})"),
        ("Diffusion calibration: realized / model mean square",
         _fmt(m["drift_diffusion"]["neural"]["diffusion_calibration_ratio"])),
    ))


def _simulation_rows(m: dict) -> str:
    sim, nll = m["simulation"], m["heldout_nll"]
    sw = sim["sliced_wasserstein"]
    ce = sim["curve_errors"]
    swi = sim["sliced_wasserstein_increments"]
    sim_rows = "".join(
        f"<tr><td>{k}</td><td>{_fmt(sw[k])}</td><td>{_fmt(swi[k])}</td><td>{_fmt(ce[k]['mean_rmse'])}</td>"
        f"<td>{_fmt(ce[k]['var_rel'])}</td><td>{_fmt(sim['nonfinite_share'][k])}</td><td>{_fmt(nll[k])}</td></tr>"
        for k in ("neural", "ou", "brownian"))
    if "real_vs_real" in sw:
        sim_rows += (f"<tr><td><i>two halves of the real paths</i></td><td>{_fmt(sw['real_vs_real'])}</td>"
                     f"<td>{_fmt(swi['real_vs_real'])}</td><td></td><td></td><td></td><td></td></tr>")
    return sim_rows


def _figures_html(figs: list[dict]) -> str:
    fig_html = "".join(
        f'<figure><h3>{html.escape(f["title"])}</h3><img src="{f["file"]}" alt="{html.escape(f["title"])}">'
        f'<figcaption>{html.escape(f["caption"])}</figcaption></figure>' for f in figs)
    if not any(f["file"] == "loss_curves.png" for f in figs):
        fig_html = ("<p><i>No fit history was given (fit_history.json next to the heads), so there are no loss "
                    "curves.</i></p>") + fig_html
    return fig_html


def _html(m: dict, figs: list[dict]) -> str:
    h, d, sim = m["heads"], m["data"], m["simulation"]
    said = verdicts(m, bold=lambda s: f"<b>{s}</b>")
    ex_html = "".join(
        f"<h3>Held-out text #{ex['sequence']}</h3><div class='tokens'>{_zscore_html(ex)}</div>" for ex in m["examples"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hf-sde report: {html.escape(str(h['base_model']))}</title>
<style>{CSS}</style></head><body>
<h1>SDE analysis of {html.escape(str(h['base_model']))}</h1>
<p>Heads: decoder layer {h['layer']} of {h['num_layers']}, PCA {h['proj_dim']} of {h['hidden_size']} dimensions,
horizon T = {h['horizon']:g} tokens. Data: {html.escape(str(d['source']))} (template {html.escape(str(d['template']))},
max length {d['max_length']}), {d['n_sequences']} sequences; {d['n_heldout']} held-out sequences
({d['n_heldout_transitions']} transitions) are {html.escape(d['heldout_description'])}.
Simulation: {sim['method']}, {sim['n_paths']} paths from each of {sim['n_starts']} held-out starts.</p>
<p class="verdict">{said['nll']}</p>
<p class="verdict">{said['simulation']}</p>
<h2>Simulation vs reality</h2>
<p>Sliced Wasserstein distances between held-out and simulated states (all positions pooled: the distribution
the paths occupy) and between their one-token increments (the local dynamics); the last row is the sampling
floor.</p>
<table><tr><th>model</th><th>sliced Wasserstein, states</th><th>sliced Wasserstein, increments</th>
<th>mean-curve RMSE</th><th>variance-curve rel. error</th>
<th>non-finite share</th><th>held-out NLL</th></tr>{_simulation_rows(m)}</table>
<h2>Theory checks (estimates on the data region, not proofs)</h2>
<table><tr><th>check</th><th>value</th><th>how to read</th></tr>{_theory_rows(m)}</table>
<h2>Process properties (held-out)</h2>
<table><tr><th>quantity</th><th>value</th></tr>{_process_rows(m)}</table>
<h2>Figures</h2>
{_figures_html(figs)}
<h2>Per-token diffusion z-score</h2>
<p>Each token is coloured by the calibrated z-score of the diffusion at its state (red: noisier than usual,
blue: calmer), which governs the step to the next token. Hover for values.</p>
{_zscore_legend()}
{ex_html}
<p style="color:#777;font-size:.85em">hf-sde {html.escape(str(m['hf_sde_version']))}; all numbers in
<a href="metrics.json">metrics.json</a>; built in {m['runtime_s']:.1f} s.</p>
</body></html>
"""
