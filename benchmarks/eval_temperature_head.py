"""Design 1 of the decoding study: a learned per-token temperature on the SDE state, as a calibration of
SmolLM2.

Teacher-forced on human HelpSteer responses (chat template, read as the fit read them), a small network maps
the step's features to ``tau`` and is fitted by maximizing the likelihood of the human tokens under
``softmax(logits / tau)`` (``_designs.fit_temperature_head``). Fitting rows: responses to the shipped heads'
*training* prompts; claims: the responses to their *held-out* prompts. Input ablations (``_designs.INPUTS``):
the model's entropy alone, the SDE statistics alone (diffusion z-score, incoming surprise, drift norm, time),
both. Reference: the best fixed temperature (chosen on the fitting rows) and tau = 1. A head that cannot beat
the best fixed temperature on held-out human tokens calibrates nothing a scalar does not.

Reports held-out mean NLL per token (nats) and the paired difference to the best fixed temperature with a
95 % cluster bootstrap over responses. The fitted heads are cached (``benchmarks/.cache``) for
``eval_frontier.py``, which samples with them.

    python benchmarks/eval_temperature_head.py [--smoke | --full]
"""

from __future__ import annotations

import argparse
import json

import _common as C

SETTINGS = {
    "smoke": {"fit_rows": 6, "heldout_prompts": 2, "max_length": 32, "steps": 50, "boot": 20, "batch": 4},
    "default": {"fit_rows": 160, "heldout_prompts": None, "max_length": 192, "steps": 600, "boot": 1000, "batch": 4},
    "full": {"fit_rows": None, "heldout_prompts": None, "max_length": 256, "steps": 1000, "boot": 2000, "batch": 4},
}


def _rows(heads, cfg):
    """(fitting rows: training prompts' responses, held-out rows: held-out prompts' responses)."""
    from eval_uncertainty import heldout_rows, prompt_sha1

    held_rows, _ = heldout_rows(heads, cfg["heldout_prompts"])
    held = set((heads.config.data or {}).get("heldout_prompt_sha1") or [])
    rows = [json.loads(x) for x in C.HELPSTEER.read_text().splitlines() if x.strip()]
    fit_rows = [r for r in rows if prompt_sha1(r["prompt"]) not in held]
    return fit_rows[: cfg["fit_rows"]] if cfg["fit_rows"] else fit_rows, held_rows


def temperature_heads(model, tok, heads, heads_path: str, scale: str) -> dict:
    """``{"heads": {inputs: TemperatureHead}, "fit": seqs, "heldout": seqs}``, fitted once per setting and
    cached (features as .npz, heads as safetensors)."""
    import numpy as np
    import torch
    from _designs import GRID, INPUTS, TemperatureHead, fit_temperature_head
    from eval_uncertainty import features, human_ids
    from safetensors.torch import load_file, save_file

    cfg = SETTINGS[scale]
    key = C.cache_key(heads=str(heads_path), cfg=cfg, grid=[float(GRID[0]), float(GRID[-1]), len(GRID)], v=1)
    folder = C.CACHE / f"tempheads-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for part, rows in zip(("fit", "heldout"), _rows(heads, cfg), strict=True):
        path = folder / f"{part}.npz"
        if not path.is_file():
            ids, starts = human_ids(tok, rows, cfg["max_length"], 4096)
            seqs = features(model, heads, ids, starts, cfg["batch"], grid=GRID)
            np.savez(path, **{f"{i}:{k}": v for i, s in enumerate(seqs) for k, v in s.items()})
        z = np.load(path)
        n = 1 + max(int(k.split(":")[0]) for k in z.files)
        data[part] = [{k.split(":")[1]: z[k] for k in z.files if k.startswith(f"{i}:")} for i in range(n)]
    fitted = {}
    horizon = float(heads.config.horizon)
    for name, inputs in INPUTS.items():
        path = folder / f"head-{name.replace('+', '_')}.safetensors"
        if path.is_file():
            state = load_file(str(path))
            head = TemperatureHead(inputs, state["mean"], state["std"], horizon=horizon)
            head.load_state_dict(state)
        else:
            head = fit_temperature_head(data["fit"], inputs, horizon, steps=cfg["steps"])
            save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path))
        fitted[name] = head.eval()
    with torch.no_grad():
        return {"heads": fitted, **data}


def evaluate(fitted: dict, boot: int, seed: int) -> dict:
    """Held-out NLL per head and fixed temperature, with paired cluster-bootstrap CIs against the best fixed."""
    import numpy as np
    import torch
    from _designs import GRID, feature_matrix, fixed_temperature_nll, token_nll

    fit, held = fitted["fit"], fitted["heldout"]
    fixed_fit = fixed_temperature_nll(fit)
    j = int(fixed_fit.argmin())
    best_tau = float(1 / GRID[j])
    j1 = int((1 / GRID - 1.0).abs().argmin())
    per_seq = {}  # method -> list of per-token NLL arrays (one per held-out sequence)
    taus = {}
    with torch.no_grad():
        for s in held:
            target, lse = torch.as_tensor(s["target_logit"]).float(), torch.as_tensor(s["lse"]).float()
            per_seq.setdefault(f"fixed tau={best_tau:.2f} (best on fitting rows)", []).append(
                (lse[:, j] - GRID[j] * target).numpy())
            if j1 != j:
                per_seq.setdefault(f"fixed tau={float(1 / GRID[j1]):.2f}", []).append(
                    (lse[:, j1] - GRID[j1] * target).numpy())
            for name, head in fitted["heads"].items():
                tau = head(feature_matrix([s], head.inputs, head.horizon))
                per_seq.setdefault(f"learned: {name}", []).append(token_nll(tau, target, lse).numpy())
                taus.setdefault(name, []).append(tau.numpy())
    ref = next(iter(per_seq))
    rng = np.random.default_rng(seed)
    n = len(held)
    idx = rng.integers(0, n, size=(boot, n))

    def mean_of(arrs, pick):
        return float(np.concatenate([arrs[i] for i in pick]).mean())

    out = {"best_fixed_tau": best_tau, "heldout_sequences": n, "heldout_tokens": int(sum(len(a) for a in per_seq[ref])),
           "fit_sequences": len(fit), "fit_tokens": int(sum(len(s["target_logit"]) for s in fit)), "methods": {}}
    for name, arrs in per_seq.items():
        point = mean_of(arrs, range(n))
        b = np.array([mean_of(arrs, row) for row in idx])
        d = b - np.array([mean_of(per_seq[ref], row) for row in idx])
        out["methods"][name] = {"nll": point, "nll_ci": [float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))],
                                "minus_best_fixed": point - mean_of(per_seq[ref], range(n)),
                                "minus_best_fixed_ci": [float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))]}
    for name, t in taus.items():
        t = np.concatenate(t)
        out["methods"][f"learned: {name}"]["tau_mean"] = float(t.mean())
        out["methods"][f"learned: {name}"]["tau_p5_p95"] = [float(np.quantile(t, 0.05)), float(np.quantile(t, 0.95))]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    p.add_argument("--heads", default=None, help="SDE heads folder (default: the shipped SmolLM2 heads)")
    args = p.parse_args(argv)
    C.setup_env(args.threads)
    import hf_sde
    from hf_sde.data.loading import SMOLLM2

    scale = C.scale_of(args)
    cfg = SETTINGS[scale]
    run = C.Run("eval_temperature_head", args, cfg)
    model, tok = SMOLLM2.load()
    heads_path = args.heads or str(C.default_heads())
    heads = hf_sde.SDEHeads.from_pretrained(heads_path).eval()
    fitted = temperature_heads(model, tok, heads, heads_path, scale)
    res = evaluate(fitted, cfg["boot"], args.seed)
    rows = []
    for name, m in res["methods"].items():
        rows.append([name, f"{m['nll']:.4f} [{m['nll_ci'][0]:.4f}, {m['nll_ci'][1]:.4f}]",
                     f"{m['minus_best_fixed']:+.4f} [{m['minus_best_fixed_ci'][0]:+.4f}, {m['minus_best_fixed_ci'][1]:+.4f}]",
                     f"{m['tau_mean']:.2f} ({m['tau_p5_p95'][0]:.2f}-{m['tau_p5_p95'][1]:.2f})" if "tau_mean" in m else "-"])
    learned = {k: v for k, v in res["methods"].items() if k.startswith("learned")}
    best = min(learned, key=lambda k: learned[k]["nll"])
    b = learned[best]
    lo, hi = b["minus_best_fixed_ci"]
    call = ("it beats every fixed temperature on held-out human tokens" if hi < 0 else
            "worse than the best fixed temperature" if lo > 0 else "no significant difference from a fixed temperature")
    verdict = (f"Best learned head: {best}, {b['minus_best_fixed']:+.4f} nats/token against the best fixed temperature "
               f"({res['best_fixed_tau']:.2f}), 95% CI [{lo:+.4f}, {hi:+.4f}]: {call}.")
    sde_only = learned.get("learned: sde")
    if sde_only is not None:
        verdict += (f" SDE inputs alone: {sde_only['minus_best_fixed']:+.4f} [{sde_only['minus_best_fixed_ci'][0]:+.4f}, "
                    f"{sde_only['minus_best_fixed_ci'][1]:+.4f}].")
    body = (f"Heads: `{heads_path}` (layer {heads.config.layer}). Fitting: {res['fit_sequences']} human responses to "
            f"training prompts ({res['fit_tokens']} tokens); held out: {res['heldout_sequences']} responses to the heads' "
            f"held-out prompts ({res['heldout_tokens']} tokens); responses cut at {cfg['max_length']} tokens; tau in "
            f"[0.3, 1.5].\n\n" + C.md_table(["temperature", "held-out NLL/token [CI]", "minus best fixed [CI]",
                                            "tau mean (p5-p95)"], rows) + f"\n\n**{verdict}**\n")
    run.finish({**res, "verdict": verdict, "heads": heads_path}, body)
    print(body)


if __name__ == "__main__":
    main()
