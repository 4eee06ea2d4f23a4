"""The SDE trace the naive way versus the hook path: time and peak memory.

Variants (greedy, ``min_new_tokens == max_new_tokens``, same prompts):

* ``plain``: ``generate`` with no trace (reference).
* ``hook``: ``generate(..., sde_control=SDEControl(heads, mode="observe"))``: one forward hook reads the
  heads' layer at the newest position; the trace comes back with the output.
* ``naive_generate``: ``generate(output_hidden_states=True, return_dict_in_generate=True)`` keeps every
  layer's state for every step; the heads then run post hoc over the heads' layer.
* ``naive_reforward``: plain ``generate``, then one more forward over the generated sequence with
  ``output_hidden_states=True`` and the heads post hoc.

Both naive paths compute the same statistics as the hook (diffusion, z-score, drift norm, surprise); the
script checks that the z-scores agree. The heads read a *middle* layer on purpose: transformers'
``hidden_states[-1]`` is the final-norm output, not the last block's output that the hook reads, so for
the default last layer the naive path would not even be equivalent.

Time: interleaved rounds in one process; ratios per round against ``hook``. Memory: each variant runs in
a fresh interpreter (after a short warm-up call); the kernel's resident high-water mark is reset before
the measured call and read after it (``VmHWM`` via ``/proc/self/clear_refs``), giving the peak increase
in resident memory (MiB) while the result is still held. ``retained MiB`` counts the bytes of the tensors
the caller ends up holding (hidden states or trace).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _common as C

SETTINGS = {
    "smoke": {"cells": [("gpt2-tiny", 2)], "new_tokens": 4, "prompt_tokens": 4,
              "reps": (1, 1, 0), "memory_cells": [], "memory_reps": 1},
    # GPT-2-124M at batch 8 (4 variants x ~10-100 s per call on 2 shared cores) only with --full.
    "default": {"cells": [("stories260K", 1), ("stories260K", 8), ("gpt2-124M", 1)],
                "new_tokens": 128, "prompt_tokens": 16, "reps": (3, 10, 30),
                "reps_gpt2": (2, 3, 60),
                "memory_cells": [("stories260K", 8), ("gpt2-124M", 1)], "memory_reps": 2},
    "full": {"cells": [("stories260K", 1), ("stories260K", 8), ("gpt2-124M", 1), ("gpt2-124M", 8)],
             "new_tokens": 128, "prompt_tokens": 16, "reps": (5, 20, 120), "reps_gpt2": (3, 6, 400),
             "memory_cells": [("stories260K", 1), ("stories260K", 8), ("gpt2-124M", 1), ("gpt2-124M", 8)],
             "memory_reps": 2},
}
VARIANTS = ("plain", "hook", "naive_generate", "naive_reforward")


def prepare(name: str, scale: str, seed: int):
    if name == "stories260K":
        model, tok = C.load_stories()
        heads, _ = C.stories_heads(model, tok, "helpsteer", 2, "smoke" if scale == "smoke" else "default")
    else:
        size = name.split("-", 1)[1]
        model = C.build_gpt2(size, seed)
        heads, _ = C.gpt2_heads(model, size, -2, n_seq=6 if size == "tiny" else 16,
                                length=48 if size == "tiny" else 144, epochs=1 if size == "tiny" else 3)
    return model, heads


def posthoc_trace(heads, states, positions):
    """The hook path's statistics from stacked states ``(B, n, D)`` at token positions ``(n,)``."""
    import torch

    z = heads.project(states.float())
    mean, std = heads(z, heads.times(positions).expand(z.shape[:-1]))
    mag = heads.diffusion_magnitude(std)
    zscore = heads.zscore(mag)
    drift_norm = (mean / heads.dt).norm(dim=-1)
    surprise = torch.full_like(mag, float("nan"))
    surprise[:, :-1] = heads.surprise(z[:, 1:] - z[:, :-1], mean[:, :-1], std[:, :-1])
    return {"diffusion": mag, "zscore": zscore, "drift_norm": drift_norm, "surprise": surprise}


def make_variants(model, heads, batch, cfg, seed):
    import torch

    import hf_sde

    n = cfg["new_tokens"]
    vocab = model.config.vocab_size
    ids = torch.tensor(C.random_ids(batch, cfg["prompt_tokens"], vocab, seed + 7))
    P = ids.shape[1]
    mask = torch.ones_like(ids)
    hf_sde.enable_sde_control(model)
    layer = heads.config.layer
    positions = torch.arange(P - 1, P - 1 + n)
    base = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n)

    def plain(tokens=n):
        with torch.inference_mode():
            return model.generate(**{**base, "max_new_tokens": tokens, "min_new_tokens": tokens})

    def hook(tokens=n):
        with torch.inference_mode():
            out = model.generate(**{**base, "max_new_tokens": tokens, "min_new_tokens": tokens},
                                 return_dict_in_generate=True, sde_control=hf_sde.SDEControl(heads, mode="observe"))
        return out.sde_trace

    def naive_generate(tokens=n):
        with torch.inference_mode():
            out = model.generate(**{**base, "max_new_tokens": tokens, "min_new_tokens": tokens},
                                 return_dict_in_generate=True, output_hidden_states=True)
            hs = out.hidden_states
            states = torch.cat([hs[0][layer + 1][:, -1:]] + [hs[k][layer + 1] for k in range(1, len(hs))], dim=1)
            return posthoc_trace(heads, states, positions[:tokens]), out

    def naive_reforward(tokens=n):
        with torch.inference_mode():
            seqs = model.generate(**{**base, "max_new_tokens": tokens, "min_new_tokens": tokens})
            fwd = model(input_ids=seqs, attention_mask=torch.ones_like(seqs), output_hidden_states=True,
                        use_cache=False)
            states = fwd.hidden_states[layer + 1][:, P - 1: P - 1 + tokens]
            return posthoc_trace(heads, states, positions[:tokens]), fwd

    return {"plain": plain, "hook": hook, "naive_generate": naive_generate, "naive_reforward": naive_reforward}


def probe(spec: dict) -> dict:
    """One memory measurement in this (fresh) process."""
    v = make_variants(*prepare(spec["model"], spec["scale"], spec["seed"]), spec["batch"], spec["cfg"], spec["seed"])
    fn = v[spec["variant"]]
    fn(4)  # warm-up: allocator, kernels, lazy imports
    with C.PeakRSS() as mem:
        result = fn()
    return {"peak_mb": mem.peak_mb, "retained_mb": C.tensor_bytes(result) / 2**20, "method": mem.method,
            "rss_before_mb": mem.rss_before}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    C.setup_env(args.threads)
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return None
    scale = C.scale_of(args)
    cfg = SETTINGS[scale]
    run = C.Run("bench_trace", args, cfg)
    results: dict = {"time": {}, "memory": {}}
    rows_t, rows_m = [], []
    loaded: dict = {}
    for name, batch in cfg["cells"]:
        if name not in loaded:
            loaded.clear()
            loaded[name] = prepare(name, scale, args.seed)
        model, heads = loaded[name]
        fns = make_variants(model, heads, batch, cfg, args.seed)
        # Equivalence: the naive post-hoc z-scores equal the hook's.
        # (16 tokens at most: also the warm-up of every variant.)
        k = min(16, cfg["new_tokens"])
        fns["plain"](k)
        trace = fns["hook"](k)
        naive, _ = fns["naive_generate"](k)
        naive2, _ = fns["naive_reforward"](k)
        diff = max(float((trace.zscore - naive["zscore"]).abs().max()),
                   float((trace.zscore - naive2["zscore"]).abs().max()))
        reps = cfg.get("reps_gpt2", cfg["reps"]) if name == "gpt2-124M" else cfg["reps"]
        times, rounds = C.interleaved(dict(fns), min_reps=reps[0],
                                      max_reps=reps[1], budget_s=reps[2], seed=args.seed, warmup=False)
        ratios = C.paired_ratios(times, "hook")
        results["time"][f"{name}/b{batch}"] = {"rounds": rounds, "times": times, "ratios_vs_hook": ratios,
                                               "max_abs_zscore_diff_naive_vs_hook": diff}
        for k in VARIANTS:
            q = ratios[k]
            rows_t.append([name, str(batch), k, f"{q['seconds']['median']:.3f}", q["median"],
                           f"{q['q25']:.3f}–{q['q75']:.3f}", str(rounds), f"{diff:.1e}"])
        del fns
    loaded.clear()
    script = Path(__file__).resolve()
    for name, batch in cfg["memory_cells"]:
        per = {}
        for rep in range(cfg["memory_reps"]):
            for k in VARIANTS:
                spec = {"model": name, "batch": batch, "variant": k, "cfg": cfg, "scale": scale, "seed": args.seed}
                r = C.run_probe(script, spec, args.threads)
                per.setdefault(k, []).append(r)
                print(f"memory {name} b{batch} {k} rep{rep}: {r}", file=sys.stderr)
        summary = {k: {"peak_mb": C.summarize([r["peak_mb"] for r in v]),
                       "retained_mb": v[0]["retained_mb"], "method": v[0]["method"]} for k, v in per.items()}
        hook_peak = summary["hook"]["peak_mb"]["median"]
        for k in VARIANTS:
            s = summary[k]
            s["peak_ratio_vs_hook"] = s["peak_mb"]["median"] / hook_peak if hook_peak > 0 else None
            rows_m.append([name, str(batch), k, s["peak_mb"]["median"], s["peak_ratio_vs_hook"],
                           s["retained_mb"], str(s["peak_mb"]["n"])])
        results["memory"][f"{name}/b{batch}"] = {"probes": per, "summary": summary}
    body = (f"{cfg['new_tokens']} new tokens, greedy. Heads at a middle layer (stories260K: 2, GPT-2: 10). "
            "Time ratio = t(variant)/t(hook) per interleaved round. `max z diff` checks that the naive post-hoc "
            "z-scores equal the hook's.\n\n"
            + C.md_table(["model", "batch", "variant", "median s", "ratio vs hook", "IQR", "rounds", "max z diff"],
                         rows_t)
            + "\n\nPeak memory: increase of resident memory (VmHWM after a reset, minus VmRSS before) during "
            "the measured call in a fresh process, while its result is held; `retained` = tensor bytes the "
            "caller holds afterwards.\n\n"
            + (C.md_table(["model", "batch", "variant", "peak MiB", "ratio vs hook", "retained MiB", "probes"],
                          rows_m) if rows_m else "(memory probes skipped at this scale)"))
    run.finish(results, body)
    print(body)
    return results


if __name__ == "__main__":
    main()
