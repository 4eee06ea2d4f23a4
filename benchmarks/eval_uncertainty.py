"""Uncertainty: does the diffusion z-score at position k predict that the model's top-1 guess for token
k+1 is wrong?

On held-out text (sequences the heads never saw), teacher-forced: at each position k the model's top-1
prediction for token k+1 is right or wrong (label 1 = wrong). Predictors known at position k:

* ``zscore``: calibrated diffusion z-score of the state at k (the SDE control signal);
* ``surprise``: standardized NLL of the increment from k-1 to k (the state at k is known, so this is causal);
* ``entropy``: entropy of the model's next-token distribution at k (the obvious baseline);
* ``position``: k itself (a trivial baseline: errors may simply be more common early or late);
* ``zscore | entropy, position``: the z-score residual after a least-squares fit on entropy and position,
  i.e. what the z-score adds beyond them.

AUROC by ranks (Mann-Whitney U; ties get average ranks; no sklearn), with a 95% cluster bootstrap over
sequences. Positions 1.. are scored (position 0 has no incoming increment).

    python benchmarks/eval_uncertainty.py [--smoke | --full]
"""

from __future__ import annotations

import argparse

import _common as C

SETTINGS = {
    "smoke": {"sets": [("tinystories", -1)], "boot": 20},
    "default": {"sets": [("helpsteer", -1), ("helpsteer", 2), ("tinystories", -1), ("tinystories", 2)], "boot": 500},
    "full": {"sets": [("helpsteer", -1), ("helpsteer", 2), ("tinystories", -1), ("tinystories", 2)], "boot": 2000},
}
PREDICTORS = ("zscore", "surprise", "entropy", "position", "zscore_resid")


def auroc(scores, labels) -> float:
    """P(score of a positive > score of a negative), ties counted one half (rank formula)."""
    import numpy as np
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def features(model, heads, token_ids):
    """Per sequence: dict of arrays over positions 1..L-2 (labels and predictors)."""
    import numpy as np
    import torch

    from hf_sde.layers import register_block_hook

    captured = []
    handle = register_block_hook(model, heads.config.layer, lambda h: captured.append(h.detach()))
    out = []
    try:
        with torch.inference_mode():
            for ids in token_ids:
                if len(ids) < 4:
                    continue
                captured.clear()
                x = torch.tensor([ids])
                logits = model(input_ids=x, use_cache=False).logits[0].float()
                hidden = captured[-1][0].float()
                z = heads.project(hidden)
                pos = torch.arange(len(ids))
                mean, std = heads(z, heads.times(pos))
                zscore = heads.zscore(heads.diffusion_magnitude(std))
                surprise = torch.full_like(zscore, float("nan"))
                surprise[1:] = heads.surprise(z[1:] - z[:-1], mean[:-1], std[:-1])
                logp = torch.log_softmax(logits, -1)
                entropy = -(logp.exp() * logp).sum(-1)
                wrong = logits.argmax(-1)[:-1] != x[0, 1:]
                k = slice(1, len(ids) - 1)  # predict token k+1 from position k, k >= 1
                out.append({"wrong": wrong[k].numpy(), "zscore": zscore[k].numpy(), "surprise": surprise[k].numpy(),
                            "entropy": entropy[k].numpy(), "position": pos[k].numpy().astype(float)})
    finally:
        handle.remove()
    # z-score residual after a linear fit on entropy and position (pooled).
    Z = np.concatenate([o["zscore"] for o in out])
    X = np.stack([np.ones_like(Z), np.concatenate([o["entropy"] for o in out]),
                  np.concatenate([o["position"] for o in out])], 1)
    coef, *_ = np.linalg.lstsq(X, Z, rcond=None)
    for o in out:
        o["zscore_resid"] = o["zscore"] - np.stack([np.ones_like(o["zscore"]), o["entropy"], o["position"]], 1) @ coef
    return out


def evaluate(seqs, boot, seed) -> dict:
    import numpy as np

    cat = {k: np.concatenate([s[k] for s in seqs]) for k in ("wrong", *PREDICTORS)}
    res = {"sequences": len(seqs), "positions": int(cat["wrong"].size), "error_rate": float(cat["wrong"].mean())}
    rng = np.random.default_rng(seed)
    boots = {k: [] for k in PREDICTORS}
    for _ in range(boot):
        pick = rng.integers(0, len(seqs), len(seqs))
        y = np.concatenate([seqs[i]["wrong"] for i in pick])
        for k in PREDICTORS:
            boots[k].append(auroc(np.concatenate([seqs[i][k] for i in pick]), y))
    for k in PREDICTORS:
        b = np.array(boots[k])
        res[k] = {"auroc": auroc(cat[k], cat["wrong"]),
                  "ci95": [float(np.nanquantile(b, 0.025)), float(np.nanquantile(b, 0.975))]}
    # Paired: does the z-score beat entropy? (bootstrap of the AUROC difference)
    d = np.array(boots["zscore"]) - np.array(boots["entropy"])
    res["zscore_minus_entropy_ci95"] = [float(np.nanquantile(d, 0.025)), float(np.nanquantile(d, 0.975))]
    res["spearman_zscore_entropy"] = float(__import__("scipy.stats", fromlist=["spearmanr"]).spearmanr(
        cat["zscore"], cat["entropy"]).statistic)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    args = p.parse_args(argv)
    C.setup_env(args.threads)
    import hf_sde

    scale = C.scale_of(args)
    cfg = SETTINGS[scale]
    run = C.Run("eval_uncertainty", args, cfg)
    model, tok = C.load_stories()
    real_ids = hf_sde.trajectories.tokenize_texts(tok, C.tinystories_texts(), 512)
    results, rows = {}, []
    for corpus, layer in cfg["sets"]:
        heads, summary = C.stories_heads(model, tok, corpus, layer, scale, seed=args.seed, stopping="auto")
        ids, _ = C.stories_corpus_ids(model, tok, corpus, scale, args.seed)
        kept = summary["kept_indices"]
        held = [ids[kept[i]] for i in summary["heldout_indices"]]
        evals = {"heldout": held}
        if corpus == "tinystories":
            evals["real_tinystories"] = real_ids
        for split, seq_ids in evals.items():
            r = evaluate(features(model, heads, seq_ids), cfg["boot"], args.seed)
            results[f"{corpus}/L{layer}/{split}"] = r
            name = {"heldout": "held-out self-generated" if corpus == "tinystories" else "held-out responses",
                    "real_tinystories": "5 real TinyStories"}[split]
            cells = [f"{r[k]['auroc']:.3f} [{r[k]['ci95'][0]:.3f}, {r[k]['ci95'][1]:.3f}]" for k in PREDICTORS]
            rows.append([corpus, str(layer), name, f"{r['sequences']}/{r['positions']}", r["error_rate"], *cells,
                         f"{r['spearman_zscore_entropy']:+.2f}"])
    body = ("AUROC for predicting that the model's top-1 guess for token k+1 is wrong, from signals at position k "
            "(0.5 = chance; above 0.5 = higher signal, more errors). 95% cluster bootstrap over sequences. "
            "`z | H, k` = z-score residual after regressing on entropy and position. rho = Spearman(z, H).\n\n"
            + C.md_table(["corpus", "layer", "text", "seqs/positions", "error rate", "z-score", "surprise",
                          "entropy H", "position k", "z | H, k", "rho(z,H)"], rows))
    run.finish(results, body)
    print(body)
    return results


if __name__ == "__main__":
    main()
