"""The SDE step inside generate's compiled forward (static cache + ``compile_config``).

Graph breaks, guards and recompilations are dynamo's, the same whatever the backend, so these tests compile with
the ``eager`` backend (bitwise eager numerics: compiled and eager SDE calls must give the same tokens) and count
the graphs a backend receives; one test runs ``aot_eager`` (functionalization of the step's in-place updates).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from control_fixtures import PARITY_FAMILIES, parity_bundle
from transformers import CompileConfig, StoppingCriteria, StoppingCriteriaList

from hf_sde import SDEControl, sde_generate
from hf_sde.data.layers import decoder_layers

IDS = torch.tensor([[1, 5, 9, 13, 17, 21], [0, 0, 1, 40, 41, 42]])
MASK = (IDS != 0).long()
CONTROLS = {
    "temperature": dict(mode="temperature", beta=1.5, temperature=1.2),
    "steer": dict(mode="steer", alpha=0.5),
    "temperature+steer-gated": dict(mode="temperature+steer", beta=1.0, alpha=0.3, gate="sigmoid"),
    "steer-later-layer": dict(mode="steer", alpha=0.5, steer_layer=2),
    "steer-attractor": dict(mode="steer", alpha=0.4, direction="attractor"),
}


class CountingBackend:
    """A dynamo backend that counts the graphs it is given (compilations) and runs them as they are."""

    def __init__(self, inner: str = "eager"):
        self.inner, self.graphs = inner, 0

    def __call__(self, gm, example_inputs, **_options):
        self.graphs += 1
        if self.inner == "aot_eager":
            from torch._dynamo.backends.debugging import aot_eager

            return aot_eager(gm, example_inputs)
        return gm.forward

    def __deepcopy__(self, memo):  # CompileConfig.to_dict() deep-copies its fields: keep one counter
        return self


def compile_config(backend="eager") -> CompileConfig:
    cc = CompileConfig(backend=backend, fullgraph=True, dynamic=False)
    cc._compile_all_devices = True  # generate compiles on CPU only when told to
    return cc


def _sde(model, heads, ctl: dict, seed: int = 0, compiled: CompileConfig | None = None, new: int = 6, **kw):
    extra = dict(cache_implementation="static")
    extra.update(compile_config=compiled) if compiled is not None else extra.update(disable_compile=True)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*eagerly.*")  # a compiled call must not fall back
        return sde_generate(model, input_ids=IDS, attention_mask=MASK, do_sample=True, max_new_tokens=new,
                            min_new_tokens=new, return_dict_in_generate=True, sde_control=SDEControl(heads, **ctl),
                            **extra, **kw)


def _assert_same(a, b, label: str) -> None:
    assert torch.equal(a.sequences, b.sequences), label
    for name in ("zscore", "temperature", "steer_norm", "diffusion", "drift_norm", "surprise"):
        torch.testing.assert_close(getattr(a.sde_trace, name), getattr(b.sde_trace, name), rtol=1e-5, atol=1e-5,
                                   equal_nan=True, msg=f"{label}: {name}")
    assert torch.equal(a.sde_trace.positions, b.sde_trace.positions), label


@pytest.mark.parametrize("family", [f for f in PARITY_FAMILIES if f != "gemma2"])
def test_controls_apply_under_fullgraph_compilation(family):
    """temperature and steering change the tokens exactly as in eager mode, with the same seed (fullgraph)."""
    bundle = parity_bundle(family)
    plain = _sde(bundle.model, bundle.heads, dict(mode="observe"))
    for name, ctl in CONTROLS.items():
        eager = _sde(bundle.model, bundle.heads, ctl)
        compiled = _sde(bundle.model, bundle.heads, ctl, compiled=compile_config())
        _assert_same(compiled, eager, f"{family}/{name}")
        if "temperature" in name:  # the controls really act
            assert not torch.allclose(compiled.sde_trace.temperature, plain.sde_trace.temperature), name
        if "steer" in name:
            assert (compiled.sde_trace.steer_norm > 0).all(), name
    # a per-layer direction (a GGUF control vector's shape): one vector per steered layer, the gate of layer 1
    g = torch.Generator().manual_seed(0)
    hidden = bundle.heads.config.hidden_size
    ctl = dict(mode="steer", alpha=0.5, gate="sigmoid", direction={1: torch.randn(hidden, generator=g),
                                                                     2: torch.randn(hidden, generator=g)})
    eager = _sde(bundle.model, bundle.heads, ctl)
    compiled = _sde(bundle.model, bundle.heads, ctl, compiled=compile_config())
    _assert_same(compiled, eager, f"{family}/per-layer")
    assert not torch.equal(eager.sequences, plain.sequences) or (eager.sde_trace.steer_norm > 0).all()


def test_gemma2_compiles_with_automatic_dynamic_shapes():
    """Gemma2's sliding-window static cache recompiles every step under dynamic=False (stock too); with
    dynamic=None the step follows it into the compiled graph."""
    bundle = parity_bundle("gemma2")
    ctl = CONTROLS["temperature"]
    eager = _sde(bundle.model, bundle.heads, ctl)
    cc = CompileConfig(backend="eager", fullgraph=True, dynamic=None)
    cc._compile_all_devices = True
    _assert_same(_sde(bundle.model, bundle.heads, ctl, compiled=cc), eager, "gemma2")


def test_one_graph_per_structure_reused_across_steps_calls_and_values():
    """No recompilation per step or per call for the same shapes, nor for new beta / alpha / temperature /
    bounds (tensors); a new control structure compiles once, and going back to one compiles nothing."""
    bundle = parity_bundle("llama")
    backend = CountingBackend()
    cc = compile_config(backend)
    _sde(bundle.model, bundle.heads, CONTROLS["temperature"], compiled=cc)
    first = backend.graphs
    assert first >= 1
    _sde(bundle.model, bundle.heads, CONTROLS["temperature"], compiled=cc, seed=1)
    _sde(bundle.model, bundle.heads, dict(mode="temperature", beta=-0.7, temperature=0.8, min_temperature=0.5,
                                          max_temperature=2.0), compiled=cc)
    assert backend.graphs == first  # per step, per call and per value: nothing new
    _sde(bundle.model, bundle.heads, CONTROLS["steer"], compiled=cc)
    assert backend.graphs == first + 1  # a new structure: one graph
    _sde(bundle.model, bundle.heads, dict(mode="steer", alpha=-0.9), compiled=cc)
    _sde(bundle.model, bundle.heads, CONTROLS["temperature"], compiled=cc)
    assert backend.graphs == first + 1


def test_stock_compiled_generate_is_untouched_before_and_after():
    """stock -> SDE -> stock: stock's compiled calls never run the step, and the SDE call, traced after
    stock, includes it (every step recorded, temperatures applied)."""
    bundle = parity_bundle("qwen3")
    model = copy.deepcopy(bundle.model)
    cc = compile_config()
    kw = dict(input_ids=IDS, attention_mask=MASK, do_sample=True, max_new_tokens=6, min_new_tokens=6,
              cache_implementation="static", compile_config=cc)
    torch.manual_seed(0)
    before = model.generate(**kw)
    blocks = list(decoder_layers(model))
    head = model.get_output_embeddings()
    out = _sde(model, bundle.heads, CONTROLS["temperature+steer-gated"], compiled=cc)
    eager = _sde(model, bundle.heads, CONTROLS["temperature+steer-gated"])
    _assert_same(out, eager, "SDE after stock")
    assert torch.isfinite(out.sde_trace.temperature).all() and (out.sde_trace.steer_norm > 0).all()
    assert list(decoder_layers(model)) == blocks and model.get_output_embeddings() is head
    assert "get_compiled_call" not in model.__dict__
    torch.manual_seed(0)
    assert torch.equal(model.generate(**kw), before)


def test_observe_compiled_equals_stock_compiled_and_eager_trace():
    bundle = parity_bundle("mistral")
    cc = compile_config()
    torch.manual_seed(0)
    stock = bundle.model.generate(input_ids=IDS, attention_mask=MASK, do_sample=True, max_new_tokens=6,
                                  min_new_tokens=6, cache_implementation="static", compile_config=cc,
                                  return_dict_in_generate=True, output_logits=True)
    ours = _sde(bundle.model, bundle.heads, dict(mode="observe"), compiled=cc, output_logits=True)
    assert torch.equal(ours.sequences, stock.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, stock.logits, strict=True))
    _assert_same(ours, _sde(bundle.model, bundle.heads, dict(mode="observe")), "observe")


@pytest.mark.parametrize("origin", ["sequence", "prompt_end"])
def test_time_origins_and_chunked_prefill_under_compilation(origin):
    bundle = parity_bundle("llama")
    heads = copy.deepcopy(bundle.heads)
    heads.config.time_origin = origin
    ctl = CONTROLS["temperature+steer-gated"]
    eager = _sde(bundle.model, heads, ctl)
    _assert_same(_sde(bundle.model, heads, ctl, compiled=compile_config()), eager, origin)
    chunked = _sde(bundle.model, heads, ctl, compiled=compile_config(), prefill_chunk_size=4)
    _assert_same(chunked, eager, f"{origin}/chunked")


def test_in_place_state_updates_survive_functionalization():
    """aot_eager runs AOTAutograd's functionalization over the step's in-place counter and record updates."""
    bundle = parity_bundle("llama")
    ctl = CONTROLS["temperature+steer-gated"]
    _assert_same(_sde(bundle.model, bundle.heads, ctl, compiled=compile_config(CountingBackend("aot_eager"))),
                 _sde(bundle.model, bundle.heads, ctl), "aot_eager")


def test_a_callback_runs_eagerly_and_says_so():
    from hf_sde.control import _WARNED

    bundle = parity_bundle("llama")
    steps = []
    _WARNED.clear()
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="a callback runs Python at every step"):
        out = sde_generate(bundle.model, input_ids=IDS, attention_mask=MASK, do_sample=True, max_new_tokens=4,
                           cache_implementation="static", compile_config=compile_config(),
                           return_dict_in_generate=True,
                           sde_control=SDEControl(bundle.heads, mode="temperature", callback=steps.append))
    assert len(steps) == 4 and out.sde_trace.temperature.shape == (2, 4)


def test_modules_are_restored_when_generation_raises():
    class Boom(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            raise RuntimeError("boom")

    bundle = parity_bundle("llama")
    model = copy.deepcopy(bundle.model)
    blocks, head = list(decoder_layers(model)), model.get_output_embeddings()
    with pytest.raises(RuntimeError, match="boom"):
        _sde(model, bundle.heads, CONTROLS["steer-later-layer"], compiled=compile_config(),
             stopping_criteria=StoppingCriteriaList([Boom()]))
    assert list(decoder_layers(model)) == blocks and model.get_output_embeddings() is head
    assert "get_compiled_call" not in model.__dict__


def test_a_callback_declines_compilation_even_when_the_keywords_ask_for_it():
    """A keyword argument outranks the generation_config: declining must set the keyword, not the config."""
    from transformers import GenerationConfig

    from hf_sde.control import _WARNED

    bundle = parity_bundle("llama")
    backend = CountingBackend()
    steps = []
    _WARNED.clear()
    with pytest.warns(UserWarning, match="eagerly"):
        sde_generate(bundle.model, input_ids=IDS, attention_mask=MASK, max_new_tokens=3,
                     generation_config=GenerationConfig(do_sample=True), disable_compile=False,
                     cache_implementation="static", compile_config=compile_config(backend),
                     sde_control=SDEControl(bundle.heads, mode="observe", callback=steps.append))
    assert backend.graphs == 0 and len(steps) == 3


def test_equal_compile_configs_share_one_compiled_forward():
    from hf_sde.control.compiled import compiled_forward

    a = CompileConfig(backend="eager", fullgraph=True, mode=None, options={"x": 1})
    b = CompileConfig(backend="eager", fullgraph=True, mode=None, options={"x": 1})
    c = CompileConfig(backend="eager", fullgraph=True, mode=None, options={"x": 2})
    assert compiled_forward(a, ("k",)) is compiled_forward(b, ("k",))
    assert compiled_forward(a, ("k",)) is not compiled_forward(c, ("k",))


def test_blocks_without_position_ids_take_positions_from_the_mask(monkeypatch):
    """Some models' blocks get no position ids: the compiled step then counts from each row's mask, like the
    eager runtime, so a left-padded batch keeps its per-row positions."""
    from hf_sde.control import compiled

    bundle = parity_bundle("llama")
    ctl = CONTROLS["temperature"]
    eager = _sde(bundle.model, bundle.heads, ctl)
    original = compiled._StepBlock.forward

    def without_position_ids(self, hidden_states, *args, **kwargs):
        kwargs = {**kwargs, "position_ids": None}
        return original(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(compiled._StepBlock, "forward", without_position_ids)
    _assert_same(_sde(bundle.model, bundle.heads, ctl, compiled=compile_config()), eager, "no position ids")
