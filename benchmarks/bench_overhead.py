"""Generation overhead of ``sde_control`` (observe / temperature / steer) against plain ``generate``.

Every round times plain generation and each SDE mode once, in a shuffled order (interleaved A/B), all with
the same fixed-seed sampling and ``min_new_tokens == max_new_tokens`` so every call produces the same number
of tokens. The figure is the per-round ratio ``t_mode / t_plain`` (median and quartiles over rounds), on
SmolLM2-135M (batch 1 and 8; the model users meet by default) and stories260K (batch 1: a ~6 ms step, the
hardest case). A separate instrumented call per mode measures the time spent inside the SDE callbacks
(``_Runtime.on_forward_pre`` / ``on_read`` / ``on_steer`` / ``on_logits``, plus ``trace`` at the end of the call,
where observe mode evaluates the heads once over all steps): "hook us/step", the headline
figure (target <= 150 us at batch 8 with SmolLM2's sizes: hidden 576, projection 16, 2x128 MLPs). Beside it,
the step itself (``on_read``: projection, the nets the control reads, statistics, temperature or steering) inside
``generate`` and hot: called back to back on one hidden state, with nothing between calls to evict the heads'
weights or torch's dispatcher from the cache. The difference is what the model's forward costs the step.

The in-place floor: the same ``generate`` call without SDE control, with a plain forward hook at the heads'
layer that runs the reference computation on the newest position (one projection, the drift and
diffusion MLPs, softplus and the temperature law: plain functional torch on fresh tensors, no SDE machinery;
"ref step us"), or a single elementwise op (``hidden[:, -1] - mean``: "1-op us"), timed per call like "step
us". Called back to back, the reference step is the ~80 us floor ("ref hot us"); inside ``generate`` it
pays the same cold cache as the SDE step, which is what a step can be compared with there.

The SmolLM2 heads are throwaway heads fitted here on a few texts (their size is what matters, not their fit).

    python benchmarks/bench_overhead.py --smoke    # seconds on stories260K + a minute for SmolLM2's load
    python benchmarks/bench_overhead.py            # default: 64 new tokens, >= 5 rounds
    python benchmarks/bench_overhead.py --full     # 128 new tokens, >= 10 rounds
"""

from __future__ import annotations

import argparse
import functools
import time

import _common as C

SETTINGS = {
    # cells: (model, batch); reps: (min rounds, max rounds, budget seconds per cell)
    # smoke (the test-suite): a random model of SmolLM2's sizes stands in for SmolLM2 (no 30-50 s load).
    "smoke": {"cells": [("stories260K", 1), ("smollm2-sized", 8)], "new_tokens": 4, "prompt_tokens": 4,
              "reps": (1, 1, 0), "hook_tokens": 4, "hot_calls": 20,
              "floor_cells": [("stories260K", 1)], "floor_rounds": 1,
              "split_cells": [("stories260K", 1)], "split_tokens": (2, 4), "split_rounds": 1,
              "compiled_cells": [("stories260K", 1)], "compiled_reps": (1, 1, 0), "compiled_backend": "eager"},
    "default": {"cells": [("stories260K", 1), ("SmolLM2", 1), ("SmolLM2", 8)], "new_tokens": 64,
                "prompt_tokens": 16, "reps": (5, 12, 240), "hook_tokens": 32, "hot_calls": 2000,
                "floor_cells": [("stories260K", 1), ("SmolLM2", 8)], "floor_rounds": 5,
                "split_cells": [("stories260K", 1)], "split_tokens": (4, 64), "split_rounds": 15,
                "compiled_cells": [("SmolLM2", 1), ("SmolLM2", 8)], "compiled_reps": (5, 10, 240),
                "compiled_backend": "inductor"},
    "full": {"cells": [("stories260K", 1), ("SmolLM2", 1), ("SmolLM2", 8)], "new_tokens": 128,
             "prompt_tokens": 16, "reps": (10, 30, 600), "hook_tokens": 64, "hot_calls": 5000,
             "floor_cells": [("stories260K", 1), ("SmolLM2", 8)], "floor_rounds": 10,
             "split_cells": [("stories260K", 1)], "split_tokens": (4, 128), "split_rounds": 30,
             "compiled_cells": [("SmolLM2", 1), ("SmolLM2", 8)], "compiled_reps": (10, 20, 600),
             "compiled_backend": "inductor"},
}
MODES = {"observe": {"mode": "observe"}, "temperature": {"mode": "temperature", "beta": 1.0},
         "steer": {"mode": "steer", "alpha": 0.05}}
# Targets: ratio to plain generate per (model, mode); hook time per step at SmolLM2 batch 8.
TARGETS = {"SmolLM2": {"observe": 1.01, "temperature": 1.01, "steer": 1.02},
           "smollm2-sized": {"observe": 1.01, "temperature": 1.01, "steer": 1.02},
           "stories260K": {"observe": 1.05, "temperature": 1.05, "steer": 1.05}}
HOOK_TARGET_US = 150.0
# Compiled generation (static cache + compile_config): SDE compiled / stock compiled.
COMPILED_TARGETS = {"observe": 1.02, "temperature": 1.03, "steer": 1.03}


def _smollm2_heads(model, tok, scale: str):
    """Heads of SmolLM2's real sizes (projection 16, 2x128) fitted for one epoch on a few TinyStories texts."""
    import hf_sde

    texts = C.tinystories_texts()[: 3 if scale == "smoke" else 5]
    traj = hf_sde.extract_trajectories(model, tok, texts, layer=-1, max_length=64 if scale == "smoke" else 128,
                                       progress=False)
    return hf_sde.fit_heads(traj, proj_dim=16, width=128, depth=2, epochs=1, progress=False).heads


def _smollm2_sized():
    """A random 2-layer Llama with SmolLM2's width and vocabulary, and random heads of SmolLM2's sizes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_sde import SDEHeads, SDEHeadsConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    heads = SDEHeads(SDEHeadsConfig(hidden_size=576, proj_dim=16, layer=1, num_layers=2, horizon=256.0))
    with torch.no_grad():
        heads.proj_basis.copy_(torch.linalg.qr(torch.randn(576, 16))[0])
        for p in heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, heads


def prepare(name: str, scale: str):
    """(model, heads, vocab) for one model, loaded once per process."""
    if name == "smollm2-sized":
        model, heads = _smollm2_sized()
    elif name == "stories260K":
        model, tok = C.load_stories()
        heads, _ = C.stories_heads(model, tok, "helpsteer", -1, "smoke" if scale == "smoke" else "default")
    else:
        from hf_sde.data.loading import SMOLLM2

        model, tok = SMOLLM2.load()
        model.eval()
        heads = _smollm2_heads(model, tok, scale)
    return model, heads, model.config.vocab_size


class HookTimer:
    """Accumulates wall time spent inside the SDE runtime's callbacks (monkeypatched for one call)."""

    # trace: the end-of-call work (observe mode runs the heads there, once over all steps), so it counts too.
    METHODS = ("on_forward_pre", "on_read", "on_steer", "on_head_input", "on_logits", "trace")

    def __init__(self):
        from hf_sde.control.step import _Runtime

        self.cls = _Runtime
        self.seconds = dict.fromkeys(self.METHODS, 0.0)
        self.calls = dict.fromkeys(self.METHODS, 0)
        self.saved = {}

    def __enter__(self):
        for m in self.METHODS:
            orig = getattr(self.cls, m)
            self.saved[m] = orig

            def wrapped(*a, _orig=orig, _m=m, **k):
                t0 = time.perf_counter()
                try:
                    return _orig(*a, **k)
                finally:
                    self.seconds[_m] += time.perf_counter() - t0
                    self.calls[_m] += 1

            setattr(self.cls, m, wrapped)
        return self

    def __exit__(self, *exc):
        for m, orig in self.saved.items():
            setattr(self.cls, m, orig)


def _caller(model, heads, ids, n: int, seed: int):
    import torch

    import hf_sde

    hf_sde.enable_sde_control(model)
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                  return_dict_in_generate=True, pad_token_id=model.config.eos_token_id)

    def call(ctl_kwargs, tokens=n):
        torch.manual_seed(seed)
        kw = {**common, "max_new_tokens": tokens, "min_new_tokens": tokens}
        if ctl_kwargs is not None:
            kw["sde_control"] = hf_sde.SDEControl(heads, **ctl_kwargs)
        with torch.inference_mode():
            out = model.generate(**kw)
        assert out.sequences.shape[1] == ids.shape[1] + tokens, out.sequences.shape
        return out

    return call


def hook_time(call, n_hook: int) -> dict:
    """Time inside the SDE callbacks per decoding step, one instrumented call per mode."""
    hook = {}
    for m, kw in MODES.items():
        with HookTimer() as ht:
            t0 = time.perf_counter()
            call(kw, n_hook)
            total = time.perf_counter() - t0
        inside = sum(ht.seconds.values())
        hook[m] = {"tokens": n_hook, "call_seconds": total, "hook_seconds": inside, "hook_share": inside / total,
                   "per_step_us": inside / n_hook * 1e6, "breakdown_seconds": ht.seconds, "calls": ht.calls}
    return hook


def hot_step(model, heads, batch: int, calls: int) -> dict:
    """``on_read`` per call (us) when called back to back on one hidden state, per mode: the step hot."""
    import torch

    import hf_sde
    from hf_sde.control import sde_hooks

    hidden = torch.randn(batch, 1, model.config.hidden_size)
    out = {}
    for m, kw in MODES.items():
        with torch.inference_mode(), sde_hooks(model, hf_sde.SDEControl(heads, **kw), prompt_width=16,
                                               max_new_tokens=64) as rt:
            rt.prefilled, rt.positions = True, torch.full((batch,), 20)  # as after a 16-token prompt's prefill
            for _ in range(10):
                rt.on_read(hidden)
            t0 = time.perf_counter()
            for _ in range(calls):
                rt.step = 5  # the same record slot every call: no buffer growth
                rt.on_read(hidden)
            out[m] = (time.perf_counter() - t0) / calls * 1e6
    return out


def reference_step(heads):
    """The reference (floor) computation, ``h (batch, D) -> (drift (batch, d), temperature (batch,))``, as plain
    functional torch.

    The projection, both MLPs (drift with its linear part, diffusion with softplus), the diffusion magnitude and
    the exponential temperature law; every result a fresh tensor. ``time_row``: the time features of one
    position, ``(1, F)``, broadcast over the batch."""
    import torch
    from torch.nn import functional as F

    with torch.no_grad():
        cfg = heads.config
        mean, basis = heads.proj_mean.float(), (heads.proj_basis / heads.proj_scale).float()
        nets = [[(m.weight.T.contiguous(), m.bias.detach()) for m in net.modules() if isinstance(m, torch.nn.Linear)]
                for net in (heads.drift_net, heads.diffusion_net)]
        lin_w, lin_b = heads.drift_linear.weight.T.contiguous(), heads.drift_linear.bias.detach()
        scale = 1.0 / (cfg.proj_dim * cfg.dt) ** 0.5
        z_mean, z_std = float(cfg.log_diffusion_mean), float(cfg.log_diffusion_std)

    def mlp(layers, x):
        for w, b in layers[:-1]:
            x = F.silu(torch.addmm(b, x, w))
        return torch.addmm(layers[-1][1], x, layers[-1][0])

    def step(h, time_row):
        z = (h - mean) @ basis
        x = torch.cat([z, time_row.expand(z.shape[0], -1)], 1)
        drift = mlp(nets[0], x) + torch.addmm(lin_b, z, lin_w)
        sigma = F.softplus(mlp(nets[1], x)) + cfg.sigma_floor
        zscore = (torch.log(torch.linalg.vector_norm(sigma, dim=-1) * scale) - z_mean) / z_std
        return drift, torch.exp(-1.0 * zscore).clamp(0.05, 5.0)

    return step, mean


def _in_situ_us(call, model, layer: int, fn, n_hook: int) -> float:
    """us per call of ``fn(h)`` (``h``: the newest position's hidden state as float32, the slice included) in a
    hook at ``layer`` inside one plain ``generate`` call (no SDE control)."""
    from hf_sde.data.layers import register_block_hook

    spent = []

    def hook(hidden):
        t0 = time.perf_counter()
        fn(hidden[:, -1].float())
        spent.append(time.perf_counter() - t0)

    handle = register_block_hook(model, layer, hook)
    try:
        call(None, n_hook)
    finally:
        handle.remove()
    return sum(spent) / len(spent) * 1e6


def _hot_us(fn, h, calls: int) -> float:
    import torch

    with torch.inference_mode():
        for _ in range(10):
            fn(h)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(h)
    return (time.perf_counter() - t0) / calls * 1e6


def reference_in_situ(call, model, heads, n_hook: int, batch: int, hot_calls: int) -> dict:
    """us per call of the reference step and of one elementwise op, in a hook at the heads' layer inside plain
    ``generate`` (no SDE control), and of the reference step called back to back (hot)."""
    import torch

    step, mean = reference_step(heads)
    time_row = heads.time_features(heads.times(torch.tensor([20])))
    layer = heads.config.layer
    out = {"ref_step_us": _in_situ_us(call, model, layer, lambda h: step(h, time_row), n_hook),
           "one_op_us": _in_situ_us(call, model, layer, lambda h: h - mean, n_hook)}
    out["ref_hot_us"] = _hot_us(lambda h: step(h, time_row), torch.randn(batch, model.config.hidden_size), hot_calls)
    return out


def compiled_floors(call, model, heads, n_hook: int, batch: int, hot_calls: int, rounds: int, seed: int) -> dict:
    """The reference step compiled, in place and hot: is the in-place floor the Python / dispatcher work that
    compilation removes, or the cold cache that no implementation avoids?

    Implementations: ``eager`` (:func:`reference_step`), ``torch.compile`` (inductor, fullgraph), and
    AOTInductor (``torch.export`` + ``torch._inductor.aoti_compile_and_package``: the step as one compiled C++
    library; called through the loaded package, and through its loader's ``run``, which skips the pytree
    wrapping). In-place figures: median over ``rounds`` interleaved rounds of one ``generate`` call each, after
    an untimed call of each (torch.compile recompiles for the hidden state's strides there). An
    implementation that cannot be built here (no C++ compiler) is reported with the error instead."""
    import random
    import tempfile

    import torch

    step, _ = reference_step(heads)
    time_row = heads.time_features(heads.times(torch.tensor([20]))).detach().float()
    h = torch.randn(batch, model.config.hidden_size)
    impls, built = {"eager": lambda x: step(x, time_row)}, {"eager": 0.0}
    errors = {}
    try:
        t0 = time.perf_counter()
        compiled = torch.compile(step, fullgraph=True, dynamic=False)
        with torch.inference_mode():
            compiled(h, time_row)
        impls["torch.compile"], built["torch.compile"] = (lambda x: compiled(x, time_row)), time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - reported in the table
        errors["torch.compile"] = f"{type(e).__name__}: {e}"[:200]
    try:
        import torch._inductor

        class Step(torch.nn.Module):
            def forward(self, x, t):
                return step(x, t)

        t0 = time.perf_counter()
        program = torch.export.export(Step(), (h, time_row))
        with tempfile.TemporaryDirectory() as tmp:  # the loaded library stays mapped after the file goes
            package = torch._inductor.aoti_compile_and_package(program, package_path=f"{tmp}/step.pt2")
            runner = torch._inductor.aoti_load_package(package)
        seconds = time.perf_counter() - t0
        # The library assumes the exported strides: the prefill's newest-position rows are strided, so copy
        # them (a no-op for the decoding steps' contiguous rows).
        impls["AOTInductor"], built["AOTInductor"] = (lambda x: runner(x.contiguous(), time_row)), seconds
        loader = getattr(runner, "loader", None)
        if loader is not None:
            impls["AOTInductor loader.run"], built["AOTInductor loader.run"] = (
                lambda x: loader.run([x.contiguous(), time_row])), seconds
    except Exception as e:  # noqa: BLE001 - reported in the table
        errors["AOTInductor"] = f"{type(e).__name__}: {e}"[:200]
    with torch.inference_mode():
        want = step(h, time_row)
        max_diff = {name: max(float((a - b).abs().max()) for a, b in zip(fn(h), want, strict=True))
                    for name, fn in impls.items()}
    rng = random.Random(seed)
    in_place = {name: [] for name in impls}
    layer = heads.config.layer
    for fn in impls.values():  # untimed: torch.compile recompiles for generate's strides and inference mode
        _in_situ_us(call, model, layer, fn, 2)
    for _ in range(rounds):
        order = list(impls)
        rng.shuffle(order)
        for name in order:
            in_place[name].append(_in_situ_us(call, model, layer, impls[name], n_hook))
    out = {name: {"in_place_us": C.summarize(in_place[name])["median"], "in_place_rounds_us": in_place[name],
                  "hot_us": _hot_us(fn, h, hot_calls), "build_seconds": built[name], "max_abs_diff": max_diff[name]}
           for name, fn in impls.items()}
    return {"impls": out, "errors": errors}


def overhead_split(call, hook: dict, tokens: tuple[int, int], rounds: int, seed: int) -> dict:
    """Each mode's overhead over plain ``generate`` split into a cost per call and a cost per step.

    Every variant runs at ``tokens = (short, long)`` new tokens in interleaved rounds; per round the overhead
    ``t(mode) - t(plain)`` at both lengths gives the per-step cost (the slope) and the per-call cost (the
    intercept); medians over rounds. The callbacks' share of a step comes from the instrumented call
    (``hook``: :func:`hook_time`, without ``trace``, which runs once per call); the rest of the per-step cost
    is spent outside them (module-hook dispatch, an added logits processor)."""
    short, long = tokens
    fns = {f"{m}@{n}": functools.partial(call, kw, n) for n in tokens for m, kw in (("plain", None), *MODES.items())}
    times, done = C.interleaved(fns, min_reps=rounds, max_reps=rounds, budget_s=0, seed=seed, warmup=True)
    out = {}
    plain_step = [(a - b) / (long - short) for a, b in zip(times[f"plain@{long}"], times[f"plain@{short}"],
                                                             strict=True)]
    for m in MODES:
        ovh = {n: [a - b for a, b in zip(times[f"{m}@{n}"], times[f"plain@{n}"], strict=True)] for n in tokens}
        step = [(a - b) / (long - short) for a, b in zip(ovh[long], ovh[short], strict=True)]
        per_call = [o - short * st for o, st in zip(ovh[short], step, strict=True)]
        ht = hook[m]
        callbacks = sum(v for k, v in ht["breakdown_seconds"].items() if k != "trace") / ht["tokens"]
        per_step = C.summarize(step)["median"]
        out[m] = {"per_call_ms": C.summarize(per_call)["median"] * 1e3, "per_step_us": per_step * 1e6,
                  "callbacks_per_step_us": callbacks * 1e6, "outside_per_step_us": (per_step - callbacks) * 1e6,
                  "plain_step_us": C.summarize(plain_step)["median"] * 1e6, "rounds": done, "tokens": tokens,
                  "per_round_step_us": [x * 1e6 for x in step], "per_round_call_ms": [x * 1e3 for x in per_call]}
    return out


def bench_cell(model, heads, vocab, batch, cfg, seed, floors: bool = False, split: bool = False):
    import torch

    n = cfg["new_tokens"]
    ids = torch.tensor(C.random_ids(batch, cfg["prompt_tokens"], vocab, seed + 7, low=3))
    ids[:, 0] = model.config.bos_token_id if model.config.bos_token_id is not None else ids[:, 0]
    call = _caller(model, heads, ids, n, seed)
    fns = {"plain": functools.partial(call, None)}
    for m, kw in MODES.items():
        fns[m] = functools.partial(call, kw)
    for f in fns.values():  # a short call of each variant: kernels, allocator, lazy imports
        f(tokens=4)
    reps = cfg["reps"]
    cpu: dict[str, list[float]] = {}
    times, rounds = C.interleaved(fns, min_reps=reps[0], max_reps=reps[1], budget_s=reps[2], seed=seed, warmup=False,
                                  cpu_times=cpu)
    r = {"rounds": rounds, "times": times, "ratios": C.paired_ratios(times, "plain"),
            "cpu_times": cpu, "cpu_ratios": C.paired_ratios(cpu, "plain"),
            "hook_time": hook_time(call, min(n, cfg["hook_tokens"])),
            "step_hot_us": hot_step(model, heads, batch, cfg["hot_calls"]),
            "reference": reference_in_situ(call, model, heads, min(n, cfg["hook_tokens"]), batch, cfg["hot_calls"]),
            "compiled_floors": compiled_floors(call, model, heads, min(n, cfg["hook_tokens"]), batch, cfg["hot_calls"],
                                               cfg["floor_rounds"], seed) if floors else None,
            "plain_tokens_per_s": batch * n / C.summarize(times["plain"])["median"]}
    if split:
        r["split"] = overhead_split(call, r["hook_time"], cfg["split_tokens"], cfg["split_rounds"], seed)
    return r


def compiled_cell(model, heads, vocab, batch, cfg, seed, backend: str) -> dict:
    """Compiled generation: stock and SDE calls with a static cache and ``compile_config`` (the SDE step inside
    the compiled graph), beside the same SDE calls with the forward run eagerly (``disable_compile=True``, what
    SDE control did before its step could be compiled), in interleaved rounds. The first call of each variant
    compiles (its seconds are reported); ratios are per round against stock compiled."""
    import torch
    from transformers import CompileConfig

    import hf_sde

    n = cfg["new_tokens"]
    ids = torch.tensor(C.random_ids(batch, cfg["prompt_tokens"], vocab, seed + 7, low=3))
    cc = CompileConfig(backend=backend, fullgraph=True, dynamic=False, mode=None)
    cc._compile_all_devices = True  # generate compiles on CPU only when told to
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                  max_new_tokens=n, min_new_tokens=n, pad_token_id=model.config.eos_token_id,
                  cache_implementation="static")

    def call(ctl_kwargs, compiled: bool):
        torch.manual_seed(seed)
        kw = {**common, **({"compile_config": cc} if compiled else {"disable_compile": True})}
        with torch.inference_mode():
            if ctl_kwargs is None:
                return model.generate(**kw)
            return hf_sde.sde_generate(model, sde_control=hf_sde.SDEControl(heads, **ctl_kwargs), **kw)

    fns = {"plain compiled": functools.partial(call, None, True)}
    for m, kw in MODES.items():
        fns[f"{m} compiled"] = functools.partial(call, kw, True)
        fns[f"{m} eager"] = functools.partial(call, kw, False)
    warmup = {}
    for name, f in fns.items():  # compilation, kernels, allocator
        t0 = time.perf_counter()
        f()
        warmup[name] = time.perf_counter() - t0
    reps = cfg["compiled_reps"]
    times, rounds = C.interleaved(fns, min_reps=reps[0], max_reps=reps[1], budget_s=reps[2], seed=seed,
                                  warmup=False)
    ratios = C.paired_ratios(times, "plain compiled")
    vs_eager = {m: C.paired_ratios({"c": times[f"{m} compiled"], "e": times[f"{m} eager"]}, "e")["c"]
                for m in MODES}
    return {"rounds": rounds, "times": times, "ratios": ratios, "compiled_vs_eager": vs_eager,
            "warmup_seconds": warmup, "backend": backend,
            "plain_step_ms": C.summarize(times["plain compiled"])["median"] / n * 1e3}


def _compiled_rows(name: str, batch: int, r: dict) -> list[list]:
    rows = []
    for m in MODES:
        q, e = r["ratios"][f"{m} compiled"], r["compiled_vs_eager"][m]
        target = COMPILED_TARGETS[m]
        rows.append([name, str(batch), m, q["median"], f"{q['q25']:.3f}–{q['q75']:.3f}", e["median"],
                     f"{e['q25']:.3f}–{e['q75']:.3f}", r["plain_step_ms"], r["warmup_seconds"][f"{m} compiled"],
                     str(r["rounds"]), f"{'yes' if q['median'] <= target else 'no'} (<= {target:.2f}); "
                     f"faster than eager: {'yes' if e['median'] < 1 else 'no'}"])
    return rows


def _rows(name: str, batch: int, r: dict) -> list[list]:
    rows = []
    for m in MODES:
        q, c = r["ratios"][m], r["cpu_ratios"][m]
        target = TARGETS[name][m]
        ht = r["hook_time"][m]
        us = ht["per_step_us"]
        hook_ok = "" if not (name.lower().startswith("smollm2") and batch == 8) else f"; hook {'yes' if us <= HOOK_TARGET_US else 'no'}"
        met = f"wall {'yes' if q['median'] <= target else 'no'}, CPU {'yes' if c['median'] <= target else 'no'}"
        rows.append([name, str(batch), m, q["median"], f"{q['q25']:.3f}–{q['q75']:.3f}", c["median"],
                     f"{c['q25']:.3f}–{c['q75']:.3f}", ht["hook_share"] * 100, us,
                     ht["breakdown_seconds"]["on_read"] / ht["tokens"] * 1e6, r["step_hot_us"][m],
                     r["reference"]["ref_step_us"], r["reference"]["one_op_us"], r["reference"]["ref_hot_us"],
                     f"{r['ratios']['plain']['seconds']['median']:.2f}", str(r["rounds"]),
                     f"{met} (<= {target:.2f}){hook_ok}"])
    return rows


def _split_rows(name: str, batch: int, r: dict) -> list[list]:
    if "split" not in r:
        return []
    rows = []
    for m, e in r["split"].items():
        budget = (TARGETS[name][m] - 1) * e["plain_step_us"]
        rows.append([name, str(batch), m, e["per_call_ms"], e["per_step_us"], e["callbacks_per_step_us"],
                     e["outside_per_step_us"], e["plain_step_us"], budget, str(e["rounds"])])
    return rows


def _floor_rows(name: str, batch: int, r: dict) -> list[list]:
    floors = r.get("compiled_floors")
    if not floors:
        return []
    rows = [[name, str(batch), impl, e["in_place_us"], e["hot_us"], e["in_place_us"] / e["hot_us"], e["build_seconds"],
             f"{e['max_abs_diff']:.1e}", str(len(e["in_place_rounds_us"]))] for impl, e in floors["impls"].items()]
    rows += [[name, str(batch), impl, f"not built: {err}", "-", "-", "-", "-", "0"]
             for impl, err in floors["errors"].items()]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    args = p.parse_args(argv)
    C.setup_env(args.threads)
    scale = C.scale_of(args)
    cfg = SETTINGS[scale]
    run = C.Run("bench_overhead", args, {**cfg, "modes": MODES, "targets": TARGETS, "hook_target_us": HOOK_TARGET_US})
    results, rows, floor_rows, split_rows, compiled_rows = {}, [], [], [], []
    names = dict.fromkeys([m for m, _ in cfg["cells"]] + [m for m, _ in cfg["compiled_cells"]])
    for name in names:  # one load per model and process
        model, heads, vocab = prepare(name, scale)
        for batch in [b for m, b in cfg["compiled_cells"] if m == name]:
            r = compiled_cell(model, heads, vocab, batch, cfg, args.seed, cfg["compiled_backend"])
            results[f"{name}/b{batch}/compiled"] = r
            compiled_rows += _compiled_rows(name, batch, r)
        for batch in [b for m, b in cfg["cells"] if m == name]:
            r = bench_cell(model, heads, vocab, batch, cfg, args.seed, floors=(name, batch) in cfg["floor_cells"],
                           split=(name, batch) in cfg["split_cells"])
            results[f"{name}/b{batch}"] = r
            rows += _rows(name, batch, r)
            split_rows += _split_rows(name, batch, r)
            floor_rows += _floor_rows(name, batch, r)
        del model
    body = (
        f"{cfg['new_tokens']} new tokens after {cfg['prompt_tokens']} prompt tokens, fixed-seed sampling (top_k=0), "
        "min_new_tokens = max_new_tokens; ratio = t(mode)/t(plain) per interleaved round, in wall time and in the "
        "process's CPU time (one torch thread: the work done, without the time spent waiting for a CPU that other "
        "tenants of this virtual machine hold; wall ratios here have swung by +-10 % between runs). `hook %` = time inside the "
        f"SDE callbacks in one instrumented call of min({cfg['hook_tokens']}, new tokens) tokens, as a share of that "
        f"call; `hook us/step` the same per decoding step (whole batch; target <= {HOOK_TARGET_US:.0f} us at "
        "SmolLM2 batch 8); `step us` the step itself (`on_read`) per call in that call, and `step hot us` the same "
        f"called {cfg['hot_calls']} times back to back on one hidden state (nothing between calls evicts the "
        "heads or torch's dispatcher from the cache). `ref step us` / `1-op us`: the reference computation (one "
        "projection, the drift and diffusion MLPs, softplus and the temperature law, in plain torch) / "
        "one elementwise op in a hook at the heads' layer inside plain `generate`, per call like `step us` (the "
        "in-place floor); `ref hot us` the reference called back to back (the ~80 us floor).\n\n"
        + C.md_table(["model", "batch", "mode", "wall ratio (median)", "IQR", "CPU ratio (median)", "IQR",
                      "hook %", "hook us/step", "step us", "step hot us", "ref step us", "1-op us", "ref hot us",
                      "plain s (median)", "rounds",
                      "target met"], rows)
        + "\n\n## The in-place floor, compiled\n\nThe reference step (`ref step us` above) built four ways, "
        "each timed in place (a hook at the heads' layer inside plain `generate`, as `ref step us`; median over "
        f"{cfg['floor_rounds']} interleaved round(s) of one call each) and hot ({cfg['hot_calls']} calls back to "
        "back). `torch.compile`: inductor, fullgraph; AOTInductor: `torch.export` + "
        "`torch._inductor.aoti_compile_and_package`, the step as one C++ library, called through the loaded "
        "package or its loader's `run` (no pytree wrapping). `build s`: compile time, paid once per shape; `max "
        "diff`: against eager. If compiling removes the Python and dispatcher work but the in-place figure stays far "
        "above the hot one, the rest is the cache the model's forward leaves cold.\n\n"
        + C.md_table(["model", "batch", "implementation", "in place us (median)", "hot us", "in place / hot",
                      "build s", "max diff", "rounds"], floor_rows)
        + "\n\n## Per call and per step\n\nEach mode's overhead over plain `generate`, split: every variant runs at "
        f"{cfg['split_tokens'][0]} and {cfg['split_tokens'][1]} new tokens in {cfg['split_rounds']} interleaved "
        "round(s); per round the overhead `t(mode) - t(plain)` at the two lengths gives the cost per step (slope) "
        "and per call (intercept: resolving the generation config, building the fused heads, the trace); medians "
        "over rounds. `callbacks us/step`: the SDE callbacks per step in the instrumented call above (without the "
        "end-of-call trace); `outside us/step`: the rest of the per-step cost (module-hook dispatch, an added "
        "logits processor); `budget us/step`: what the cell's target ratio allows per plain step.\n\n"
        + C.md_table(["model", "batch", "mode", "per call ms", "per step us", "callbacks us/step",
                      "outside us/step", "plain step us", "budget us/step", "rounds"], split_rows)
        + "\n\n## Compiled generation\n\nStatic cache and `compile_config` (backend "
        f"`{cfg['compiled_backend']}`, fullgraph, CPU via `_compile_all_devices`): the SDE step runs inside the "
        "compiled decoding graph. `ratio`: SDE compiled / stock compiled per interleaved round; `vs eager`: SDE "
        "compiled / the same SDE call with the forward run eagerly (`disable_compile=True`); `compile s`: the first "
        f"call of the SDE variant (compilation included). Targets: "
        + ", ".join(f"{m} <= {t:.2f}" for m, t in COMPILED_TARGETS.items()) + ", and faster than eager.\n\n"
        + C.md_table(["model", "batch", "mode", "ratio (median)", "IQR", "vs eager (median)", "IQR",
                      "plain step ms", "compile s", "rounds", "target met"], compiled_rows))
    run.finish(results, body)
    print(body)
    return results


if __name__ == "__main__":
    main()
