"""The benchmark entry point runs end to end at its tiny ``--smoke`` setting and writes every result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HUB = REPO.parent / "shared" / "hf-cache" / "hub"
SCRIPTS = ["eval_fit", "eval_uncertainty", "eval_control", "bench_extract", "bench_fit", "bench_fit_time",
           "bench_trace", "bench_overhead", "bench_call", "bench_load"]


@pytest.mark.skipif(not HUB.is_dir(), reason="needs ../shared/hf-cache (stories260K)")
def test_run_all_smoke(tmp_path):
    env = os.environ.copy()
    env.setdefault("HF_HUB_CACHE", str(HUB.resolve()))
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_SDE_BENCH_CACHE"] = str(tmp_path / "cache")  # cold cache: nothing precomputed
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in SCRIPTS:
        data = json.loads((out / f"{name}.json").read_text())
        assert data["scale"] == "smoke" and data["results"]
        machine = data["machine"]
        for key in ("cpu", "torch", "transformers", "torch_threads", "loadavg_1_5_15"):
            assert key in machine
        assert (out / f"{name}.md").read_text().strip()
    summary = (out / "README.md").read_text()
    assert all(f"## {name}" in summary for name in SCRIPTS)
    # bench_overhead's compiled floors: every implementation is timed, or the table says why it was not built
    floors = json.loads((out / "bench_overhead.json").read_text())["results"]["stories260K/b1"]["compiled_floors"]
    assert {"eager", "torch.compile", "AOTInductor"} <= set(floors["impls"]) | set(floors["errors"])
    for impl, e in floors["impls"].items():
        assert e["in_place_us"] > 0 and e["hot_us"] > 0, impl
        assert e["max_abs_diff"] < 1e-4, impl  # the compiled step computes what the eager one does
    # bench_overhead's compiled rows: every mode timed against stock compiled and against its eager call
    compiled = json.loads((out / "bench_overhead.json").read_text())["results"]["stories260K/b1/compiled"]
    assert set(compiled["compiled_vs_eager"]) == {"observe", "temperature", "steer"}
    assert all(r["median"] > 0 for r in compiled["ratios"].values())
    assert "## Compiled generation" in (out / "bench_overhead.md").read_text()
    # bench_overhead's per-call / per-step split on stories260K: one row per mode, parts that add up
    split = json.loads((out / "bench_overhead.json").read_text())["results"]["stories260K/b1"]["split"]
    assert set(split) == {"observe", "temperature", "steer"}
    for mode, e in split.items():
        assert e["per_step_us"] == pytest.approx(e["callbacks_per_step_us"] + e["outside_per_step_us"]), mode
        assert e["callbacks_per_step_us"] > 0 and e["plain_step_us"] > 0, mode


def test_results_name_no_absolute_paths_of_the_machine_that_produced_them():
    """Results files name what they read relative to the repository (benchmarks/_common.repo_relative)."""
    import re

    absolute = re.compile(r"(?<![\w.])/(?:work|tmp|root|home|Users|mnt|opt)/[A-Za-z]")
    offenders = [f"{p.name}: {m.group(0)}" for p in sorted((REPO / "benchmarks" / "results").iterdir())
                 if p.suffix in (".md", ".json") for m in [absolute.search(p.read_text())] if m]
    assert not offenders, offenders


def test_repo_relative_rewrites_this_checkout_and_its_neighbours():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import _common as C

    assert C.repo_relative(f"heads `{C.REPO}/hf_sde/pretrained/x`") == "heads `hf_sde/pretrained/x`"
    assert C.repo_relative(f"{C.REPO.parent}/shared/data/a.jsonl") == "../shared/data/a.jsonl"
