"""Loading SmolLM2-135M-Instruct from its GGUF file: without the dequantized-weights cache, the first load
(which builds the cache) and later loads (which read it), each in a fresh interpreter.

transformers dequantizes a GGUF file on every ``from_pretrained(..., gguf_file=...)``; hf-sde's cache
(``hf_sde/gguf_cache.py``) saves the dequantized model once and verifies it on every later load. Every
measurement runs ``SMOLLM2.load()`` in a new process against a private, initially empty cache folder
(``HF_SDE_CACHE``), timing the call alone (not the interpreter start or the imports). Target: a
second load within 5 s.

    python benchmarks/bench_load.py [--smoke | --full]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

SETTINGS = {
    # smoke: stories260K's GGUF (tiny; what the test-suite runs), one load of each kind.
    "smoke": {"model": "stories260K", "no_cache": 1, "cached": 1},
    "default": {"model": "SmolLM2", "no_cache": 1, "cached": 3},
    "full": {"model": "SmolLM2", "no_cache": 3, "cached": 5},
}
TARGET_S = 5.0


def probe(model: str) -> dict:
    """Runs in the child: one timed load."""
    C.setup_env(1)
    import hf_sde  # noqa: F401 - imports outside the timed part
    from hf_sde.data.loading import SMOLLM2

    t0 = time.perf_counter()
    if model == "SmolLM2":
        SMOLLM2.load()
    else:
        hf_sde.load_model(C.STORIES_ID, gguf_file=C.STORIES_GGUF, revision=C.STORIES_REV)
    return {"seconds": time.perf_counter() - t0}


def run_child(model: str, cache: Path, use_cache: bool) -> float:
    env = dict(os.environ, HF_SDE_CACHE=str(cache), HF_SDE_GGUF_CACHE="1" if use_cache else "0")
    out = subprocess.run([sys.executable, __file__, "--probe", model], env=env, capture_output=True, text=True,
                         check=False, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"load probe failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.probe)))
        return None
    C.setup_env(args.threads)
    cfg = SETTINGS[C.scale_of(args)]
    run = C.Run("bench_load", args, cfg)
    model = cfg["model"]
    with tempfile.TemporaryDirectory(prefix="hf-sde-bench-load-") as tmp:
        cache = Path(tmp)
        no_cache = [run_child(model, cache, False) for _ in range(cfg["no_cache"])]
        first = run_child(model, cache, True)       # builds the entry
        cached = [run_child(model, cache, True) for _ in range(cfg["cached"])]
    results = {"model": model, "no_cache_s": no_cache, "first_load_s": first, "cached_load_s": cached,
               "target_s": TARGET_S}
    med = C.summarize(cached)["median"]
    rows = [[model, "no cache (transformers dequantizes)", f"{C.summarize(no_cache)['median']:.1f}", str(len(no_cache)), "-"],
            [model, "first load (dequantize + write the cache)", f"{first:.1f}", "1", "-"],
            [model, "second and later loads (verified cache)", f"{med:.1f}", str(len(cached)),
             "yes" if med <= TARGET_S else "no"]]
    body = ("Seconds inside the load call, fresh interpreter each time, private cache folder (median over loads). "
            f"Target: later loads <= {TARGET_S:g} s.\n\n"
            + C.md_table(["model", "load", "seconds (median)", "loads", f"<= {TARGET_S:g} s"], rows))
    run.finish(results, body)
    print(body)
    return results


if __name__ == "__main__":
    main()
