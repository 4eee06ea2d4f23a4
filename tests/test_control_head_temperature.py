"""Temperature on the LM head's input: ``lm_head(h / tau) = lm_head(h) / tau``, so SDE temperature control divides
the head's input (hidden size numbers per row) instead of the logits (the vocabulary) where that gives the same
scores, and divides the logits everywhere else (soft-capped, biased or non-float32 heads, processors that do not
commute with the division, raw logits kept, the caller's own processors).
"""

from __future__ import annotations

import copy

import pytest
import torch
from control_fixtures import parity_bundle
from transformers import GenerationConfig, LogitsProcessorList

from hf_sde import SDEControl, sde_generate
from hf_sde.control import setup as control_setup
from hf_sde.control import step as control_module


class _Identity:
    """A caller's logits processor that changes nothing (its presence makes generate divide the logits)."""

    def __call__(self, input_ids, scores):
        return scores


def _calibrated(heads):
    """The random heads' log diffusion spans ~0.02 around 1.59: calibrate so that z-scores spread over ~[-1, 1]."""
    heads = copy.deepcopy(heads)
    heads.config.log_diffusion_mean, heads.config.log_diffusion_std = 1.587, 0.01
    return heads


def _run(model, heads, seed: int, **kw):
    calls = []
    original = control_module._Runtime.on_head_input

    def spy(self, *a):
        calls.append(self.current)
        return original(self, *a)

    ids = torch.tensor([[1, 5, 9, 13], [0, 1, 40, 41]])
    control_module._Runtime.on_head_input = spy
    try:
        torch.manual_seed(seed)
        out = sde_generate(model, input_ids=ids, attention_mask=(ids != 0).long(), do_sample=True, top_k=0,
                           max_new_tokens=8, eos_token_id=None, return_dict_in_generate=True, output_scores=True,
                           sde_control=SDEControl(_calibrated(heads), mode="temperature", beta=1.0), **kw)
    finally:
        control_module._Runtime.on_head_input = original
    return out, calls


@pytest.fixture
def small_vocab_on_head(monkeypatch):
    """The tiny models' vocabulary is 4x their hidden size: let the head take the temperature anyway."""
    monkeypatch.setattr(control_setup, "HEAD_SCALING_MIN_RATIO", 0)


@pytest.mark.parametrize(("family", "on_head"), [("llama", True), ("gpt2", True), ("qwen3", True),
                                                 ("gemma2", False)])
def test_head_input_scaling_equals_dividing_the_logits(family, on_head, small_vocab_on_head):
    bundle = parity_bundle(family)
    folded, calls = _run(bundle.model, bundle.heads, 3)
    divided, no_calls = _run(bundle.model, bundle.heads, 3, logits_processor=LogitsProcessorList([_Identity()]))
    assert bool(calls) is on_head and not no_calls  # gemma2 caps its logits: never on the head
    if on_head:
        assert calls == list(range(8))  # once per step, prefill included
    tau = folded.sde_trace.temperature
    assert tau.std() > 0.1 and ((tau > 0.3) & (tau < 1.5)).any()  # a real, varying temperature
    assert torch.equal(folded.sequences, divided.sequences)
    torch.testing.assert_close(folded.sde_trace.temperature, divided.sde_trace.temperature)
    for a, b in zip(folded.scores, divided.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_small_vocabularies_divide_the_logits():
    """Below HEAD_SCALING_MIN_RATIO x hidden size the logits are divided (cheaper than a hook on the head)."""
    bundle = parity_bundle("llama")
    assert bundle.model.config.vocab_size < control_setup.HEAD_SCALING_MIN_RATIO * bundle.model.config.hidden_size
    assert control_setup._temperature_head(bundle.model, GenerationConfig(do_sample=True)) is None
    assert not _run(bundle.model, bundle.heads, 3)[1]


def test_where_the_head_cannot_take_the_temperature(small_vocab_on_head):
    model = parity_bundle("llama").model
    gc = GenerationConfig(do_sample=True)
    assert control_setup._temperature_head(model, gc) is model.get_output_embeddings()
    for name, value in (("sequence_bias", {(5,): 1.0}), ("exponential_decay_length_penalty", (2, 1.1)),
                        ("dola_layers", "low"), ("guidance_scale", 1.5)):
        other = copy.deepcopy(gc)
        setattr(other, name, value)
        assert control_setup._temperature_head(model, other) is None, name
    biased = copy.deepcopy(model)
    biased.lm_head.bias = torch.nn.Parameter(torch.zeros(biased.config.vocab_size))
    assert control_setup._temperature_head(biased, gc) is None
    assert control_setup._temperature_head(copy.deepcopy(model).to(torch.bfloat16), gc) is None
    assert control_setup._temperature_head(parity_bundle("gemma2").model, gc) is None


def test_a_head_that_is_never_called_is_an_error_not_a_silent_plain_sample(small_vocab_on_head):
    """If a model computed its logits without calling its output-embedding module, the temperature would never
    reach the tokens: the call must fail, not return plain samples with a trace claiming otherwise."""
    bundle = parity_bundle("llama")
    model = copy.deepcopy(bundle.model)
    decoy = copy.deepcopy(model.lm_head)
    model.get_output_embeddings = lambda: decoy  # the hook lands on a module the forward never calls
    with pytest.raises(RuntimeError, match="reached the LM head in 0 of"):
        _run(model, bundle.heads, 3)


def test_raw_logits_stay_raw(small_vocab_on_head):
    """With output_logits the logits are returned untouched (the scores are divided instead)."""
    bundle = parity_bundle("llama")
    out, calls = _run(bundle.model, bundle.heads, 5, output_logits=True)
    assert not calls
    tau = out.sde_trace.temperature
    for k, (logits, scores) in enumerate(zip(out.logits, out.scores, strict=True)):
        torch.testing.assert_close(scores, logits / tau[:, k:k + 1])


def test_head_scaling_never_syncs(small_vocab_on_head):
    from test_control_fused import NoSync, guarded_callbacks

    bundle = parity_bundle("llama")
    mode = NoSync()
    with guarded_callbacks(mode), mode:
        _, calls = _run(bundle.model, bundle.heads, 3)
    assert calls and mode.checked > 50
