"""Reproduce every benchmark and evaluation table of hf-sde in one command.

    python benchmarks/run_all.py            # default settings: bounded time on 2 cores -> benchmarks/results/
    python benchmarks/run_all.py --full     # larger settings                            -> benchmarks/results/full/
    python benchmarks/run_all.py --smoke    # seconds; what the test-suite runs          -> benchmarks/.cache/smoke-results/
    python benchmarks/run_all.py --only bench_overhead eval_control
    python benchmarks/run_all.py --decoding # what the SDE buys (SmolLM2 + judge): designs and detection study

Each script also runs alone (``python benchmarks/<name>.py [--smoke|--full]``). Results: one JSON (all
numbers, settings, machine info: CPU, torch / transformers versions, threads, load) and one markdown table
per script, plus ``README.md`` collecting the tables. Heads, trajectories and self-generated stories are
cached in ``benchmarks/.cache`` (delete it to refit from scratch). Works offline: ``HF_HUB_CACHE`` defaults
to ``<repo>/../shared/hf-cache/hub`` and ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

# Evaluations first: they fit (and cache) the stories260K heads the performance benchmarks reuse.
SCRIPTS = ["eval_fit", "eval_uncertainty", "eval_control", "bench_extract", "bench_fit", "bench_fit_time",
           "bench_trace", "bench_overhead", "bench_call", "bench_load"]
# "What the SDE buys" on SmolLM2: the temperature head, the detection study and the decoding designs. Not in
# the default run (they need the judge model and ~1 h on 2 cores): ``--decoding`` runs them, smallest first.
DECODING = ["eval_temperature_head", "eval_detection", "eval_frontier"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--smoke", action="store_true")
    g.add_argument("--full", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", choices=SCRIPTS + DECODING, default=None)
    p.add_argument("--skip", nargs="+", choices=SCRIPTS + DECODING, default=[])
    p.add_argument("--decoding", action="store_true",
                   help=f"run the decoding and detection studies instead of the default set: {', '.join(DECODING)} "
                        "(SmolLM2 and the judge model; about an hour on 2 cores)")
    args = p.parse_args(argv)
    scale = C.scale_of(args)
    out = Path(args.out) if args.out else (C.CACHE / "smoke-results" if scale == "smoke" else
                                          C.RESULTS / "full" if scale == "full" else C.RESULTS)
    C.setup_env(args.threads)
    names = [n for n in (args.only or (DECODING if args.decoding else SCRIPTS)) if n not in args.skip]
    flags = (["--smoke"] if scale == "smoke" else ["--full"] if scale == "full" else []) + [
        "--threads", str(args.threads), "--out", str(out), "--seed", str(args.seed)]
    t_all = time.perf_counter()
    info = C.machine_info()
    timings, failed = {}, []
    for name in names:
        t0 = time.perf_counter()
        print(f"== {name} ({scale})", flush=True)
        try:
            importlib.import_module(name).main(flags)
        except Exception:  # noqa: BLE001 - report and go on with the other tables
            traceback.print_exc()
            failed.append(name)
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"== {name}: {timings[name]} s", flush=True)
    total = time.perf_counter() - t_all
    command = "python benchmarks/run_all.py" + {"smoke": " --smoke", "full": " --full"}.get(scale, "")
    # The summary collects every script's latest tables in this folder (also those not rerun this time).
    walls = {}
    for name in SCRIPTS + DECODING:
        with contextlib.suppress(OSError, ValueError, KeyError):
            walls[name] = json.loads((out / f"{name}.json").read_text())["wall_seconds"]
    parts = [f"# hf-sde benchmarks and evaluations ({scale})\n",
             f"`{command}` reproduces every table below (each script's own command and wall time are in its "
             f"section). Wall times: {', '.join(f'{k} {v:.0f} s' for k, v in walls.items())}; "
             f"{sum(walls.values()):.0f} s summed.\n",
             f"Last invocation: `{' '.join(['python benchmarks/run_all.py', *(argv or sys.argv[1:])])}` "
             f"({total:.0f} s).\n", C.machine_md(info) + ".\n",
             "Load: " + C.load_note(info, C.machine_info()) + ".\n"]
    for name in SCRIPTS + DECODING:
        md = out / f"{name}.md"
        if md.is_file():
            text = md.read_text().split("\n", 1)[1] if md.read_text().startswith("# ") else md.read_text()
            parts.append(f"\n## {name}\n{text}")
    if failed:
        parts.append(f"\n**Failed:** {', '.join(failed)} (see the console output).\n")
    (out / "README.md").write_text(C.repo_relative("\n".join(parts)))
    (out / "run_all.json").write_text(json.dumps({"scale": scale, "command": command, "seconds": timings,
                                                  "total_seconds": round(total, 1), "failed": failed,
                                                  "machine": info}, indent=2))
    print(f"wrote {out}/README.md in {total:.0f} s" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
