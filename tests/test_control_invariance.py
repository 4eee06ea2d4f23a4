"""Decoding-time control must be invisible when it controls nothing.

``sde_control=None``, ``mode="observe"``, ``mode="temperature"`` with ``beta=0`` and ``mode="steer"`` with
``alpha=0`` give bit-identical tokens to stock ``generate`` with the same seed; batched generation with left
padding gives every row its unbatched tokens and trace.
"""

from __future__ import annotations

import control_fixtures
import pytest
import torch
from control_fixtures import PROMPTS, encode, run, stories_bundle, tiny_llama_config
from transformers import LlamaForCausalLM

from hf_sde import SDEControl, SDEGenerateOutput, SDEGenerationMixin, enable_sde_control, sde_generate

make_stories = control_fixtures.make_stories  # a fixture (fresh stories260K copies)

NEW = 12


@pytest.fixture(scope="module")
def sb(stories_model, stories_trajectories):
    return stories_bundle(stories_model, stories_trajectories)


@pytest.mark.parametrize("sampling", [dict(do_sample=True, top_k=0), dict(do_sample=False)], ids=["sample", "greedy"])
def test_sde_control_none_is_stock_generate(sb, make_stories, sampling):
    plain = make_stories().model  # never enabled
    enabled = enable_sde_control(make_stories().model)
    inputs = encode(sb.tok, PROMPTS)
    kw = dict(max_new_tokens=NEW, **sampling)
    ref = run(plain.generate, inputs, 3, **kw)
    assert ref.shape[1] == inputs["input_ids"].shape[1] + NEW
    for out in (run(enabled.generate, inputs, 3, sde_control=None, **kw),
                run(enabled.generate, inputs, 3, **kw),
                run(lambda **k: sde_generate(plain, sde_control=None, **k), inputs, 3, **kw)):
        assert torch.equal(out, ref)
    # Disabling restores the class's generate, which rejects sde_control again.
    from hf_sde import disable_sde_control

    disable_sde_control(enabled)
    assert "generate" not in vars(enabled)
    assert torch.equal(run(enabled.generate, inputs, 3, **kw), ref)


NEUTRAL = {
    "observe": dict(mode="observe"),
    "temperature-beta0": dict(mode="temperature", beta=0.0, temperature=1.0),
    "steer-alpha0": dict(mode="steer", alpha=0.0),
    "temperature+steer-neutral": dict(mode="temperature+steer", beta=0.0, alpha=0.0, direction="attractor"),
}
SAMPLERS = {
    "plain": dict(top_k=0),
    "topk-topp-minp-penalty": dict(top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_neutral_controls_give_plain_sampling(sb, sampler):
    model = enable_sde_control(sb.model)
    inputs = encode(sb.tok, PROMPTS)
    kw = dict(max_new_tokens=NEW, do_sample=True, **SAMPLERS[sampler])
    ref = run(model.generate, inputs, 7, **kw)
    for name, ctl_kwargs in NEUTRAL.items():
        ctl = SDEControl(sb.heads, **ctl_kwargs)
        out = run(model.generate, inputs, 7, sde_control=ctl, return_dict_in_generate=True, **kw)
        assert torch.equal(out.sequences, ref), name
        trace = out.sde_trace
        assert trace.temperature.shape == (2, NEW)
        assert torch.isfinite(trace.zscore).all()
        if ctl.controls_temperature:
            assert torch.equal(trace.temperature, torch.ones_like(trace.temperature))
        if ctl.steers:
            assert torch.equal(trace.steer_norm, torch.zeros_like(trace.steer_norm))
    # The same seed really fixes the sample: another seed gives other tokens.
    assert not torch.equal(run(model.generate, inputs, 8, **kw), ref)


def test_observe_keeps_static_temperature(sb):
    """Observe mode leaves the stock temperature in charge and records it."""
    model = enable_sde_control(sb.model)
    inputs = encode(sb.tok, PROMPTS[:1])
    kw = dict(max_new_tokens=NEW, do_sample=True, top_k=0, temperature=0.7)
    ref = run(model.generate, inputs, 1, **kw)
    out = run(model.generate, inputs, 1, sde_control=SDEControl(sb.heads, mode="observe"),
              return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, ref)
    assert torch.allclose(out.sde_trace.temperature, torch.full((1, NEW), 0.7))


def test_constant_sde_temperature_equals_stock_temperature(sb):
    """A temperature law clipped to a single value ``tau`` samples like stock ``temperature=tau``."""
    model = enable_sde_control(sb.model)
    inputs = encode(sb.tok, PROMPTS)
    kw = dict(max_new_tokens=NEW, do_sample=True, top_k=0)
    ref = run(model.generate, inputs, 5, temperature=0.5, **kw)
    traces = []
    ctl = SDEControl(sb.heads, mode="temperature", beta=2.0, min_temperature=0.5, max_temperature=0.5,
                     on_trace=traces.append)
    out = run(model.generate, inputs, 5, sde_control=ctl, **kw)
    assert torch.equal(out, ref)
    assert torch.equal(traces[-1].temperature, torch.full((2, NEW), 0.5))
    # ... and the static temperature must not be applied a second time on top of the SDE law.
    with pytest.raises(ValueError, match="temperature"):
        model.generate(**inputs, sde_control=ctl, temperature=0.5, **kw)


@pytest.mark.parametrize("mode", ["observe", "temperature+steer"])
def test_batched_left_padding_matches_unbatched(sb, mode):
    model = enable_sde_control(sb.model)
    prompts = ["Once upon a time", "The little dog ran to the park and", "Lily"]
    ctl_kwargs = dict(mode=mode, beta=1.0, alpha=0.05)
    batch_inputs = encode(sb.tok, prompts)
    assert (batch_inputs["attention_mask"] == 0).any()  # really left padded
    ctl = SDEControl(sb.heads, **ctl_kwargs)
    batched = model.generate(**batch_inputs, do_sample=False, max_new_tokens=NEW, sde_control=ctl,
                             return_dict_in_generate=True)
    width = batch_inputs["input_ids"].shape[1]
    for row, prompt in enumerate(prompts):
        single_inputs = encode(sb.tok, [prompt])
        single = model.generate(**single_inputs, do_sample=False, max_new_tokens=NEW,
                                sde_control=SDEControl(sb.heads, **ctl_kwargs), return_dict_in_generate=True)
        n = single_inputs["input_ids"].shape[1]
        assert batched.sequences[row, width:].tolist() == single.sequences[0, n:].tolist(), prompt
        bt, st = batched.sde_trace[row], single.sde_trace
        assert torch.equal(bt.positions, st.positions)
        assert st.positions[0, 0].item() == n - 1
        for name in ("diffusion", "zscore", "drift_norm", "temperature", "steer_norm", "surprise"):
            torch.testing.assert_close(getattr(bt, name), getattr(st, name), rtol=1e-4, atol=1e-4, equal_nan=True,
                                       msg=lambda m, name=name, prompt=prompt: f"{prompt!r} {name}: {m}")


def test_return_dict_false_returns_tensor_and_trace_through_on_trace(sb):
    """Per-call results never live on the (reusable) SDEControl: the trace comes back in the output or through
    ``on_trace``, one call at a time."""
    model = enable_sde_control(sb.model)
    inputs = encode(sb.tok, PROMPTS)
    traces = []
    ctl = SDEControl(sb.heads, mode="temperature", on_trace=traces.append)
    assert not hasattr(ctl, "last_trace")
    out = run(model.generate, inputs, 0, do_sample=True, max_new_tokens=NEW, sde_control=ctl,
              return_dict_in_generate=False)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, inputs["input_ids"].shape[1] + NEW)
    assert len(traces) == 1 and traces[0].zscore.shape == (2, NEW)
    out2 = run(model.generate, inputs, 0, do_sample=True, max_new_tokens=NEW, sde_control=ctl,
               return_dict_in_generate=True)
    assert isinstance(out2, SDEGenerateOutput)
    assert torch.equal(out2.sequences, out)
    assert len(traces) == 2 and out2.sde_trace is traces[1]
    torch.testing.assert_close(traces[0].zscore, traces[1].zscore, equal_nan=True)
    assert vars(ctl) == vars(SDEControl(sb.heads, mode="temperature", on_trace=traces.append))


def test_mixin_subclass_accepts_sde_control(tmp_path):
    from control_fixtures import tiny_bundle

    tb = tiny_bundle()

    class SDELlama(SDEGenerationMixin, LlamaForCausalLM):
        pass

    model = SDELlama(tiny_llama_config()).eval()
    model.load_state_dict(tb.model.state_dict())
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    kw = dict(max_new_tokens=8, do_sample=True, top_k=0)
    ref = run(tb.model.generate, {"input_ids": ids}, 2, **kw)
    assert torch.equal(run(model.generate, {"input_ids": ids}, 2, **kw), ref)
    assert torch.equal(run(model.generate, {"input_ids": ids}, 2, sde_control=None, **kw), ref)
    out = run(model.generate, {"input_ids": ids}, 2, sde_control=SDEControl(tb.heads, mode="observe"),
              return_dict_in_generate=True, **kw)
    assert isinstance(out, SDEGenerateOutput)
    assert torch.equal(out.sequences, ref)
    assert out.sde_trace.diffusion.shape == (1, 8)
    # The mixin survives save / load like any PreTrainedModel.
    model.save_pretrained(tmp_path)
    again = SDELlama.from_pretrained(tmp_path).eval()
    out2 = run(again.generate, {"input_ids": ids}, 2, sde_control=SDEControl(tb.heads, mode="temperature"),
               return_dict_in_generate=True, **kw)
    assert out2.sde_trace.temperature.shape == (1, 8)


def test_deep_copy_of_enabled_model_generates_with_its_own_weights():
    import copy

    from control_fixtures import tiny_bundle

    tb = tiny_bundle(layer=1)
    enabled = enable_sde_control(tb.model)
    twin = copy.deepcopy(enabled)  # e.g. a frozen reference model
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    ids = {"input_ids": torch.tensor([[1, 5, 9, 13]])}
    kw = dict(do_sample=False, max_new_tokens=6, eos_token_id=None)
    stock = run(lambda **k: LlamaForCausalLM.generate(twin, **k), ids, 0, **kw)
    assert not torch.equal(stock, run(enabled.generate, ids, 0, **kw))  # the halved weights do matter
    assert torch.equal(run(twin.generate, ids, 0, **kw), stock)
    out = run(twin.generate, ids, 0, sde_control=SDEControl(tb.heads, mode="observe"), return_dict_in_generate=True,
              **kw)
    assert torch.equal(out.sequences, stock) and out.sde_trace.zscore.shape == (1, 6)
