"""Whole fits, as a user runs them: wall time to early stopping and the held-out NLL reached, for the fit
settings that `bench_fit.py` times per epoch.

`bench_fit.py` measures transitions per second per epoch; a user waits for a whole fit, and a large batch
needs more epochs. Here each configuration runs ``fit_heads`` to its early stop (or its epoch budget) on two
corpora, and the table shows the seconds, the epochs and the held-out NLL:

- SmolLM2-135M-Instruct, layer 22, HelpSteer response paths (``template="helpsteer-chat"``, max_length 256):
  the shipped heads' corpus and fit (``proj_dim`` 16);
- stories260K, last layer, HelpSteer responses (max_length 256; ``bench_fit``'s corpus), ``proj_dim`` 16.

Configurations: the defaults; batch 4096 with ``compile=True``, ``matmul_precision="medium"`` and
``bf16=True`` (the fastest epoch in ``bench_fit``) for 150 epochs; the same without compile and with a larger
step (lr 2e-3, 100 epochs); the defaults with medium and bf16. All machine threads (what ``hf-sde fit`` uses),
one process, every configuration run once untimed first (so the compiled one has its graph: the one-off
compilation is reported apart), then the rounds interleaved in shuffled order.

    python benchmarks/bench_fit_time.py [--smoke | --full]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import _common as C

FAST = dict(batch_size=4096, matmul_precision="medium", bf16=True)
CONFIGS = {
    "defaults": {},
    "b4096, compile, medium, bf16, 150 epochs": {**FAST, "compile": True, "epochs": 150},
    "b4096, medium, bf16, lr 2e-3, 100 epochs": {**FAST, "lr": 2e-3, "epochs": 100},
    "b512 (default), medium, bf16": {"matmul_precision": "medium", "bf16": True},
}
SETTINGS = {
    "smoke": {"corpora": ["stories260K"], "limit": 48, "max_length": 64, "rounds": 1,
              "epochs_cap": 2},
    "default": {"corpora": ["SmolLM2", "stories260K"], "limit": None, "max_length": 256, "rounds": 3,
                "epochs_cap": None},
    "full": {"corpora": ["SmolLM2", "stories260K"], "limit": None, "max_length": 256, "rounds": 5,
             "epochs_cap": None},
}


def corpus(name: str, scale: str):
    cfg = SETTINGS[scale]
    if name == "SmolLM2":
        return C.smollm2_response_trajectories([22], cfg["max_length"], cfg["limit"])[22]
    sys.path.insert(0, str(C.BENCH))
    import bench_fit

    traj = bench_fit.trajectories("smoke" if scale == "smoke" else "default")
    return traj.subset(list(range(min(400, len(traj)))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    args = p.parse_args(argv)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    C.setup_env(threads)  # all threads, as `hf-sde fit` runs (the --threads option is not used here)
    import hf_sde

    scale = C.scale_of(args)
    cfg = SETTINGS[scale]
    run = C.Run("bench_fit_time", args, {**cfg, "configs": CONFIGS, "threads": threads})
    rng = random.Random(args.seed)
    results, rows = {}, []
    for name in cfg["corpora"]:
        traj = corpus(name, scale)

        def fit(kw: dict, traj=traj):
            if cfg["epochs_cap"]:
                kw = {**kw, "epochs": cfg["epochs_cap"]}
            t0 = time.perf_counter()
            r = hf_sde.fit_heads(traj, progress=False, seed=args.seed, **kw)
            return time.perf_counter() - t0, r

        first = {label: fit(kw)[0] for label, kw in CONFIGS.items()}  # untimed: compiles the compiled loss
        runs = {label: [] for label in CONFIGS}
        for _ in range(cfg["rounds"]):
            order = list(CONFIGS)
            rng.shuffle(order)
            for label in order:
                seconds, r = fit(CONFIGS[label])
                runs[label].append({"seconds": seconds, "heldout_nll": r.heldout_nll["neural"],
                                    "epochs": len(r.history["train_total"]), "best_epoch": r.best_epoch,
                                    "train_transitions": r.heads.config.data["train_transitions"]})
                print(f"{name} / {label}: {seconds:.2f} s, NLL {r.heldout_nll['neural']:.4f}, "
                      f"{runs[label][-1]['epochs']} epochs", file=sys.stderr)
        base = statistics.median(x["seconds"] for x in runs["defaults"])
        results[name] = {}
        for label, rs in runs.items():
            sec = statistics.median(x["seconds"] for x in rs)
            nll = [x["heldout_nll"] for x in rs]
            results[name][label] = {"runs": rs, "median_seconds": sec, "time_ratio_vs_defaults": sec / base,
                                    "heldout_nll": statistics.median(nll), "first_run_seconds": first[label],
                                    "compile_seconds": max(first[label] - sec, 0.0) if CONFIGS[label].get("compile")
                                    else 0.0}
            e = results[name][label]
            rows.append([name, str(rs[0]["train_transitions"]), label, e["median_seconds"], e["time_ratio_vs_defaults"],
                         f"{e['heldout_nll']:.4f}", f"{min(nll):.4f}–{max(nll):.4f}",
                         "/".join(str(x["epochs"]) for x in rs), e["compile_seconds"] if e["compile_seconds"] else "-",
                         str(len(rs))])
    body = (f"{threads} thread(s), one process, proj_dim 16, seed {args.seed}; each configuration run once untimed "
            f"first, then {cfg['rounds']} interleaved round(s). seconds: median wall time of the whole `fit_heads` "
            "call (PCA, baselines, training to early stopping or the epoch budget, calibration, evaluation); time "
            "ratio: against the defaults on the same corpus; epochs: epochs run in each round; compile s: the "
            "first (untimed) run's extra time, paid once per process.\n\n"
            + C.md_table(["corpus", "train transitions", "configuration", "seconds", "time ratio", "held-out NLL",
                          "NLL range", "epochs", "compile s", "rounds"], rows))
    run.finish(results, body)
    print(body)
    return results


if __name__ == "__main__":
    main()
