"""Scale-out measurements for sharded extraction and the distributed fit (see docs/scale-out.md).

Extraction throughput with N processes (run under a launcher; rank 0 prints one JSON line)::

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        benchmarks/distributed_bench.py extract --data ../shared/data/helpsteer_sample_500.jsonl
    python benchmarks/distributed_bench.py extract ...          # 1 process

Peak memory of a fit against corpus size (synthetic random-walk shards; each fit in a fresh subprocess,
peak RSS as ``VmHWM`` reset after the imports)::

    python benchmarks/distributed_bench.py memory --sizes 250 1000 4000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))


def extract(args) -> None:
    import _offline  # noqa: F401  (offline hub cache when ../shared exists)

    from hf_sde.fitting.process_group import DistEnv

    with DistEnv.init(cpu=True) as env:
        _extract(args, env)


def _extract(args, env) -> None:
    import torch

    import hf_sde
    import hf_sde.data.loading
    from hf_sde.trajectories.shards import clear_shards, extract_to_shards

    model, tok = hf_sde.data.loading.STORIES260K.load()
    out = args.out or tempfile.mkdtemp()
    if env.is_main:
        clear_shards(out)
    env.barrier()
    t0 = time.perf_counter()
    paths = extract_to_shards(model, tok, args.data, out, template=args.template, limit=args.limit,
                              max_length=args.max_length, shard_size=args.shard_size, progress=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(hf_sde.Trajectories.load(p).num_transitions + len(hf_sde.Trajectories.load(p)) for p in paths)
    stats = torch.tensor([tokens, elapsed], dtype=torch.float64)
    per_rank = stats.clone()
    env.all_reduce_(stats[:1])
    env.all_reduce_(per_rank[1:], op="max")
    env.barrier()
    t_all = time.perf_counter() - t0
    if env.is_main:
        print(json.dumps({"processes": env.world_size, "tokens": int(stats[0]), "seconds_slowest_rank": float(per_rank[1]),
                          "seconds_wall": t_all, "tokens_per_s": float(stats[0]) / t_all,
                          "threads_per_process": torch.get_num_threads()}))


def make_corpus(folder: str, sequences: int, length: int, hidden: int, shard_size: int) -> None:
    import torch

    from hf_sde.trajectories.extract import Trajectories

    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    drift = torch.randn(hidden, generator=g) * 0.05
    for s, start in enumerate(range(0, sequences, shard_size)):
        docs = list(range(start, min(start + shard_size, sequences)))
        states = [torch.cumsum(torch.randn(length, hidden, generator=g) + drift, 0) * 0.1 for _ in docs]
        Trajectories(states, 0, hidden, 1, "synthetic", 0, {"doc_indices": docs, "groups": [None] * len(docs)}).save(
            os.path.join(folder, f"traj-rank00000-of-00001-{s:05d}.safetensors"))


def _vm(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def fit_child(args) -> None:
    """Run one fit in this (fresh) process; print its peak RSS counted from after the imports.

    Importing torch has a transient RSS peak above what a small fit needs, so the high-water mark is reset
    after the imports (Linux ``/proc/self/clear_refs``) and read back as ``VmHWM`` after the fit.
    """
    import torch

    from hf_sde.fitting.fit import fit_heads, fit_heads_distributed
    from hf_sde.trajectories.shards import load_shards

    torch.set_num_threads(1)
    base = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    kw = dict(proj_dim=16, epochs=1, batch_size=512, progress=False, seed=0)
    t0 = time.perf_counter()
    if args.how == "fit_heads":
        fit_heads(load_shards(args.folder), **kw)
    else:
        fit_heads_distributed(args.folder, mode=args.how, **kw)
    print(json.dumps({"how": args.how, "peak_rss_mb": round(_vm("VmHWM"), 1), "rss_after_imports_mb": round(base, 1),
                      "peak_minus_imports_mb": round(_vm("VmHWM") - base, 1),
                      "seconds": round(time.perf_counter() - t0, 2)}))


def memory(args) -> None:
    rows = []
    root = tempfile.mkdtemp()
    for n in args.sizes:
        folder = os.path.join(root, f"n{n}")
        make_corpus(folder, n, args.length, args.hidden, args.shard_size)
        corpus_mb = n * args.length * args.hidden * 4 / 2**20
        for how in args.how:
            out = subprocess.run([sys.executable, __file__, "fit-child", folder, how], capture_output=True, text=True,
                                 check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res.update(sequences=n, transitions=n * (args.length - 1), corpus_states_mb=round(corpus_mb, 1))
            rows.append(res)
            print(json.dumps(res), flush=True)
    shutil.rmtree(root, ignore_errors=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--data", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data",
                                                  "helpsteer_sample_500.jsonl"))
    e.add_argument("--template", default="helpsteer-response")
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--max-length", type=int, default=256)
    e.add_argument("--shard-size", type=int, default=64)
    e.add_argument("--out", default=None)
    e.set_defaults(func=extract)
    m = sub.add_parser("memory")
    m.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 4000])
    m.add_argument("--how", nargs="+", default=["stream", "exact", "fit_heads"])
    m.add_argument("--length", type=int, default=128)
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--shard-size", type=int, default=250)
    m.add_argument("--json-out", default=None)
    m.set_defaults(func=memory)
    c = sub.add_parser("fit-child")
    c.add_argument("folder")
    c.add_argument("how", choices=("stream", "exact", "fit_heads"))
    c.set_defaults(func=fit_child)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
