"""vLLM with hf-sde gives the numbers of ``sde_generate`` on the same weights (float32, greedy)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import NEW_TOKENS
from vllm import SamplingParams

from hf_sde import SDEControl, sde_generate
from hf_sde.vllm import get_traces, sde_args, sde_prompt

MODES = [
    dict(mode="temperature", beta=1.0),
    dict(mode="steer", alpha=0.3),
    dict(mode="temperature+steer", beta=0.5, alpha=0.2, gate="sigmoid", gate_threshold=0.0),
    None,  # a plain request in the same batch
]
# Prompt of each request: the plain one shares its prompt with the temperature one (greedy: same tokens, and
# their prompt blocks are shared by prefix caching) and with the steered one (whose salt keeps it apart).
PROMPT_OF = [0, 0, 1, 0]


_REFERENCES: dict = {}


def reference(model, heads, ids, control, new_tokens=NEW_TOKENS):
    """``sde_generate``'s tokens and trace (memoized: each reference is computed once per session)."""
    key = (tuple(ids), repr(control), new_tokens)
    if key not in _REFERENCES:
        _REFERENCES[key] = _reference(model, heads, ids, control, new_tokens)
    return _REFERENCES[key]


def _reference(model, heads, ids, control, new_tokens):
    # vLLM runs with ignore_eos=True (so that requests grow into preemption): no EOS stop here either. The
    # explicit mask keeps generate from masking the prompt's <|im_end|> (= pad id) once EOS is unset.
    input_ids = torch.tensor([ids])
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True, eos_token_id=None,
                  attention_mask=torch.ones_like(input_ids))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "temperature control under greedy decoding"
        out = sde_generate(model, input_ids, sde_control=SDEControl(heads, **control) if control else None, **kwargs)
    return out.sequences[0, len(ids):].tolist(), getattr(out, "sde_trace", None)


def assert_traces_close(ref, got, steers: bool):
    n = ref.diffusion.shape[1]
    assert got.diffusion.shape == (1, n)
    assert got.positions[0].tolist() == ref.positions[0].tolist()
    for name, atol in (("diffusion", 1e-4), ("zscore", 1e-4), ("temperature", 1e-4), ("surprise", 1e-4)):
        a, b = getattr(ref, name)[0], getattr(got, name)[0]
        assert torch.equal(a.isnan(), b.isnan()), name
        assert torch.allclose(a.nan_to_num(), b.nan_to_num(), atol=atol, rtol=1e-4), (name, (a - b).abs().max())
    assert torch.allclose(ref.drift_norm, got.drift_norm, rtol=1e-4)
    if steers:
        assert (got.steer_norm > 0).all()
        assert torch.allclose(ref.steer_norm, got.steer_norm, rtol=1e-4)
    else:
        assert (got.steer_norm == 0).all()


@pytest.fixture(scope="module")
def batch_run(llm, prompt_ids):
    """One batch of four requests (three SDE modes and a plain one) through chunked prefill and preemption."""
    before = llm.preemptions
    args = [sde_args(**m) if m else None for m in MODES]
    prompts = [sde_prompt({"prompt_token_ids": prompt_ids[p]}, a) for p, a in zip(PROMPT_OF, args, strict=True)]
    params = [SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, extra_args=a) for a in args]
    outs = llm.generate(prompts, params, use_tqdm=False)
    traces = get_traces(llm, [a["sde_trace_id"] for a in args if a])
    return outs, traces, llm.preemptions - before


def test_batch_went_through_chunked_prefill_and_preemption(batch_run, prompt_ids):
    outs, traces, preemptions = batch_run
    assert min(len(ids) for ids in prompt_ids) > 32  # each prompt needs two prefill chunks
    assert all(len(ids) < 64 < len(ids) + NEW_TOKENS for ids in prompt_ids)  # and grows into a third KV block
    assert preemptions > 0, "the KV cache was meant to be too small for the batch: no request was preempted"
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outs)
    assert all(t is not None and t.diffusion.shape == (1, NEW_TOKENS) for t in traces)


@pytest.mark.parametrize("i", range(3))
def test_sde_request_matches_sde_generate(batch_run, hf, heads, prompt_ids, i):
    outs, traces, _ = batch_run
    model, _ = hf
    control = dict(MODES[i])
    ref_tokens, ref_trace = reference(model, heads, prompt_ids[PROMPT_OF[i]], control)
    assert list(outs[i].outputs[0].token_ids) == ref_tokens
    assert_traces_close(ref_trace, traces[i], steers="steer" in control["mode"])
    if "temperature" in control["mode"]:
        law = SDEControl(heads, **control).temperature_law(ref_trace.zscore)
        assert torch.allclose(traces[i].temperature, law, atol=1e-5)


def test_steering_changes_tokens_and_plain_request_is_unaffected(batch_run, hf, heads, prompt_ids):
    outs, _, _ = batch_run
    model, _ = hf
    # Greedy: temperatures do not move the argmax, so sde_generate's temperature-mode tokens are plain greedy.
    plain, _ = reference(model, heads, prompt_ids[0], MODES[0])
    assert list(outs[3].outputs[0].token_ids) == plain
    assert list(outs[1].outputs[0].token_ids) != plain, "alpha=0.3 was expected to change the greedy text"


def test_sampled_temperature_scales_only_its_row(llm, hf, heads, prompt_ids):
    """Processed logprobs are log_softmax(logits / tau) for the SDE row and log_softmax(logits) for the plain row."""
    model, _ = hf
    args = sde_args(mode="temperature", beta=1.0)
    params = [SamplingParams(max_tokens=12, temperature=1.0, logprobs=0, extra_args=args),
              SamplingParams(max_tokens=12, temperature=1.0, logprobs=0)]  # (per-request seeds fail on CPU with chunked prefill: "CPU Generator does not use offset")
    outs = llm.generate([{"prompt_token_ids": prompt_ids[0]}, {"prompt_token_ids": prompt_ids[2]}], params,
                        use_tqdm=False)
    trace = get_traces(llm, [args["sde_trace_id"]])[0]
    taus = trace.temperature[0]
    assert not torch.allclose(taus, torch.ones_like(taus))
    for out, ids, tau in ((outs[0], prompt_ids[0], taus), (outs[1], prompt_ids[2], None)):
        tokens = list(out.outputs[0].token_ids)
        with torch.no_grad():
            logits = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1: len(ids) - 1 + len(tokens)]
        scaled = logits / tau.unsqueeze(-1) if tau is not None else logits
        want = torch.log_softmax(scaled, -1)[torch.arange(len(tokens)), torch.tensor(tokens)]
        got = torch.tensor([step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens, strict=True)])
        assert torch.allclose(got, want, atol=2e-4), (got - want).abs().max()
    # the SDE row's temperatures follow the law on its own z-scores
    law = SDEControl(heads, mode="temperature", beta=1.0).temperature_law(trace.zscore)
    assert torch.allclose(trace.temperature, law, atol=1e-6)
    assert math.isnan(trace.surprise[0, -1])


def test_a_per_layer_direction_matches_generate(llm, hf, heads, prompt_ids):
    """A GGUF control vector's layout (one vector per layer) sent as sde_direction: generate's tokens and trace."""
    model, _ = hf
    n, read = heads.config.num_layers, heads.config.layer
    g = torch.Generator().manual_seed(0)
    vectors = {layer: torch.randn(heads.config.hidden_size, generator=g) for layer in sorted({read, min(read + 2, n - 1)})}
    assert len(vectors) == 2
    control = dict(mode="steer", alpha=0.3, direction=vectors)
    tokens, trace = _reference(model, heads, prompt_ids[1], control, NEW_TOKENS)
    single, _ = _reference(model, heads, prompt_ids[1], dict(mode="steer", alpha=0.3, direction=vectors[read]),
                           NEW_TOKENS)
    assert tokens != single  # the second layer's vector acts: the test can fail
    args = sde_args(mode="steer", alpha=0.3, direction=vectors)
    assert sorted(args["sde_direction"]) == sorted(str(k) for k in vectors)
    out = llm.generate([sde_prompt(prompt_ids[1], args)], [SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0,
                                                                            ignore_eos=True, extra_args=args)],
                       use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == tokens
    got = get_traces(llm, [args["sde_trace_id"]])[0]
    assert_traces_close(trace, got, steers=True)
    assert torch.allclose(got.steer_norm, trace.steer_norm, rtol=1e-3, atol=1e-4)  # the layers' norms, summed
