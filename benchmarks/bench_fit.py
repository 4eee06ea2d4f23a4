"""Fitting throughput (training transitions per second per epoch) and peak memory of ``fit_heads``
against the projection dimension and the corpus size.

Corpus: stories260K trajectories of HelpSteer responses (layer -1, max_length 256), cached. Each
configuration runs in a fresh interpreter: first ``fit_heads(epochs=E)`` under a reset resident-memory
high-water mark (peak memory = increase of resident memory during that fit; measured first, so no earlier
fit's freed memory hides it), then ``fit_heads(epochs=0)`` (PCA, baselines, calibration: the fixed cost)
and ``fit_heads(epochs=E)`` again for the time. Per-epoch seconds = (t_E - t_0) / E; throughput = training
transitions / per-epoch seconds. Ratios are against the reference
configuration (proj_dim 16, smallest corpus) measured in the same run; the growth exponents are
least-squares slopes of log(cost) on log(size).

Speed table (the headline figure, d = 32, the largest corpus): 1 thread and all the machine's threads, the
default batch and ``--large-batch``, eager and ``compile=True``, each in its own process, shuffled and
interleaved with the scaling configurations; ratios against default batch / 1 thread / eager. The compiled
probe's first fit pays the compilation (``compile s`` = first fit - timed fit, which reuses the graph; a
cold compilation: each compiled probe gets an empty inductor cache directory). The probes run in the caller's
environment (OpenMP's default wait policy unless ``OMP_WAIT_POLICY`` is set: what ``hf-sde fit`` gets); the
all-threads large-batch rows are measured again with ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep:
robust beside a busy process, but every parallel region pays a wake-up), and with
``matmul_precision="medium"`` (``--matmul-precision medium``: float32 products with bfloat16 inputs where
the CPU has them, e.g. AMX), alone and with ``bf16=True`` (``--bf16``: mixed precision, bfloat16 activations),
whose held-out NLLs the table shows beside the float32 rows'. The speed
configurations run ``speed_reps`` rounds, the scaling ones ``reps``.

    python benchmarks/bench_fit.py [--smoke | --full] [--large-batch 4096]
"""

from __future__ import annotations

import argparse
import atexit
import inspect
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common as C

SETTINGS = {
    # Smoke: enough text for proj_dim 16 (fits refuse < 10 (d + 1) training or held-out transitions).
    # Speed table: threads (0 = all the machine's) x batch (None = fit_heads' default) x compile.
    "smoke": {"max_length": 64, "limit": 48, "sizes": [24, 48], "dims": [8, 16], "epochs": 1, "reps": 1,
              "subprocess": False, "speed": {"threads": [1], "compile": [False]}},
    "default": {"max_length": 256, "limit": None, "sizes": [100, 200, 400], "dims": [8, 16, 32, 64], "epochs": 3,
                "reps": 2, "speed_reps": 5, "subprocess": True, "speed": {"threads": [1, 0], "compile": [False, True]}},
    "full": {"max_length": 256, "limit": None, "sizes": [50, 100, 200, 500], "dims": [8, 16, 32, 64], "epochs": 5,
             "reps": 3, "speed_reps": 5, "subprocess": True, "speed": {"threads": [1, 0], "compile": [False, True]}},
}
REF_DIM = 16
HEADLINE_DIM = 32  # the headline figure: transitions/s/epoch at d = 32, 2x128 MLPs


def trajectories(scale: str):
    import hf_sde

    cfg = SETTINGS[scale]
    path = C.CACHE / f"traj-stories-helpsteer-{C.cache_key(m=cfg['max_length'], l=cfg['limit'])}.safetensors"
    if path.is_file():
        return hf_sde.Trajectories.load(str(path))
    model, tok = C.load_stories()
    ids, groups = C.helpsteer_ids(tok, cfg["max_length"], cfg["limit"])
    traj = hf_sde.extract_from_ids(model, ids, -1, batch_size=16, progress=False)
    traj.meta["groups"] = [groups[i] for i in traj.meta["kept_indices"]]
    C.CACHE.mkdir(parents=True, exist_ok=True)
    traj.save(str(path))
    return traj


def train_flops_per_transition(d: int, width: int = 128, depth: int = 2, time_frequencies: int = 4) -> int:
    """Multiply-add FLOPs of one training transition: forward of the drift and diffusion MLPs (inputs d + time
    features) and the linear drift, backward twice that (input and weight gradients) less the input
    gradients of the first layers and of the linear drift, which nothing needs."""
    inp = d + 2 * time_frequencies + 1
    dims = [inp] + [width] * depth + [d]
    mlp = sum(2 * a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
    fwd = 2 * mlp + 2 * d * d
    return 3 * fwd - 2 * 2 * inp * width - 2 * d * d


def matmul_gflops(rows: int, width: int = 128, seconds: float = 0.3, precision: str | None = None) -> float:
    """Achieved GFLOP/s of the fit's dominant product, (rows x width) @ (width x width), at the current threads
    (and the fit's float32 matmul precision)."""
    import torch

    from hf_sde.fitting.fit import float32_matmul_precision

    a, b = torch.randn(rows, width), torch.randn(width, width)
    with float32_matmul_precision(precision):
        for _ in range(3):
            a @ b
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            n += 1
        return 2 * rows * width * width * n / (time.perf_counter() - t0) / 1e9


def measure(scale: str, n: int, dim: int, epochs: int, batch_size: int | None = None, compile: bool = False,
            precision: str | None = None) -> dict:
    import torch

    import hf_sde

    traj = trajectories(scale)
    sub = traj.subset(list(range(min(n, len(traj)))))
    # precision: None (float32), a matmul_precision level, or "<level>+bf16" (that level and bf16=True).
    precision, _, autocast = (precision or "").partition("+")
    precision, bf16 = precision or None, autocast == "bf16"
    kw = dict(proj_dim=dim, progress=False, seed=0, patience=epochs + 1, compile=compile, matmul_precision=precision,
              bf16=bf16)
    if batch_size:
        kw["batch_size"] = batch_size
    # Memory first, in the fresh process: once a fit has freed its tensors, malloc hands the same memory to
    # the next fit without the resident size growing, which would hide that fit's peak. With compile, this
    # first fit also compiles the loss (the later fits reuse the graph).
    t0 = time.perf_counter()
    with C.PeakRSS() as mem:
        hf_sde.fit_heads(sub, epochs=epochs, **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf_sde.fit_heads(sub, epochs=0, **kw)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = hf_sde.fit_heads(sub, epochs=epochs, **kw)
    total = time.perf_counter() - t0
    ran = len(res.history["train_total"])
    per_epoch = max(total - setup, 1e-9) / max(ran, 1)
    n_train = res.heads.config.data["train_transitions"]
    return {"n_sequences": len(sub), "proj_dim": dim, "epochs": ran, "train_transitions": n_train,
            "setup_s": setup, "total_s": total, "per_epoch_s": per_epoch,
            "transitions_per_s": n_train / per_epoch,
            "peak_mb": mem.peak_mb, "memory_method": mem.method, "first_fit_s": first,
            "compile_s": max(first - total, 0.0) if compile else 0.0, "compile": compile,
            "matmul_precision": precision or "highest", "bf16": bf16, "heldout_nll": res.heldout_nll["neural"],
            "matmul_gflops": matmul_gflops(min(batch_size or 512, 8192), precision=precision),
            "flops_per_transition": train_flops_per_transition(dim),
            "threads": torch.get_num_threads(),
            "batch_size": batch_size or inspect.signature(hf_sde.fit_heads).parameters["batch_size"].default}


def slope(xs, ys) -> float:
    lx = [math.log(x) for x in xs]
    ly = [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / den if den else float("nan")


def machine_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def key_of(n: int, d: int, threads: int, batch: int | None, compile: bool, plain: tuple, policy: str | None = None,
           precision: str | None = None) -> str:
    """Scaling configurations (``plain``: the run's threads and batch, eager) keep their short keys; ``policy``: an
    ``OMP_WAIT_POLICY`` set for this probe only (None: the caller's environment); ``precision``: the fit's
    ``matmul_precision`` (None: float32), ``+bf16`` when the probe also trains with ``bf16=True``."""
    if (threads, batch, compile, policy, precision) == (*plain, None, None):
        return f"n{n}/d{d}"
    return (f"n{n}/d{d}/t{threads}/b{batch or 'default'}/{'compiled' if compile else 'eager'}"
            + (f"/omp-{policy.lower()}" if policy else "") + (f"/mm-{precision}" if precision else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    p.add_argument("--batch-size", type=int, default=None, help="fit batch size (default: fit_heads' default)")
    p.add_argument("--large-batch", type=int, default=4096, help="the speed table's large batch (default 4096)")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    C.setup_env(args.threads)
    if args.probe:
        spec = json.loads(args.probe)
        if spec.get("compile"):  # a cold compilation: inductor's on-disk caches would hide its cost
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache = tempfile.mkdtemp(prefix="bench_fit_inductor_")
            atexit.register(shutil.rmtree, cache, True)
        print(json.dumps(measure(spec["scale"], spec["n"], spec["dim"], spec["epochs"], spec.get("batch_size"),
                                 spec.get("compile", False), spec.get("precision"))))
        return None
    import torch

    # The probes run in the caller's environment: OpenMP's default wait policy (threads spin a while before
    # sleeping) unless OMP_WAIT_POLICY is set, which is what `hf-sde fit` gets. On a quiet 2-core box that ran
    # 2-thread fits at ~350k transitions/s against ~230k with PASSIVE (batch 4096, d = 32); beside a busy
    # process spinning was > 10x slower. So the all-threads large-batch rows are measured with PASSIVE too.
    scale = C.scale_of(args)
    cfg = SETTINGS[scale]
    run = C.Run("bench_fit", args, cfg)
    traj = trajectories(scale)  # build the cache once, outside the probes
    sizes = [min(s, len(traj)) for s in cfg["sizes"]]
    n_max = sizes[-1]
    plain = (args.threads, args.batch_size, False)
    configs = {(n, REF_DIM, *plain) for n in sizes} | {(n_max, d, *plain) for d in cfg["dims"]}
    threads_list = list(dict.fromkeys(t or machine_threads() for t in cfg["speed"]["threads"]))
    batches = list(dict.fromkeys([args.batch_size, args.large_batch]))
    speed = [(n_max, HEADLINE_DIM, t, b, c, None, None) for t in threads_list for b in batches
             for c in cfg["speed"]["compile"]]
    if cfg["subprocess"] and threads_list[-1] > 1:  # the policy only matters with several threads
        speed += [(n_max, HEADLINE_DIM, threads_list[-1], args.large_batch, c, "PASSIVE", None)
                  for c in cfg["speed"]["compile"]]
    # bfloat16 products (matmul_precision="medium"), and those with bfloat16 activations (bf16=True: mixed
    # precision), at the all-threads large batch: the fastest float32 setting.
    speed += [(n_max, HEADLINE_DIM, threads_list[-1], args.large_batch, c, None, prec) for prec in ("medium", "medium+bf16")
              for c in cfg["speed"]["compile"]]
    configs = {(*c, None, None) for c in configs}
    configs = sorted(configs | set(speed), key=lambda c: (c[0], c[1], c[2], c[3] or 0, c[4], c[5] or "", c[6] or ""))
    speed_set = set(speed)
    rng = random.Random(args.seed)
    raw: dict = {}
    script = Path(__file__).resolve()
    for rep in range(max(cfg["reps"], cfg.get("speed_reps", 0))):
        order = [c for c in configs if rep < cfg["reps"] or c in speed_set]
        rng.shuffle(order)
        for n, d, t, b, c, pol, prec in order:
            spec = {"scale": scale, "n": n, "dim": d, "epochs": cfg["epochs"], "batch_size": b, "compile": c,
                    "precision": prec}
            if cfg["subprocess"]:
                r = C.run_probe(script, spec, t, env={"OMP_WAIT_POLICY": pol} if pol else None)
            else:
                torch.set_num_threads(t)
                r = measure(scale, n, d, cfg["epochs"], b, c, prec)
            r["omp_wait_policy"] = pol or os.environ.get("OMP_WAIT_POLICY") or "default"
            key = key_of(n, d, t, b, c, plain, pol, prec)
            raw.setdefault(key, []).append(r)
            print(f"fit {key} rep{rep}: {r['per_epoch_s']:.2f} s/epoch, {r['transitions_per_s']:,.0f} tr/s, "
                  f"{r['peak_mb']:.1f} MiB", file=sys.stderr)
    torch.set_num_threads(args.threads)
    table = {}
    for key, rs in raw.items():
        table[key] = {k: C.summarize([r[k] for r in rs]) for k in ("per_epoch_s", "transitions_per_s", "peak_mb",
                                                                    "setup_s", "compile_s", "matmul_gflops",
                                                                    "heldout_nll")}
        table[key].update({k: rs[0][k] for k in ("n_sequences", "proj_dim", "train_transitions", "epochs",
                                                 "threads", "batch_size", "compile", "flops_per_transition",
                                                 "omp_wait_policy", "matmul_precision", "bf16")})
    ref = table[f"n{sizes[0]}/d{REF_DIM}"]
    rows = []
    for n, d, *_ in [c for c in configs if tuple(c[2:]) == (*plain, None, None)]:
        t = table[f"n{n}/d{d}"]
        t["per_epoch_ratio_vs_ref"] = t["per_epoch_s"]["median"] / ref["per_epoch_s"]["median"]
        t["peak_ratio_vs_ref"] = (t["peak_mb"]["median"] / ref["peak_mb"]["median"]
                                  if ref["peak_mb"]["median"] > 0 else None)
        rows.append([str(t["n_sequences"]), str(d), str(t["train_transitions"]), t["per_epoch_s"]["median"],
                     f"{t['transitions_per_s']['median']:.0f}", t["per_epoch_ratio_vs_ref"], t["setup_s"]["median"],
                     t["peak_mb"]["median"], t["peak_ratio_vs_ref"], str(t["per_epoch_s"]["n"])])
    by_n = [table[f"n{n}/d{REF_DIM}"] for n in sizes]
    by_d = [table[f"n{n_max}/d{d}"] for d in cfg["dims"]]
    growth = {
        "per_epoch_time_vs_transitions": slope([t["train_transitions"] for t in by_n],
                                               [t["per_epoch_s"]["median"] for t in by_n]),
        "peak_memory_vs_transitions": slope([t["train_transitions"] for t in by_n],
                                            [max(t["peak_mb"]["median"], 1e-3) for t in by_n]),
        "per_epoch_time_vs_proj_dim": slope(cfg["dims"], [t["per_epoch_s"]["median"] for t in by_d]),
        "peak_memory_vs_proj_dim": slope(cfg["dims"], [max(t["peak_mb"]["median"], 1e-3) for t in by_d]),
    }
    batch = table[f"n{n_max}/d{REF_DIM}"]["batch_size"]
    # The speed table: ratios against 1 thread, the default batch, eager (the reference configuration).
    speed_ref_key = key_of(n_max, HEADLINE_DIM, threads_list[0], args.batch_size, False, plain)
    speed_ref = table[speed_ref_key]["transitions_per_s"]["median"]
    speed_rows, speed_table = [], {}
    for n, d, t, b, c, pol, prec in speed:
        k = key_of(n, d, t, b, c, plain, pol, prec)
        e = table[k]
        e["speedup_vs_speed_ref"] = e["transitions_per_s"]["median"] / speed_ref
        # The matmul ceiling: every FLOP at the GFLOP/s the dominant product reaches at this batch and threads.
        e["matmul_ceiling_transitions_per_s"] = e["matmul_gflops"]["median"] * 1e9 / e["flops_per_transition"]
        e["fraction_of_ceiling"] = e["transitions_per_s"]["median"] / e["matmul_ceiling_transitions_per_s"]
        speed_table[k] = e
        speed_rows.append([str(e["threads"]), str(e["batch_size"]), "compiled" if c else "eager", e["omp_wait_policy"],
                           e["matmul_precision"], "yes" if e["bf16"] else "no", e["per_epoch_s"]["median"], f"{e['transitions_per_s']['median']:,.0f}",
                           f"{e['heldout_nll']['median']:.4f}",
                           e["speedup_vs_speed_ref"], e["compile_s"]["median"] if c else "-",
                           f"{e['matmul_gflops']['median']:.0f}", f"{e['matmul_ceiling_transitions_per_s']:,.0f}",
                           e["fraction_of_ceiling"], str(e["per_epoch_s"]["n"])])
    best_key = max(speed_table, key=lambda k: speed_table[k]["transitions_per_s"]["median"])
    best = speed_table[best_key]
    head_key = f"n{n_max}/d{HEADLINE_DIM}"
    headline = table[head_key]["transitions_per_s"]["median"] if head_key in table else None
    results = {"configs": table, "raw": raw, "growth_exponents": growth, "reference": f"n{sizes[0]}/d{REF_DIM}",
               "batch_size": batch, "speed_reference": speed_ref_key, "machine_threads": machine_threads(),
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "default",
               "headline": {"config": head_key, "transitions_per_s_per_epoch": headline,
                            "best_config": best_key, "best_transitions_per_s_per_epoch":
                                best["transitions_per_s"]["median"]}}
    n_head = table[speed_ref_key]["train_transitions"]
    lead = (f"**d = {HEADLINE_DIM}, {n_head} training transitions: {speed_ref:,.0f} transitions/s/epoch** "
            f"(batch {batch}, 1 thread, eager); fastest: **{best['transitions_per_s']['median']:,.0f}** "
            f"({best['threads']} thread(s), batch {best['batch_size']}, "
            f"{'compiled' if best['compile'] else 'eager'}, OpenMP wait policy {best['omp_wait_policy']}, matmul "
            f"precision {best['matmul_precision']}{', bf16 autocast' if best['bf16'] else ''}: "
            f"{best['speedup_vs_speed_ref']:.2f}x).\n\n")
    body = (lead + f"stories260K, HelpSteer responses (max_length {cfg['max_length']}), layer -1, 2x128 MLPs, "
            f"{cfg['epochs']} epochs per measurement, one fresh process per configuration, all configurations "
            f"shuffled and interleaved, {cfg['reps']} round(s) ({cfg.get('speed_reps', cfg['reps'])} for the speed "
            f"table), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY') or 'unset (OpenMP default)'} "
            "unless the row says PASSIVE.\n\n"
            f"Speed at d = {HEADLINE_DIM}, {n_max} sequences (ratio: transitions/s against 1 thread, batch {batch}, "
            "eager; matmul precision: fit_heads' matmul_precision, highest = float32 products, medium = bfloat16 "
            "inputs; bf16: fit_heads(bf16=True), each training batch's forward under bfloat16 autocast (float32 "
            "weights, optimizer and loss); held-out NLL: the fitted heads' (nats/dim, computed in float32), so "
            "the cost of medium and bf16 shows; "
            "compile s: the one-off cold compilation, paid by the first fit of a process; ceiling: "
            f"{train_flops_per_transition(HEADLINE_DIM):,} training FLOPs per transition at the GFLOP/s that "
            "a (batch x 128) @ (128 x 128) product reaches in the same process, i.e. every FLOP at matmul speed "
            "and everything else free):\n\n"
            + C.md_table(["threads", "batch", "loss", "OMP wait", "matmul precision", "bf16", "s/epoch", "transitions/s",
                          "held-out NLL", "speedup", "compile s",
                          "matmul GFLOP/s", "ceiling tr/s", "of ceiling", "reps"], speed_rows)
            + f"\n\nScaling ({args.threads} thread(s), batch {batch}, eager; ratios against n={sizes[0]}, "
            f"d={REF_DIM}):\n\n"
            + C.md_table(["sequences", "proj_dim", "train transitions", "s/epoch", "transitions/s", "epoch ratio",
                          "setup s", "peak MiB", "peak ratio", "reps"], rows)
            + "\n\nGrowth exponents (slope of log cost on log size): "
            + ", ".join(f"{k} = {v:.2f}" for k, v in growth.items()) + ".")
    run.finish(results, body)
    print(body)
    return results


if __name__ == "__main__":
    main()
