"""The fixed cost of ``sde_control`` per ``generate`` call, measured where it is spent.

A call with SDE control does some work once per call, whatever its length: check the heads against the model,
read the generation options and the prompt's layout (``_call_setup``), build the runtime (fused heads, law
constants), install and remove the hooks, build the trace and hand the step buffers on. Each of these functions
is timed in place (a ``perf_counter`` pair around it, ~0.2 us each) in repeated calls with the same heads and
model, interleaved with plain ``generate`` calls, so the caches are as cold as a user's. The sum is the fixed
cost per call; the per-step callbacks are not in it (``bench_overhead.py`` times those). The same functions
called back to back without a forward in between give the "hot" figure.

Beside it, the whole call's extra time over plain ``generate`` at the same length (median of per-round
differences), which holds the fixed cost and the steps' callbacks.

    python benchmarks/bench_call.py --smoke    # seconds
    python benchmarks/bench_call.py            # stories260K batch 1, 4 new tokens, 400 rounds
"""

from __future__ import annotations

import argparse
import time

import _common as C

SETTINGS = {
    "smoke": {"cells": [("stories260K", 1)], "new_tokens": 2, "prompt_tokens": 4, "rounds": 3, "hot_calls": 5},
    "default": {"cells": [("stories260K", 1), ("smollm2-sized", 8)], "new_tokens": 4, "prompt_tokens": 16,
                "rounds": 400, "hot_calls": 500},
    "full": {"cells": [("stories260K", 1), ("smollm2-sized", 8)], "new_tokens": 4, "prompt_tokens": 16,
             "rounds": 1500, "hot_calls": 2000},
}
MODES = {"observe": {"mode": "observe"}, "temperature": {"mode": "temperature", "beta": 1.0},
         "steer": {"mode": "steer", "alpha": 0.05}}
TARGET_MS = 0.2  # fixed cost per repeated call with the same heads and model


def _parts():
    """(label, owner, attribute) of every function that runs once per SDE call."""
    import hf_sde
    from hf_sde.control import generate, step

    return [("check", hf_sde.SDEHeads, "check_compatible"), ("setup", generate, "_call_setup"),
            ("runtime", step._Runtime, "__init__"), ("install", step._Runtime, "install"),
            ("remove", step._Runtime, "remove"), ("trace", step._Runtime, "trace"),
            ("release", step._Runtime, "release")]


class PartTimer:
    """Accumulates the time spent in each per-call function while active (monkeypatched, always undone)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.saved: list[tuple] = []

    def __enter__(self):
        for label, owner, name in _parts():
            orig = getattr(owner, name)
            self.saved.append((owner, name, orig))
            self.seconds[label] = 0.0

            def timed(*a, _orig=orig, _label=label, **k):
                t0 = time.perf_counter()
                try:
                    return _orig(*a, **k)
                finally:
                    self.seconds[_label] += time.perf_counter() - t0

            setattr(owner, name, timed)
        return self

    def __exit__(self, *exc):
        for owner, name, orig in reversed(self.saved):
            setattr(owner, name, orig)
        self.saved.clear()

    def take(self) -> dict[str, float]:
        out = dict(self.seconds)
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        return out


def hot_parts(model, heads, ids, ctl_kwargs: dict, n: int) -> dict[str, float]:
    """us per call of the per-call functions called back to back (no forward between them)."""
    import torch

    import hf_sde
    from hf_sde.control.generate import sde_hooks
    from hf_sde.control.setup import _call_setup

    ctl = hf_sde.SDEControl(heads, **ctl_kwargs)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=4)
    with sde_hooks(model, ctl, _call_setup(model, (), dict(kwargs), ctl)) as runtime:
        sequences = model.generate(**kwargs)  # a runtime with buffers, to time the trace on
    t0 = time.perf_counter()
    for _ in range(n):
        heads.check_compatible(model)
        setup = _call_setup(model, (), dict(kwargs), ctl)
        with sde_hooks(model, ctl, setup):
            pass
    setup_us = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for _ in range(n):
        runtime.trace(sequences)
    return {"check + setup + runtime + install + remove": setup_us, "trace": (time.perf_counter() - t0) / n * 1e6}


def measure_cell(model, heads, vocab: int, batch: int, cfg: dict, seed: int) -> dict:
    """Per mode: the per-call functions' time in place over interleaved rounds, hot, and the call's extra time."""
    import torch

    import hf_sde

    hf_sde.enable_sde_control(model)
    ids = torch.randint(3, vocab, (batch, cfg["prompt_tokens"]), generator=torch.Generator().manual_seed(0))
    n = cfg["new_tokens"]
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                  return_dict_in_generate=True, max_new_tokens=n, min_new_tokens=n,
                  pad_token_id=model.config.eos_token_id)

    def plain():
        torch.manual_seed(0)
        with torch.inference_mode():
            model.generate(**common)

    cell = {}
    for mode, ctl_kwargs in MODES.items():
        timer = PartTimer()
        parts: dict[str, list[float]] = {label: [] for label, _, _ in _parts()}

        def sde(ctl_kwargs=ctl_kwargs, timer=timer, parts=parts):
            torch.manual_seed(0)
            with torch.inference_mode(), timer:
                out = model.generate(**common, sde_control=hf_sde.SDEControl(heads, **ctl_kwargs))
            for label, s in timer.take().items():
                parts[label].append(s)
            assert out.sde_trace.zscore.shape == (batch, n)

        times, rounds = C.interleaved({"plain": plain, "sde": sde}, min_reps=cfg["rounds"], max_reps=cfg["rounds"],
                                      budget_s=0, seed=seed)
        parts = {label: values[-rounds:] for label, values in parts.items()}  # without the warm-up call
        fixed = [sum(v) for v in zip(*parts.values(), strict=True)]
        extra = [a - b for a, b in zip(times["sde"], times["plain"], strict=True)]
        with torch.inference_mode():
            hot = hot_parts(model, heads, ids, ctl_kwargs, cfg["hot_calls"])
        cell[mode] = {"rounds": rounds, "fixed_ms": C.summarize([x * 1e3 for x in fixed]),
                      "parts_us": {k: C.summarize([x * 1e6 for x in v]) for k, v in parts.items()},
                      "extra_ms": C.summarize([x * 1e3 for x in extra]),
                      "plain_ms": C.summarize([x * 1e3 for x in times["plain"]]), "hot_us": hot}
    return cell


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    args = p.parse_args(argv)
    C.setup_env(args.threads)
    from bench_overhead import prepare

    scale = C.scale_of(args)
    cfg = SETTINGS[scale]
    run = C.Run("bench_call", args, cfg)
    results, rows = {}, []
    labels = [label for label, _, _ in _parts()]
    for name, batch in cfg["cells"]:
        cell = results[f"{name}/b{batch}"] = measure_cell(*prepare(name, scale), batch, cfg, args.seed)
        for mode, r in cell.items():
            med = r["fixed_ms"]["median"]
            rows.append([name, str(batch), mode, med, f"{r['fixed_ms']['q25']:.3f}–{r['fixed_ms']['q75']:.3f}",
                         *(r["parts_us"][k]["median"] for k in labels), sum(r["hot_us"].values()) / 1e3,
                         r["extra_ms"]["median"], r["plain_ms"]["median"], str(r["rounds"]),
                         "yes" if med <= TARGET_MS else "no"])
    body = (
        f"Repeated calls with the same heads and model, {cfg['new_tokens']} new tokens after "
        f"{cfg['prompt_tokens']} prompt tokens, interleaved with plain `generate` calls. `fixed ms`: the time "
        "spent per call in the functions that run once per call (their sum; median and IQR over rounds), and the "
        "median of each in us: `check` (the heads against the model), `setup` (generation options, prompt layout, "
        "step budget), `runtime` (fused heads from their cache, the law's constants), `install` / `remove` (the "
        "hooks), `trace` (the nets no step ran, the statistics masked after EOS, moved to the host), `release` "
        "(the step buffers handed to the next call). `hot ms`: the same functions back to back, without a "
        "forward between calls. `extra ms`: the whole call's time over plain `generate` (median of per-round "
        f"differences; the steps' callbacks included). Target: fixed cost <= {TARGET_MS} ms.\n\n"
        + C.md_table(["model", "batch", "mode", "fixed ms", "IQR", *(f"{k} us" for k in labels), "hot ms",
                      "extra ms", "plain ms", "rounds", "target met"], rows))
    run.finish(results, body)


if __name__ == "__main__":
    main()
