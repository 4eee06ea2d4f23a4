"""Shared plumbing for the benchmarks and evaluations: environment, machine info, models, corpora,
cached heads, interleaved A/B timing, statistics and result files.

Every script runs standalone (``python benchmarks/bench_overhead.py``) and from ``run_all.py``.
Scales: ``smoke`` (seconds, for the test-suite), ``default`` (minutes on 2 cores), ``full`` (larger).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import platform
import random
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
BENCH = REPO / "benchmarks"
CACHE = Path(os.environ.get("HF_SDE_BENCH_CACHE", BENCH / ".cache"))
RESULTS = BENCH / "results"

STORIES_ID = "ggml-org/models-moved"
STORIES_GGUF = "tinyllamas/stories260K.gguf"
STORIES_REV = "499bc8821c6b12b4e53c5bffcb21ec206f212d81"
TINYSTORIES = DATA / "tinystories_sample.txt"
HELPSTEER = DATA / "helpsteer_sample_500.jsonl"

SCALES = ("smoke", "default", "full")


def _env_defaults() -> None:
    # huggingface_hub reads these when it is first imported, so set them before anything imports it.
    if "HF_HUB_CACHE" not in os.environ:
        os.environ["HF_HUB_CACHE"] = str((SHARED / "hf-cache" / "hub").resolve())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


_env_defaults()


def setup_env(threads: int | None = None) -> None:
    """Offline hub cache relative to the repo (unless already set), quiet libraries, torch threads."""
    _env_defaults()
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    library_fingerprint()
    logging.getLogger("hf_sde").setLevel(logging.ERROR)
    logging.getLogger("hf_sde.data.loading").setLevel(logging.ERROR)
    if threads:
        torch.set_num_threads(int(threads))
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


def add_common_args(parser) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--smoke", action="store_true", help="tiny settings (seconds; used by the test-suite)")
    g.add_argument("--full", action="store_true", help="larger settings (long on 2 cores)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared 2-core box, 2 threads under load "
                             "spin-wait and run up to 10x slower)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the JSON and markdown results")
    parser.add_argument("--seed", type=int, default=0)


def scale_of(args) -> str:
    return "smoke" if getattr(args, "smoke", False) else "full" if getattr(args, "full", False) else "default"


# ----- machine info ---------------------------------------------------------------------------------
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    import torch
    import transformers

    import hf_sde

    info = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_sde": hf_sde.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
    }
    with contextlib.suppress(Exception):
        import psutil

        info["memory_total_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    return info


def load_note(start: dict, end: dict | None = None) -> str:
    la = start.get("loadavg_1_5_15", [0])[0]
    la_end = (end or {}).get("loadavg_1_5_15", [la])[0]
    cpus = start.get("cpus_available") or 1
    busy = "busy" if max(la, la_end) > cpus else "quiet"
    return (f"load average {la:.1f} at start, {la_end:.1f} at end on {cpus} CPUs ({busy}; other processes share the "
            "machine, so absolute times are noisy and only same-run interleaved ratios are meaningful)")


# ----- models ---------------------------------------------------------------------------------------
_STORIES: list = []


def load_stories():
    """stories260K and its tokenizer (loaded once per process; ``run_all`` shares it between scripts)."""
    import hf_sde

    if not _STORIES:
        with contextlib.redirect_stderr(open(os.devnull, "w")):  # noqa: SIM115 - the GGUF repair warning
            _STORIES.append(hf_sde.load_model(STORIES_ID, gguf_file=STORIES_GGUF, revision=STORIES_REV))
    return _STORIES[0]


def build_gpt2(size: str = "124M", seed: int = 0):
    """A randomly initialised GPT-2 (``GPT2Config()`` defaults for 124M: 768 wide, 12 layers, vocab 50257)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if size == "124M":
        cfg = GPT2Config()
    elif size == "tiny":
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=512, n_positions=512)
    else:
        raise ValueError(size)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    model.generation_config.pad_token_id = cfg.eos_token_id
    model.hf_sde_source = {"name_or_path": f"random-gpt2-{size}-seed{seed}", "gguf_file": None, "revision": None}
    return model


def random_ids(n: int, length: int, vocab: int, seed: int, low: int = 3) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (n, length), generator=g).tolist()


# ----- corpora --------------------------------------------------------------------------------------
STORY_PROMPTS = [
    "Once upon a time", "One day, a little girl named Lily", "Tom and his dog went to the park",
    "There was a big red ball", "Once upon a time, there was a little bird", "Sara wanted to play with her friend",
    "The sun was shining and", "A small cat lived in a house", "Ben found a shiny rock",
    "Once upon a time, in a big forest,", "Mom said to Tim,", "The little boy was sad because",
]
# Disjoint from STORY_PROMPTS: used by the control evaluation.
EVAL_PROMPTS = [
    "Once upon a time, there was a girl named Sue", "One day, a big bear", "Lily and Max were best friends",
    "The old man had a garden", "Timmy liked to run", "Once upon a time, a little fish",
    "Anna saw a bird in the sky", "The kids went to the beach", "Once there was a happy dog named Spot",
    "Jack had a new toy car", "It was a rainy day", "A little mouse lived under the stairs",
    "Once upon a time, there lived a kind queen", "Sam and Mia found a box", "The cat wanted to catch the ball",
    "Grandma baked a cake",
]


def tinystories_texts() -> list[str]:
    from hf_sde import load_texts

    return load_texts(str(TINYSTORIES))


def helpsteer_ids(tok, max_length: int = 256, limit: int | None = None) -> tuple[list[list[int]], list[str]]:
    """HelpSteer responses (template ``helpsteer-response``) tokenized and truncated, with prompt groups."""
    from hf_sde import load_texts
    from hf_sde.trajectories.extract import tokenize_texts

    texts, groups = load_texts(str(HELPSTEER), template="helpsteer-response", limit=limit, return_groups=True)
    return tokenize_texts(tok, texts, max_length), groups


def cache_key(**parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def self_generated_ids(model, tok, n: int, max_new_tokens: int, seed: int = 0, batch_size: int = 32,
                       prompts: list[str] | None = None) -> list[list[int]]:
    """The model's own stories (cached as JSON under benchmarks/.cache).

    By default from BOS alone (prompt ``""``): every token is the model's own sample. With fixed prompts
    (``STORY_PROMPTS``) every sample of a prompt repeats the same prompt states exactly, which lets the
    fitted diffusion collapse there (see eval_fit's ``tinystories-prompted`` row)."""
    from hf_sde import self_generate

    prompts = [""] if prompts is None else prompts
    path = CACHE / f"selfgen-{cache_key(n=n, t=max_new_tokens, seed=seed, p=prompts)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    ids = self_generate(model, tok, prompts, n, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        seed=seed, progress=False)
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ids))
    return ids


_FINGERPRINT: list[str] = []


def library_fingerprint() -> str:
    """Hash of the library code that determines fitted heads (so a changed fitter invalidates the cache).

    Computed once per process, right after importing that code: a file edited while a long run is going
    must not relabel heads fitted by the code the process actually runs."""
    if not _FINGERPRINT:
        import hf_sde.fitting.fit  # noqa: F401 - the code whose source is hashed is the code in use

        h = hashlib.sha1()
        package = REPO / "hf_sde"
        for path in [*sorted((package / "fitting").glob("*.py")), package / "trajectories" / "extract.py"]:
            h.update(path.read_bytes())
        _FINGERPRINT.append(h.hexdigest()[:10])
    return _FINGERPRINT[0]


def cached_fit(name: str, key: dict, build: Callable[[], tuple]):
    """Fit (or load) heads. ``build()`` returns ``(FitResult, extra_json)``; returns ``(heads, summary)``.

    The summary holds the held-out NLLs, the split and whatever ``extra_json`` adds. The cache key includes
    :func:`library_fingerprint`, so heads are refitted whenever the fitting code changes.
    """
    from hf_sde import SDEHeads

    key = {**key, "lib": library_fingerprint()}
    folder = CACHE / f"heads-{name}-{cache_key(**key)}"
    summary_path = folder / "bench_summary.json"
    if summary_path.is_file():
        return SDEHeads.from_pretrained(str(folder)), json.loads(summary_path.read_text())
    result, extra = build()
    folder.mkdir(parents=True, exist_ok=True)
    result.heads.save_pretrained(str(folder), overwrite=True)  # an interrupted build left no summary
    summary = {"key": key, "summary": result.summary(), "heldout_parts": result.heldout_parts,
               "train_indices": result.train_indices, "heldout_indices": result.heldout_indices,
               "history": result.history, **(extra or {})}
    summary_path.write_text(json.dumps(summary, default=float))
    return result.heads, summary


# ----- timing ---------------------------------------------------------------------------------------
def interleaved(fns: dict[str, Callable[[], object]], *, min_reps: int, max_reps: int, budget_s: float,
                seed: int = 0, warmup: bool = True,
                cpu_times: dict[str, list[float]] | None = None) -> tuple[dict[str, list[float]], int]:
    """Time each callable once per round, rounds in shuffled order (A/B interleaving), until ``max_reps``
    rounds or (after ``min_reps``) ``budget_s`` seconds. Returns per-name lists of seconds and the rounds.

    ``cpu_times``: a dict that receives each call's process CPU seconds too (for one-thread work, the work
    done, without the time the process waited for a CPU on a shared machine)."""
    rng = random.Random(seed)
    names = list(fns)
    if warmup:
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    if cpu_times is not None:
        cpu_times.update({n: [] for n in names})
    start = time.perf_counter()
    rounds = 0
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() - start < budget_s):
        order = names[:]
        rng.shuffle(order)
        for n in order:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times[n].append(time.process_time() - c0)
        rounds += 1
    return times, rounds


def summarize(values) -> dict:
    import numpy as np

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "median": float(np.median(v)), "q25": float(np.quantile(v, 0.25)),
            "q75": float(np.quantile(v, 0.75)), "min": float(v.min()), "max": float(v.max()),
            "mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def paired_ratios(times: dict[str, list[float]], baseline: str) -> dict[str, dict]:
    """Per-round ratio ``t_name / t_baseline`` (same round, so same machine state), summarized.

    Also ``ratio_of_medians`` and ``ratio_of_mins`` (the least-disturbed runs) as cross-checks."""
    base = times[baseline]
    out = {}
    for name, ts in times.items():
        r = [a / b for a, b in zip(ts, base, strict=True)]
        s = summarize(r)
        s["ratio_of_medians"] = summarize(ts)["median"] / summarize(base)["median"]
        s["ratio_of_mins"] = min(ts) / min(base)
        s["seconds"] = summarize(ts)
        out[name] = s
    return out


def bootstrap_ci(values, stat: Callable = None, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05):
    """Percentile bootstrap CI of ``stat`` (default mean) over the first axis of ``values``."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    stat = stat or (lambda x: float(np.mean(x)))
    if len(v) < 2:
        x = stat(v) if len(v) else float("nan")
        return x, x
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n_boot, len(v)))
    boots = np.array([stat(v[i]) for i in idx])
    return float(np.quantile(boots, alpha / 2)), float(np.quantile(boots, 1 - alpha / 2))


# ----- memory ---------------------------------------------------------------------------------------
def maxrss_mb() -> float:
    """This process's peak resident set size so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


class PeakRSS:
    """Peak resident memory of a block, as an increase over the resident memory when it starts (MiB).

    Linux: resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``) and reads ``VmHWM``
    afterwards, so the peak belongs to this block alone. Elsewhere (or if the reset is refused) it falls
    back to the ``ru_maxrss`` delta, which only sees growth above the process's earlier peak. Torch's
    CPU tensors come from malloc/mmap, which ``tracemalloc`` does not see, so RSS is the honest measure.
    Run each variant in a fresh process (``run_probe``) so that memory freed by one is not reused by the next.
    """

    def __enter__(self):
        import gc

        gc.collect()
        self.method = "VmHWM reset via /proc/self/clear_refs"
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "ru_maxrss delta"
        self.rss_before = _status_mb("VmRSS") or maxrss_mb()
        self.maxrss_before = maxrss_mb()
        return self

    def __exit__(self, *exc):
        if self.method.startswith("VmHWM"):
            self.peak_mb = (_status_mb("VmHWM") or 0.0) - self.rss_before
        else:
            self.peak_mb = maxrss_mb() - self.maxrss_before
        self.rss_after = _status_mb("VmRSS")


def run_probe(script: Path, spec: dict, threads: int, timeout: float = 1200, env: dict | None = None) -> dict:
    """Run ``script --probe JSON`` in a fresh interpreter (``env``: variables set for it only) and parse the
    JSON it prints last.

    A fresh process per measurement makes ``ru_maxrss`` deltas meaningful: the high-water mark starts
    from the same warmed-up state for every variant."""
    cmd = [sys.executable, str(script), "--probe", json.dumps(spec), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"probe {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tensor_bytes(obj) -> int:
    """Bytes held by every tensor in a nested tuple / list / dict."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x) for x in obj.values())
    if dataclasses.is_dataclass(obj):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


# ----- output ---------------------------------------------------------------------------------------
def fmt(x, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and not math.isfinite(x):
        return "nan"
    return f"{x:.{nd}f}"


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |")
    return "\n".join(lines)


def machine_md(info: dict) -> str:
    keys = ("cpu", "cpus_available", "torch", "transformers", "hf_sde", "torch_threads", "python",
            "loadavg_1_5_15", "git_commit", "git_dirty", "timestamp_utc")
    return "Machine: " + ", ".join(f"{k}={info.get(k)}" for k in keys)


def repo_relative(text: str) -> str:
    """``text`` with this checkout's absolute paths written relative to the repository (results files name what
    they read as a reader's checkout has it, never the folders of the machine that produced them)."""
    return text.replace(f"{REPO}/", "").replace(f"{REPO.parent}/", "../")


def write_result(out_dir: str | Path, name: str, payload: dict, markdown: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(repo_relative(json.dumps(payload, indent=2, default=_json_default)))
    (out / f"{name}.md").write_text(repo_relative(markdown.rstrip() + "\n"))
    return out / f"{name}.json"


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    return str(o)


class Run:
    """Bookkeeping for one benchmark script: settings, machine info at start and end, wall time."""

    def __init__(self, name: str, args, settings: dict):
        self.name = name
        self.args = args
        self.scale = scale_of(args)
        self.settings = settings
        self.t0 = time.perf_counter()
        self.machine_start = machine_info()

    def finish(self, results: dict, markdown_body: str, command: str | None = None) -> dict:
        end = machine_info()
        wall = time.perf_counter() - self.t0
        command = command or f"python benchmarks/{self.name}.py" + (
            " --smoke" if self.scale == "smoke" else " --full" if self.scale == "full" else "")
        payload = {"benchmark": self.name, "scale": self.scale, "command": command, "settings": self.settings,
                   "machine": self.machine_start, "machine_end": {"loadavg_1_5_15": end["loadavg_1_5_15"]},
                   "load_note": load_note(self.machine_start, end), "wall_seconds": round(wall, 1),
                   "results": results}
        md = (f"# {self.name} ({self.scale})\n\n`{command}` — {wall:.0f} s wall.\n\n{machine_md(self.machine_start)}."
              f"\n\nLoad: {payload['load_note']}.\n\n{markdown_body}")
        write_result(self.args.out, self.name, payload, md)
        return payload


# ----- heads used across scripts (cached) -----------------------------------------------------------
HEADS_SCALE = {
    # corpus sizes and epochs per scale: (helpsteer rows, helpsteer max_length, self-generated stories,
    # new tokens per story, epochs)
    # smoke: just enough text for proj_dim 16 (fits refuse fewer than 10 (d + 1) training transitions)
    "smoke": {"helpsteer_limit": 12, "max_length": 64, "selfgen": 8, "selfgen_tokens": 48, "epochs": 1},
    "default": {"helpsteer_limit": None, "max_length": 256, "selfgen": 256, "selfgen_tokens": 192, "epochs": 40},
    "full": {"helpsteer_limit": None, "max_length": 256, "selfgen": 1024, "selfgen_tokens": 256, "epochs": 60},
}


def stories_corpus_ids(model, tok, corpus: str, scale: str, seed: int = 0):
    """Token ids and groups of a stories260K corpus: ``helpsteer`` responses, ``tinystories`` (the model's
    own stories sampled from BOS: the 5-story sample is far too small to fit on) or ``tinystories-prompted``
    (its stories continuing the fixed ``STORY_PROMPTS``; an ablation)."""
    s = HEADS_SCALE[scale]
    if corpus == "helpsteer":
        return helpsteer_ids(tok, s["max_length"], s["helpsteer_limit"])
    if corpus == "tinystories":
        return self_generated_ids(model, tok, s["selfgen"], s["selfgen_tokens"], seed=seed), None
    if corpus == "tinystories-prompted":
        return self_generated_ids(model, tok, s["selfgen"], s["selfgen_tokens"], seed=seed,
                                  prompts=STORY_PROMPTS), None
    raise ValueError(corpus)


def stories_trajectories(model, tok, corpus: str, layer: int, scale: str, seed: int = 0):
    """``extract_from_ids`` over a stories260K corpus (with HelpSteer prompt groups), cached as safetensors."""
    import hf_sde

    s = HEADS_SCALE[scale]
    version = 2 if corpus.startswith("tinystories") else 1
    path = CACHE / f"traj-{corpus}-L{layer}-{cache_key(**s, seed=seed, corpus=corpus, v=version)}.safetensors"
    if path.is_file():
        return hf_sde.Trajectories.load(str(path))
    ids, groups = stories_corpus_ids(model, tok, corpus, scale, seed)
    traj = hf_sde.extract_from_ids(model, ids, layer, batch_size=16, progress=False)
    if groups is not None:
        traj.meta["groups"] = [groups[i] for i in traj.meta["kept_indices"]]
    CACHE.mkdir(parents=True, exist_ok=True)
    traj.save(str(path))
    return traj


def stories_heads(model, tok, corpus: str = "helpsteer", layer: int = -1, scale: str = "default",
                  proj_dim: int = 16, seed: int = 0, epochs: int | None = None, stopping: str = "auto",
                  jitter: float = 0.0):
    """Heads for stories260K fitted with ``extract_from_ids`` + ``fit_heads`` (cached). Returns (heads, summary).

    ``stopping`` is ``fit_heads(early_stopping=...)``: ``"auto"`` (the library default), ``"sequences"``
    (watch held-back training sequences) or ``"transitions"`` (a random slice of training transitions).
    ``jitter > 0`` fits on dequantized states: every training state gets independent Gaussian noise of
    ``jitter`` times the per-dimension std of the states (held-out evaluation in eval_fit stays on the clean
    states). Self-generated stories repeat exact states (shared prefixes such as "Once upon a time,"), where
    the Gaussian likelihood is unbounded and the diffusion net shrinks sigma; the noise bounds it.
    """
    import hf_sde

    s = HEADS_SCALE[scale]
    epochs = s["epochs"] if epochs is None else epochs
    key = {"model": STORIES_GGUF, "corpus": corpus, "layer": layer, "proj_dim": proj_dim, "seed": seed,
           "epochs": epochs, **s, "v": 2 if corpus.startswith("tinystories") else 1, "stopping": stopping,
           "jitter": jitter}

    def build():
        import torch

        traj = stories_trajectories(model, tok, corpus, layer, scale, seed)
        if jitter > 0:
            sd = torch.cat(traj.states).float().std(0)
            g = torch.Generator().manual_seed(seed + 12345)
            traj = hf_sde.Trajectories([x + jitter * sd * torch.randn(x.shape, generator=g) for x in traj.states],
                                       traj.layer, traj.hidden_size, traj.num_layers, traj.model_id, traj.skipped,
                                       dict(traj.meta))
        t0 = time.perf_counter()
        res = hf_sde.fit_heads(traj, proj_dim=proj_dim, epochs=epochs, seed=seed, progress=False,
                               patience=max(10, epochs // 4), early_stopping=stopping,
                               base_model=STORIES_ID, base_model_revision=STORIES_REV, gguf_file=STORIES_GGUF,
                               data_description={"corpus": corpus, "scale": scale, "stopping": stopping,
                                                 "jitter": jitter})
        return res, {"fit_seconds": time.perf_counter() - t0, "num_sequences": len(traj),
                     "kept_indices": traj.meta["kept_indices"], "stopping": stopping, "jitter": jitter}

    name = f"stories-{corpus}-L{layer}-d{proj_dim}-{stopping}" + (f"-j{jitter}" if jitter else "")
    return cached_fit(name, key, build)


def gpt2_heads(model, size: str, layer: int = -1, n_seq: int = 16, length: int = 144, epochs: int = 3,
               proj_dim: int = 16, seed: int = 0):
    """Heads for the random GPT-2, fitted quickly on its own trajectories of random token ids (cached)."""
    import hf_sde

    key = {"model": f"gpt2-{size}", "layer": layer, "n": n_seq, "len": length, "epochs": epochs,
           "proj_dim": proj_dim, "seed": seed, "v": 1}

    def build():
        ids = random_ids(n_seq, length, model.config.vocab_size, seed + 1)
        traj = hf_sde.extract_from_ids(model, ids, layer, batch_size=8, progress=False)
        res = hf_sde.fit_heads(traj, proj_dim=proj_dim, epochs=epochs, seed=seed, progress=False)
        return res, {}

    return cached_fit(f"gpt2-{size}-L{layer}", key, build)


# ----- SmolLM2-135M-Instruct ------------------------------------------------------------------------------
_SMOLLM2: list = []


def load_smollm2():
    """SmolLM2-135M-Instruct and its tokenizer (loaded once per process)."""
    from hf_sde.data.loading import SMOLLM2

    if not _SMOLLM2:
        _SMOLLM2.append(SMOLLM2.load())
    return _SMOLLM2[0]


def default_heads():
    """The heads shipped with the package for SmolLM2."""
    from hf_sde.pretrained import DEFAULT_HEADS

    return DEFAULT_HEADS


def smollm2_response_trajectories(layers: list[int], max_response: int, limit: int | None = None) -> dict:
    """Response-path Trajectories of SmolLM2 on the HelpSteer sample (``template="helpsteer-chat"``) for several
    layers from one extraction (one forward per batch, one hook per layer), cached in ``benchmarks/.cache``."""
    import hf_sde

    key = cache_key(model="smollm2", max_response=max_response, limit=limit, v=2)
    paths = {layer: CACHE / f"smollm2-chat-{key}-L{layer}.safetensors" for layer in layers}
    missing = [layer for layer, p in paths.items() if not p.is_file()]
    if missing:
        model, tok = load_smollm2()
        trajs = hf_sde.extract_trajectories(model, tok, str(HELPSTEER), layer=missing, template="helpsteer-chat",
                                            max_length=max_response, limit=limit, progress=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        for layer, traj in zip(missing, trajs, strict=True):
            traj.save(str(paths[layer]))
    return {layer: hf_sde.Trajectories.load(str(p)) for layer, p in paths.items()}
