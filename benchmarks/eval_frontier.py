"""Control on SmolLM2-135M-Instruct: decoding strategies on HelpSteer prompts, against the human responses.

Protocol. Prompts are HelpSteer prompts formatted with SmolLM2's chat template (prompt text cut to its last
512 tokens, as in the fit). The *test* prompts are the shipped heads' held-out prompts (never seen in
fitting); the *tuning* prompts are a seeded sample of the training prompts. Every method is swept on the
tuning prompts; its setting whose diversity (distinct-2) is closest to the human responses' on the tuning
prompts is then run on the test prompts, where all claims are made: methods are compared at matched
diversity, on judge NLL (quality) and MAUVE. (MAUVE first chose the settings, but with a few dozen responses
per setting it saturated at 0.99-1.00 for every setting and could not rank them.) Methods (ancestral
sampling, ``top_k=0``): fixed temperature, top-p, min-p, typical-p, eta sampling, EDT (entropy-based dynamic
temperature), SDE temperature control ``tau = clip(tau0 * exp(-beta z), 0.3, 1.5)``, and the three SDE
decoding designs (``_designs.py``): a learned per-token temperature (input ablations: entropy, SDE statistics, both;
heads from ``eval_temperature_head.py``), surprise-triggered cooling, and SDE-gated min-p. Each SDE method is
compared with the best baseline (lowest test judge NLL) paired over test prompts, and the chosen settings of
temperature, min-p, SDE temperature and surprise cooling are rerun on long generations (where small models
degenerate).

Metrics: MAUVE (``mauve-text``) of the generated responses against the human HelpSteer responses to the same
prompts, on features of an independent judge (Gemma-3-270M, see ``_quality.py``); the judge's NLL of each
response given the end of its prompt; distinct-2 (per prompt pool); 4-gram repetition; length in words.
95% intervals: cluster bootstrap over prompts (MAUVE recomputed per resample).

    python benchmarks/eval_frontier.py [--smoke | --full] [--heads DIR]
"""

from __future__ import annotations

import argparse
import json

import _common as C

SETTINGS = {
    "smoke": {"tune_prompts": 2, "test_prompts": 2, "samples": 1, "new_tokens": 6, "batch": 8, "boot": 5,
              "sweeps": {"temperature": [1.0], "sde_temperature": [(1.0, 1.0)], "learned_tau[sde+entropy]": [1.0],
                         "surprise_cooling": [(1.0, 1.5, 0.5)], "sde_min_p": [(0.1, 0.5)]},
              "long_new_tokens": 8, "long_methods": ["temperature", "surprise_cooling"]},
    "default": {"tune_prompts": 8, "test_prompts": 16, "samples": 2, "new_tokens": 64, "batch": 16, "boot": 100,
                "sweeps": {"temperature": [0.7, 1.0], "top_p": [0.9, 0.95], "min_p": [0.05, 0.1],
                           "typical_p": [0.5, 0.9], "eta_cutoff": [1e-3, 3e-3], "edt": [0.5, 1.0],
                           "sde_temperature": [(1.0, 1.0), (1.0, 0.5)],
                           "learned_tau[sde]": [0.7, 1.0], "learned_tau[sde+entropy]": [0.7, 1.0],
                           "surprise_cooling": [(1.0, 1.5, 0.5), (0.8, 1.5, 0.5)],
                           "sde_min_p": [(0.1, 0.5), (0.1, -0.5)]},
                "long_new_tokens": 192, "long_methods": ["temperature", "min_p", "surprise_cooling"]},
    "full": {"tune_prompts": 32, "test_prompts": 28, "samples": 4, "new_tokens": 128, "batch": 16, "boot": 200,
             "sweeps": {"temperature": [0.4, 0.6, 0.7, 0.8, 0.9, 1.0], "top_p": [0.7, 0.8, 0.9, 0.95],
                        "min_p": [0.02, 0.05, 0.1, 0.2, 0.3], "typical_p": [0.3, 0.5, 0.8, 0.95],
                        "eta_cutoff": [1e-4, 3e-4, 1e-3, 3e-3], "edt": [0.1, 0.25, 0.5, 1.0, 2.0],
                        "sde_temperature": [(1.0, b) for b in (-1.0, -0.5, 0.5, 1.0, 2.0)]
                        + [(0.8, b) for b in (0.5, 1.0, 2.0)],
                        "learned_tau[entropy]": [0.6, 0.8, 1.0], "learned_tau[sde]": [0.6, 0.8, 1.0],
                        "learned_tau[sde+entropy]": [0.6, 0.8, 1.0],
                        "surprise_cooling": [(t, h, c) for t in (0.8, 1.0) for h in (1.0, 2.0) for c in (0.3, 0.6)],
                        "sde_min_p": [(b, g) for b in (0.05, 0.1) for g in (-1.0, -0.5, 0.5, 1.0)]},
             "long_new_tokens": 256, "long_methods": ["temperature", "min_p", "sde_temperature", "surprise_cooling"]},
}
SDE_BOUNDS = (0.3, 1.5)
MAX_PROMPT_TOKENS = 512


def sha1(text: str) -> str:
    """The hash ``fit_heads`` records for held-out prompts (``config.data["heldout_prompt_sha1"]``)."""
    from hf_sde.fitting.fit import group_hash

    return group_hash(text)


def chat_ids(tok, prompt: str) -> list[int]:
    """The chat-formatted prompt (the prompt text cut to its last ``MAX_PROMPT_TOKENS`` tokens)."""
    p = tok(prompt.strip(), add_special_tokens=False)["input_ids"]
    text = prompt.strip() if len(p) <= MAX_PROMPT_TOKENS else "..." + tok.decode(p[-MAX_PROMPT_TOKENS:])
    return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)["input_ids"])


def split_prompts(rows, heads, cfg, seed):
    """(tuning prompts, test prompts): test = the heads' held-out prompts, tuning = a sample of training ones."""
    import random

    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    held = set(heads.config.data.get("heldout_prompt_sha1", []))
    if not held:
        raise SystemExit("These heads record no held-out prompts (config.data.heldout_prompt_sha1).")
    test = [p for p in prompts if sha1(p) in held]
    train = [p for p in prompts if sha1(p) not in held]
    rng = random.Random(seed)
    return rng.sample(train, min(cfg["tune_prompts"], len(train))), test[: cfg["test_prompts"]]


def sample_kwargs(method, value):
    """``generate`` kwargs (and an optional processor) for one setting of a baseline method."""
    if method == "temperature":
        return {"temperature": value}
    if method in ("top_p", "min_p", "typical_p", "eta_cutoff"):
        return {method: value}
    raise ValueError(method)


DESIGNS = ("learned_tau[entropy]", "learned_tau[sde]", "learned_tau[sde+entropy]", "surprise_cooling", "sde_min_p")
SDE_METHODS = ("sde_temperature", *DESIGNS)


def design_kwargs(heads, method, value, temp_heads):
    """``generate`` kwargs of one decoding design (``_designs.py``): an observing SDEControl whose step callback
    feeds the design's logits processor."""
    import _designs as D
    from transformers import LogitsProcessorList

    import hf_sde

    reader = D.StepReader()
    if method.startswith("learned_tau["):
        proc = D.LearnedTemperature(reader, temp_heads[method[len("learned_tau["):-1]], scale=value)
    elif method == "surprise_cooling":
        tau0, threshold, cool = value
        proc = D.SurpriseCooling(reader, tau0=tau0, threshold=threshold, cool=cool)
    elif method == "sde_min_p":
        proc = D.SDEGatedMinP(reader, base=value[0], gamma=value[1])
    else:
        raise ValueError(method)
    return {"sde_control": hf_sde.SDEControl(heads, mode="observe", callback=reader),
            "logits_processor": LogitsProcessorList([proc])}


def generate(model, tok, heads, prompt_ids, method, value, cfg, seed, temp_heads=None, new_tokens=None):
    """Responses (token ids cut at EOS) for one setting; the batch is left-padded chat prompts."""
    import torch
    from transformers import LogitsProcessorList

    import hf_sde
    from hf_sde.control.processors import EntropyDynamicTemperatureLogitsProcessor

    hf_sde.enable_sde_control(model)
    out_ids = []
    torch.manual_seed(seed)
    for s in range(0, len(prompt_ids), cfg["batch"]):
        batch = prompt_ids[s:s + cfg["batch"]]
        width = max(len(x) for x in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, x in enumerate(batch):
            ids[r, width - len(x):] = torch.tensor(x)
            mask[r, width - len(x):] = 1
        kw = dict(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                  max_new_tokens=new_tokens or cfg["new_tokens"], pad_token_id=tok.pad_token_id)
        if method == "edt":
            kw["logits_processor"] = LogitsProcessorList([EntropyDynamicTemperatureLogitsProcessor(1.0, 0.8, value)])
        elif method == "sde_temperature":
            tau0, beta = value
            kw["sde_control"] = hf_sde.SDEControl(heads, mode="temperature", temperature=tau0, beta=beta,
                                                  min_temperature=SDE_BOUNDS[0], max_temperature=SDE_BOUNDS[1])
        elif method in DESIGNS:
            kw.update(design_kwargs(heads, method, value, temp_heads))
        else:
            kw.update(sample_kwargs(method, value))
        with torch.inference_mode():
            seqs = model.generate(**kw)
        for r in range(len(batch)):
            new = seqs[r, width:].tolist()
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id)]
            out_ids.append(new)
    return out_ids


def evaluate(texts, groups, prompts_of, judge, human, cfg, seed, boot=None):
    """Metrics of one setting's responses (``human``: features, groups of the human responses)."""
    import numpy as np
    from _quality import mauve, mauve_ci
    from eval_control import distinct, repetition

    nll, feats = judge.score([prompts_of[g] for g in groups], texts)
    words = [t.split() for t in texts]
    keys = list(dict.fromkeys(groups))
    members = [[i for i, g in enumerate(groups) if g == k] for k in keys]
    d2 = np.array([distinct([words[i] for i in m], 2) for m in members])
    nll_a, rep_a = np.array(nll, dtype=float), np.array([repetition(w) for w in words])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(keys), size=(cfg["boot"], len(keys)))

    def ci_of(per_group):
        b = np.array([np.nanmean(np.concatenate([per_group[j] for j in row])) for row in idx])
        return [float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))]

    out = {"n": len(texts), "prompts": len(keys), "mauve": mauve(feats, human[0], seed),
           "judge_nll": float(np.nanmean(nll_a)), "judge_nll_ci": ci_of([nll_a[m] for m in members]),
           "distinct2": float(d2.mean()), "distinct2_ci": ci_of([d2[[j]] for j in range(len(keys))]),
           "repetition": float(rep_a.mean()), "repetition_ci": ci_of([rep_a[m] for m in members]),
           "words": float(np.mean([len(w) for w in words])), "empty": int(sum(1 for w in words if not w)),
           "judge_nll_by_prompt": {k: float(np.nanmean(nll_a[m])) for k, m in zip(keys, members, strict=True)}}
    if boot:
        out["mauve_ci"] = mauve_ci(feats, groups, human[0], human[1], boot, seed)
    return out


def run_split(name, model, tok, heads, judge, rows, prompts, settings, cfg, seed, boot, temp_heads=None,
              new_tokens=None, reused=()):
    """Generate and score every setting on one set of prompts (``reused``: rows of an earlier run, kept as they are
    for the settings they cover)."""
    prompts_of = {sha1(p): p for p in prompts}
    humans = [r for r in rows if r["prompt"] in set(prompts)]
    h_nll, h_feats = judge.score([r["prompt"] for r in humans], [r["response"] for r in humans])
    human = (h_feats, [sha1(r["prompt"]) for r in humans])
    groups = [sha1(p) for p in prompts for _ in range(cfg["samples"])]
    ids = [chat_ids(tok, prompts_of[g]) for g in groups]
    results = []
    for method, value in settings:
        old = next((r for r in reused if r["method"] == method and _same(r["setting"], value)), None)
        if old is not None:
            results.append(old)
            print(f"[{name}] {method:16s} {value!s:12s} reused from {old['reused_from']}", flush=True)
            continue
        conts = generate(model, tok, heads, ids, method, value, cfg, seed, temp_heads, new_tokens)
        texts = [tok.decode(c, skip_special_tokens=True).strip() for c in conts]
        m = evaluate(texts, groups, prompts_of, judge, human, cfg, seed, boot)
        m.update({"split": name, "method": method, "setting": value, "example": texts[0][:240]})
        results.append(m)
        print(f"[{name}] {method:16s} {value!s:12s} mauve={m['mauve']:.3f} judge={m['judge_nll']:.3f} "
              f"d2={m['distinct2']:.3f} rep={m['repetition']:.3f} words={m['words']:.0f}", flush=True)
    import numpy as np
    from eval_control import distinct

    h_words = [r["response"].split()[: int(cfg["new_tokens"] * 0.75)] for r in humans]  # ~ as long as ours
    pools = {g: [w for w, hg in zip(h_words, human[1], strict=True) if hg == g] for g in set(human[1])}
    reference = {"judge_nll": float(np.nanmean(h_nll)), "n": len(humans),
                 "words": float(np.mean([len(r["response"].split()) for r in humans])),
                 # pools of as many responses as we sample per prompt: distinct-2 falls as a pool grows
                 "distinct2": float(np.mean([distinct(p[: cfg["samples"]], 2) for p in pools.values()]))}
    return results, reference


def plot(tuning, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, ykey, ylabel in ((axes[0], "mauve", "MAUVE vs human responses (higher is better)"),
                             (axes[1], "judge_nll", "judge NLL, nats/token (lower is better)")):
        for method in dict.fromkeys(r["method"] for r in tuning):
            pts = sorted((r["distinct2"], r[ykey]) for r in tuning if r["method"] == method)
            style = "D-" if method in SDE_METHODS else "o-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method, alpha=0.85)
        ax.set_xlabel("distinct-2 (per prompt pool)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _same(a, b) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def reusable_rows(path: str, cfg: dict, seed: int, tune_hashes: list[str], test_hashes: list[str]):
    """Baseline rows of an earlier run of this protocol (same prompts, samples, tokens, seed), to skip regenerating
    them: ``(tuning rows, test rows)``, each marked with ``reused_from`` (that run's commit). SDE methods are never
    reused; the test row of the best baseline is not either (the paired comparison needs its per-prompt NLLs)."""
    prev = json.loads(open(path).read())
    ps, res = prev["settings"], prev["results"]
    same = (all(ps.get(k) == cfg[k] for k in ("tune_prompts", "test_prompts", "samples", "new_tokens", "batch"))
            and res.get("tune_prompts") == tune_hashes and res.get("test_prompts") == test_hashes
            and prev.get("command", "").split()[:2] == ["python", "benchmarks/eval_frontier.py"]
            and (prev.get("settings", {}).get("seed", seed) == seed))
    if not same:
        raise SystemExit(f"--reuse {path}: that run used other prompts or settings; run without --reuse.")
    tag = f"{prev['machine'].get('git_commit')} ({path})"
    keep = [r for r in res["tuning"] if r["method"] not in SDE_METHODS]
    test = [r for r in res["test"] if r["method"] not in SDE_METHODS]
    best = min(test, key=lambda r: r["judge_nll"]) if test else None
    test = [r for r in test if r is not best]
    for r in keep + test:
        r["reused_from"] = tag
    return keep, test


def paired_against_best_baseline(test, boot: int, seed: int) -> dict:
    """Judge NLL of each SDE method minus the best baseline's (lowest judge NLL among the non-SDE methods), per
    test prompt, with a 95 % bootstrap over prompts (paired: both ran on the same prompts)."""
    import numpy as np

    base = [r for r in test if r["method"] not in SDE_METHODS and "judge_nll_by_prompt" in r]
    if not base:
        return {}
    ref = min(base, key=lambda r: r["judge_nll"])
    keys = list(ref["judge_nll_by_prompt"])
    rng = np.random.default_rng(seed + 3)
    idx = rng.integers(0, len(keys), size=(max(boot, 1), len(keys)))
    out = {"baseline": [ref["method"], ref["setting"]], "methods": {}}
    for r in test:
        if r["method"] not in SDE_METHODS:
            continue
        d = np.array([r["judge_nll_by_prompt"][k] - ref["judge_nll_by_prompt"][k] for k in keys])
        b = np.array([np.nanmean(d[row]) for row in idx])
        out["methods"][r["method"]] = {"setting": r["setting"], "diff": float(np.nanmean(d)),
                                       "ci95": [float(np.nanquantile(b, 0.025)), float(np.nanquantile(b, 0.975))]}
    return out


def paired_md(paired: dict) -> str:
    if not paired:
        return ""
    m, v = paired["baseline"]
    rows = []
    for name, r in paired["methods"].items():
        lo, hi = r["ci95"]
        call = "better" if hi < 0 else "worse" if lo > 0 else "no significant difference"
        rows.append([name, str(r["setting"]), f"{r['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]", call])
    return (f"### Each SDE design against the best baseline ({m} {v}), paired over test prompts\n\n"
            + C.md_table(["method", "setting", "judge NLL minus baseline [95% CI]", "verdict"], rows))


def _fmt_ci(v, ci):
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    p.add_argument("--heads", default=None, help="heads folder or repo id (default: the shipped SmolLM2 heads)")
    p.add_argument("--reuse", default=None, help="an earlier eval_frontier.json of the same protocol: its baseline "
                   "rows are kept instead of regenerated (marked in the output); every SDE method is rerun")
    args = p.parse_args(argv)
    C.setup_env(args.threads)
    from pathlib import Path

    from _quality import Judge

    import hf_sde
    from hf_sde.data.loading import SMOLLM2

    scale = C.scale_of(args)
    cfg = SETTINGS[scale]
    run = C.Run("eval_frontier", args, {**cfg, "sde_bounds": SDE_BOUNDS, "max_prompt_tokens": MAX_PROMPT_TOKENS,
                                        "seed": args.seed, "reuse": args.reuse})
    model, tok = SMOLLM2.load()
    heads_path = args.heads or str(C.default_heads())
    heads = hf_sde.SDEHeads.from_pretrained(heads_path)
    rows = [json.loads(line) for line in open(C.HELPSTEER)]
    tune_prompts, test_prompts = split_prompts(rows, heads, cfg, args.seed)
    judge = Judge()
    settings = [(m, v) for m, vals in cfg["sweeps"].items() for v in vals]
    temp_heads = None
    if any(m.startswith("learned_tau[") for m, _ in settings):  # design 1: fitted (or cached) by its own eval
        from eval_temperature_head import temperature_heads

        temp_heads = temperature_heads(model, tok, heads, heads_path, scale)["heads"]
    reuse_tune, reuse_test = (reusable_rows(args.reuse, cfg, args.seed, [sha1(x) for x in tune_prompts],
                                            [sha1(x) for x in test_prompts]) if args.reuse else ([], []))
    tuning, tune_ref = run_split("tuning", model, tok, heads, judge, rows, tune_prompts, settings, cfg, args.seed, None,
                                 temp_heads, reused=reuse_tune)
    target = tune_ref["distinct2"]
    best = {}
    for r in tuning:  # matched diversity: the setting whose distinct-2 is closest to the human responses'
        if r["method"] not in best or abs(r["distinct2"] - target) < abs(best[r["method"]]["distinct2"] - target):
            best[r["method"]] = r
    chosen = [(m, r["setting"]) for m, r in best.items()]
    test, test_ref = run_split("test", model, tok, heads, judge, rows, test_prompts, chosen, cfg, args.seed + 1,
                               cfg["boot"], temp_heads, reused=reuse_test)
    paired = paired_against_best_baseline(test, cfg["boot"], args.seed)
    long_cfg = {**cfg, "samples": 1}
    judge.max_response = 2 * long_cfg["long_new_tokens"]
    long_settings = [(m, v) for m, v in chosen if m in cfg["long_methods"]]
    long, _ = run_split("long", model, tok, heads, judge, rows, test_prompts, long_settings, long_cfg, args.seed + 2,
                        None, temp_heads, new_tokens=long_cfg["long_new_tokens"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "eval_frontier.png"
    if scale != "smoke":
        plot(tuning, png, f"SmolLM2-135M-Instruct, HelpSteer tuning prompts ({len(tune_prompts)} x {cfg['samples']}), "
             f"{cfg['new_tokens']} new tokens")
    lowest = min(test, key=lambda r: r["judge_nll"])
    top = max(test, key=lambda r: r["mauve"])
    sde = next(r for r in test if r["method"] == "sde_temperature")
    others = [r for r in test if r["method"] not in SDE_METHODS]
    best_base = max(others, key=lambda r: r["mauve"]) if others else None
    verdict = (f"At matched diversity on the {len(test_prompts)} held-out test prompts the lowest judge NLL is "
               f"{lowest['method']} ({lowest['setting']}): {_fmt_ci(lowest['judge_nll'], lowest['judge_nll_ci'])}; "
               f"SDE temperature control: {_fmt_ci(sde['judge_nll'], sde['judge_nll_ci'])}. "
               f"The highest MAUVE is {top['method']} "
               f"({top['setting']}): {_fmt_ci(top['mauve'], top.get('mauve_ci'))}. SDE temperature control "
               f"({sde['setting']}): {_fmt_ci(sde['mauve'], sde.get('mauve_ci'))}"
               + (f"; the best baseline, {best_base['method']}: {_fmt_ci(best_base['mauve'], best_base.get('mauve_ci'))}"
                  if best_base else "") + ".")
    head = ["method", "setting", "n", "MAUVE [CI]", "judge NLL [CI]", "distinct-2 [CI]", "repetition [CI]", "words"]

    def rows_of(rs, with_mauve_ci):
        return [[r["method"] + (" (reused)" if r.get("reused_from") else ""), str(r["setting"]), str(r["n"]), _fmt_ci(r["mauve"], r.get("mauve_ci")) if with_mauve_ci
                 else f"{r['mauve']:.3f}", _fmt_ci(r["judge_nll"], r["judge_nll_ci"]),
                 _fmt_ci(r["distinct2"], r["distinct2_ci"]), _fmt_ci(r["repetition"], r["repetition_ci"]),
                 f"{r['words']:.0f}"] for r in rs]

    body = (f"Human responses' distinct-2 on the tuning prompts (cut to ~{int(cfg['new_tokens'] * 0.75)} words): "
            f"{tune_ref['distinct2']:.3f}; test prompts: {test_ref['distinct2']:.3f}. "
            f"Heads: `{heads_path}` (layer {heads.config.layer}). Tuning: {len(tune_prompts)} training prompts x "
            f"{cfg['samples']} samples; test: {len(test_prompts)} held-out prompts x {cfg['samples']} samples; up to "
            f"{cfg['new_tokens']} new tokens, seed {args.seed}. Human responses: judge NLL "
            f"{test_ref['judge_nll']:.3f} on the test prompts ({test_ref['n']} responses, {test_ref['words']:.0f} "
            f"words on average; generated responses are cut at {cfg['new_tokens']} tokens). Plot: `{png.name}`.\n\n"
            + (f"Rows marked (reused) are the baselines of an earlier run of this protocol (`--reuse`: same prompts, "
               f"settings and seed; {len(reuse_tune)} tuning and {len(reuse_test)} test rows, from "
               f"{(reuse_tune or reuse_test or [{}])[0].get('reused_from')}); every SDE method and the best "
               f"baseline's test row were generated in this run.\n\n" if args.reuse else "")
            + "## Test split (each method at the setting whose tuning distinct-2 is closest to the human responses')\n\n" + C.md_table(head, rows_of(test, True))
            + f"\n\n**{verdict}**\n\n" + paired_md(paired)
            + f"\n\n## Long generations ({long_cfg['long_new_tokens']} new tokens, test prompts x 1, chosen settings)\n\n"
            + "Where small models degenerate: repetition (share of repeated 4-grams) and judge NLL over the whole "
            "response.\n\n" + C.md_table(head, rows_of(long, False))
            + "\n\n## Tuning split (every setting)\n\n" + C.md_table(head, rows_of(tuning, False)))
    run.finish({"tuning": tuning, "test": test, "long": long, "paired": paired, "chosen": chosen, "verdict": verdict,
                "human_tuning": tune_ref,
                "human_test": test_ref, "heads": heads_path, "tune_prompts": [sha1(x) for x in tune_prompts],
                "test_prompts": [sha1(x) for x in test_prompts]}, body)
    print(body)


if __name__ == "__main__":
    main()
