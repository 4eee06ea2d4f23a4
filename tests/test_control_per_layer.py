"""Steering along one vector per layer (a GGUF control vector's layout): each listed layer moves by
``alpha * gate(z) * ||h|| * unit(v_layer)`` at the newest position, the gate from the heads' layer."""

from __future__ import annotations

import pytest
import torch
from control_fixtures import all_hooks, tiny_bundle

from hf_sde import SDEControl, enable_sde_control, load_control_vector, save_control_vector
from hf_sde.data.layers import decoder_layers

IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25], [0, 0, 1, 40, 41, 42, 43]])
MASK = (IDS != 0).long()
NEW = 8


def _vectors(hidden: int, layers=(1, 2), seed: int = 0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(hidden, generator=g) for layer in layers}


def _generate(model, ctl, **kw):
    return model.generate(input_ids=IDS, attention_mask=MASK, do_sample=False, max_new_tokens=NEW, eos_token_id=None,
                          sde_control=ctl, return_dict_in_generate=True, **kw)


class HandSteering:
    """The same steering written out by hand: forward hooks adding ``alpha * ||h|| * unit(v)`` to the newest
    position of each listed block (gate "always", so no state is needed)."""

    def __init__(self, model, vectors: dict[int, torch.Tensor], alpha: float):
        self.norms: list[torch.Tensor] = []
        blocks = decoder_layers(model)
        self.handles = [blocks[layer].register_forward_hook(self._hook(v, alpha, first=layer == min(vectors)))
                        for layer, v in vectors.items()]

    def _hook(self, v, alpha, first):
        unit = v / v.norm()

        def hook(_module, _args, out):
            h = out[0] if isinstance(out, tuple) else out
            delta = alpha * h[:, -1].norm(dim=-1, keepdim=True) * unit
            h = h.clone()
            h[:, -1] += delta
            norm = delta.norm(dim=-1)
            if first:
                self.norms.append(norm)
            else:
                self.norms[-1] = self.norms[-1] + norm
            return (h, *out[1:]) if isinstance(out, tuple) else h
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def test_per_layer_steering_equals_the_hand_written_hooks():
    tb = tiny_bundle(layer=1)
    model = enable_sde_control(tb.model)
    vectors = _vectors(32, layers=(1, 2))
    out = _generate(model, SDEControl(tb.heads, mode="steer", alpha=0.3, direction=vectors))
    assert all_hooks(model) == {}
    hand = HandSteering(model, vectors, 0.3)
    try:
        ref = model.generate(input_ids=IDS, attention_mask=MASK, do_sample=False, max_new_tokens=NEW,
                             eos_token_id=None)
    finally:
        hand.remove()
    plain = model.generate(input_ids=IDS, attention_mask=MASK, do_sample=False, max_new_tokens=NEW, eos_token_id=None)
    assert torch.equal(out.sequences, ref)
    assert not torch.equal(ref, plain)  # the steering is strong enough to change tokens: the test can fail
    # steer_norm: the sum of both layers' step norms, per step (the hooks' last forward has no recorded step)
    torch.testing.assert_close(out.sde_trace.steer_norm, torch.stack(hand.norms[:NEW], 1), rtol=1e-4, atol=1e-5)


def test_one_layer_dict_equals_the_vector_at_that_layer():
    tb = tiny_bundle(layer=1)
    model = enable_sde_control(tb.model)
    v = _vectors(32, layers=(2,))[2]
    for gate in ("always", "sigmoid"):
        single = _generate(model, SDEControl(tb.heads, mode="steer", alpha=0.4, gate=gate, direction=v, steer_layer=2))
        dict_ = _generate(model, SDEControl(tb.heads, mode="steer", alpha=0.4, gate=gate, direction={2: v}))
        assert torch.equal(single.sequences, dict_.sequences)
        torch.testing.assert_close(single.sde_trace.steer_norm, dict_.sde_trace.steer_norm, equal_nan=True)


def test_alpha_zero_is_plain_generate_and_observe_ignores_the_vectors():
    tb = tiny_bundle(layer=1)
    model = enable_sde_control(tb.model)
    plain = model.generate(input_ids=IDS, attention_mask=MASK, do_sample=False, max_new_tokens=NEW, eos_token_id=None)
    vectors = _vectors(32)
    assert torch.equal(_generate(model, SDEControl(tb.heads, mode="steer", alpha=0.0, direction=vectors)).sequences,
                       plain)
    assert torch.equal(_generate(model, SDEControl(tb.heads, mode="observe", alpha=1.0, direction=vectors)).sequences,
                       plain)


def test_a_gguf_control_vector_steers_generate(tmp_path):
    """The file llama.cpp / repeng read and write, loaded and passed as the direction."""
    tb = tiny_bundle(layer=1)
    model = enable_sde_control(tb.model)
    vectors = _vectors(32)
    path = save_control_vector(vectors, tmp_path / "v.gguf", model_hint="llama")
    loaded = load_control_vector(path)
    a = _generate(model, SDEControl(tb.heads, mode="steer", alpha=0.3, direction=loaded))
    b = _generate(model, SDEControl(tb.heads, mode="steer", alpha=0.3, direction=vectors))
    assert torch.equal(a.sequences, b.sequences)


def test_negative_layer_keys_resolve_like_layer_arguments():
    tb = tiny_bundle(layer=1)
    model = enable_sde_control(tb.model)
    v = _vectors(32, layers=(2,))[2]
    a = _generate(model, SDEControl(tb.heads, mode="steer", alpha=0.4, direction={-1: v}))
    b = _generate(model, SDEControl(tb.heads, mode="steer", alpha=0.4, direction={2: v}))
    assert torch.equal(a.sequences, b.sequences)


@pytest.mark.parametrize(("direction", "kwargs", "error", "match"), [
    ({}, {}, ValueError, "empty dict"),
    ({1: torch.ones(31)}, {}, ValueError, r"layer 1 must be a tensor of shape \(32,\).*another model"),
    ({1: torch.zeros(32)}, {}, ValueError, "layer 1 is zero or not finite"),
    ({1: torch.full((32,), float("nan"))}, {}, ValueError, "zero or not finite"),
    ({"1": torch.ones(32)}, {}, TypeError, "decoder layer indices"),
    ({1: torch.ones(32)}, {"steer_layer": 2}, ValueError, "drop steer_layer"),
])
def test_bad_per_layer_directions_are_refused_at_construction(direction, kwargs, error, match):
    tb = tiny_bundle(layer=1)
    with pytest.raises(error, match=match):
        SDEControl(tb.heads, mode="steer", alpha=0.3, direction=direction, **kwargs)


@pytest.mark.parametrize(("layers", "match"), [
    ((0, 2), r"steers layer\(s\) \[0\], before the heads' layer 1.*>= 1"),
    ((2, -1), "names decoder layer 2 twice"),
    ((5,), "layer 5 is out of range.*3 decoder layers"),
    ((-4,), "out of range"),
])
def test_layers_the_model_cannot_steer_are_refused_at_construction(layers, match):
    tb = tiny_bundle(layer=1)
    with pytest.raises(ValueError, match=match):
        SDEControl(tb.heads, mode="steer", alpha=0.3, direction={layer: torch.ones(32) for layer in layers})


def test_the_keys_are_resolved_and_sorted_once():
    tb = tiny_bundle(layer=1)
    ctl = SDEControl(tb.heads, mode="steer", alpha=0.3, direction={-1: torch.ones(32), 1: torch.ones(32)})
    assert list(ctl.direction) == [1, 2]
