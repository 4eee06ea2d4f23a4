"""GPU check of SDE control: observe-mode parity with stock ``generate`` and the overhead of every mode, eager
and compiled, on random-weight models of real shapes (no downloads: the models are built from configs).

What it runs, in this order, within one time budget (``--budget-s``, default 420 s: the whole run stays under
8 minutes on one H100; what does not fit is recorded as skipped, with the reason):

1. Parity (a random Llama of SmolLM2-135M's shape, left-padded batch of 2): ``hf_sde.sde_generate`` with
   ``SDEControl(mode="observe")`` against stock ``generate`` with the same seed, for {float32, bfloat16} x
   {dynamic cache, static cache, static cache + ``compile_config``} x {greedy, sampling with top-k / top-p}:
   sequences, scores and raw logits bitwise equal (the max abs difference is reported where not), and a finite
   trace. The plain static cell passes ``disable_compile=True`` (on a GPU a static cache alone would make stock
   ``generate`` compile its forward); the compiled cell uses ``CompileConfig(fullgraph=True)`` (inductor,
   ``reduce-overhead``). Where a compiled cell differs, it says whether SDE control equals stock ``generate``
   run eagerly (i.e. the difference is compilation's numerics). Column "SDE compiled": ``no`` where SDE control
   warned that it runs generate's forward eagerly. Then temperature mode (beta=1.0) and steer mode
   (alpha=0.05) per dtype and cache: a finite trace of shape (batch, new_tokens), temperatures within
   [min_temperature, max_temperature], steering applied at every step.
2. Overhead: for each model shape (SmolLM2-135M, Llama-3.2-1B), batch 1 / 8 / 32, eager (dynamic cache) and
   compiled (static cache + compile_config), 64 new tokens (min_new_tokens = max_new_tokens), interleaved
   rounds of plain ``generate`` and SDE observe / temperature / steer: ratio to plain (median, IQR), ms per
   decoding step, warm-up seconds (the first call of each variant: compilation); and per model and batch the
   speed-up compilation gives (median eager call / median compiled call), for plain and for each SDE mode.
   Overhead runs in bfloat16 on a GPU (``--overhead-dtype``), float32 on CPU.

A failing cell does not stop the run (it is recorded with its reason); the exit status is 1 if any parity or
mode cell failed. Results: ``device_check.json`` and ``device_check.md`` in ``--out``, and one summary line on
stdout (``parity: N/M cells pass; overhead rows: K``).

On a GPU machine (from the repository root; no internet needed)::

    pip install --no-deps -e .          # or: export PYTHONPATH=.
    python benchmarks/device_check.py --out $OUT

On CPU (seconds; what tests/test_device_check.py runs)::

    python benchmarks/device_check.py --smoke

``--smoke``: tiny random Llamas (hidden 32-64, 2-3 layers, vocabulary 128), 4 new tokens, batch 1 and 2, eager
attention (with SDPA, dynamo's graph differs from eager by float rounding in float32 even with the eager backend,
so stock compiled and stock eager already differ); the compiled cells use ``CompileConfig(backend="eager")``
(dynamo tracing, eager kernels: bitwise eager, and seconds instead of inductor's ~10-30 s per graph on CPU) unless
``--inductor`` is passed. On CPU the compiled cells set ``compile_config._compile_all_devices = True`` (generate
compiles on CPU only when told to).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import sys
import time
import traceback
import warnings

import _common as C

NAME = "device_check"
MODES = {"observe": {"mode": "observe"}, "temperature": {"mode": "temperature", "beta": 1.0},
         "steer": {"mode": "steer", "alpha": 0.05}}
DECODING = {"greedy": {"do_sample": False}, "sample": {"do_sample": True, "top_k": 20, "top_p": 0.9}}
CACHES = ("dynamic", "static", "static+compiled")
DTYPES = ("float32", "bfloat16")

SHAPES = {
    # SmolLM2-135M and Llama-3.2-1B (rope scaling of the latter left out: irrelevant to what is measured here).
    "smollm2-135m-shape": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                               tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "llama-1b-shape": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                           tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0,
                           bos_token_id=128000, eos_token_id=128001, pad_token_id=0),
    "tiny-64x3": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "tiny-32x2": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0),
}

SETTINGS = {
    "full": {"parity_model": "smollm2-135m-shape", "overhead_models": ["smollm2-135m-shape", "llama-1b-shape"],
             "parity_prompt": 8, "parity_new_tokens": 16, "batches": [1, 8, 32], "prompt_tokens": 16,
             "new_tokens": 64, "reps": (3, 30), "cell_budget_s": 8.0, "compiled_warmup_calls": 3,
             # Share of the budget the parity section may use; first guesses of a cell's cost (seconds), replaced
             # by measured ones as the run goes.
             "parity_share": 0.45, "est_parity_s": 5.0, "est_compiled_parity_s": 60.0, "est_eager_cell_s": 20.0,
             "est_compiled_cell_s": 90.0},
    "smoke": {"parity_model": "tiny-64x3", "overhead_models": ["tiny-64x3", "tiny-32x2"],
              "parity_prompt": 6, "parity_new_tokens": 4, "batches": [1, 2], "prompt_tokens": 4,
              "new_tokens": 4, "reps": (2, 2), "cell_budget_s": 0.0, "compiled_warmup_calls": 1,
              "parity_share": 0.6, "est_parity_s": 0.5, "est_compiled_parity_s": 3.0, "est_eager_cell_s": 1.0,
              "est_compiled_cell_s": 3.0},
}


# ----- set-up ---------------------------------------------------------------------------------------
class Budget:
    """One deadline for the run; a section may have an earlier one of its own."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), float(seconds)

    def left(self, share: float = 1.0) -> float:
        return self.t0 + share * self.seconds - time.perf_counter()

    def fits(self, estimate: float, share: float = 1.0) -> str | None:
        """``None`` if ``estimate`` seconds fit before the (section's) deadline, else the reason to skip."""
        left = self.left(share)
        if estimate <= left:
            return None
        return f"time budget: needs ~{estimate:.1f} s, {max(left, 0):.1f} s left of {share * self.seconds:.0f} s"


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(shape: str, device, dtype, seed: int, attn: str):
    """A random-weight Llama of ``shape`` built on ``device`` in ``dtype`` (``torch.manual_seed(seed)``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = dict(SHAPES[shape])
    theta = spec.pop("rope_theta")
    cfg = LlamaConfig(**spec, rope_parameters={"rope_type": "default", "rope_theta": theta}, attn_implementation=attn)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = cfg.pad_token_id
    return model


def build_heads(shape: str, device, seed: int):
    """Random SDE heads for ``shape`` at 3/4 of the depth, parameters perturbed so the statistics vary."""
    import torch

    import hf_sde

    spec = SHAPES[shape]
    n = spec["num_hidden_layers"]
    cfg = hf_sde.SDEHeadsConfig(hidden_size=spec["hidden_size"], proj_dim=16, layer=(3 * n) // 4, num_layers=n,
                                horizon=256.0, width=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        heads = hf_sde.SDEHeads(cfg)
        with torch.no_grad():
            for p in heads.parameters():
                p.add_(0.1 * torch.randn_like(p))
    # The heads stay on the CPU, where SDEHeads.from_pretrained leaves them: SDE control builds its copy of the
    # step on the model's device (this is the path users run).
    return heads.eval()


def compile_config(args, device):
    from transformers import CompileConfig

    if device.type == "cpu" and not args.inductor:
        cc = CompileConfig(fullgraph=True, backend="eager", mode="default")  # the eager backend takes no mode
    else:
        cc = CompileConfig(fullgraph=True)
    if device.type == "cpu":
        cc._compile_all_devices = True  # generate compiles the forward on CPU only when told to
    return cc


def cache_kwargs(cache: str, cc) -> dict:
    if cache == "dynamic":
        return {}
    if cache == "static":
        # A static cache alone makes generate compile the forward on a GPU: this cell is the eager static cache.
        return {"cache_implementation": "static", "disable_compile": True}
    return {"cache_implementation": "static", "compile_config": cc}


def reset_compiled(model=None) -> None:
    """Forget compiled graphs (one model's compiled call too), so each compiled cell starts from its own shapes."""
    import torch

    torch._dynamo.reset()
    if model is not None:
        for attr in ("_compiled_call", "_last_compile_config"):
            if attr in model.__dict__:
                delattr(model, attr)


def free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def eager_warnings(out: list):
    """Record whether SDE control warned that it runs generate's forward eagerly (the warning is emitted once per
    process, so its once-key is forgotten first)."""
    import hf_sde.control

    warned = getattr(hf_sde.control, "_WARNED", None)
    if isinstance(warned, set):
        warned.discard("compile")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    out.append(any("eagerly" in str(w.message) for w in caught))


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:300]


# ----- parity ---------------------------------------------------------------------------------------
def max_abs_diff(a, b) -> float:
    import torch

    if a.shape != b.shape:
        return math.inf
    a, b = a.float(), b.float()
    d = torch.where(a == b, torch.zeros_like(a), (a - b).abs())  # equal infinities count as equal
    return float(torch.nan_to_num(d, nan=math.inf).max()) if d.numel() else 0.0


def compare(stock, ours) -> dict:
    """Bitwise comparison of two ``generate`` outputs (sequences, scores, logits) and the largest difference."""
    import torch

    out = {"sequences_equal": stock.sequences.shape == ours.sequences.shape
           and bool(torch.equal(stock.sequences, ours.sequences))}
    for name in ("scores", "logits"):
        a, b = getattr(stock, name), getattr(ours, name)
        same = len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=False))
        out[f"{name}_equal"] = bool(same)
        diff = math.inf if len(a) != len(b) else max([0.0] + [max_abs_diff(x, y) for x, y in zip(a, b, strict=True)])
        out[f"{name}_max_abs_diff"] = diff
    # The raw logits' difference (the scores' is huge wherever a filtered -inf / finfo.min meets a kept value).
    out["max_abs_diff"] = out["logits_max_abs_diff"]
    out["equal"] = out["sequences_equal"] and out["scores_equal"] and out["logits_equal"]
    return out


def trace_problem(trace, batch: int, steps: int) -> str | None:
    """Why an observe trace is wrong (shape, missing first step, non-finite valid entries), or ``None``."""
    import torch

    if trace is None:
        return "no sde_trace"
    if tuple(trace.zscore.shape) != (batch, steps):
        return f"trace shape {tuple(trace.zscore.shape)} != {(batch, steps)}"
    valid = trace.positions >= 0
    if not bool(valid[:, 0].all()):
        return "first step not recorded"
    for name in ("zscore", "diffusion", "temperature"):
        if not bool(torch.isfinite(getattr(trace, name)[valid]).all()):
            return f"trace.{name} not finite"
    return None


def parity_inputs(vocab: int, prompt: int, device, seed: int) -> dict:
    """A left-padded batch of 2: a full prompt and one with 3 pad tokens (pad id 0)."""
    import torch

    ids = torch.tensor(C.random_ids(2, prompt, vocab, seed + 11, low=3), device=device)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def _generate(model, seed: int, ctl=None, **kw):
    import torch

    import hf_sde

    torch.manual_seed(seed)  # (generate runs under no_grad itself)
    if ctl is None:
        return type(model).generate(model, **kw)
    return hf_sde.sde_generate(model, sde_control=ctl, **kw)


def parity_cell(model, heads, inputs, dtype: str, cache: str, decoding: str, cc, cfg, seed: int) -> dict:
    import hf_sde

    cell = {"check": "observe", "dtype": dtype, "cache": cache, "decoding": decoding, "sde_compiled": "-"}
    kw = dict(**inputs, max_new_tokens=cfg["parity_new_tokens"], return_dict_in_generate=True, output_scores=True,
              output_logits=True, **DECODING[decoding], **cache_kwargs(cache, cc))
    t0 = time.perf_counter()
    stock = _generate(model, seed, **kw)
    cell["stock_seconds"] = time.perf_counter() - t0
    eager: list[bool] = []
    t0 = time.perf_counter()
    with eager_warnings(eager):
        ours = _generate(model, seed, hf_sde.SDEControl(heads, mode="observe"), **kw)
    cell["sde_seconds"] = time.perf_counter() - t0
    if cache == "static+compiled":
        cell["sde_compiled"] = "no" if eager[0] else "yes"
    cmp = compare(stock, ours)
    cell.update(cmp)
    problems = []
    if not cmp["equal"]:
        what = [n for n in ("sequences", "scores", "logits") if not cmp[f"{n}_equal"]]
        problems.append(f"{'/'.join(what)} differ from stock (max abs diff {cmp['max_abs_diff']:.3g})")
        if cache == "static+compiled":  # is the difference compilation's numerics? compare with stock run eagerly
            ref = _generate(model, seed, **{**kw, "disable_compile": True})
            same = compare(ref, ours)
            cell["equals_stock_eager"] = same["equal"]
            cell["stock_compiled_vs_eager_max_abs_diff"] = compare(ref, stock)["max_abs_diff"]
            problems.append("equals stock generate run eagerly" if same["equal"] else
                            f"differs from stock eager too (max abs diff {same['max_abs_diff']:.3g})")
    bad = trace_problem(getattr(ours, "sde_trace", None), inputs["input_ids"].shape[0], len(stock.scores))
    if bad:
        problems.append(bad)
    cell["status"] = "fail" if problems else "pass"
    cell["reason"] = "; ".join(problems)
    return cell


def mode_cell(model, heads, inputs, dtype: str, cache: str, mode: str, cc, cfg, seed: int) -> dict:
    """Temperature / steer mode: a finite trace of the right shape, temperatures within bounds, steering applied."""
    import torch

    import hf_sde

    n = cfg["parity_new_tokens"]
    cell = {"check": mode, "dtype": dtype, "cache": cache, "decoding": "sample", "sde_compiled": "-"}
    ctl = hf_sde.SDEControl(heads, **MODES[mode])
    kw = dict(**inputs, max_new_tokens=n, min_new_tokens=n, return_dict_in_generate=True, **DECODING["sample"],
              **cache_kwargs(cache, cc))
    eager: list[bool] = []
    t0 = time.perf_counter()
    with eager_warnings(eager):
        out = _generate(model, seed, ctl, **kw)
    cell["sde_seconds"] = time.perf_counter() - t0
    if cache == "static+compiled":
        cell["sde_compiled"] = "no" if eager[0] else "yes"
    tr, batch = out.sde_trace, inputs["input_ids"].shape[0]
    problems = []
    if out.sequences.shape != (batch, inputs["input_ids"].shape[1] + n):
        problems.append(f"sequences shape {tuple(out.sequences.shape)}")
    for name in ("zscore", "diffusion", "temperature", "steer_norm"):
        x = getattr(tr, name)
        if tuple(x.shape) != (batch, n):
            problems.append(f"trace.{name} shape {tuple(x.shape)} != {(batch, n)}")
        elif not bool(torch.isfinite(x).all()):
            problems.append(f"trace.{name} not finite")
    if not problems:
        tau = tr.temperature
        lo, hi = float(tau.min()), float(tau.max())
        cell["temperature_range"] = [lo, hi]
        if lo < ctl.min_temperature or hi > ctl.max_temperature:
            problems.append(f"temperature {lo:.3g}..{hi:.3g} outside [{ctl.min_temperature}, {ctl.max_temperature}]")
        if mode == "steer":
            cell["steer_norm_range"] = [float(tr.steer_norm.min()), float(tr.steer_norm.max())]
            if not bool((tr.steer_norm > 0).all()):
                problems.append("steer_norm is 0 at some step (steering not applied)")
    cell["status"] = "fail" if problems else "pass"
    cell["reason"] = "; ".join(problems)
    return cell


def run_parity(args, cfg, device, budget: Budget) -> tuple[list[dict], float]:
    """The parity and mode cells, and the longest compiled block's seconds (a compiled overhead cell's first guess)."""
    import torch

    shape, share = cfg["parity_model"], cfg["parity_share"]
    cells: list[dict] = []
    heads = build_heads(shape, device, args.seed)
    cc = compile_config(args, device)
    inputs = parity_inputs(SHAPES[shape]["vocab_size"], cfg["parity_prompt"], device, args.seed)
    # Cheap cells first (every dtype), then the compiled ones (a compilation each), bfloat16 first.
    plan = [(d, c) for d in DTYPES for c in CACHES if c != "static+compiled"]
    plan += [(d, "static+compiled") for d in reversed(DTYPES)]
    est = {"eager": cfg["est_parity_s"], "compiled": cfg["est_compiled_parity_s"]}
    est_measured, block_est, blocks = False, est["compiled"], {}
    models: dict[str, object] = {}
    base = build_model(shape, device, torch.float32, args.seed, args.attn)
    for dtype, cache in plan:
        kind = "compiled" if cache == "static+compiled" else "eager"
        if dtype not in models:
            models[dtype] = base if dtype == "float32" else copy.deepcopy(base).to(getattr(torch, dtype))
        model = models[dtype]
        if kind == "compiled":
            reset_compiled(model)
        items = [("observe", d) for d in DECODING] + [(m, "sample") for m in ("temperature", "steer")]
        for check, decoding in items:
            label = {"check": check, "dtype": dtype, "cache": cache, "decoding": decoding, "sde_compiled": "-"}
            first = kind == "compiled" and check == "observe" and decoding == "greedy"
            skip = budget.fits(est["eager"] if kind == "eager" else est["compiled"] if first else block_est, share)
            if skip:
                cells.append({**label, "status": "skipped", "reason": skip})
                continue
            t0 = time.perf_counter()
            try:
                if check == "observe":
                    cell = parity_cell(model, heads, inputs, dtype, cache, decoding, cc, cfg, args.seed)
                else:
                    cell = mode_cell(model, heads, inputs, dtype, cache, check, cc, cfg, args.seed)
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                cell = {**label, "status": "fail", "reason": _short(e), "traceback": traceback.format_exc()[-3000:]}
            cell["cell_seconds"] = seconds = time.perf_counter() - t0
            cells.append(cell)
            if kind == "compiled":
                blocks[dtype] = blocks.get(dtype, 0.0) + seconds
            if kind == "eager":
                est["eager"] = max(est["eager"], 1.5 * seconds)
            elif first:  # the first compiled cell of a dtype pays the compilation: what the next dtype's will cost
                est["compiled"] = max(est["compiled"] if est_measured else 0.0, 1.2 * seconds)
                est_measured, block_est = True, est["compiled"]
            else:
                block_est = max(2.0 * seconds, block_est * 0.5)
            print(f"[parity] {check:11s} {dtype:8s} {cache:15s} {decoding:6s} {cell['status']:7s} "
                  f"{cell['cell_seconds']:.1f}s {cell.get('reason', '')}", file=sys.stderr, flush=True)
    del models, base
    reset_compiled()
    free(device)
    return cells, max(blocks.values(), default=0.0)


# ----- overhead -------------------------------------------------------------------------------------
def overhead_cell(model, heads, batch: int, compiled: bool, cc, cfg, device, seed: int) -> dict:
    import torch

    import hf_sde

    n, vocab = cfg["new_tokens"], model.config.vocab_size
    ids = torch.tensor(C.random_ids(batch, cfg["prompt_tokens"], vocab, seed + 7, low=3), device=device)
    ids[:, 0] = model.config.bos_token_id
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                  max_new_tokens=n, min_new_tokens=n, return_dict_in_generate=True,
                  **cache_kwargs("static+compiled" if compiled else "dynamic", cc))

    def caller(mode):
        def call():
            sync(device)
            out = _generate(model, seed, None if mode is None else hf_sde.SDEControl(heads, **MODES[mode]), **common)
            sync(device)
            if out.sequences.shape[1] != ids.shape[1] + n:
                raise RuntimeError(f"{mode or 'plain'}: {out.sequences.shape[1] - ids.shape[1]} new tokens, not {n}")
            return out
        return call

    fns = {"plain": caller(None), **{m: caller(m) for m in MODES}}
    warmup, sde_eager = {}, {}
    calls = cfg["compiled_warmup_calls"] if compiled else 1
    for name, fn in fns.items():  # compilation (and CUDA-graph recording) happens here
        eager: list[bool] = []
        t0 = time.perf_counter()
        with eager_warnings(eager):
            fn()
        warmup[name] = time.perf_counter() - t0
        for _ in range(calls - 1):
            fn()
        sde_eager[name] = eager[0]
    lo, hi = cfg["reps"]
    times, rounds = C.interleaved(fns, min_reps=lo, max_reps=hi, budget_s=cfg["cell_budget_s"], seed=seed,
                                  warmup=False)
    return {"batch": batch, "cache": "compiled" if compiled else "eager", "new_tokens": n, "rounds": rounds,
            "times": times, "ratios": C.paired_ratios(times, "plain"), "warmup_seconds": warmup,
            "sde_compiled": {m: ("no" if sde_eager[m] else "yes") if compiled else "-" for m in MODES}}


def run_overhead(args, cfg, device, budget: Budget, compiled_guess: float = 0.0) -> tuple[list[dict], list[dict]]:
    """Cells in priority order (every eager cell, then compiled ones: middle batch first), within the budget.

    A cell runs if its estimate fits: the longest measured cell of its kind (eager / compiled), at first the
    settings' guess (compiled: at least ``compiled_guess``, the parity section's longest compiled block, which
    compiles the same variants)."""
    import torch

    dtype = getattr(torch, args.overhead_dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    cc = compile_config(args, device)
    batches = cfg["batches"]
    order = sorted(batches, key=lambda b: (b != batches[len(batches) // 2], b))
    plan = [(m, b, False) for m in cfg["overhead_models"] for b in batches]
    plan += [(m, b, True) for b in order for m in cfg["overhead_models"]]
    est = {False: cfg["est_eager_cell_s"], True: max(cfg["est_compiled_cell_s"], compiled_guess)}
    measured: dict[bool, float] = {}
    cells, skipped = [], []
    loaded: tuple[str, object, object] | None = None
    for shape, batch, compiled in plan:
        label = {"model": shape, "batch": batch, "cache": "compiled" if compiled else "eager",
                 "dtype": str(dtype).removeprefix("torch.")}
        skip = budget.fits(est[compiled])
        if skip:
            skipped.append({**label, "reason": skip})
            continue
        if loaded is None or loaded[0] != shape:
            loaded = None
            reset_compiled()
            free(device)
            loaded = (shape, build_model(shape, device, dtype, args.seed, args.attn),
                      build_heads(shape, device, args.seed))
        _, model, heads = loaded
        if compiled:
            reset_compiled(model)
        t0 = time.perf_counter()
        try:
            cell = {**label, **overhead_cell(model, heads, batch, compiled, cc, cfg, device, args.seed)}
            cells.append(cell)
            status = "done"
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            skipped.append({**label, "reason": f"error: {_short(e)}", "traceback": traceback.format_exc()[-3000:]})
            status = f"error {_short(e)}"
        seconds = time.perf_counter() - t0
        measured[compiled] = est[compiled] = max(measured.get(compiled, 0.0), seconds)
        print(f"[overhead] {shape} b{batch} {label['cache']}: {status} ({seconds:.1f}s)", file=sys.stderr, flush=True)
    loaded = None
    reset_compiled()
    free(device)
    return cells, skipped


def overhead_rows(cells: list[dict]) -> list[list]:
    rows = []
    for c in sorted(cells, key=lambda c: (c["model"], c["cache"] == "compiled", c["batch"])):
        n = c["new_tokens"]
        plain_ms = c["ratios"]["plain"]["seconds"]["median"] / n * 1e3
        for m in MODES:
            r = c["ratios"][m]
            rows.append([c["model"], str(c["batch"]), c["cache"], c["dtype"], m, r["median"],
                         f"{r['q25']:.3f}–{r['q75']:.3f}", r["seconds"]["median"] / n * 1e3, plain_ms,
                         c["warmup_seconds"][m], c["warmup_seconds"]["plain"], c["sde_compiled"][m],
                         str(c["rounds"])])
    return rows


def speedup_rows(cells: list[dict]) -> list[list]:
    """Median eager call / median compiled call per model and batch, for plain generate and each SDE mode."""
    by = {(c["model"], c["batch"], c["cache"]): c for c in cells}
    rows = []
    for (model, batch, cache), c in by.items():
        e = by.get((model, batch, "eager"))
        if cache != "compiled" or e is None:
            continue
        med = {k: (e["ratios"][k]["seconds"]["median"], c["ratios"][k]["seconds"]["median"])
               for k in ("plain", *MODES)}
        rows.append([model, str(batch), *(a / b for a, b in med.values()),
                     ", ".join(f"{m} {c['sde_compiled'][m]}" for m in MODES)])
    return rows


# ----- report ---------------------------------------------------------------------------------------
def device_info(device) -> dict:
    import torch
    import transformers

    info = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda_available": torch.cuda.is_available()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    gpu_memory_gb=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
                    peak_memory_gb=round(torch.cuda.max_memory_allocated(device) / 2**30, 2))
    return info


def markdown(parity: list[dict], ocells: list[dict], oskipped: list[dict], info: dict, cfg: dict,
             budget_s: float) -> str:
    prow = [[c["check"], c["dtype"], c["cache"], c["decoding"], c["status"], c.get("sde_compiled", "-"),
             "-" if c.get("max_abs_diff") is None else f"{c['max_abs_diff']:.3g}", c.get("reason", "") or ""]
            for c in parity]
    gpu = info.get("gpu", "none")
    text = (f"Device: {info['device']} (GPU: {gpu}), torch {info['torch']}, transformers {info['transformers']}; "
            f"time budget {budget_s:.0f} s.\n\n## Parity\n\n"
            f"Model: random `{cfg['parity_model']}`, left-padded batch of 2, {cfg['parity_new_tokens']} new tokens. "
            "`observe`: SDE control in observe mode against stock `generate` with the same seed (sequences, scores "
            "and logits bitwise; finite trace). `temperature` / `steer`: finite trace of shape (batch, new tokens), "
            "temperatures within [min, max], steering at every step. `static`: static cache with "
            "`disable_compile=True`; `static+compiled`: static cache + `compile_config`. `SDE compiled`: no where "
            "SDE control warned that it runs generate's forward eagerly.\n\n"
            + C.md_table(["check", "dtype", "cache", "decoding", "status", "SDE compiled", "max abs diff", "reason"],
                         prow))
    text += ("\n\n## Overhead\n\n"
             f"{cfg['new_tokens']} new tokens after {cfg['prompt_tokens']} prompt tokens (min_new_tokens = "
             "max_new_tokens), sampling (top_k=0); ratio = t(mode) / t(plain) per interleaved round (median, IQR); "
             "ms/step: median call / new tokens (whole batch); warm-up s: the first call (compilation, in compiled "
             "cells).\n\n"
             + C.md_table(["model", "batch", "cache", "dtype", "mode", "ratio (median)", "IQR", "ms/step",
                           "plain ms/step", "warm-up s", "plain warm-up s", "SDE compiled", "rounds"],
                          overhead_rows(ocells)))
    text += ("\n\n## Compilation speed-up\n\nMedian eager call (dynamic cache) / median compiled call (static cache "
             "+ compile_config), per model and batch (same run, separate cells).\n\n"
             + C.md_table(["model", "batch", "plain", *MODES, "SDE compiled"], speedup_rows(ocells)))
    if oskipped:
        text += "\n\n## Skipped overhead cells\n\n" + C.md_table(
            ["model", "batch", "cache", "reason"], [[s["model"], str(s["batch"]), s["cache"], s["reason"]]
                                                   for s in oskipped])
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models, a few tokens (seconds on CPU; the test-suite)")
    p.add_argument("--out", default=str(C.RESULTS), help="folder for device_check.json / .md (on a GPU box: $OUT)")
    p.add_argument("--budget-s", type=float, default=420.0, help="time budget shared by all sections (seconds)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--inductor", action="store_true",
                   help="on CPU, compile with inductor (default there: backend='eager', seconds instead of minutes)")
    p.add_argument("--attn", default=None, choices=["sdpa", "eager"],
                   help="attention implementation (default: sdpa; eager with --smoke)")
    p.add_argument("--overhead-dtype", default=None, choices=list(DTYPES),
                   help="dtype of the overhead rows (default: bfloat16 on a GPU, float32 on CPU)")
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU, torch's on GPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.full = False
    budget = Budget(args.budget_s)

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    C.setup_env(args.threads or (1 if device.type == "cpu" else None))
    args.attn = args.attn or ("eager" if args.smoke else "sdpa")
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):  # every cell compiles its own shapes: no silent eager fallback
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    scale = "smoke" if args.smoke else "full"
    cfg = SETTINGS[scale]
    run = C.Run(NAME, args, {**cfg, "budget_s": args.budget_s, "attn": args.attn, "inductor": args.inductor,
                             "modes": MODES, "decoding": DECODING})
    parity, compiled_guess = ([], 0.0) if args.skip_parity else run_parity(args, cfg, device, budget)
    ocells, oskipped = ([], []) if args.skip_overhead else run_overhead(args, cfg, device, budget, compiled_guess)
    info = device_info(device)
    run.machine_start.update({k: v for k, v in info.items() if k not in run.machine_start})
    rows = overhead_rows(ocells)
    passed = sum(c["status"] == "pass" for c in parity)
    failed = [c for c in parity if c["status"] == "fail"]
    skipped = sum(c["status"] == "skipped" for c in parity)
    summary = (f"parity: {passed}/{len(parity)} cells pass"
               + (f" ({skipped} skipped, {len(failed)} failed)" if skipped or failed else "")
               + f"; overhead rows: {len(rows)}")
    results = {"device": info, "summary": summary, "parity": parity,
               "overhead": ocells,
               "overhead_skipped": oskipped, "elapsed_seconds": budget.seconds - budget.left()}
    body = markdown(parity, ocells, oskipped, info, cfg, args.budget_s) + f"\n\n{summary}\n"
    run.finish(results, body, command=f"python benchmarks/{NAME}.py" + (" --smoke" if args.smoke else ""))
    print(summary, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
