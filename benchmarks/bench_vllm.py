"""Tokens/s of SmolLM2-135M-Instruct in vLLM with and without hf-sde control, and in transformers' generate.

Run in the vLLM environment (scripts/setup_vllm_venv.sh), from the repository root:

    .venv-vllm/bin/python benchmarks/bench_vllm.py [--tokens 32] [--rounds 5] [--server]

Settings measured (float32, eager, greedy with ignore_eos so every run generates exactly --tokens tokens):
- vLLM offline ``LLM.generate``: batch 1, 8 and 32 (one call with that many prompts), plain / SDE temperature /
  SDE steer;
- with ``--server``: 8 concurrent streaming chat requests to ``python -m hf_sde.vllm.serve`` (openai client);
- transformers ``generate`` on the same weights: batch 1 and 8 (left padded), plain / ``sde_generate``.

Each group (engine, mode, batch) runs its three settings in interleaved rounds (the order rotates every round), so
a change of the machine's load hits all three alike; the ratio to plain is the median over rounds of the round's
plain time over the setting's time, with its interquartile range. Writes benchmarks/results/bench_vllm.json and
.md; the load average at start and end is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_CACHE", str((ROOT / ".." / "shared" / "hf-cache" / "hub").resolve()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
# One OpenMP thread: with two on 2 cores shared with other jobs, every oneDNN / vLLM CPU kernel waits ~3 ms at its
# barrier for a descheduled thread (measured here: 1.3 tok/s batch 1 with two threads, 12 tok/s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("HF_SDE_VLLM_HEADS", "smollm2")

QUESTIONS = [
    "Give three tips for staying healthy.", "What is the capital of France?", "Write a haiku about rain.",
    "How do I boil an egg?", "Name three planets and one fact about each.", "What is a prime number?",
    "Suggest a name for a black cat.", "Why is the sky blue?",
]
SETTINGS = {"plain": None, "sde-temperature": dict(mode="temperature", beta=1.0),
            "sde-steer": dict(mode="steer", alpha=0.2)}


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def interleaved(runs: dict, rounds: int) -> dict[str, dict]:
    """Run every setting of ``runs`` (name -> callable) once per round, the order rotating each round (after one
    warm-up call each); per setting the median seconds and the per-round ratio plain time / setting time."""
    for fn in runs.values():
        fn()
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t)
    out = {}
    for name in names:
        ratios = sorted(p / x for p, x in zip(times["plain"], times[name], strict=True))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[name] = dict(seconds=statistics.median(times[name]), ratio=statistics.median(ratios),
                         ratio_iqr=[q[0], q[2]], times=times[name])
    return out


def _rows(engine: str, mode: str, batch: int, tokens: int, result: dict[str, dict]) -> list[dict]:
    rows = []
    for name, r in result.items():
        rows.append(dict(engine=engine, mode=mode, batch=batch, setting=name, seconds=r["seconds"],
                         tokens_per_s=batch * tokens / r["seconds"], vs_plain_same_engine=r["ratio"],
                         vs_plain_iqr=r["ratio_iqr"], round_seconds=r["times"]))
        print(rows[-1], flush=True)
    return rows


def bench_vllm(folder: str, prompts: list[list[int]], tokens: int, rounds: int) -> list[dict]:
    from vllm import LLM, SamplingParams

    from hf_sde.vllm import get_traces, llm_kwargs, sde_args, sde_prompt

    llm = LLM(folder, **llm_kwargs(max_model_len=512, seed=0))
    llm.generate(["warm up"], SamplingParams(max_tokens=4), use_tqdm=False)
    rows = []
    for batch in (1, 8, 32):
        def run(batch=batch, control=None):
            args = [sde_args(**control) if control else None for _ in range(batch)]
            # every request of every setting gets its own cache salt (steered ones must; the others too, so that
            # no setting is served from the prefix cache while another prefills)
            ps = [sde_prompt({"prompt_token_ids": prompts[i % len(prompts)], "cache_salt": uuid.uuid4().hex}, a)
                  for i, a in enumerate(args)]
            params = [SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, extra_args=a) for a in args]
            outs = llm.generate(ps, params, use_tqdm=False)
            assert all(len(o.outputs[0].token_ids) == tokens for o in outs)
            if control:
                got = get_traces(llm, [a["sde_trace_id"] for a in args])
                assert all(t is not None and t.zscore.shape[1] == tokens for t in got)
        runs = {name: functools.partial(run, batch, control) for name, control in SETTINGS.items()}
        rows += _rows("vllm", "offline batch", batch, tokens, interleaved(runs, rounds))
    return rows


def bench_server(folder: str, tokens: int, rounds: int, streams: int = 8) -> list[dict]:
    import httpx
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    log = open("/tmp/bench_vllm_server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "hf_sde.vllm.serve", "--model", folder, "--served-model-name",
                             "m", "--port", str(port), "--max-model-len", "512"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    rows = []
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError("server exited; see /tmp/bench_vllm_server.log")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        async def one(client, question, xargs):
            extra = {"ignore_eos": True, "cache_salt": uuid.uuid4().hex}  # no setting served from the prefix cache
            if xargs:
                extra["vllm_xargs"] = dict(xargs)
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": question}], max_tokens=tokens, temperature=0,
                stream=True, extra_body=extra)
            n = 0
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    n += 1
            return n

        def run(xargs):
            async def all_streams():
                # a client per event loop (asyncio.run makes a new loop each time)
                async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x") as client:
                    return await asyncio.gather(*(one(client, QUESTIONS[i % len(QUESTIONS)], xargs)
                                                  for i in range(streams)))
            asyncio.run(all_streams())

        runs = {name: functools.partial(run, {f"sde_{k}": v for k, v in control.items()} if control else None)
                for name, control in SETTINGS.items()}
        rows += _rows("vllm", f"server, {streams} concurrent streams", streams, tokens, interleaved(runs, rounds))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return rows


def bench_generate(folder: str, prompts: list[list[int]], tokens: int, rounds: int) -> list[dict]:
    import torch

    from hf_sde import DEFAULT_HEADS, SDEControl, SDEHeads, load_model, sde_generate

    model, tokenizer = load_model(folder, dtype=torch.float32)
    heads = SDEHeads.from_pretrained(DEFAULT_HEADS)
    rows = []
    for batch in (1, 8):
        enc = tokenizer.pad({"input_ids": prompts[:batch]}, return_tensors="pt")  # left padding (load_model)

        def run(enc, ctl):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                out = sde_generate(model, enc["input_ids"], attention_mask=enc["attention_mask"], sde_control=ctl,
                                   max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            assert out.shape[1] == enc["input_ids"].shape[1] + tokens
        runs = {name: functools.partial(run, enc, SDEControl(heads, **control) if control else None)
                for name, control in SETTINGS.items()}
        rows += _rows("transformers", "generate", batch, tokens, interleaved(runs, rounds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per group (default: 5, at least 2)")
    parser.add_argument("--server", action="store_true", help="also 8 concurrent streams through the server")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_vllm"))
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2 (a ratio per round needs rounds to compare), got {args.rounds}")

    import torch
    import transformers
    import vllm

    from hf_sde.vllm import model_folder

    folder = str(model_folder())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]) for q in QUESTIONS]
    load_start = os.getloadavg()
    rows = bench_vllm(folder, prompts, args.tokens, args.rounds)
    if args.server:
        rows += bench_server(folder, args.tokens, args.rounds)
    rows += bench_generate(folder, prompts, args.tokens, args.rounds)
    load_end = os.getloadavg()

    def rate(engine, mode, batch, setting):
        for r in rows:
            if (r["engine"], r["mode"], r["batch"], r["setting"]) == (engine, mode, batch, setting):
                return r["tokens_per_s"]
        return None

    for r in rows:
        hf = rate("transformers", "generate", r["batch"], r["setting"])
        r["vs_transformers_same_setting"] = r["tokens_per_s"] / hf if hf else None
    meta = dict(tokens=args.tokens, rounds=args.rounds, git_commit=_git_commit(), cpu_count=os.cpu_count(), platform=platform.platform(),
                torch=torch.__version__, transformers=transformers.__version__, vllm=vllm.__version__,
                loadavg_start=load_start, loadavg_end=load_end, dtype="float32", enforce_eager=True,
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                command=".venv-vllm/bin/python benchmarks/bench_vllm.py " + " ".join(sys.argv[1:]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = ["# hf-sde in vLLM: tokens/s with and without SDE control", "",
             f"SmolLM2-135M-Instruct float32, eager, greedy, {args.tokens} new tokens per request (ignore_eos), "
             f"{args.rounds} interleaved rounds per group (median; ratio to plain: median and IQR over rounds); "
             f"commit {meta['git_commit']}; vLLM {vllm.__version__} (CPU), transformers {transformers.__version__}, "
             f"torch {torch.__version__}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; {os.cpu_count()} cores "
             f"shared with other jobs, load average "
             f"{load_start[0]:.1f} at start, {load_end[0]:.1f} at end.", "",
             "| engine | mode | batch | setting | s | tok/s | vs plain (same engine, same rounds) | IQR | "
             "vs transformers (same setting) |",
             "|---|---|---|---|---|---|---|---|---|"]
    def f(x):
        return "" if x is None else f"{x:.2f}"

    for r in rows:
        lines.append(f"| {r['engine']} | {r['mode']} | {r['batch']} | {r['setting']} | {r['seconds']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['vs_plain_same_engine']:.3f} | {r['vs_plain_iqr'][0]:.3f}–"
                     f"{r['vs_plain_iqr'][1]:.3f} | {f(r['vs_transformers_same_setting'])} |")
    lines += ["", f"Command: `{meta['command']}`"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
