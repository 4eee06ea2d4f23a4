"""Generation overhead of ``sde_control`` (observe / temperature / steer) against plain ``generate``.

Every round times plain generation and each SDE mode once, in a shuffled order (interleaved A/B), all
with the same fixed-seed sampling and ``min_new_tokens == max_new_tokens`` so every call produces the
same number of tokens. The figure is the per-round ratio ``t_mode / t_plain`` (median and quartiles over
rounds). A separate instrumented call per mode measures the time spent inside the hooks and the logits
processor (``_Runtime.on_forward_pre`` / ``on_read`` / ``on_steer`` / ``on_logits`` and the trace
assembly), a low-noise cross-check that also says where the overhead goes.

    python benchmarks/bench_overhead.py            # stories260K + GPT-2-124M-sized random model
    python benchmarks/bench_overhead.py --full     # more rounds
"""

from __future__ import annotations

import argparse
import functools
import time

import _common as C

SETTINGS = {
    "smoke": {"models": ["stories260K", "gpt2-tiny"], "batches": [2], "new_tokens": 4, "prompt_tokens": 4,
              "reps": {"stories260K": (1, 1, 0), "gpt2-tiny": (1, 1, 0)}, "warmup": False},
    # (min_reps, max_reps, budget seconds per (model, batch) cell). GPT-2-124M at batch 8 x 128 tokens takes
    # ~10-100 s per call on 2 shared cores, so it gets few rounds by default.
    "default": {"models": ["stories260K", "gpt2-124M"], "batches": [1, 8], "new_tokens": 128, "prompt_tokens": 16,
                "reps": {"stories260K": (5, 15, 45), "gpt2-124M": (2, 4, 60)}},
    "full": {"models": ["stories260K", "gpt2-124M"], "batches": [1, 8], "new_tokens": 128, "prompt_tokens": 16,
             "reps": {"stories260K": (10, 30, 240), "gpt2-124M": (5, 10, 900)}},
}
MODES = {"observe": {"mode": "observe"}, "temperature": {"mode": "temperature", "beta": 1.0},
         "steer": {"mode": "steer", "alpha": 0.05}}
TARGETS = {"observe": 1.03, "temperature": 1.03, "steer": 1.06}


def prepare(name: str, scale: str, seed: int):
    """(model, heads, prompt ids) for one model."""
    if name == "stories260K":
        model, tok = C.load_stories()
        heads, _ = C.stories_heads(model, tok, "helpsteer", -1, "smoke" if scale == "smoke" else "default")
        vocab = model.config.vocab_size
    else:
        size = name.split("-", 1)[1]
        model = C.build_gpt2(size, seed)
        heads, _ = C.gpt2_heads(model, size, -1, n_seq=6 if size == "tiny" else 16,
                                length=48 if size == "tiny" else 144, epochs=1 if size == "tiny" else 3)
        vocab = model.config.vocab_size
    return model, heads, vocab


class HookTimer:
    """Accumulates wall time spent inside the SDE runtime's callbacks (monkeypatched for one call)."""

    METHODS = ("on_forward_pre", "on_read", "on_steer", "on_logits", "trace")

    def __init__(self):
        from hf_sde.control import _Runtime

        self.cls = _Runtime
        self.seconds = dict.fromkeys(self.METHODS, 0.0)
        self.calls = dict.fromkeys(self.METHODS, 0)
        self.saved = {}

    def __enter__(self):
        for m in self.METHODS:
            orig = getattr(self.cls, m)
            self.saved[m] = orig

            def wrapped(*a, _orig=orig, _m=m, **k):
                t0 = time.perf_counter()
                try:
                    return _orig(*a, **k)
                finally:
                    self.seconds[_m] += time.perf_counter() - t0
                    self.calls[_m] += 1

            setattr(self.cls, m, wrapped)
        return self

    def __exit__(self, *exc):
        for m, orig in self.saved.items():
            setattr(self.cls, m, orig)


def bench_cell(model, heads, vocab, batch, cfg, reps, seed):
    import torch

    import hf_sde

    n = cfg["new_tokens"]
    ids = torch.tensor(C.random_ids(batch, cfg["prompt_tokens"], vocab, seed + 7, low=3))
    if vocab == 512:  # stories260K: a real prompt reads better than random ids and costs the same
        ids[:, 0] = 1
    mask = torch.ones_like(ids)
    hf_sde.enable_sde_control(model)
    common = dict(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=n,
                  min_new_tokens=n, return_dict_in_generate=True)

    def call(ctl_kwargs, tokens=n):
        torch.manual_seed(seed)
        kw = {**common, "max_new_tokens": tokens, "min_new_tokens": tokens}
        if ctl_kwargs is not None:
            kw["sde_control"] = hf_sde.SDEControl(heads, **ctl_kwargs)
        with torch.inference_mode():
            out = model.generate(**kw)
        assert out.sequences.shape[1] == ids.shape[1] + tokens, out.sequences.shape
        return out

    fns = {"plain": functools.partial(call, None)}
    for m, kw in MODES.items():
        fns[m] = functools.partial(call, kw)
    if cfg.get("warmup", True):  # a short call of each variant: kernels, allocator, lazy imports
        for f in fns.values():
            f(tokens=4)
    times, rounds = C.interleaved(fns, min_reps=reps[0], max_reps=reps[1], budget_s=reps[2], seed=seed,
                                  warmup=False)
    ratios = C.paired_ratios(times, "plain")
    # Instrumented calls (shorter: the per-step cost does not depend on the length): time inside the hooks.
    hook = {}
    n_hook = min(n, 32)
    for m, kw in MODES.items():
        t0 = time.perf_counter()
        call(None, n_hook)
        plain_s = time.perf_counter() - t0
        with HookTimer() as ht:
            t0 = time.perf_counter()
            call(kw, n_hook)
            total = time.perf_counter() - t0
        inside = sum(ht.seconds.values())
        hook[m] = {"tokens": n_hook, "call_seconds": total, "plain_call_seconds": plain_s, "hook_seconds": inside,
                   "hook_share": inside / total, "hook_vs_plain": inside / plain_s,
                   "per_step_us": inside / n_hook * 1e6, "breakdown_seconds": ht.seconds, "calls": ht.calls}
    tokens = batch * n
    return {"rounds": rounds, "times": times, "ratios": ratios, "hook_time": hook,
            "plain_tokens_per_s": tokens / C.summarize(times["plain"])["median"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    args = p.parse_args(argv)
    C.setup_env(args.threads)
    scale = C.scale_of(args)
    cfg = SETTINGS[scale]
    run = C.Run("bench_overhead", args, {**cfg, "modes": MODES, "targets": TARGETS})
    results = {}
    rows = []
    for name in cfg["models"]:
        model, heads, vocab = prepare(name, scale, args.seed)
        for batch in cfg["batches"]:
            r = bench_cell(model, heads, vocab, batch, cfg, cfg["reps"][name], args.seed)
            results[f"{name}/b{batch}"] = r
            for m in MODES:
                q = r["ratios"][m]
                target = TARGETS[m] if name == "gpt2-124M" else None
                ok = "-" if target is None else ("yes" if q["median"] <= target else "no")
                rows.append([name, str(batch), m, q["median"], f"{q['q25']:.3f}–{q['q75']:.3f}",
                             q["ratio_of_mins"], r["hook_time"][m]["hook_share"] * 100,
                             r["hook_time"][m]["per_step_us"], f"{r['ratios']['plain']['seconds']['median']:.2f}",
                             str(r["rounds"]), ok if target is None else f"{ok} (<= {target:.2f})"])
        del model
    body = (
        f"{cfg['new_tokens']} new tokens, fixed-seed sampling (top_k=0), min_new_tokens = max_new_tokens; "
        "ratio = t(mode)/t(plain) per interleaved round. `hook %` = time inside the SDE callbacks in one "
        "instrumented call of min(32, new tokens) tokens, as a share of that call; `hook us/step` the same per "
        "decoding step (whole batch).\n\n"
        + C.md_table(["model", "batch", "mode", "median ratio", "IQR", "ratio of mins", "hook %", "hook us/step",
                      "plain s (median)", "rounds", "target met"], rows))
    run.finish(results, body)
    print(body)
    return results


if __name__ == "__main__":
    main()
