"""Steering: ``h <- h + alpha * gate(z) * ||h|| * unit(v)`` at the newest position only, KV-cache correct."""

from __future__ import annotations

import control_fixtures
import pytest
import torch
from control_fixtures import PROMPTS, all_hooks, encode, run, tiny_bundle
from transformers import GenerationConfig

from hf_sde import SDEControl, enable_sde_control
from hf_sde.data.layers import decoder_layers

NEW = 10


sb = control_fixtures.enabled_stories  # a fixture: stories260K with SDE control enabled, one per module


class Capture:
    """Records the output of a block (registered before generate, so it sees the state before steering) and
    the input of the module after it (the state after steering)."""

    def __init__(self, model, layer: int):
        blocks = decoder_layers(model)
        after = blocks[layer + 1] if layer + 1 < len(blocks) else model.model.norm
        self.before, self.after = [], []
        self.handles = [
            blocks[layer].register_forward_hook(lambda m, a, out: self.before.append(
                (out[0] if isinstance(out, tuple) else out).detach().clone())),
            after.register_forward_pre_hook(lambda m, a, kw: self.after.append(
                (a[0] if a else kw["hidden_states"]).detach().clone()), with_kwargs=True),
        ]

    def remove(self):
        for h in self.handles:
            h.remove()


def _plain_block_output(model, layer, **inputs):
    out = []
    handle = decoder_layers(model)[layer].register_forward_hook(lambda m, a, o: out.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return out[0]


@pytest.mark.parametrize("steer_layer", [None, 2])
def test_steering_touches_only_the_newest_position(steer_layer):
    """Heads read layer 1 of a 3-layer model; steering at layer 1 (or 2) changes the newest position only.

    Prompt positions other than the last leave the steered layer exactly as in a plain forward, every decoding
    forward sees one position (so nothing in the KV cache is re-run or steered twice), and the newest position
    moves by exactly ``alpha * ||h|| * unit(v)`` with the user vector ``v``.
    """
    tb = tiny_bundle(layer=1)
    model = enable_sde_control(tb.model)
    layer = 1 if steer_layer is None else steer_layer
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25], [0, 0, 1, 40, 41, 42, 43]])
    mask = (ids != 0).long()
    v = torch.linspace(-1, 1, 32)
    alpha = 0.4
    ctl = SDEControl(tb.heads, mode="steer", alpha=alpha, direction=v, steer_layer=steer_layer)
    cap = Capture(model, layer)
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                             sde_control=ctl, return_dict_in_generate=True, eos_token_id=None)
    finally:
        cap.remove()
    assert all_hooks(model) == {}
    assert len(cap.before) == len(cap.after) == NEW  # prefill + NEW - 1 decoding forwards
    plain = _plain_block_output(model, layer, input_ids=ids, attention_mask=mask)
    prefill_before, prefill_after = cap.before[0], cap.after[0]
    assert prefill_after.shape == plain.shape
    # Cached prompt positions: untouched (real positions; the pads' values are irrelevant).
    real = mask[:, :-1].bool()
    torch.testing.assert_close(prefill_after[:, :-1][real], plain[:, :-1][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prefill_before[:, :-1], prefill_after[:, :-1], rtol=0, atol=0)
    for before, after in zip(cap.before[1:], cap.after[1:], strict=True):
        assert before.shape[1] == after.shape[1] == 1  # decoding steps only compute the newest position
    unit = v / v.norm()
    for k, (before, after) in enumerate(zip(cap.before, cap.after, strict=True)):
        h = before[:, -1]
        expected = h + alpha * h.norm(dim=-1, keepdim=True) * unit
        torch.testing.assert_close(after[:, -1], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.sde_trace.steer_norm[:, k], alpha * h.norm(dim=-1), rtol=1e-5, atol=1e-6)
    assert not torch.equal(prefill_after[:, -1], plain[:, -1])
    # And it changes what is generated.
    free = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, eos_token_id=None)
    assert not torch.equal(out.sequences, free)


@pytest.mark.parametrize("direction", ["drift", "attractor"])
def test_steer_norm_is_alpha_norm_and_changes_output(sb, direction):
    inputs = encode(sb.tok, PROMPTS)
    layer = sb.heads.config.layer
    alpha = 0.5
    cap = Capture(sb.model, layer)
    try:
        out = sb.model.generate(**inputs, do_sample=False, max_new_tokens=NEW, return_dict_in_generate=True,
                                sde_control=SDEControl(sb.heads, mode="steer", alpha=alpha, direction=direction))
    finally:
        cap.remove()
    norms = torch.stack([b[:, -1].norm(dim=-1) for b in cap.before], 1)
    torch.testing.assert_close(out.sde_trace.steer_norm, alpha * norms, rtol=1e-5, atol=1e-6)
    moved = torch.stack([(a[:, -1] - b[:, -1]).norm(dim=-1) for a, b in zip(cap.after, cap.before, strict=True)], 1)
    torch.testing.assert_close(moved, alpha * norms, rtol=1e-4, atol=1e-4)
    free = sb.model.generate(**inputs, do_sample=False, max_new_tokens=NEW)
    assert not torch.equal(out.sequences, free)


@pytest.mark.parametrize("gate", ["threshold", "sigmoid"])
def test_gates(sb, gate):
    inputs = encode(sb.tok, PROMPTS + ["Lily and Tom"])
    alpha, threshold = 0.3, 0.0
    ctl = SDEControl(sb.heads, mode="steer", alpha=alpha, gate=gate, gate_threshold=threshold, gate_sharpness=2.0)
    cap = Capture(sb.model, sb.heads.config.layer)
    try:
        out = run(sb.model.generate, inputs, 0, do_sample=True, top_k=0, max_new_tokens=NEW, sde_control=ctl,
                  return_dict_in_generate=True, eos_token_id=None)
    finally:
        cap.remove()
    tr = out.sde_trace
    norms = torch.stack([b[:, -1].norm(dim=-1) for b in cap.before], 1)
    above = tr.zscore > threshold
    assert above.any() and (~above).any()  # both sides of the threshold occur
    if gate == "threshold":
        assert (tr.steer_norm[~above] == 0).all()
        torch.testing.assert_close(tr.steer_norm[above], alpha * norms[above], rtol=1e-5, atol=1e-6)
    else:
        gate_value = torch.sigmoid(2.0 * (tr.zscore - threshold))
        torch.testing.assert_close(tr.steer_norm, alpha * gate_value * norms, rtol=1e-5, atol=1e-6)
        assert (tr.steer_norm[~above] < alpha * norms[~above] / 2).all()
    torch.testing.assert_close(ctl.gate_value(tr.zscore) * alpha * norms, tr.steer_norm, rtol=1e-5, atol=1e-6)


def test_chunked_prefill_reads_and_steers_only_the_last_prompt_position():
    tb = tiny_bundle(layer=1)
    model = enable_sde_control(tb.model)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37], [0, 0, 0, 1, 40, 41, 42, 43, 44, 45]])
    mask = (ids != 0).long()
    for ctl_kwargs in (dict(mode="observe"), dict(mode="steer", alpha=0.5), dict(mode="steer", alpha=0.5, steer_layer=2)):
        kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6, eos_token_id=None,
                  return_dict_in_generate=True, output_logits=True)
        ref = model.generate(sde_control=SDEControl(tb.heads, **ctl_kwargs), **kw)
        chunked = model.generate(sde_control=SDEControl(tb.heads, **ctl_kwargs), prefill_chunk_size=4, **kw)
        assert torch.equal(chunked.sequences, ref.sequences), ctl_kwargs
        # A steered non-final chunk would leave a steered prompt position in the cache of the later layers.
        torch.testing.assert_close(torch.stack(chunked.logits), torch.stack(ref.logits), rtol=1e-5, atol=1e-5)
        for name in ("zscore", "diffusion", "steer_norm", "surprise", "positions"):
            torch.testing.assert_close(getattr(chunked.sde_trace, name), getattr(ref.sde_trace, name),
                                       rtol=1e-4, atol=1e-4, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")


def test_steering_argument_errors(sb):
    inputs = encode(sb.tok, PROMPTS[:1])
    hidden = sb.heads.config.hidden_size
    for bad in (torch.ones(hidden + 1), torch.ones(1, hidden), torch.ones(hidden // 2)):
        with pytest.raises(ValueError, match="shape"):
            SDEControl(sb.heads, mode="steer", alpha=0.1, direction=bad)
    assert sb.heads.config.layer == 4
    with pytest.raises(ValueError, match="precedes"):
        sb.model.generate(**inputs, max_new_tokens=2, sde_control=SDEControl(sb.heads, mode="steer", alpha=0.1, steer_layer=1))
    with pytest.raises(ValueError, match="precedes"):
        sb.model.generate(**inputs, max_new_tokens=2, sde_control=SDEControl(sb.heads, mode="steer", alpha=0.1, steer_layer=-2))
    with pytest.raises(ValueError, match="out of range"):
        sb.model.generate(**inputs, max_new_tokens=2, sde_control=SDEControl(sb.heads, mode="steer", steer_layer=7))
    steer = SDEControl(sb.heads, mode="steer", alpha=0.1)
    with pytest.raises(NotImplementedError, match="use_cache"):
        sb.model.generate(**inputs, max_new_tokens=2, use_cache=False, sde_control=steer)
    with pytest.raises(NotImplementedError, match="use_cache"):
        sb.model.generate(**inputs, generation_config=GenerationConfig(use_cache=False, max_new_tokens=2),
                          sde_control=steer)
    assert all_hooks(sb.model) == {}
    # Observing / temperature control without the cache is fine and gives the cached result.
    ref = sb.model.generate(**inputs, do_sample=False, max_new_tokens=4, sde_control=SDEControl(sb.heads, "observe"),
                            return_dict_in_generate=True)
    nocache = sb.model.generate(**inputs, do_sample=False, max_new_tokens=4, use_cache=False,
                                sde_control=SDEControl(sb.heads, "observe"), return_dict_in_generate=True)
    assert torch.equal(nocache.sequences, ref.sequences)
    torch.testing.assert_close(nocache.sde_trace.zscore, ref.sde_trace.zscore, rtol=1e-4, atol=1e-4)


def test_static_cache_gives_the_dynamic_cache_trace():
    """A static cache hands the model a 4D mask: positions (hence t_k, z-scores, steering) must not change."""
    tb = tiny_bundle(layer=1)
    model = enable_sde_control(tb.model)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25], [0, 0, 1, 40, 41, 42, 43]])
    kw = dict(input_ids=ids, attention_mask=(ids != 0).long(), do_sample=False, max_new_tokens=5, eos_token_id=None,
              return_dict_in_generate=True)
    ctl = dict(mode="temperature+steer", alpha=0.3)
    ref = model.generate(sde_control=SDEControl(tb.heads, **ctl), **kw)
    static = model.generate(sde_control=SDEControl(tb.heads, **ctl), cache_implementation="static", **kw)
    assert ref.sde_trace.positions[:, 0].tolist() == [6, 4]
    assert torch.equal(static.sequences, ref.sequences)
    for name in ("positions", "zscore", "temperature", "steer_norm", "surprise"):
        torch.testing.assert_close(getattr(static.sde_trace, name), getattr(ref.sde_trace, name), rtol=1e-4, atol=1e-4,
                                   equal_nan=True)
    assert all_hooks(model) == {}
