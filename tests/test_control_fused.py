"""The fused per-step path equals the heads' own modules, and never waits for the device.

``_FusedHeads`` folds the projection, the first layers, the linear drift and both MLPs into a few dense calls;
it must give ``heads(heads.project(h), heads.times(k))`` up to float rounding, for both time origins. The step
path (hooks and logits processor) must not read tensor values on the host: run under a torch function mode
that raises on ``.item()`` / ``.tolist()`` / ``bool`` / ``int`` / ``float`` / ``__index__`` of a tensor while
inside the hf-sde callbacks (transformers' own loop syncs; that is not ours).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from control_fixtures import tiny_bundle
from torch.overrides import TorchFunctionMode

from hf_sde import SDEControl, SDEHeads, enable_sde_control
from hf_sde.control import step as control_module

SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__"}


def _with_origin(heads, origin: str):
    heads = copy.deepcopy(heads)
    heads.config.time_origin = origin
    return heads


# Which nets run per step (the rest once over all steps in the trace) depends on what the control reads.
STEP_SPLITS = {
    "observe-deferred": ((), dict(mode="observe")),
    "observe-live": (("drift", "diffusion"), dict(mode="observe", callback=lambda step: None)),
    "temperature": (("diffusion",), dict(mode="temperature", beta=0.5)),
    "steer-drift": (("drift",), dict(mode="steer", alpha=0.05)),
    "steer-attractor": ((), dict(mode="steer", alpha=0.05, direction="attractor")),
    "steer-gated": (("drift", "diffusion"), dict(mode="temperature+steer", alpha=0.05, gate="sigmoid")),
    "steer-threshold": (("drift", "diffusion"), dict(mode="steer", alpha=0.05, gate="threshold")),
    "steer-fixed-later-layer": ((), dict(mode="steer", alpha=0.05, direction=torch.linspace(-1, 1, 32),
                                         steer_layer=2)),
}


@pytest.mark.parametrize("split", list(STEP_SPLITS))
@pytest.mark.parametrize("origin", ["sequence", "prompt_end"])
def test_fused_step_equals_heads(origin, split):
    """The trace equals the heads applied post hoc, whichever nets run per decoding step (those the control
    reads: all when a callback wants live stats) and whichever run once over all steps when the trace is built."""
    nets, ctl_kwargs = STEP_SPLITS[split]
    assert control_module._nets_per_step(SDEControl(tiny_bundle(layer=1).heads, **ctl_kwargs)) == nets
    tb = tiny_bundle(layer=1)
    _assert_trace_equals_heads(tb.model, _with_origin(tb.heads, origin), ctl_kwargs, origin)


@pytest.mark.parametrize("split", ["temperature", "observe-deferred"])
@pytest.mark.parametrize("depth", [1, 3])
def test_fused_step_equals_heads_at_other_depths(depth, split):
    """Depth 1 (no hidden-to-hidden layer: the first layer feeds the output) and depth 3 (two of them: the work
    tensors alternate), per step and deferred."""
    tb = tiny_bundle(layer=1)
    cfg = copy.deepcopy(tb.heads.config)
    cfg.depth = depth
    heads = SDEHeads(cfg)
    with torch.no_grad():
        for name in ("proj_mean", "proj_basis", "proj_scale"):
            getattr(heads, name).copy_(getattr(tb.heads, name))
    assert len(heads.diffusion_net) == 2 * depth + 1
    _assert_trace_equals_heads(tb.model, heads, STEP_SPLITS[split][1], "sequence")


def _assert_trace_equals_heads(model, heads, ctl_kwargs: dict, origin: str) -> None:
    torch.manual_seed(0)  # the random weights below (the test must not depend on what ran before it)
    with torch.no_grad():  # make every part matter: non-trivial scale, mean and linear drift
        heads.proj_scale.uniform_(0.5, 2.0)
        heads.proj_mean.normal_()
        heads.drift_linear.weight.normal_(0, 0.3)
        heads.drift_linear.bias.normal_(0, 0.3)
        for p in (*heads.drift_net.parameters(), *heads.diffusion_net.parameters()):
            p.normal_(0, 0.3)
    model = enable_sde_control(model)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21], [0, 0, 1, 40, 41, 42]])
    captured = []
    handle = model.model.layers[1].register_forward_hook(lambda m, a, o: captured.append(
        (o[0] if isinstance(o, tuple) else o)[:, -1].detach().clone()))
    try:
        out = model.generate(input_ids=ids, attention_mask=(ids != 0).long(), do_sample=False, max_new_tokens=6,
                             eos_token_id=None, return_dict_in_generate=True,
                             sde_control=SDEControl(heads, **ctl_kwargs))
    finally:
        handle.remove()
    tr = out.sde_trace
    hidden = torch.stack(captured, 1)                      # (batch, steps, D)
    z = heads.project(hidden)
    k = tr.positions if origin == "sequence" else torch.arange(6).expand(2, 6)
    assert tr.positions[:, 0].tolist() == [5, 3]
    mean, std = heads(z, heads.times(k))
    magnitude = heads.diffusion_magnitude(std)
    torch.testing.assert_close(tr.diffusion, magnitude, rtol=1e-5, atol=1e-6)
    # These random heads' calibration spread is tiny, so z-scores reach ~2e4: float32 rounding of log s is ~1e-5 of it.
    torch.testing.assert_close(tr.zscore, heads.zscore(magnitude), rtol=5e-5, atol=1e-5)
    torch.testing.assert_close(tr.drift_norm, (mean / heads.dt).norm(dim=-1), rtol=1e-5, atol=1e-5)
    surprise = heads.surprise(z[:, 1:] - z[:, :-1], mean[:, :-1], std[:, :-1])
    torch.testing.assert_close(tr.surprise[:, :-1], surprise, rtol=1e-4, atol=1e-4)
    # The two origins really differ (unless the time features had no weight).
    other = model.generate(input_ids=ids, attention_mask=(ids != 0).long(), do_sample=False, max_new_tokens=6,
                           eos_token_id=None, return_dict_in_generate=True,
                           sde_control=SDEControl(_with_origin(heads, "sequence" if origin == "prompt_end"
                                                               else "prompt_end"), mode="observe"))
    assert not torch.allclose(other.sde_trace.zscore, tr.zscore)


class NoSync(TorchFunctionMode):
    """Raises on host reads of tensor values while ``inside`` is set (by the wrapped SDE callbacks)."""

    def __init__(self):
        super().__init__()
        self.inside = 0
        self.checked = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.inside:
            self.checked += 1
            if getattr(func, "__name__", "") in SYNCS:
                raise AssertionError(f"device->host sync in the SDE step path: {func}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def guarded_callbacks(mode: NoSync):
    cls = control_module._Runtime
    saved = {m: getattr(cls, m) for m in ("on_forward_pre", "on_read", "on_steer", "on_head_input", "on_logits")}

    def wrap(fn):
        def inner(*a, **k):
            mode.inside += 1
            try:
                return fn(*a, **k)
            finally:
                mode.inside -= 1
        return inner

    for name, fn in saved.items():
        setattr(cls, name, wrap(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(cls, name, fn)


def test_the_guard_catches_a_sync():
    mode = NoSync()
    with mode:
        mode.inside = 1
        with pytest.raises(AssertionError, match="sync"):
            bool(torch.ones(1).sum() > 0)
        with pytest.raises(AssertionError, match="sync"):
            torch.ones(2).tolist()


@pytest.mark.parametrize("origin", ["sequence", "prompt_end"])
@pytest.mark.parametrize("ctl_kwargs", [
    dict(mode="observe"), dict(mode="temperature", beta=1.0),
    dict(mode="temperature+steer", alpha=0.2, steer_layer=2, gate="sigmoid", direction="attractor"),
    dict(mode="steer", alpha=0.2, gate="threshold"),
], ids=["observe", "temperature", "temperature+steer-later-layer", "steer-threshold"])
@pytest.mark.parametrize("live", [True, False], ids=["callback", "no-callback"])
def test_step_path_never_syncs(origin, ctl_kwargs, live):
    """No callback path syncs: with a live callback (every net and statistic per step) and without one (only
    what the control reads per step, the rest deferred to the trace)."""
    tb = tiny_bundle(layer=1)
    model = enable_sde_control(tb.model)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21], [0, 0, 1, 40, 41, 42]])
    kw = dict(input_ids=ids, attention_mask=(ids != 0).long(), do_sample=True, max_new_tokens=5, eos_token_id=None,
              return_dict_in_generate=True)
    steps = []
    callback = (lambda s: steps.append(s.index)) if live else None
    ctl = SDEControl(_with_origin(tb.heads, origin), **ctl_kwargs, callback=callback)
    mode = NoSync()
    torch.manual_seed(0)
    with guarded_callbacks(mode), mode:
        out = model.generate(sde_control=ctl, **kw)
    assert mode.checked > 30 and steps == (list(range(5)) if live else [])  # the guard saw the callbacks run
    torch.manual_seed(0)
    again = model.generate(sde_control=ctl, **kw)  # unguarded: same result
    assert torch.equal(out.sequences, again.sequences)
    torch.testing.assert_close(out.sde_trace.zscore, again.sde_trace.zscore)


def test_fused_heads_are_reused_and_never_stale():
    """A repeated call reuses the fused heads; new heads, weights changed in place, a new calibration or another
    device rebuild them (the trace then follows the heads as they are now)."""
    from hf_sde.control.fused import fused_heads

    tb = tiny_bundle(layer=1)
    heads, cpu = tb.heads, torch.device("cpu")
    first = fused_heads(heads, cpu, 8)
    assert fused_heads(heads, cpu, 8) is first
    assert fused_heads(heads, cpu, 32) is first and first.n_times >= 32  # tables grow in place
    with torch.no_grad():
        heads.diffusion_net[0].weight.mul_(1.5)   # in place: same storage, new version
    rebuilt = fused_heads(heads, cpu, 8)
    assert rebuilt is not first
    torch.testing.assert_close(rebuilt.nets["diffusion"].first[:, :4], heads.diffusion_net[0].weight[:, :8].T[:, :4])
    heads.config.log_diffusion_std = heads.config.log_diffusion_std * 2   # recalibrated
    assert fused_heads(heads, cpu, 8) is not rebuilt
    assert fused_heads(copy.deepcopy(heads), cpu, 8) is not fused_heads(heads, cpu, 8)
    # a replaced module, a replaced parameter and an added buffer each rebuild
    for change in (lambda h: setattr(h.diffusion_net, "0", torch.nn.Linear(*h.diffusion_net[0].weight.T.shape)),
                   lambda h: setattr(h.drift_linear, "bias", torch.nn.Parameter(h.drift_linear.bias + 1)),
                   lambda h: h.drift_net.register_buffer("extra", torch.zeros(1))):
        kept = fused_heads(heads, cpu, 8)
        change(heads)
        assert fused_heads(heads, cpu, 8) is not kept
    # a model on another device (meta stands in for a GPU here) gets its own copy there; the CPU one stays
    current = fused_heads(heads, cpu, 8)
    moved = fused_heads(heads, torch.device("meta"), 8)
    assert moved is not current and moved.mean.device.type == "meta" and moved.basis.device.type == "meta"
    assert fused_heads(heads, cpu, 8) is current


def test_repeated_calls_follow_heads_changed_in_place():
    tb = tiny_bundle(layer=1)
    model = enable_sde_control(tb.model)
    kw = dict(input_ids=torch.tensor([[1, 5, 9, 13]]), max_new_tokens=3, do_sample=False,
              return_dict_in_generate=True)
    before = model.generate(**kw, sde_control=SDEControl(tb.heads, mode="observe")).sde_trace.zscore
    with torch.no_grad():
        tb.heads.diffusion_net[-1].bias.add_(0.5)
    after = model.generate(**kw, sde_control=SDEControl(tb.heads, mode="temperature")).sde_trace.zscore
    fresh = model.generate(**kw, sde_control=SDEControl(copy.deepcopy(tb.heads), mode="temperature")).sde_trace.zscore
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh)


def test_fused_heads_cache_lets_heads_go_and_sees_data_assignment():
    """The cache holds fused copies weakly by their heads (deleted heads free them), and ``p.data = ...`` (same
    tensor, same version counter, new storage) rebuilds."""
    import gc
    import weakref

    from hf_sde.control.fused import _CACHE, fused_heads

    heads = copy.deepcopy(tiny_bundle(layer=1).heads)
    first = fused_heads(heads, torch.device("cpu"), 8)
    w = heads.diffusion_net[0].weight
    w.data = torch.randn_like(w)
    assert fused_heads(heads, torch.device("cpu"), 8) is not first
    ref = weakref.ref(heads)
    del heads, w, first
    gc.collect()
    assert ref() is None and all(k is not None for k in _CACHE.keys())


def test_reused_step_buffers_leave_earlier_traces_alone():
    """Calls reuse the step buffers of the previous call with the same shapes: a trace already returned must not
    change, and each call's trace equals the one of a call that allocated its own."""
    from hf_sde.control import step

    tb = tiny_bundle(layer=1)
    model = enable_sde_control(tb.model)
    kw = dict(input_ids=torch.tensor([[1, 5, 9, 13], [2, 6, 10, 14]]), max_new_tokens=5, do_sample=True,
              return_dict_in_generate=True)

    def run(**ctl):
        torch.manual_seed(0)
        return model.generate(**kw, sde_control=SDEControl(tb.heads, **ctl)).sde_trace

    modes = [dict(mode="temperature", beta=0.5), dict(mode="observe"), dict(mode="steer", alpha=0.05),
             dict(mode="temperature", beta=-0.5)]
    fresh = []
    for ctl in modes:
        step._POOL.clear()
        fresh.append(run(**ctl))
    traces = [run(**ctl) for ctl in modes for _ in range(2)]
    assert step._POOL  # the calls did hand their buffers on
    for i, trace in enumerate(traces):
        for name in ("zscore", "temperature", "steer_norm", "surprise", "positions"):
            torch.testing.assert_close(getattr(trace, name), getattr(fresh[i // 2], name), equal_nan=True)
    shared = {t.untyped_storage().data_ptr() for tr in traces for t in vars(tr).values()}
    assert len(shared) == 7 * len(traces)  # every field of every trace owns its storage
