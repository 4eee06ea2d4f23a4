"""Latency of the Space under concurrent users (SmolLM2): the app before this change vs the batched one.

Each variant is served in its own process on 127.0.0.1 and driven through ``gradio_client``, like visitors:

* ``before``: ``hf_sde/demo.py`` of commit ``f54bdc8`` (checked out to a temporary folder with ``git archive``),
  served with its defaults (one generation at a time, 16 queued);
* ``after``: ``spaces/app.py`` of this checkout, configured by environment variables as deployed.

Both serve SmolLM2-135M-Instruct with the same heads: the shipped heads when installed, else demo heads that
the ``after`` server fits once at start-up (a few short texts; the ``before`` server is given that folder).
At 1 user: ``--sequential`` requests one after another; at 8 and 16: that many users submit at once (one
request each). Latency = submit to final result. Every user checks that its own seed comes back.

    python benchmarks/bench_space.py            # ~10 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import _common as C

BEFORE_COMMIT = "f54bdc8"
LEVELS = (1, 8, 16)
PROMPTS = ("Give three tips for staying healthy.", "Write a haiku about the sea.", "What is a star?",
           "Name two uses of a paperclip.")
PARAMS = dict(mode="temperature+steer", beta=1.0, tau0=1.0, tmin=0.3, tmax=1.5, alpha=0.1, direction="drift")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _wait_up(port: int, proc: subprocess.Popen, timeout: float = 900) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError("server did not come up")


def _start(variant: str, port: int, env: dict, heads: str | None, log: Path) -> subprocess.Popen:
    spec = "from hf_sde.data.loading import SMOLLM2 as S\n"
    if variant == "before":
        code = spec + ("import hf_sde.demo as d\n"
                       f"demo = d.build_demo(S.name_or_path, S.gguf_file, S.revision, {heads!r})\n"
                       f"d.launch(demo, server_name='127.0.0.1', server_port={port})\n")
    else:
        code = (f"import runpy, sys; sys.argv = ['app.py']; runpy.run_path({str(C.REPO / 'spaces' / 'app.py')!r}, "
                "run_name='__main__')\n")
    # cwd: the log's folder, so that ``python -c`` does not import the hf_sde of the current directory.
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            cwd=log.parent)


def _request(client, prefix: list, prompt: str, seed: int, max_new: int) -> tuple[float, bool]:
    p = PARAMS
    args = [*prefix, prompt, p["mode"], p["beta"], p["tau0"], p["tmin"], p["tmax"], p["alpha"], p["direction"], seed,
            max_new]
    start = time.perf_counter()
    out = client.predict(*args, api_name="/generate")
    return time.perf_counter() - start, f"seed {seed}" in str(out[4])


def _level(url: str, prefix: list, users: int, sequential: int, max_new: int) -> dict:
    from gradio_client import Client

    clients = [Client(url, verbose=False) for _ in range(users)]
    results: list[tuple[float, bool]] = []
    lock, barrier = threading.Lock(), threading.Barrier(users)

    def user(i: int) -> None:
        barrier.wait()
        for k in range(sequential if users == 1 else 1):
            r = _request(clients[i], prefix, PROMPTS[(i + k) % len(PROMPTS)], 100 + 17 * i + k, max_new)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(r[0] for r in results)
    q = lambda f: lat[min(len(lat) - 1, round(f * (len(lat) - 1)))]  # noqa: E731 - nearest-rank quantile
    return {"users": users, "requests": len(lat), "p50_s": q(0.5), "p95_s": q(0.95), "max_s": lat[-1],
            "wall_s": wall, "requests_per_min": 60 * len(lat) / wall, "own_seed_back": all(r[1] for r in results)}


def run_variant(variant: str, env: dict, heads: str | None, work: Path, args) -> dict:
    """Serve one variant, warm it up, measure every level, stop it."""
    port = _free_port()
    log = work / f"{variant}.log"
    t0 = time.perf_counter()
    proc = _start(variant, port, {**env, "GRADIO_SERVER_PORT": str(port)}, heads, log)
    try:
        _wait_up(port, proc)
        startup = time.perf_counter() - t0
        url = f"http://127.0.0.1:{port}/"
        from hf_sde.data.loading import SMOLLM2 as S

        # The old page's model / GGUF / revision / heads boxes come first in its API.
        prefix = [S.name_or_path, S.gguf_file, S.revision, heads] if variant == "before" else []
        _level(url, prefix, 1, 1, args.max_new_tokens)  # warm-up
        levels = []
        for users in args.levels:
            levels.append({**_level(url, prefix, users, args.sequential, args.max_new_tokens),
                           "server_rss_mb": _rss_mb(proc.pid)})
            print(variant, levels[-1], flush=True)
        return {"startup_s": startup, "levels": levels}
    finally:
        proc.terminate()
        proc.wait(30)


def _heads_folder(cache: Path) -> str | None:
    folders = sorted(p for p in (cache / "demo-heads").glob("*") if not p.name.startswith("."))
    return str(folders[0]) if folders else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--sequential", type=int, default=3, help="requests of the single user")
    ap.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    ap.add_argument("--out", default=str(C.RESULTS))
    ap.add_argument("--render", default=None, help="only rewrite the markdown of this bench_space.json")
    ap.add_argument("--reuse-after", default=None, help="bench_space.json whose 'after' results to keep (rerun "
                                                        "only 'before')")
    args = ap.parse_args()
    if args.render:
        payload = json.loads(Path(args.render).read_text())
        C.write_result(args.out, "bench_space", payload, render(payload))
        return 0
    info = C.machine_info()
    work = Path(tempfile.mkdtemp(prefix="bench-space-"))
    old = work / "before"
    old.mkdir()
    subprocess.run(f"git -C {C.REPO} archive {BEFORE_COMMIT} hf_sde | tar -x -C {old}", shell=True, check=True)
    env = {**os.environ, "HF_SDE_CACHE": str(work / "cache"), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": os.environ["HF_HUB_CACHE"]}
    after_env = {**env, "PYTHONPATH": str(C.REPO)}
    start = time.perf_counter()
    if args.reuse_after:
        after = json.loads(Path(args.reuse_after).read_text())["after"]
        env["HF_SDE_CACHE"] = after["cache"]
    else:
        after = run_variant("after", after_env, None, work, args)
        after["cache"] = env["HF_SDE_CACHE"]
    heads = _heads_folder(Path(env["HF_SDE_CACHE"]))
    before = run_variant("before", {**env, "PYTHONPATH": str(old)}, heads, work, args)
    payload = {"machine": info, "before_commit": BEFORE_COMMIT, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)",
               "max_new_tokens": args.max_new_tokens, "params": PARAMS, "heads": "shipped" if heads is None else
               "demo heads fitted at start-up", "before": before, "after": after,
               "wall_s": time.perf_counter() - start}
    C.write_result(args.out, "bench_space", payload, render(payload))
    print(render(payload))
    return 0


def render(payload: dict) -> str:
    """The markdown table of a results payload."""
    rows = [[v, str(lv["users"]), str(lv["requests"]), C.fmt(lv["p50_s"], 1), C.fmt(lv["p95_s"], 1), C.fmt(lv["wall_s"], 1),
             C.fmt(lv["requests_per_min"], 1), str(round(lv["server_rss_mb"])), "yes" if lv["own_seed_back"] else "NO"]
            for v in ("before", "after") for lv in payload[v]["levels"]]
    info = payload["machine"]
    return (f"# bench_space\n\n`python benchmarks/bench_space.py` — {payload['wall_s']:.0f} s wall.\n\n"
            f"{C.machine_md(info)}\n\nSmolLM2-135M-Instruct, {payload['max_new_tokens']} new tokens per run (each "
            "request samples a plain and a controlled run), mode temperature+steer, "
            f"{payload['heads']}. `before` = commit {payload['before_commit']} (one generation at a time); `after` = "
            "this branch (rows of concurrent requests batched by one worker). p95 over 8 or 16 requests is close to "
            "the maximum. The machine is shared (load average in the machine line): the two variants ran minutes "
            "apart, so single-user differences are within the noise; the concurrent rows are the point.\n\n"
            + C.md_table(["variant", "users", "requests", "p50 s", "p95 s", "wall s", "requests/min",
                          "server RSS MB", "own seed back"], rows) + "\n")


if __name__ == "__main__":
    C.setup_env()
    sys.exit(main())
