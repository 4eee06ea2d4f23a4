"""Control: the quality-diversity frontier of decoding strategies on stories260K.

Strategies (all ancestral sampling, ``top_k=0``, fixed seed, same prompts):

* fixed temperature sweep;
* SDE temperature control, ``tau = clip(tau0 * exp(-beta * z), 0.3, 1.5)`` (beta sweep at two tau0);
* min-p sweep at temperature 1;
* EDT, entropy-based dynamic temperature ``T = T0 * N^(theta/H)`` (N = 0.8, theta sweep; hf_sde.control.processors).

Metrics per setting: mean per-token NLL of the generated continuation under the base model at
temperature 1 (lower = more typical for the model), corpus-level distinct-2 / distinct-3 over words, and
the repetition rate (per sample, share of word 4-grams that already occurred in the sample). distinct-n is
computed per prompt (that prompt's samples pooled) and averaged over prompts. Spread: percentile cluster
bootstrap over prompts (95% CI), the same resamples for every metric.

Dominance: for every SDE point we interpolate each baseline's NLL at the SDE point's distinct-2 (piecewise
linear along the baseline's sweep, only inside its range) and bootstrap the gap NLL(SDE) - NLL(baseline);
a CI entirely below 0 means SDE control gives lower NLL at equal diversity there (it dominates that part of
the baseline's frontier). Heads: fitted on the model's own stories (layer -1, see eval_fit.py).

    python benchmarks/eval_control.py [--smoke | --full]
"""

from __future__ import annotations

import argparse

import _common as C

SETTINGS = {
    "smoke": {"prompts": 2, "samples_per_prompt": 2, "new_tokens": 8, "boot": 20, "batch": 8,
              "temperature": [0.7, 1.0], "sde": [(1.0, 1.0)], "min_p": [0.1], "edt_theta": [0.5]},
    "default": {"prompts": 16, "samples_per_prompt": 6, "new_tokens": 128, "boot": 500, "batch": 48,
                "temperature": [0.5, 0.7, 0.85, 1.0, 1.15, 1.3],
                "sde": [(1.0, -1.0), (1.0, -0.5), (1.0, 0.5), (1.0, 1.0), (1.0, 2.0),
                        (0.8, -0.5), (0.8, 0.5), (0.8, 1.0), (0.8, 2.0)],
                "min_p": [0.02, 0.05, 0.1, 0.2, 0.3, 0.5], "edt_theta": [0.1, 0.25, 0.5, 1.0, 2.0]},
    "full": {"prompts": 16, "samples_per_prompt": 16, "new_tokens": 128, "boot": 1000, "batch": 64,
             "temperature": [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.5],
             "sde": [(1.0, b) for b in (-2.0, -1.0, -0.5, 0.25, 0.5, 1.0, 2.0, 4.0)]
             + [(0.8, b) for b in (-1.0, -0.5, 0.5, 1.0, 2.0)] + [(1.2, b) for b in (0.5, 1.0, 2.0)],
             "min_p": [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5],
             "edt_theta": [0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0]},
}
SDE_BOUNDS = (0.3, 1.5)


def settings_list(cfg):
    out = [("temperature", f"T={t}", {"temperature": t}) for t in cfg["temperature"]]
    out += [("sde_temperature", f"tau0={t0},beta={b}", {"tau0": t0, "beta": b}) for t0, b in cfg["sde"]]
    out += [("min_p", f"min_p={m}", {"min_p": m}) for m in cfg["min_p"]]
    out += [("edt", f"theta={th}", {"theta": th}) for th in cfg["edt_theta"]]
    return out


def generate(model, tok, heads, prompts, method, params, cfg, seed):
    """Continuations (lists of token ids, cut after EOS) and the mean applied temperature."""
    import torch
    from transformers import LogitsProcessorList

    import hf_sde
    from hf_sde.control.processors import EntropyDynamicTemperatureLogitsProcessor

    hf_sde.enable_sde_control(model)
    eos = tok.eos_token_id
    conts, temps = [], []
    torch.manual_seed(seed)
    for start in range(0, len(prompts), cfg["batch"]):
        batch = prompts[start:start + cfg["batch"]]
        enc = tok(batch, return_tensors="pt", padding=True, padding_side="left")
        kw = dict(**enc, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=cfg["new_tokens"],
                  pad_token_id=tok.pad_token_id)
        edt = None
        if method == "temperature":
            kw["temperature"] = params["temperature"]
        elif method == "min_p":
            kw["min_p"] = params["min_p"]
        elif method == "edt":
            edt = EntropyDynamicTemperatureLogitsProcessor(1.0, 0.8, params["theta"], record=True)
            kw["logits_processor"] = LogitsProcessorList([edt])
        elif method == "sde_temperature":
            kw["sde_control"] = hf_sde.SDEControl(heads, mode="temperature", temperature=params["tau0"],
                                                  beta=params["beta"], min_temperature=SDE_BOUNDS[0],
                                                  max_temperature=SDE_BOUNDS[1])
            kw["return_dict_in_generate"] = True
        with torch.inference_mode():
            out = model.generate(**kw)
        seqs = out.sequences if hasattr(out, "sequences") else out
        new = seqs[:, enc["input_ids"].shape[1]:]
        finished = torch.zeros(new.shape[0], dtype=torch.bool)
        valid = torch.ones_like(new, dtype=torch.bool)
        for k in range(new.shape[1]):
            valid[:, k] = ~finished
            finished |= new[:, k] == eos
        for r in range(new.shape[0]):
            conts.append(new[r][valid[r]].tolist())
        if method == "sde_temperature":
            t = out.sde_trace.temperature
            temps.append(t[torch.isfinite(t)])
        elif edt is not None:
            t = torch.stack(edt.temperatures, 1)[valid[:, : len(edt.temperatures)]]
            temps.append(t)
        elif method == "temperature":
            temps.append(torch.full((int(valid.sum()),), float(params["temperature"])))
        else:
            temps.append(torch.ones(int(valid.sum())))
    mean_t = float(torch.cat(temps).mean()) if temps else float("nan")
    return conts, mean_t


def nll_per_sample(model, prompt_ids, conts, batch=32):
    """Mean per-token NLL of each continuation given its prompt, under the model at temperature 1."""
    import torch

    out = []
    with torch.inference_mode():
        for s in range(0, len(conts), batch):
            seqs = [p + c for p, c in zip(prompt_ids[s:s + batch], conts[s:s + batch], strict=True)]
            width = max(len(x) for x in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, x in enumerate(seqs):
                ids[r, : len(x)] = torch.tensor(x)
                mask[r, : len(x)] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            for r, (p, c) in enumerate(zip(prompt_ids[s:s + batch], conts[s:s + batch], strict=True)):
                if not c:
                    out.append(float("nan"))
                    continue
                pos = torch.arange(len(p) - 1, len(p) - 1 + len(c))
                out.append(float(-logp[r, pos, torch.tensor(c)].mean()))
    return out


def ngrams(words, n):
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct(word_lists, n) -> float:
    grams = [g for w in word_lists for g in ngrams(w, n)]
    return len(set(grams)) / max(len(grams), 1)


def repetition(words, n=4) -> float:
    g = ngrams(words, n)
    return 1 - len(set(g)) / len(g) if g else 0.0


def metrics(nlls, word_lists, groups, boot, seed):
    """Point estimates and a cluster bootstrap over prompts (samples of one prompt are correlated).

    distinct-n is computed per prompt over all of that prompt's samples pooled, then averaged over prompts:
    resampling prompts never duplicates n-grams inside a pool, so the bootstrap is not biased downwards the
    way resampling samples for a corpus-level distinct-n would be."""
    import numpy as np

    nll = np.array(nlls, dtype=float)
    rep = np.array([repetition(w) for w in word_lists])
    keys = list(dict.fromkeys(groups))
    members = [[i for i, g in enumerate(groups) if g == k] for k in keys]
    d2g = np.array([distinct([word_lists[i] for i in m], 2) for m in members])
    d3g = np.array([distinct([word_lists[i] for i in m], 3) for m in members])
    nll_sum = np.array([np.nansum(nll[m]) for m in members])
    nll_cnt = np.array([np.isfinite(nll[m]).sum() for m in members])
    rep_g = np.array([rep[m].sum() for m in members])
    cnt = np.array([len(m) for m in members])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(keys), size=(boot, len(keys)))
    nb = nll_sum[idx].sum(1) / np.maximum(nll_cnt[idx].sum(1), 1)
    d2 = d2g[idx].mean(1)
    d3 = d3g[idx].mean(1)
    rb = rep_g[idx].sum(1) / cnt[idx].sum(1)

    def ci(x):
        return [float(np.quantile(x, 0.025)), float(np.quantile(x, 0.975))]

    return {"n": int(len(word_lists)), "prompts": len(keys), "nll": float(np.nanmean(nll)), "nll_ci": ci(nb),
            "nll_sample_std": float(np.nanstd(nll)),
            "distinct2": float(d2g.mean()), "distinct2_ci": ci(d2),
            "distinct3": float(d3g.mean()), "distinct3_ci": ci(d3),
            "distinct2_corpus": distinct(word_lists, 2),
            "repetition": float(rep.mean()), "repetition_ci": ci(rb),
            "mean_words": float(np.mean([len(w) for w in word_lists])),
            "_boot": {"nll": nb.tolist(), "distinct2": d2.tolist()}}


def interp_gap(point_boot, base_boots):
    """Bootstrap NLL gap of a point to a baseline curve at the point's distinct-2 (None outside the range)."""
    import numpy as np

    gaps = []
    for b in range(len(point_boot["nll"])):
        xs = np.array([bb["distinct2"][b] for bb in base_boots])
        ys = np.array([bb["nll"][b] for bb in base_boots])
        order = np.argsort(xs)
        xs, ys = xs[order], ys[order]
        x = point_boot["distinct2"][b]
        if x < xs[0] or x > xs[-1]:
            gaps.append(np.nan)
            continue
        gaps.append(point_boot["nll"][b] - float(np.interp(x, xs, ys)))
    gaps = np.array(gaps)
    inside = np.isfinite(gaps).mean()
    if inside < 0.5:
        return None
    g = gaps[np.isfinite(gaps)]
    return {"gap": float(np.median(g)), "ci": [float(np.quantile(g, 0.025)), float(np.quantile(g, 0.975))],
            "inside_share": float(inside)}


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"temperature": ("o-", "tab:blue", "fixed temperature"), "min_p": ("s-", "tab:orange", "min-p (T=1)"),
              "edt": ("^-", "tab:green", "EDT (N=0.8)"), "sde_temperature": ("D", "tab:red", "SDE temperature")}
    for ax, (xkey, xlabel) in zip(axes, (("distinct2", "distinct-2 (words, per prompt pool)"),
                                          ("repetition", "repetition rate (4-gram, per sample)")), strict=True):
        for method, (marker, color, label) in styles.items():
            pts = [(r[xkey], r["nll"], r[f"{xkey}_ci"], r["nll_ci"], r["label"]) for r in results if r["method"] == method]
            if not pts:
                continue
            pts.sort()
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            xerr = [[max(p[0] - p[2][0], 0) for p in pts], [max(p[2][1] - p[0], 0) for p in pts]]
            yerr = [[max(p[1] - p[3][0], 0) for p in pts], [max(p[3][1] - p[1], 0) for p in pts]]
            if method == "sde_temperature":
                for tau0, mk in ((1.0, "D"), (0.8, "v"), (1.2, "P")):
                    sel = [p for p in pts if p[4].startswith(f"tau0={tau0},")]
                    if sel:
                        ax.errorbar([p[0] for p in sel], [p[1] for p in sel], fmt=mk, color=color, capsize=2,
                                    xerr=[[max(p[0] - p[2][0], 0) for p in sel], [max(p[2][1] - p[0], 0) for p in sel]],
                                    yerr=[[max(p[1] - p[3][0], 0) for p in sel], [max(p[3][1] - p[1], 0) for p in sel]],
                                    label=f"{label} tau0={tau0}", alpha=0.85)
            else:
                ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=marker, color=color, capsize=2, label=label, alpha=0.85)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("NLL under the model at T=1 (nats/token)")
    axes[0].set_title("better: lower right (diverse and typical)", fontsize=9)
    axes[1].set_title("better: lower left", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    args = p.parse_args(argv)
    C.setup_env(args.threads)
    from pathlib import Path

    scale = C.scale_of(args)
    cfg = SETTINGS[scale]
    run = C.Run("eval_control", args, {**cfg, "sde_bounds": SDE_BOUNDS, "edt": {"T0": 1.0, "N": 0.8}})
    model, tok = C.load_stories()
    heads, hsum = C.stories_heads(model, tok, "tinystories", -1, "smoke" if scale == "smoke" else "default",
                                  seed=args.seed)
    prompts = [p for p in C.EVAL_PROMPTS[: cfg["prompts"]] for _ in range(cfg["samples_per_prompt"])]
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    results = []
    for method, label, params in settings_list(cfg):
        conts, mean_t = generate(model, tok, heads, prompts, method, params, cfg, args.seed)
        nlls = nll_per_sample(model, prompt_ids, conts)
        words = [tok.decode(c, skip_special_tokens=True).split() for c in conts]
        m = metrics(nlls, words, prompts, cfg["boot"], args.seed)
        m.update({"method": method, "label": label, "params": params, "mean_temperature": mean_t,
                  "example": tok.decode(prompt_ids[0] + conts[0], skip_special_tokens=True)[:300]})
        results.append(m)
        print(f"{label:28s} nll={m['nll']:.3f} d2={m['distinct2']:.3f} rep={m['repetition']:.3f} T={mean_t:.2f}",
              flush=True)
    # Dominance of SDE points over each baseline's frontier.
    dominance = []
    for r in results:
        if r["method"] != "sde_temperature":
            continue
        for base in ("temperature", "min_p", "edt"):
            g = interp_gap(r["_boot"], [b["_boot"] for b in results if b["method"] == base])
            strict = [b["label"] for b in results if b["method"] == base and r["nll"] < b["nll"]
                      and r["distinct2"] > b["distinct2"]]
            dominance.append({"sde": r["label"], "baseline": base, "gap": g, "pareto_dominates": strict})
    rows = [[r["method"], r["label"], str(r["n"]), f"{r['nll']:.3f} [{r['nll_ci'][0]:.3f}, {r['nll_ci'][1]:.3f}]",
             f"{r['distinct2']:.3f} [{r['distinct2_ci'][0]:.3f}, {r['distinct2_ci'][1]:.3f}]", r["distinct3"],
             f"{r['repetition']:.3f} [{r['repetition_ci'][0]:.3f}, {r['repetition_ci'][1]:.3f}]",
             r["mean_temperature"], r["mean_words"]] for r in results]
    drows = []
    for d in dominance:
        g = d["gap"]
        verdict = ("outside range" if g is None else "SDE better" if g["ci"][1] < 0 else
                   "SDE worse" if g["ci"][0] > 0 else "tie (CI spans 0)")
        drows.append([d["sde"], d["baseline"], "-" if g is None else f"{g['gap']:+.3f}",
                      "-" if g is None else f"[{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]", verdict,
                      ", ".join(d["pareto_dominates"]) or "none"])
    n_better = sum(1 for d in dominance if d["gap"] and d["gap"]["ci"][1] < 0)
    n_worse = sum(1 for d in dominance if d["gap"] and d["gap"]["ci"][0] > 0)
    n_cmp = sum(1 for d in dominance if d["gap"])
    verdict = (f"Of {n_cmp} SDE-vs-baseline comparisons inside a baseline's diversity range, SDE temperature control "
               f"has significantly lower NLL at equal distinct-2 in {n_better} and significantly higher in {n_worse} "
               f"(the rest are ties within the 95% CI).")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "eval_control_frontier.png"
    if scale != "smoke":  # matplotlib costs seconds; the smoke run only checks the pipeline
        plot(results, png, f"stories260K, {len(prompts)} samples/setting, {cfg['new_tokens']} new tokens, "
             "95% cluster-bootstrap CI over prompts")
    for r in results:
        r.pop("_boot")
    body = (f"{len(prompts)} samples per setting ({cfg['prompts']} prompts x {cfg['samples_per_prompt']}), up to "
            f"{cfg['new_tokens']} new tokens, seed {args.seed}, top_k=0. SDE bounds {SDE_BOUNDS}. Brackets: 95% "
            f"cluster-bootstrap CI over prompts. Plot: `{png.name}`.\n\n"
            + C.md_table(["method", "setting", "n", "NLL [CI]", "distinct-2 [CI]", "distinct-3", "repetition [CI]",
                          "mean T", "words"], rows)
            + "\n\n## Does SDE control dominate a baseline?\n\nGap = NLL(SDE) - NLL(baseline interpolated at the SDE "
            "point's distinct-2), bootstrap median and 95% CI; negative = SDE better. `Pareto` lists baseline "
            "settings with both higher NLL and lower distinct-2 than the SDE point (point estimates).\n\n"
            + C.md_table(["SDE setting", "baseline", "gap", "95% CI", "verdict", "Pareto-dominated points"], drows)
            + f"\n\n**{verdict}**\n")
    run.finish({"settings": results, "dominance": dominance, "verdict": verdict, "plot": png.name,
                "heads": {"corpus": "tinystories self-generated", "layer": -1, "summary": hsum["summary"]}}, body)
    print(body)
    return results


if __name__ == "__main__":
    main()
