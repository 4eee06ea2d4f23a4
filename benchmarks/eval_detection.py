"""Detection: does a response's path likelihood under the SDE say something about its human quality ratings?

The detection study. HelpSteer rows carry human ratings (helpfulness, correctness, coherence, complexity,
verbosity, 0-4). Every row's response is scored by :func:`hf_sde.score_texts` (the library function, one
forward per batch), read as chat in the context of its prompt exactly as the shipped heads' fit read it
(template ``helpsteer-chat``, response path <= 256 tokens, full prompt context). Statistics per response:

* SDE: ``mean_surprise`` (an affine function of the path NLL under the neural SDE, ``sde_nll``: one row for
  both), ``tube_exit_rate`` (share of steps outside the 99% ellipsoid of the fitted
  transition), ``sde_nll`` and ``ou_nll`` (path NLL, nats/dim, under the neural SDE and under OU),
  ``sde_minus_ou_nll`` (their per-step difference), ``mean_zscore`` (diffusion z-score);
* baselines a user tries first, same forward: ``token_nll`` (the model's mean token NLL of the response),
  ``entropy`` (mean next-token entropy), ``num_tokens`` (tokens scored: the length, capped at 255 by the path
  cap), and ``full_length``, the response's uncapped length in tokens (the tokenizer alone).

The OU baseline is refitted (:class:`hf_sde.OUBaseline`) on the paths of the heads' training rows (every row
whose prompt is not in ``heads.config.data["heldout_prompt_sha1"]``); the heads do not store it.

Evaluation sets: (1) **held-out**: the rows of the prompts the heads held out (claims are made here);
(2) **all rows, in-sample for the heads**: most of them trained the heads (and the OU baseline), shown so the
reader sees both. Per rating: Spearman rho between statistic and rating; per coherence and correctness:
AUROC of the statistic for "low" (rating <= 2) against "high" (rating >= 3; every row is in one class; class
sizes reported), AUROC > 0.5 = a higher statistic goes with a low rating. 95% intervals: cluster bootstrap
over prompts (a prompt's responses are resampled together). "Beats the best baseline": the paired bootstrap
CI of (statistic's discrimination - best baseline's) lies above 0, where discrimination is |rho| or
|AUROC - 0.5| with the sign fixed by the full-sample estimate and the best baseline is the one of
``token_nll``, ``entropy``, ``num_tokens`` with the largest full-sample discrimination. Also per rating: the
within-prompt Spearman (statistic and rating centred on their prompt's mean; does the statistic rank
responses to the same prompt?).

Next-token error prediction (diffusion z + entropy vs entropy alone) is ``eval_uncertainty.py``'s table.

``--model stories260k`` (``--smoke`` default, used by the test-suite): the same pipeline on stories260K with
heads fitted on HelpSteer responses as plain text (``_common.stories_heads``), the first rows of the sample.

    python benchmarks/eval_detection.py [--smoke | --full] [--model smollm2|stories260k] [--heads DIR]
"""

from __future__ import annotations

import argparse
import json
import os

import _common as C

RATINGS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
AUROC_RATINGS = ("coherence", "correctness")
LOW = 2  # rating <= LOW is the positive ("low quality") class of the AUROC
# The path NLL under the neural SDE is not listed: a text's mean surprise is an affine function of it (the
# surprise standardizes each step's NLL by constants), so every rank statistic of the two is identical.
SDE_STATS = ("mean_surprise", "tube_exit_rate", "ou_nll", "sde_minus_ou_nll", "mean_zscore")
BASELINES = ("token_nll", "entropy", "num_tokens", "full_length")
STATS = SDE_STATS + BASELINES
LABELS = {"mean_surprise": "mean surprise (= path NLL, SDE)", "tube_exit_rate": "tube exit rate", "sde_nll": "path NLL (SDE)",
          "ou_nll": "path NLL (OU)", "sde_minus_ou_nll": "SDE - OU NLL", "mean_zscore": "mean diffusion z",
          "token_nll": "token NLL (model)", "entropy": "entropy (model)", "num_tokens": "scored tokens (<= cap)",
          "full_length": "full length (tokens)"}

SETTINGS = {
    # rows: HelpSteer sample rows scored (None = all 500); max_length: response path cap (the fit's 256)
    "smoke": {"model": "stories260k", "rows": 24, "max_length": 48, "batch": 8, "boot": 50},
    "default": {"model": "smollm2", "rows": None, "max_length": 256, "batch": 4, "boot": 1000},
    "full": {"model": "smollm2", "rows": None, "max_length": 256, "batch": 4, "boot": 4000},
}


def load_rows(n: int | None) -> list[dict]:
    rows = [json.loads(x) for x in C.HELPSTEER.read_text().splitlines() if x.strip()]
    return rows[:n] if n is not None else rows


# ----- scoring (cached: the SmolLM2 forward over 500 rows is the slow part) -----------------------------------
def _save_scores(path, scores, seconds: float) -> None:
    import torch
    from safetensors.torch import save_file

    keys = sorted(scores[0].steps)
    tensors = {k: torch.cat([s.steps[k].reshape(s.steps[k].shape[0], -1).float() for s in scores]).contiguous()
               for k in keys}
    lengths = {k: [int(s.steps[k].shape[0]) for s in scores] for k in keys}
    shapes = {k: list(scores[0].steps[k].shape[1:]) for k in keys}
    save_file(tensors, str(path), metadata={"lengths": json.dumps(lengths), "shapes": json.dumps(shapes),
                                            "score_seconds": f"{seconds:.1f}", "loadavg": json.dumps([round(x, 2) for x in os.getloadavg()])})


def _load_scores(path):
    import torch
    from safetensors import safe_open

    from hf_sde.analysis.scoring import summarize

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    lengths, shapes = json.loads(meta["lengths"]), json.loads(meta["shapes"])
    cold = {"score_seconds": float(meta.get("score_seconds", "nan")), "loadavg_at_end": json.loads(meta.get("loadavg", "null"))}
    parts = {k: torch.split(v, lengths[k]) for k, v in tensors.items()}
    n = len(next(iter(lengths.values())))
    out = []
    for i in range(n):
        steps = {k: parts[k][i].reshape(-1, *shapes[k]) for k in tensors}
        steps["positions"] = steps["positions"].long()
        out.append(summarize(i, steps, keep_steps=True))
    return out, cold


def score_rows(model_name, model, tok, heads, heads_id, rows, template, cfg, progress):
    """``score_texts(..., return_steps=True)`` of every row (cached by heads, rows, template and caps), and the
    time the scoring took when it ran (the cache records it)."""
    import hashlib
    import time

    from hf_sde.analysis.scoring import score_texts

    key = C.cache_key(model=model_name, heads=heads_id, rows=hashlib.sha1(json.dumps(rows).encode()).hexdigest(),
                      template=template, max_length=cfg["max_length"], v=1)
    path = C.CACHE / f"detect-scores-{model_name}-{key}.safetensors"
    if path.is_file():
        return _load_scores(path)
    t0 = time.perf_counter()
    scores = score_texts(model, tok, heads, rows, template=template, max_length=cfg["max_length"],
                         batch_size=cfg["batch"], return_steps=True, progress=progress)
    C.CACHE.mkdir(parents=True, exist_ok=True)
    seconds = time.perf_counter() - t0
    _save_scores(path, scores, seconds)
    return scores, {"score_seconds": round(seconds, 1), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                    "now": True}


# ----- statistics ---------------------------------------------------------------------------------------------
def _auroc(scores, labels):
    import numpy as np
    from scipy.stats import rankdata

    y = np.asarray(labels, bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(scores)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _spearman(x, y):
    import numpy as np
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _centred(values, codes):
    """``values`` minus the mean of their group (``codes``: integer group ids)."""
    import numpy as np

    values = np.asarray(values, float)
    sums, counts = np.bincount(codes, values), np.bincount(codes)
    return values - (sums / np.maximum(counts, 1))[codes]


def measures(table, ratings, codes) -> dict:
    """Every point estimate on one set of rows: Spearman per (rating, stat), within-prompt Spearman (``codes``:
    integer prompt ids), AUROC."""
    import numpy as np

    out = {}
    centred = {s: _centred(table[s], codes) for s in STATS}
    for r in RATINGS:
        y = np.asarray(ratings[r], float)
        yc = _centred(y, codes)
        for s in STATS:
            out[("rho", r, s)] = _spearman(table[s], y)
            out[("rho_within", r, s)] = _spearman(centred[s], yc)
    for r in AUROC_RATINGS:
        low = np.asarray(ratings[r]) <= LOW
        for s in STATS:
            out[("auroc", r, s)] = _auroc(table[s], low)
    return out


def _disc(kind: str, value: float, sign: float) -> float:
    """Discrimination with the direction fixed by the full sample: |rho| or |AUROC - 0.5| (sign-fixed)."""
    return sign * value if kind.startswith("rho") else sign * (value - 0.5)


def evaluate(values: dict, rows, idx, boot: int, seed: int) -> dict:
    """Point estimates, cluster bootstrap CIs and paired comparisons with the best baseline, on rows ``idx``
    (``values``: statistic -> array over all rows)."""
    import numpy as np

    table = {s: np.asarray(values[s], float)[idx] for s in STATS}
    ratings = {r: np.array([rows[i][r] for i in idx], float) for r in RATINGS}
    groups = [rows[i]["prompt"].strip() for i in idx]
    prompts = list(dict.fromkeys(groups))
    codes = np.array([prompts.index(g) for g in groups])
    point = measures(table, ratings, codes)
    members = [np.flatnonzero(codes == c) for c in range(len(prompts))]
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(boot):
        pick = rng.integers(0, len(prompts), len(prompts))
        sel = np.concatenate([members[b] for b in pick])
        # a prompt drawn twice counts as two clusters (two groups for the within-prompt centring)
        new_codes = np.concatenate([np.full(len(members[b]), n) for n, b in enumerate(pick)])
        boots.append(measures({s: v[sel] for s, v in table.items()}, {r: v[sel] for r, v in ratings.items()},
                              new_codes))
    res = {"rows": len(idx), "prompts": len(prompts),
           "class_sizes": {r: {"low (<=2)": int((ratings[r] <= LOW).sum()), "high (>=3)": int((ratings[r] > LOW).sum())}
                           for r in AUROC_RATINGS},
           "stat_means": {s: float(np.nanmean(v)) for s, v in table.items()}, "measures": {}}
    for kind in ("rho", "rho_within", "auroc"):
        for r in (RATINGS if kind != "auroc" else AUROC_RATINGS):
            cell = {}
            for s in STATS:
                b = np.array([x[(kind, r, s)] for x in boots])
                cell[s] = {"value": point[(kind, r, s)], "ci95": _ci(b)}
            signs = {s: (1.0 if _disc(kind, point[(kind, r, s)], 1.0) >= 0 else -1.0) for s in STATS}
            best = max(BASELINES, key=lambda s: _disc(kind, point[(kind, r, s)], signs[s]))
            for s in SDE_STATS:
                d = np.array([_disc(kind, x[(kind, r, s)], signs[s]) - _disc(kind, x[(kind, r, best)], signs[best])
                              for x in boots])
                dp = _disc(kind, point[(kind, r, s)], signs[s]) - _disc(kind, point[(kind, r, best)], signs[best])
                lo, hi = _ci(d)
                cell[s]["vs_best_baseline"] = {"baseline": best, "diff": dp, "ci95": [lo, hi], "beats": bool(lo > 0)}
            res["measures"][f"{kind}/{r}"] = cell
    return res


def _ci(b) -> list[float]:
    import numpy as np

    b = np.asarray(b, float)
    b = b[np.isfinite(b)]
    if not b.size:
        return [float("nan"), float("nan")]
    return [float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))]


# ----- the two models ------------------------------------------------------------------------------------------
def setup_smollm2(heads_dir, rows):
    """SmolLM2, the heads, template ``helpsteer-chat``, and the held-out row mask from the heads' record."""
    from hf_sde import SDEHeads
    from hf_sde.fitting.fit import group_hash

    model, tok = C.load_smollm2()
    heads = SDEHeads.from_pretrained(str(heads_dir)).eval()
    heads.check_compatible(model)
    held = set((heads.config.data or {}).get("heldout_prompt_sha1") or [])
    if not held:
        raise SystemExit("These heads record no held-out prompts (config.data['heldout_prompt_sha1']): the "
                         "evaluation cannot tell unseen text from training text.")
    heldout = [group_hash(r["prompt"]) in held for r in rows]
    shown = os.path.relpath(heads_dir, C.REPO) if os.path.exists(str(heads_dir)) else str(heads_dir)
    return model, tok, heads, "helpsteer-chat", heldout, {"heads": shown, "recorded_heldout_nll":
                                                           heads.config.heldout_nll}


def setup_stories(rows, scale, seed):
    """stories260K with heads fitted on the same rows' responses (plain text); held-out = the fit's split."""
    model, tok = C.load_stories()
    heads, summary = C.stories_heads(model, tok, "helpsteer", -1, "smoke" if scale == "smoke" else scale, seed=seed)
    kept = summary["kept_indices"]
    held_rows = {kept[i] for i in summary["heldout_indices"]}
    n_fit = C.HEADS_SCALE["smoke" if scale == "smoke" else scale]["helpsteer_limit"]
    heldout = [i in held_rows for i in range(len(rows))]
    if n_fit is not None and len(rows) > n_fit:  # rows the heads never saw count as held-out
        heldout = [h or i >= n_fit for i, h in enumerate(heldout)]
    return model, tok, heads, "helpsteer-response", heldout, {"heads": "stories260K helpsteer heads (cached fit)",
                                                              "recorded_heldout_nll": heads.config.heldout_nll}


# ----- report ---------------------------------------------------------------------------------------------------
def _cell(c: dict, nd: int = 2) -> str:
    v, (lo, hi) = c["value"], c["ci95"]
    return f"{v:+.{nd}f} [{lo:+.{nd}f}, {hi:+.{nd}f}]" if abs(v) < 10 else C.fmt(v)


def _auc_cell(c: dict) -> str:
    return f"{c['value']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]"


def _vs(c: dict) -> str:
    v = c["vs_best_baseline"]
    return f"{v['diff']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" + (" **beats**" if v["beats"] else "")


def tables(res: dict) -> str:
    m = res["measures"]
    lines = []
    rows = [[LABELS[s], *(_cell(m[f"rho/{r}"][s]) for r in RATINGS)] for s in STATS]
    lines += ["Spearman rho (statistic vs rating), 95% cluster-bootstrap CI:", "",
              C.md_table(["statistic", *RATINGS], rows), ""]
    rows = [[LABELS[s], *(_cell(m[f"rho_within/{r}"][s]) for r in RATINGS)] for s in STATS]
    lines += ["Within-prompt Spearman rho (statistic and rating centred on the prompt's mean):", "",
              C.md_table(["statistic", *RATINGS], rows), ""]
    cs = res["class_sizes"]
    head = [f"AUROC {r} low/high ({cs[r]['low (<=2)']}/{cs[r]['high (>=3)']})" for r in AUROC_RATINGS]
    rows = [[LABELS[s], *(_auc_cell(m[f"auroc/{r}"][s]) for r in AUROC_RATINGS)] for s in STATS]
    lines += ["AUROC for a low rating (<= 2) against a high one (>= 3); > 0.5: a higher statistic, a lower rating:",
              "", C.md_table(["statistic", *head], rows), ""]
    rows = [[LABELS[s], *(_vs(m[f"auroc/{r}"][s]) for r in AUROC_RATINGS),
             *(_vs(m[f"rho/{r}"][s]) for r in AUROC_RATINGS)] for s in SDE_STATS]
    best = {r: m[f"auroc/{r}"][SDE_STATS[0]]["vs_best_baseline"]["baseline"] for r in AUROC_RATINGS}
    best_rho = {r: m[f"rho/{r}"][SDE_STATS[0]]["vs_best_baseline"]["baseline"] for r in AUROC_RATINGS}
    lines += ["Paired against the best baseline (discrimination |AUROC - 0.5| or |rho|, direction fixed by the full "
              "sample; difference > 0 = the SDE statistic discriminates better; **beats** = CI above 0):", "",
              C.md_table(["statistic", *(f"AUROC {r} vs {LABELS[best[r]]}" for r in AUROC_RATINGS),
                          *(f"rho {r} vs {LABELS[best_rho[r]]}" for r in AUROC_RATINGS)], rows)]
    return "\n".join(lines)


def verdict(res: dict, name: str) -> str:
    m = res["measures"]
    beats = [(k, s) for k, cell in m.items() if not k.startswith("rho_within") for s in SDE_STATS
             if cell[s].get("vs_best_baseline", {}).get("beats")]
    checked = [k for k in m if k.split("/")[0] in ("rho", "auroc") and k.split("/")[1] in AUROC_RATINGS]
    n_tests = len(checked) * len(SDE_STATS)
    core = [(k, s) for k, s in beats if k.split("/")[1] in AUROC_RATINGS]
    best_sde = {}
    for r in AUROC_RATINGS:
        cell = m[f"auroc/{r}"]
        s = max(SDE_STATS, key=lambda x: abs(cell[x]["value"] - 0.5))
        b = cell[s]["vs_best_baseline"]
        best_sde[r] = (f"{r}: best SDE statistic {LABELS[s]} AUROC {_auc_cell(cell[s])} vs best baseline "
                       f"{LABELS[b['baseline']]} {_auc_cell(cell[b['baseline']])} (difference in discrimination "
                       f"{b['diff']:+.3f} [{b['ci95'][0]:+.3f}, {b['ci95'][1]:+.3f}])")
    head = (f"{name}: " + ("no SDE statistic beats the best baseline on coherence or correctness (AUROC or "
                           "Spearman; paired CI above 0)" if not core else
                           "the paired CI lies above 0 for " + ", ".join(f"{LABELS[s]} ({k})" for k, s in core)
                           + f" (of {n_tests} comparisons on coherence and correctness; not corrected for "
                           "multiplicity)"))
    return head + ". " + "; ".join(best_sde.values()) + "."


def figure(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [k for k in results if isinstance(results[k], dict) and "measures" in results[k]]
    fig, axes = plt.subplots(1, len(AUROC_RATINGS), figsize=(11, 4.2), sharey=True)
    width = 0.8 / max(len(sets), 1)
    for ax, r in zip(axes, AUROC_RATINGS, strict=True):
        for j, name in enumerate(sets):
            cell = results[name]["measures"][f"auroc/{r}"]
            vals = [cell[s]["value"] for s in STATS]
            lo = [cell[s]["value"] - cell[s]["ci95"][0] for s in STATS]
            hi = [cell[s]["ci95"][1] - cell[s]["value"] for s in STATS]
            xs = [i + (j - (len(sets) - 1) / 2) * width for i in range(len(STATS))]
            ax.bar(xs, vals, width, yerr=[lo, hi], capsize=2,
                   label=f"{name} ({'SDE blue / baselines orange' if j == 0 else 'SDE green / baselines red'})",
                   color=[("C0" if s in SDE_STATS else "C1") if j == 0 else ("C2" if s in SDE_STATS else "C3")
                          for s in STATS], alpha=0.85 if j == 0 else 0.5)
        ax.axhline(0.5, color="k", lw=0.8)
        ax.set_xticks(range(len(STATS)))
        ax.set_xticklabels([LABELS[s] for s in STATS], rotation=60, ha="right", fontsize=8)
        ax.set_title(f"AUROC: low {r} (<= {LOW}) vs high")
    axes[0].set_ylabel("AUROC (95% cluster bootstrap)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    p.add_argument("--model", choices=("smollm2", "stories260k"), default=None,
                   help="smollm2 (default) or stories260k (--smoke default, so the test-suite never loads SmolLM2)")
    p.add_argument("--heads", default=None, help="SmolLM2 heads folder or repo id (default: the shipped heads)")
    args = p.parse_args(argv)
    C.setup_env(args.threads)
    import hashlib
    import time

    from hf_sde import OUBaseline
    from hf_sde.analysis.scoring import DEFAULT_TUBE, rescore
    from hf_sde.fitting.fit import make_transitions

    scale = C.scale_of(args)
    cfg = dict(SETTINGS[scale])
    model_name = args.model or cfg["model"]
    if model_name == "stories260k" and scale != "smoke":
        cfg.update(rows=120, max_length=128)  # stories260K reads HelpSteer poorly; a bounded table
    heads_dir = args.heads or C.default_heads()
    run = C.Run("eval_detection", args, {**cfg, "model": model_name, "tube": DEFAULT_TUBE, "low_rating": LOW,
                                         "heads": str(heads_dir) if model_name == "smollm2" else None})
    rows = load_rows(cfg["rows"])
    t0 = time.perf_counter()
    if model_name == "smollm2":
        model, tok, heads, template, heldout, info = setup_smollm2(heads_dir, rows)
        weights = C.Path(str(heads_dir)) / "model.safetensors"
        heads_id = hashlib.sha1(weights.read_bytes()).hexdigest() if weights.is_file() else str(heads_dir)
    else:
        model, tok, heads, template, heldout, info = setup_stories(rows, scale, args.seed)
        heads_id = C.cache_key(cfg=heads.config.__dict__)
    scores, cold = score_rows(model_name, model, tok, heads, heads_id, rows, template, cfg, progress=scale != "smoke")
    info["load_and_score_seconds"] = round(time.perf_counter() - t0, 1)
    info["scores_from_cache"] = not cold.pop("now", False)
    info["cold_scoring"] = cold
    train = [i for i, h in enumerate(heldout) if not h]
    held = [i for i, h in enumerate(heldout) if h]
    if len(train) < 2 or len(held) < 2:
        raise SystemExit(f"need training and held-out rows, got {len(train)} / {len(held)}")
    ou = OUBaseline.fit(make_transitions([scores[i].steps["z"] for i in train], heads.config.horizon))
    scores = [rescore(heads, s, ou=ou) for s in scores]
    steps = lambda idx, k: sum(float(scores[i].steps[k].double().sum()) for i in idx) / sum(  # noqa: E731
        scores[i].num_tokens for i in idx)
    info.update(template=template, rows=len(rows), train_rows=len(train), heldout_rows=len(held),
                heldout_prompts=len({rows[i]["prompt"].strip() for i in held}),
                pooled_heldout_nll={"sde": steps(held, "sde_nll"), "ou_refit": steps(held, "ou_nll")},
                tube_exit_rate={"train": steps(train, "outside_tube"), "heldout": steps(held, "outside_tube"),
                                "nominal": 1 - DEFAULT_TUBE})
    values = {s: [float(getattr(x, s)) for x in scores] for s in STATS if s != "full_length"}
    values["full_length"] = [len(tok(r["response"].strip(), add_special_tokens=False)["input_ids"]) for r in rows]
    results = {"info": info,
               "held-out": evaluate(values, rows, held, cfg["boot"], args.seed),
               "all rows (in-sample for the heads)": evaluate(values, rows, list(range(len(rows))), cfg["boot"],
                                                              args.seed)}
    results["verdict"] = {k: verdict(results[k], k) for k in ("held-out", "all rows (in-sample for the heads)")}
    fig_name = "eval_detection.png" if scale != "smoke" else None
    if fig_name:
        C.Path(args.out).mkdir(parents=True, exist_ok=True)
        figure({k: v for k, v in results.items() if k in ("held-out", "all rows (in-sample for the heads)")},
               C.Path(args.out) / fig_name)
    body = _markdown(results, model_name, scale, fig_name)
    flags = " --smoke" if scale == "smoke" else " --full" if scale == "full" else ""
    command = (f"python benchmarks/eval_detection.py{flags}" + (f" --model {args.model}" if args.model else "")
               + (f" --heads {args.heads}" if args.heads else ""))
    run.finish(results, body, command=command)
    print(body)
    return results


def _markdown(results, model_name, scale, fig_name) -> str:
    i = results["info"]
    nll = i["pooled_heldout_nll"]
    tube = i["tube_exit_rate"]
    parts = [
        f"Model {model_name}; heads {i['heads']} (recorded held-out NLL "
        f"{ {k: round(v, 4) for k, v in (i['recorded_heldout_nll'] or {}).items()} }). {i['rows']} HelpSteer rows "
        f"scored with `hf_sde.score_texts(template={i['template']!r})`; OU refitted on the {i['train_rows']} "
        f"training rows' paths. Held-out: {i['heldout_rows']} rows of {i['heldout_prompts']} prompts; pooled "
        f"held-out NLL {nll['sde']:.4f} (SDE) vs {nll['ou_refit']:.4f} (OU refit) nats/dim. Tube exit rate "
        f"(nominal {tube['nominal']:.2f}): {tube['train']:.3f} on training rows, {tube['heldout']:.3f} held out "
        "(the increments are heavier-tailed than Gaussian). Scoring the rows (one forward each, the slow part) took "
        f"{i['cold_scoring']['score_seconds']:.0f} s, load average {i['cold_scoring']['loadavg_at_end']} at its end"
        + ("; this run read those scores from `benchmarks/.cache`" if i["scores_from_cache"] else "") + ".",
        "Next-token error prediction (diffusion z + entropy vs entropy alone): see `eval_uncertainty.md`.",
    ]
    for name in ("held-out", "all rows (in-sample for the heads)"):
        r = results[name]
        parts.append(f"## {name}: {r['rows']} rows, {r['prompts']} prompts\n\n{tables(r)}")
    if fig_name:
        parts.append(f"![AUROC per statistic]({fig_name})")
    parts.append("## Verdict\n\n" + "\n\n".join(results["verdict"].values()))
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
