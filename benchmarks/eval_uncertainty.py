"""Uncertainty: does the diffusion z-score at position k predict that the model's top-1 guess for token k+1 is
wrong, and does it add anything to the model's own entropy?

Teacher-forced on text the heads never saw: at each path position k the model's top-1 prediction for token k+1
is right or wrong (label 1 = wrong). Predictors known at position k:

* ``zscore``: calibrated diffusion z-score of the state at k (the SDE control signal);
* ``surprise``: standardized NLL of the increment from k-1 to k (the state at k is known, so this is causal);
* ``entropy``: entropy of the model's next-token distribution at k (the obvious baseline);
* ``position``: k itself, counted from the path start (a trivial baseline);
* ``zscore | entropy, position``: the z-score residual after a least-squares fit on entropy and position;
* combinations: logistic regressions of the label on (entropy), (entropy, zscore) and
  (entropy, zscore, surprise, position), fitted on half of the sequences and scored on the other half
  (sequence-level split, seeded); the AUROC difference to entropy alone with a paired cluster bootstrap CI.

AUROC by ranks (Mann-Whitney U; ties get average ranks), with a 95% cluster bootstrap over sequences.
Path positions 1.. are scored (position 0 has no incoming increment).

``--model smollm2`` (the default): SmolLM2-135M-Instruct with the shipped heads (``--heads DIR`` for others), on
(1) held-out human HelpSteer responses (rows whose prompt the heads held out, ``heads.config.data
["heldout_prompt_sha1"]``), read as chat in the context of the prompt exactly as the fit read them, and (2) the
model's own samples for those prompts (temperature 1, no truncation, seeded), teacher-forced on the sampled ids;
then a stories260K table (layer -1, today's code path). ``--model stories260k``: stories260K only, all four head
sets (today's table). ``--smoke`` runs stories260K only unless ``--model smollm2`` is given.

    python benchmarks/eval_uncertainty.py [--smoke | --full] [--model smollm2|stories260k] [--heads DIR]
"""

from __future__ import annotations

import argparse
import hashlib

import _common as C

SETTINGS = {
    "smoke": {"sets": [("tinystories", -1)], "boot": 20},
    "default": {"sets": [("helpsteer", -1), ("helpsteer", 2), ("tinystories", -1), ("tinystories", 2)], "boot": 500},
    "full": {"sets": [("helpsteer", -1), ("helpsteer", 2), ("tinystories", -1), ("tinystories", 2)], "boot": 2000},
}
# SmolLM2: held-out prompts used, response path cap, context cap, own samples per prompt and their length.
SMOLLM2_SETTINGS = {
    "smoke": {"prompts": 2, "max_length": 24, "max_context": 256, "samples": 1, "new_tokens": 12, "boot": 20,
              "batch": 4, "stories_sets": [("tinystories", -1)], "stories_scale": "smoke"},
    "default": {"prompts": 30, "max_length": 192, "max_context": 4096, "samples": 2, "new_tokens": 96, "boot": 500,
                "batch": 4, "stories_sets": [("helpsteer", -1), ("tinystories", -1)], "stories_scale": "default"},
    "full": {"prompts": None, "max_length": 256, "max_context": 4096, "samples": 2, "new_tokens": 128, "boot": 2000,
             "batch": 4, "stories_sets": SETTINGS["full"]["sets"], "stories_scale": "full"},
}
PREDICTORS = ("zscore", "surprise", "entropy", "position", "zscore_resid")
# Logistic regressions scored on the held-back half of the sequences; "H" alone is the reference.
COMBOS = {"H": ("entropy",), "H+z": ("entropy", "zscore"), "H+z+s+k": ("entropy", "zscore", "surprise", "position")}


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


def prompt_sha1(prompt: str) -> str:
    """The key ``heads.config.data["heldout_prompt_sha1"]`` lists held-out prompts by."""
    return hashlib.sha1(prompt.strip().encode()).hexdigest()[:12]


# ----- features: one forward per batch, hook at the heads' layer, logits on the path only -------------------
def _sequence_features(heads, hidden, logits, ids, grid=None):
    """Labels and predictors over path positions 1..p-2 of one path (hidden/logits: (p, .); ids: the p path
    tokens followed by nothing: token j+1 of the path is ``ids[j + 1]``). With ``grid`` (inverse temperatures
    ``s``), also the next token's raw logit and ``logsumexp(s * logits)`` per grid point (``(n, len(grid))``):
    what fitting a per-token temperature on these tokens needs, without keeping 49k logits per position."""
    import torch

    p = hidden.shape[0]
    z = heads.project(hidden.float())
    pos = torch.arange(p)
    mean, std = heads(z, heads.times(pos))
    zscore = heads.zscore(heads.diffusion_magnitude(std))
    surprise = torch.full_like(zscore, float("nan"))
    surprise[1:] = heads.surprise(z[1:] - z[:-1], mean[:-1], std[:-1])
    logp = torch.log_softmax(logits.float(), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    wrong = logits.argmax(-1)[:-1] != torch.as_tensor(ids[1:])
    k = slice(1, p - 1)  # predict token k+1 from position k, k >= 1
    out = {"wrong": wrong[k].numpy(), "zscore": zscore[k].numpy(), "surprise": surprise[k].numpy(),
           "entropy": entropy[k].numpy(), "position": pos[k].numpy().astype(float),
           "drift_norm": (mean.norm(dim=-1) / heads.config.dt)[k].numpy()}
    if grid is not None:
        lg = logits[k].float()
        out["target_logit"] = lg.gather(1, torch.as_tensor(ids[2:p]).view(-1, 1))[:, 0].numpy()
        out["lse"] = torch.stack([torch.logsumexp(lg * float(s), -1) for s in grid], 1).numpy()
    return out


def features(model, heads, token_ids, starts=None, batch_size: int = 8, grid=None):
    """Per sequence: dict of arrays over path positions 1..p-2 (labels and predictors). The path of sequence i
    is ``token_ids[i][starts[i]:]`` (whole sequence when ``starts`` is None); k counts from its start.
    ``grid``: see :func:`_sequence_features`.

    One forward per batch (right-padded): a hook at the heads' layer reads the states, the decoder's final
    output goes through the LM head at the path positions only (a 49k vocabulary times every prompt position
    would not fit in memory)."""
    import torch

    from hf_sde.data.layers import register_block_hook

    starts = list(starts) if starts is not None else [0] * len(token_ids)
    keep = [i for i, ids in enumerate(token_ids) if len(ids) - starts[i] >= 4]
    order = sorted(keep, key=lambda i: len(token_ids[i]))
    captured = []
    handle = register_block_hook(model, heads.config.layer, lambda h: captured.append(h.detach()))
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    out = {}
    try:
        with torch.inference_mode():
            for a in range(0, len(order), batch_size):
                idx = order[a:a + batch_size]
                width = max(len(token_ids[i]) for i in idx)
                x = torch.tensor([list(token_ids[i]) + [0] * (width - len(token_ids[i])) for i in idx])
                mask = (torch.arange(width) < torch.tensor([len(token_ids[i]) for i in idx])[:, None]).long()
                captured.clear()
                last = decoder(input_ids=x, attention_mask=mask, use_cache=False).last_hidden_state
                for r, i in enumerate(idx):
                    span = slice(starts[i], len(token_ids[i]))
                    out[i] = _sequence_features(heads, captured[-1][r, span], head(last[r, span]),
                                                token_ids[i][span], grid)
    finally:
        handle.remove()
    return add_residual([out[i] for i in keep])


def add_residual(out: list[dict]) -> list[dict]:
    """The z-score residual after a pooled least-squares fit on entropy and position (``zscore_resid``)."""
    import numpy as np

    Z = np.concatenate([o["zscore"] for o in out])
    X = np.stack([np.ones_like(Z), np.concatenate([o["entropy"] for o in out]),
                  np.concatenate([o["position"] for o in out])], 1)
    coef, *_ = np.linalg.lstsq(X, Z, rcond=None)
    for o in out:
        o["zscore_resid"] = o["zscore"] - np.stack([np.ones_like(o["zscore"]), o["entropy"], o["position"]], 1) @ coef
    return out


# ----- statistics ---------------------------------------------------------------------------------------------
def logistic_fit(X, y, ridge: float = 1e-4, iters: int = 50):
    """Logistic regression by Newton iterations on standardized columns (small ridge for separable data).
    Returns ``score(X)``: the linear predictor (monotone in the fitted probability, enough for AUROC)."""
    import numpy as np

    X, y = np.asarray(X, float), np.asarray(y, float)
    mu, sd = X.mean(0), X.std(0) + 1e-12
    A = np.column_stack([np.ones(len(X)), (X - mu) / sd])
    w = np.zeros(A.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-A @ w))
        grad = A.T @ (p - y) + ridge * w
        hess = (A * (p * (1 - p))[:, None]).T @ A + ridge * np.eye(A.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return lambda Xn: np.column_stack([np.ones(len(Xn)), (np.asarray(Xn, float) - mu) / sd]) @ w


def combinations(seqs, boot: int, seed: int) -> dict:
    """Logistic regressions (``COMBOS``) fitted on a seeded half of the sequences, scored on the other half:
    AUROC with cluster bootstrap CIs over the test sequences, and the paired difference to entropy alone."""
    import numpy as np

    rng = np.random.default_rng(seed + 7)
    perm = rng.permutation(len(seqs))
    train, test = perm[: len(seqs) // 2], perm[len(seqs) // 2:]

    def stack(idx, cols):
        return np.concatenate([np.stack([seqs[i][c] for c in cols], 1) for i in idx])

    y_train = np.concatenate([seqs[i]["wrong"] for i in train])
    scored = []  # per test sequence: {combo: scores}
    models = {name: logistic_fit(stack(train, cols), y_train) for name, cols in COMBOS.items()}
    for i in test:
        scored.append({name: models[name](stack([i], cols)) for name, cols in COMBOS.items()})
    labels = [seqs[i]["wrong"] for i in test]

    def aurocs(pick):
        y = np.concatenate([labels[j] for j in pick])
        return {name: auroc(np.concatenate([scored[j][name] for j in pick]), y) for name in COMBOS}

    point = aurocs(range(len(test)))
    brng = np.random.default_rng(seed + 11)
    boots = [aurocs(brng.integers(0, len(test), len(test))) for _ in range(boot)]
    res = {"train_sequences": len(train), "test_sequences": len(test),
           "test_positions": int(sum(len(x) for x in labels))}
    for name in COMBOS:
        b = np.array([x[name] for x in boots])
        d = b - np.array([x["H"] for x in boots])
        res[name] = {"auroc": point[name], "ci95": _ci(b), "minus_H": point[name] - point["H"], "minus_H_ci95": _ci(d)}
    return res


def _ci(b) -> list[float]:
    import numpy as np

    return [float(np.nanquantile(b, 0.025)), float(np.nanquantile(b, 0.975))]


def evaluate(seqs, boot, seed) -> dict:
    import numpy as np
    from scipy.stats import spearmanr

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
        res[k] = {"auroc": auroc(cat[k], cat["wrong"]), "ci95": _ci(np.array(boots[k]))}
    # Paired: does the z-score beat entropy? (bootstrap of the AUROC difference)
    res["zscore_minus_entropy_ci95"] = _ci(np.array(boots["zscore"]) - np.array(boots["entropy"]))
    res["spearman_zscore_entropy"] = float(spearmanr(cat["zscore"], cat["entropy"]).statistic)
    if len(seqs) >= 4:
        res["combinations"] = combinations(seqs, boot, seed)
    return res


def _cell(r: dict) -> str:
    return f"{r['auroc']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"


def table_rows(label: list[str], r: dict) -> tuple[list, list]:
    """One row of the per-predictor table and one of the combination table."""
    main = [*label, f"{r['sequences']}/{r['positions']}", r["error_rate"], *(_cell(r[k]) for k in PREDICTORS),
            f"{r['spearman_zscore_entropy']:+.2f}"]
    c = r.get("combinations")
    if c is None:
        return main, []
    comb = [*label, f"{c['train_sequences']}/{c['test_sequences']}", _cell(c["H"]), _cell(c["H+z"]),
            f"{c['H+z']['minus_H']:+.3f} [{c['H+z']['minus_H_ci95'][0]:+.3f}, {c['H+z']['minus_H_ci95'][1]:+.3f}]",
            _cell(c["H+z+s+k"]),
            f"{c['H+z+s+k']['minus_H']:+.3f} [{c['H+z+s+k']['minus_H_ci95'][0]:+.3f}, "
            f"{c['H+z+s+k']['minus_H_ci95'][1]:+.3f}]"]
    return main, comb


MAIN_HEADERS = ["seqs/positions", "error rate", "z-score", "surprise", "entropy H", "position k", "z | H, k",
                "rho(z,H)"]
COMB_HEADERS = ["train/test seqs", "LR(H)", "LR(H, z)", "(H, z) - H", "LR(H, z, s, k)", "(H, z, s, k) - H"]


# ----- SmolLM2: held-out human responses and the model's own samples ----------------------------------------
def heldout_rows(heads, n_prompts: int | None) -> tuple[list[dict], list[str]]:
    """HelpSteer sample rows whose prompt the heads held out (file order), and those prompts (first ``n_prompts``)."""
    import json

    held = set((heads.config.data or {}).get("heldout_prompt_sha1") or [])
    if not held:
        raise ValueError("these heads record no held-out prompts (config.data['heldout_prompt_sha1']); without them "
                         "the evaluation cannot tell unseen text from training text")
    rows = [json.loads(x) for x in C.HELPSTEER.read_text().splitlines() if x.strip()]
    prompts = list(dict.fromkeys(r["prompt"].strip() for r in rows if prompt_sha1(r["prompt"]) in held))
    prompts = prompts[:n_prompts] if n_prompts is not None else prompts
    keep = set(prompts)
    return [r for r in rows if r["prompt"].strip() in keep], prompts


def human_ids(tok, rows, max_length: int, max_context: int):
    """Chat ids and path starts of the rows, as the fit tokenized them (template ``helpsteer-chat``)."""
    from hf_sde.data.corpus import TEMPLATES
    from hf_sde.trajectories.extract import tokenize_documents

    docs = [TEMPLATES["helpsteer-chat"](r) for r in rows]
    return tokenize_documents(tok, docs, max_length, max_context, template="helpsteer-chat")


def sample_ids(model, tok, prompts, n_samples: int, new_tokens: int, max_context: int, seed: int, batch: int = 8):
    """The model's own responses (chat template, temperature 1, no top-k/top-p, seeded): ``(ids, starts)`` with
    ids = context + sampled tokens up to (not including) the end-of-turn token, start = last context position."""
    import torch

    ctx = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
           for p in prompts]
    ctx = [list(c["input_ids"] if hasattr(c, "keys") else c)[-(max_context - new_tokens):] for c in ctx]
    jobs = [c for c in ctx for _ in range(n_samples)]
    stop = {tok.eos_token_id, *(tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, starts = [], []
    for a in range(0, len(jobs), batch):
        part = jobs[a:a + batch]
        width = max(map(len, part))
        x = torch.tensor([[pad] * (width - len(c)) + c for c in part])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in part])
        torch.manual_seed(seed + a)
        with torch.inference_mode():
            gen = model.generate(input_ids=x, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, min_p=None, max_new_tokens=new_tokens, pad_token_id=pad)[:, width:]
        for c, g in zip(part, gen.tolist(), strict=True):
            cut = next((j for j, t in enumerate(g) if t in stop), len(g))
            ids.append(c + g[:cut])
            starts.append(len(c) - 1)
    return ids, starts


def run_smollm2(args, cfg, heads_dir) -> tuple[dict, str]:
    """SmolLM2 tables: held-out human responses and the model's own samples for the held-out prompts."""
    import time

    from hf_sde import SDEHeads
    from hf_sde.data.loading import SMOLLM2

    t0 = time.perf_counter()
    model, tok = SMOLLM2.load()
    heads = SDEHeads.from_pretrained(str(heads_dir)).eval()
    heads.check_compatible(model)
    rows, prompts = heldout_rows(heads, cfg["prompts"])
    info = {"heads": str(heads_dir), "layer": heads.config.layer, "proj_dim": heads.config.proj_dim,
            "time_origin": heads.config.time_origin, "heads_heldout_nll": heads.config.heldout_nll,
            "heldout_prompts_used": len(prompts), "human_rows": len(rows)}
    sets = {"held-out human responses": human_ids(tok, rows, cfg["max_length"], cfg["max_context"])}
    sets["own samples (T=1)"] = sample_ids(model, tok, prompts, cfg["samples"], cfg["new_tokens"],
                                           cfg["max_context"], args.seed, batch=8)
    info["load_and_sample_seconds"] = round(time.perf_counter() - t0, 1)
    results, rows_main, rows_comb = {"info": info}, [], []
    for name, (ids, starts) in sets.items():
        r = evaluate(features(model, heads, ids, starts, cfg["batch"]), cfg["boot"], args.seed)
        results[name] = r
        m, c = table_rows(["SmolLM2-135M-Instruct", str(heads.config.layer), name], r)
        rows_main.append(m)
        rows_comb.extend([c] if c else [])
    info["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return results, _tables(rows_main, rows_comb)


def _tables(rows_main, rows_comb) -> str:
    lead = ["model", "layer", "text"]
    return (C.md_table(lead + MAIN_HEADERS, rows_main) + "\n\nCombinations (logistic regression fitted on one half "
            "of the sequences, AUROC on the other half; differences paired, cluster bootstrap over test sequences):"
            "\n\n" + C.md_table(lead + COMB_HEADERS, rows_comb))


def run_stories(args, sets, scale: str, boot: int) -> tuple[dict, str]:
    """stories260K tables (today's code path): heads fitted and cached by ``_common.stories_heads``."""
    import hf_sde

    model, tok = C.load_stories()
    real_ids = hf_sde.trajectories.extract.tokenize_texts(tok, C.tinystories_texts(), 512)
    results, rows_main, rows_comb = {}, [], []
    for corpus, layer in sets:
        heads, summary = C.stories_heads(model, tok, corpus, layer, scale, seed=args.seed, stopping="auto")
        ids, _ = C.stories_corpus_ids(model, tok, corpus, scale, args.seed)
        kept = summary["kept_indices"]
        evals = {"heldout": [ids[kept[i]] for i in summary["heldout_indices"]]}
        if corpus == "tinystories":
            evals["real_tinystories"] = real_ids
        for split, seq_ids in evals.items():
            r = evaluate(features(model, heads, seq_ids), boot, args.seed)
            results[f"{corpus}/L{layer}/{split}"] = r
            name = {"heldout": "held-out self-generated" if corpus == "tinystories" else "held-out responses",
                    "real_tinystories": "5 real TinyStories"}[split]
            m, c = table_rows([f"stories260K ({corpus})", str(layer), name], r)
            rows_main.append(m)
            rows_comb.extend([c] if c else [])
    return results, _tables(rows_main, rows_comb)


def verdict(results: dict) -> str:
    """A plain statement from the numbers: does z beat entropy, does z add to entropy (target +0.02 AUROC)."""
    parts = []
    for name, r in results.items():
        if not isinstance(r, dict) or "zscore" not in r:
            continue
        z, h = r["zscore"]["auroc"], r["entropy"]["auroc"]
        lo, hi = r["zscore_minus_entropy_ci95"]
        s = (f"{name}: z-score AUROC {z:.3f} vs entropy {h:.3f} (z - H in [{lo:+.3f}, {hi:+.3f}]: "
             + ("z beats entropy" if lo > 0 else "z is worse than entropy" if hi < 0 else "no clear difference")
             + f"); z residual after H, k {r['zscore_resid']['auroc']:.3f}")
        c = r.get("combinations")
        if c:
            d, (dlo, dhi) = c["H+z"]["minus_H"], c["H+z"]["minus_H_ci95"]
            met = "meets" if dlo > 0 and d >= 0.02 else "adds something but misses" if dlo > 0 else "does not meet"
            s += (f"; adding z to entropy changes held-out-half AUROC by {d:+.3f} [{dlo:+.3f}, {dhi:+.3f}], which "
                  f"{met} the +0.02 target; all four features: {c['H+z+s+k']['minus_H']:+.3f} "
                  f"[{c['H+z+s+k']['minus_H_ci95'][0]:+.3f}, {c['H+z+s+k']['minus_H_ci95'][1]:+.3f}]")
        parts.append(s + ".")
    return " ".join(parts)


INTRO = ("AUROC for predicting that the model's top-1 guess for token k+1 is wrong, from signals at position k "
         "(0.5 = chance; above 0.5 = higher signal, more errors). 95% cluster bootstrap over sequences. "
         "`z | H, k` = z-score residual after regressing on entropy and position. rho = Spearman(z, H). "
         "LR(...) = logistic regression on those features (H entropy, z z-score, s surprise, k position).")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    p.add_argument("--model", choices=("smollm2", "stories260k"), default=None,
                   help="smollm2 (default; then a stories260K table too) or stories260k alone (today's tables); "
                        "--smoke defaults to stories260k so the test-suite never loads SmolLM2")
    p.add_argument("--heads", default=None, help="SmolLM2 heads folder or repo id (default: the shipped heads)")
    args = p.parse_args(argv)
    C.setup_env(args.threads)
    from hf_sde.pretrained import DEFAULT_HEADS

    scale = C.scale_of(args)
    model = args.model or ("stories260k" if scale == "smoke" else "smollm2")
    heads_dir = args.heads or DEFAULT_HEADS
    cfg = dict(SMOLLM2_SETTINGS[scale]) if model == "smollm2" else dict(SETTINGS[scale])
    run = C.Run("eval_uncertainty", args, {**cfg, "model": model, "heads": str(heads_dir) if model == "smollm2"
                                            else None})
    results, body = {}, INTRO + "\n\n"
    if model == "smollm2":
        results["smollm2"], md = run_smollm2(args, cfg, heads_dir)
        body += f"## SmolLM2-135M-Instruct (heads `{heads_dir}`)\n\n{_smollm2_note(results['smollm2'])}\n\n{md}\n\n"
        sets, stories_scale = cfg["stories_sets"], cfg["stories_scale"]
    else:
        sets, stories_scale = cfg["sets"], scale
    results["stories260k"], md = run_stories(args, sets, stories_scale, cfg["boot"])
    body += f"## stories260K (heads fitted by `_common.stories_heads`, scale {stories_scale})\n\n{md}\n\n"
    text = verdict({f"SmolLM2 {k}": v for k, v in results.get("smollm2", {}).items()}
                   | {f"stories260K {k}": v for k, v in results["stories260k"].items()})
    results["verdict"] = text
    body += f"## Verdict\n\n{text}\n"
    flags = " --smoke" if scale == "smoke" else " --full" if scale == "full" else ""
    command = (f"python benchmarks/eval_uncertainty.py{flags}" + (f" --model {args.model}" if args.model else "")
               + (f" --heads {args.heads}" if args.heads else ""))
    run.finish(results, body, command=command)
    print(body)
    return results


def _smollm2_note(r: dict) -> str:
    i = r["info"]
    return (f"Heads at layer {i['layer']} (d={i['proj_dim']}, time origin {i['time_origin']}), held-out NLL "
            f"{ {k: round(v, 3) for k, v in (i['heads_heldout_nll'] or {}).items()} }. Text: {i['human_rows']} "
            f"HelpSteer rows of {i['heldout_prompts_used']} prompts the heads held out, read as chat with the prompt "
            "as context (path = response, k = 0 at the last prompt position); own samples = the model's responses "
            "to the same prompts, teacher-forced on the sampled ids.")


if __name__ == "__main__":
    main()
