"""benchmarks/device_check.py (the GPU check) runs end to end on CPU at ``--smoke``: every parity cell passes and
every overhead row has a finite positive ratio (tiny random Llamas; no hub access)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.py"
DTYPES = ("float32", "bfloat16")
CACHES = ("dynamic", "static", "static+compiled")
DECODINGS = ("greedy", "sample")
MODES = ("observe", "temperature", "steer")


def test_device_check_smoke(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_SDE_BENCH_CACHE": str(tmp_path / "c")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("parity: ") and "cells pass; overhead rows: " in last, log

    data = json.loads((tmp_path / "device_check.json").read_text())
    assert data["scale"] == "smoke"
    for key in ("torch", "transformers", "cpu"):
        assert key in data["machine"], key
    res = data["results"]
    assert res["device"]["device"] == "cpu" and res["device"]["torch"] and res["device"]["transformers"]

    cells = res["parity"]
    observe = {(c["dtype"], c["cache"], c["decoding"]): c for c in cells if c["check"] == "observe"}
    assert set(observe) == set(itertools.product(DTYPES, CACHES, DECODINGS))
    for key, c in observe.items():
        assert c["status"] == "pass", (key, c.get("reason"))
        assert c["sequences_equal"] and c["scores_equal"] and c["logits_equal"] and c["max_abs_diff"] == 0, key
        assert c["sde_compiled"] in (("yes", "no") if key[1] == "static+compiled" else ("-",)), key
    controlled = {(c["check"], c["dtype"], c["cache"]): c for c in cells if c["check"] != "observe"}
    assert set(controlled) == set(itertools.product(("temperature", "steer"), DTYPES, CACHES))
    for key, c in controlled.items():
        assert c["status"] == "pass", (key, c.get("reason"))
        lo, hi = c["temperature_range"]
        assert 0.3 <= lo <= hi <= 1.5, key
    assert f"parity: {len(cells)}/{len(cells)} cells pass" in last

    rows = res["overhead"]
    assert {(r["model"], r["batch"], r["cache"]) for r in rows} == set(
        itertools.product(("tiny-64x3", "tiny-32x2"), (1, 2), ("eager", "compiled")))
    for r in rows:
        for mode in MODES:
            ratio = r["ratios"][mode]
            assert math.isfinite(ratio["median"]) and ratio["median"] > 0, (r["model"], r["batch"], mode)
            assert r["ratios"][mode]["seconds"]["median"] > 0
            assert r["warmup_seconds"][mode] > 0
    assert f"overhead rows: {len(rows) * len(MODES)}" in last and not res["overhead_skipped"]

    md = (tmp_path / "device_check.md").read_text()
    for heading in ("## Parity", "## Overhead", "## Compilation speed-up"):
        assert heading in md, heading
    assert "| check | dtype | cache | decoding | status | SDE compiled |" in md
    assert "| model | batch | cache | dtype | mode | ratio (median) |" in md
    assert md.count("| observe | ") >= len(observe)
