"""Prefix caching with steering: a steered request's KV cache never reaches another request (cache_salt)."""

from __future__ import annotations

import torch
from vllm import SamplingParams

from hf_sde.vllm import sde_args, sde_prompt


def _plain_after_steered(llm, hf, ids, salted: bool):
    llm.reset_prefix_cache()
    args = sde_args(mode="steer", alpha=0.4)
    prompt = sde_prompt({"prompt_token_ids": ids}, args) if salted else {"prompt_token_ids": ids}
    # A 54-token prompt and 12 new tokens: the second 32-token KV block (positions 32-63, steered from position 53
    # on) is full, so prefix caching keeps it; the follow-up prompt (65 tokens) could reuse both blocks.
    assert 40 < len(ids) < 63
    steered = llm.generate([prompt], SamplingParams(max_tokens=66 - len(ids), temperature=0, ignore_eos=True,
                                                    extra_args=args), use_tqdm=False)[0].outputs[0].token_ids
    follow = ids + list(steered[: 65 - len(ids)])
    out = llm.generate([{"prompt_token_ids": follow}], SamplingParams(max_tokens=4, temperature=0, logprobs=0,
                                                                       ignore_eos=True), use_tqdm=False)[0]
    tokens = list(out.outputs[0].token_ids)
    model, _ = hf
    with torch.no_grad():
        logits = model(torch.tensor([follow + tokens])).logits[0, len(follow) - 1: len(follow) - 1 + len(tokens)]
    want = torch.log_softmax(logits, -1)[torch.arange(len(tokens)), torch.tensor(tokens)]
    got = torch.tensor([step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens, strict=True)])
    return out.num_cached_tokens, (got - want).abs().max().item()


def test_salted_steering_does_not_leak_into_a_plain_request(llm, hf, prompt_ids):
    cached, err = _plain_after_steered(llm, hf, prompt_ids[2], salted=True)
    assert cached < 32 * 2  # the steered block was not reused
    assert err < 2e-4


def test_without_salt_the_steered_cache_would_leak(llm, hf, prompt_ids):
    """The reason for the salt: the same two requests without it reuse steered KV and change the plain logprobs."""
    cached, err = _plain_after_steered(llm, hf, prompt_ids[2], salted=False)
    llm.reset_prefix_cache()
    assert cached >= 32 * 2
    assert err > 1e-3
