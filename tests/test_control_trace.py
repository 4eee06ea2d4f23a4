"""Decoding-time control: the temperature law, the per-step trace, composition with the rest of ``generate``,
hook hygiene, independence of models, input validation, streaming, stop strings and low-precision models."""

from __future__ import annotations

import math
import threading

import control_fixtures
import pytest
import torch
from control_fixtures import PROMPTS, all_hooks, encode, run, tiny_bundle
from transformers import LogitsProcessor, TextIteratorStreamer

from hf_sde import SDEControl, SDEStep, enable_sde_control, sde_generate

make_stories = control_fixtures.make_stories  # a fixture (fresh stories260K copies)

NEW = 12
FIELDS = ("diffusion", "zscore", "drift_norm", "temperature", "steer_norm", "surprise", "positions")
FLOAT_FIELDS = FIELDS[:-1]


sb = control_fixtures.enabled_stories  # a fixture: stories260K with SDE control enabled, one per module


# ----- the temperature law ----------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.5, 2.0, -0.5, -2.0, 0.0])
def test_temperature_law_monotone_and_clipped(sb, beta):
    ctl = SDEControl(sb.heads, mode="temperature", beta=beta, temperature=0.9, min_temperature=0.4,
                     max_temperature=1.3)
    z = torch.linspace(-6, 6, 241)
    tau = ctl.temperature_law(z)
    steps = tau.diff()
    assert ((tau >= 0.4) & (tau <= 1.3)).all()
    if beta > 0:
        assert (steps <= 0).all()
    elif beta < 0:
        assert (steps >= 0).all()
    else:
        assert torch.equal(tau, torch.full_like(tau, 0.9))
    if beta != 0:  # both clip bounds reached, and the law in between
        assert tau.min() == pytest.approx(0.4) and tau.max() == pytest.approx(1.3)
        mid = z.abs() < 0.05
        assert torch.allclose(tau[mid], 0.9 * torch.exp(-beta * z[mid]))


@pytest.mark.parametrize("beta", [1.0, -1.0])
def test_recorded_temperature_follows_zscore(sb, beta):
    ctl = SDEControl(sb.heads, mode="temperature", beta=beta, min_temperature=0.5, max_temperature=1.4)
    out = run(sb.model.generate, encode(sb.tok, PROMPTS), 0, do_sample=True, top_k=0, max_new_tokens=16,
              sde_control=ctl, return_dict_in_generate=True)
    tr = out.sde_trace
    keep = torch.isfinite(tr.zscore)
    z, tau = tr.zscore[keep], tr.temperature[keep]
    assert z.numel() > 8 and z.std() > 0.1
    assert torch.equal(tau, ctl.temperature_law(z))
    assert ((tau >= 0.5) & (tau <= 1.4)).all()
    assert tau.max() > tau.min()  # the law really varied the temperature
    ordered = tau[torch.argsort(z)]
    if beta > 0:  # a higher z-score never gives a higher temperature
        assert (ordered.diff() <= 0).all()
    else:
        assert (ordered.diff() >= 0).all()


def test_invalid_control_arguments(sb):
    for bad in (dict(mode="nope"), dict(gate="nope"), dict(min_temperature=0.0), dict(min_temperature=2.0),
                dict(temperature=0.0), dict(beta=math.nan), dict(alpha=math.inf), dict(direction="sideways")):
        with pytest.raises(ValueError):
            SDEControl(sb.heads, **bad)
    with pytest.raises(TypeError):
        SDEControl(object())
    with pytest.raises(TypeError):
        sb.model.generate(**encode(sb.tok, PROMPTS[:1]), max_new_tokens=2, sde_control="observe")


# ----- the trace --------------------------------------------------------------------------------------
def _pick_eos(seqs: torch.Tensor, width: int) -> tuple[int, int]:
    """A token row 0 produces first at some step >= 2 and row 1 never produces: (token, step)."""
    new0, new1 = seqs[0, width:].tolist(), seqs[1, width:].tolist()
    for k in range(2, len(new0) - 3):
        if new0[k] not in new0[:k] and new0[k] not in new1:
            return new0[k], k
    raise AssertionError(f"no usable EOS candidate in {new0} / {new1}")


def test_trace_shapes_and_nan_after_eos(sb):
    inputs = encode(sb.tok, PROMPTS)
    width = inputs["input_ids"].shape[1]
    free = sb.model.generate(**inputs, do_sample=False, max_new_tokens=NEW, sde_control=SDEControl(sb.heads, "observe"),
                             return_dict_in_generate=True)
    for name in FIELDS:
        assert getattr(free.sde_trace, name).shape == (2, NEW), name
    assert torch.isnan(free.sde_trace.surprise[:, -1]).all()
    assert torch.isfinite(free.sde_trace.surprise[:, :-1]).all()
    eos, k = _pick_eos(free.sequences, width)

    ctl = SDEControl(sb.heads, mode="temperature", beta=1.0)
    out = sb.model.generate(**inputs, do_sample=False, max_new_tokens=NEW, sde_control=ctl, eos_token_id=[eos],
                            return_dict_in_generate=True)
    tr = out.sde_trace
    assert out.sequences.shape[1] == width + NEW  # row 1 keeps going
    assert out.sequences[0, width + k].item() == eos
    assert out.sequences[0, width:width + k].tolist() == free.sequences[0, width:width + k].tolist()
    for name in FIELDS:
        assert getattr(tr, name).shape == (2, NEW), name
    for name in FLOAT_FIELDS[:-1]:
        v = getattr(tr, name)
        assert torch.isfinite(v[0, :k + 1]).all(), name  # up to and including the EOS step
        assert torch.isnan(v[0, k + 1:]).all(), name     # masked after it
        assert torch.isfinite(v[1]).all(), name
    # Surprise needs the next state: none at / after EOS, none at the last step.
    assert torch.isfinite(tr.surprise[0, :k]).all() and torch.isnan(tr.surprise[0, k:]).all()
    assert torch.isfinite(tr.surprise[1, :-1]).all() and torch.isnan(tr.surprise[1, -1])
    assert (tr.positions[0, k + 1:] == -1).all() and (tr.positions[0, :k + 1] >= 0).all()
    # Steps before EOS are the ones the unconstrained run saw.
    # (per step vs deferred: the z-score scales float32 rounding of log s by 1 / the calibration's spread)
    torch.testing.assert_close(tr.zscore[:, :k + 1], free.sde_trace.zscore[:, :k + 1], rtol=1e-4, atol=2e-4)
    assert tr.to_dict()["zscore"][1] == tr.zscore[1].tolist()

    # A single row that hits EOS stops there: trace as long as the output.
    single = sb.model.generate(**encode(sb.tok, PROMPTS[:1]), do_sample=False, max_new_tokens=NEW,
                               sde_control=SDEControl(sb.heads, "observe"), eos_token_id=eos,
                               return_dict_in_generate=True)
    assert single.sde_trace.zscore.shape == (1, k + 1)
    assert torch.isfinite(single.sde_trace.zscore).all() and torch.isnan(single.sde_trace.surprise[0, k])


def test_trace_follows_returned_tokens_not_forwards(sb):
    """transformers may run one step more than it returns and undo it (its deferred stop check, used on MPS):
    the trace must have one step per returned token, with the last surprise still NaN."""
    inputs = encode(sb.tok, PROMPTS)
    plain = sb.model.generate(**inputs, do_sample=False, max_new_tokens=NEW,
                              sde_control=SDEControl(sb.heads, "observe"), return_dict_in_generate=True)

    def generate_one_step_too_many(*args, max_new_tokens, **kwargs):
        out = type(sb.model).generate(sb.model, *args, max_new_tokens=max_new_tokens + 1, **kwargs)
        out.sequences = out.sequences[:, :-1]  # what _undo_generation_steps does
        return out

    steps = []
    out = sde_generate(sb.model, **inputs, do_sample=False, max_new_tokens=NEW, return_dict_in_generate=True,
                       sde_control=SDEControl(sb.heads, "observe", callback=steps.append),
                       _generate=generate_one_step_too_many)
    assert len(steps) == NEW + 1  # the extra forward really happened
    assert torch.equal(out.sequences, plain.sequences)
    for name in FIELDS:
        # Per step (a callback) and deferred (observe) run the nets at other batch shapes: float32 rounding of
        # log s, which the z-score scales by 1 / the calibration's spread (~0.02 here), and the surprise with it.
        tol = dict(rtol=1e-4, atol=2e-4) if name in ("zscore", "surprise") else {}
        torch.testing.assert_close(getattr(out.sde_trace, name), getattr(plain.sde_trace, name), equal_nan=True,
                                   **tol)


def test_inputs_and_inputs_embeds(sb):
    """``inputs=`` and ``inputs_embeds=`` prompts give the trace of ``input_ids=``."""
    inputs = encode(sb.tok, PROMPTS)
    kw = dict(do_sample=False, max_new_tokens=6, return_dict_in_generate=True)
    ref = sb.model.generate(**inputs, sde_control=SDEControl(sb.heads, "observe"), **kw)
    by_inputs = sb.model.generate(inputs=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                  sde_control=SDEControl(sb.heads, "observe"), **kw)
    embeds = sb.model.get_input_embeddings()(inputs["input_ids"])
    by_embeds = sb.model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                  sde_control=SDEControl(sb.heads, "observe"), **kw)
    width = inputs["input_ids"].shape[1]
    assert torch.equal(by_inputs.sequences, ref.sequences)
    assert torch.equal(by_embeds.sequences, ref.sequences[:, width:])  # embeds: only the new tokens come back
    for out in (by_inputs, by_embeds):
        for name in FIELDS:
            torch.testing.assert_close(getattr(out.sde_trace, name), getattr(ref.sde_trace, name), equal_nan=True)


# ----- composition ------------------------------------------------------------------------------------
class BanToken(LogitsProcessor):
    def __init__(self, token: int):
        self.token, self.calls = token, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        scores = scores.clone()
        scores[:, self.token] = -math.inf
        return scores


def test_user_logits_processor_and_temperature_compose(sb):
    inputs = encode(sb.tok, PROMPTS)
    width = inputs["input_ids"].shape[1]
    plain = run(sb.model.generate, inputs, 0, do_sample=False, max_new_tokens=NEW)
    banned = plain[0, width + 1].item()
    ban = BanToken(banned)
    ctl = SDEControl(sb.heads, mode="temperature", beta=2.0, min_temperature=0.3, max_temperature=1.5)
    out = run(sb.model.generate, inputs, 0, do_sample=True, top_k=0, max_new_tokens=NEW, sde_control=ctl,
              logits_processor=[ban], output_scores=True, output_logits=True, return_dict_in_generate=True)
    n = out.sequences.shape[1] - width
    assert ban.calls == n == len(out.scores)
    assert banned not in out.sequences[:, width:].tolist()[0] + out.sequences[:, width:].tolist()[1]
    tau = out.sde_trace.temperature
    assert (tau != 1).any()
    ent_change = []
    for k in range(n):
        expected = out.logits[k].clone()
        expected[:, banned] = -math.inf
        expected = expected / tau[:, k:k + 1]  # the user's processor first, then the SDE temperature
        torch.testing.assert_close(out.scores[k], expected)
        p_raw = torch.softmax(out.logits[k], -1)
        p = torch.softmax(out.scores[k], -1)
        ent = lambda q: -(q * q.clamp_min(1e-30).log()).sum(-1)  # noqa: E731
        ent_change.append(ent(p) - ent(p_raw))
    ent_change = torch.stack(ent_change, 1)
    cooled, heated = tau < 0.9, tau > 1.1
    assert cooled.any() and heated.any()
    assert (ent_change[cooled] < 0).all() and (ent_change[heated] > 0).all()


def test_temperature_control_changes_samples(sb):
    inputs = encode(sb.tok, PROMPTS)
    kw = dict(do_sample=True, top_k=0, max_new_tokens=NEW)
    traces = []
    neutral = SDEControl(sb.heads, mode="temperature", beta=0.0)
    strong = SDEControl(sb.heads, mode="temperature", beta=3.0, min_temperature=0.3, max_temperature=1.5,
                        on_trace=traces.append)
    differ = 0
    for seed in range(3):
        a = run(sb.model.generate, inputs, seed, sde_control=neutral, **kw)
        b = run(sb.model.generate, inputs, seed, sde_control=strong, **kw)
        differ += int(not torch.equal(a, b))
        assert (traces[-1].temperature != 1).any()
    assert differ >= 2


# ----- hooks ------------------------------------------------------------------------------------------
class Boom(LogitsProcessor):
    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls > self.at:
            raise RuntimeError("boom")
        return scores


def test_hooks_removed_after_every_call_and_on_error():
    tb = tiny_bundle(layer=1)
    model = enable_sde_control(tb.model)
    assert all_hooks(model) == {}
    ids = torch.tensor([[1, 7, 8, 9]])
    kw = dict(input_ids=ids, do_sample=True, max_new_tokens=5)
    ref = run(model.generate, {}, 4, **kw)
    controls = [SDEControl(tb.heads, mode=m, alpha=0.1, steer_layer=s)
                for m in ("observe", "temperature", "steer", "temperature+steer") for s in (None, 2)]
    for ctl in controls:
        run(model.generate, {}, 4, sde_control=ctl, **kw)
        assert all_hooks(model) == {}, ctl.mode
    for ctl in controls:
        boom = Boom(at=2)
        with pytest.raises(RuntimeError, match="boom"):
            model.generate(sde_control=ctl, logits_processor=[boom], **kw)
        assert boom.calls == 3
        assert all_hooks(model) == {}, ctl.mode

    def bad_callback(step):
        raise KeyError("callback failed")

    with pytest.raises(KeyError):
        model.generate(sde_control=SDEControl(tb.heads, mode="steer", alpha=0.1, callback=bad_callback), **kw)
    assert all_hooks(model) == {}
    # No state survives a failed call: stock sampling is untouched.
    assert torch.equal(run(model.generate, {}, 4, **kw), ref)
    assert torch.equal(run(model.generate, {}, 4, sde_control=SDEControl(tb.heads, "observe"), **kw), ref)


# ----- several models, compatibility, unsupported decoding ---------------------------------------------
def test_two_models_with_their_own_heads_are_independent(sb):
    tb = tiny_bundle()
    big, small = sb.model, enable_sde_control(tb.model)
    big_in = encode(sb.tok, PROMPTS)
    small_ids = torch.tensor([[1, 11, 12, 13, 14]])

    def big_run(callback=None):
        ctl = SDEControl(sb.heads, mode="temperature+steer", alpha=0.1, callback=callback)
        return big.generate(**big_in, do_sample=False, max_new_tokens=NEW, sde_control=ctl,
                            return_dict_in_generate=True)

    def small_run():
        return small.generate(input_ids=small_ids, do_sample=False, max_new_tokens=6,
                              sde_control=SDEControl(tb.heads, mode="steer", alpha=0.3),
                              return_dict_in_generate=True)

    ref_big, ref_small = big_run(), small_run()
    # The small model generates (with its own hooks) in the middle of every step of the big one.
    nested = []
    again = big_run(callback=lambda step: nested.append(small_run()))
    assert len(nested) == NEW
    assert torch.equal(again.sequences, ref_big.sequences)
    for name in FIELDS:
        torch.testing.assert_close(getattr(again.sde_trace, name), getattr(ref_big.sde_trace, name), equal_nan=True)
    for out in nested:
        assert torch.equal(out.sequences, ref_small.sequences)
        torch.testing.assert_close(out.sde_trace.steer_norm, ref_small.sde_trace.steer_norm)
    assert all_hooks(big) == {} and all_hooks(small) == {}


def test_heads_of_another_model_raise_clear_error(sb):
    tb = tiny_bundle()  # hidden size 32, 3 layers; stories260K: 64, 5
    inputs = encode(sb.tok, PROMPTS[:1])
    with pytest.raises(ValueError, match="hidden size 32"):
        sb.model.generate(**inputs, max_new_tokens=2, sde_control=SDEControl(tb.heads, mode="observe"))
    other_depth = tiny_bundle(num_layers=2)
    with pytest.raises(ValueError, match="3 decoder layers"):
        enable_sde_control(other_depth.model).generate(input_ids=torch.tensor([[1, 5, 6]]), max_new_tokens=2,
                                                       sde_control=SDEControl(tb.heads, mode="observe"))
    assert all_hooks(sb.model) == {} and all_hooks(other_depth.model) == {}


def test_beam_search_and_assisted_decoding_rejected(sb, make_stories):
    from transformers import GenerationConfig

    inputs = encode(sb.tok, PROMPTS[:1])
    ctl = SDEControl(sb.heads, mode="observe")
    with pytest.raises(NotImplementedError, match="beam"):
        sb.model.generate(**inputs, num_beams=2, max_new_tokens=3, sde_control=ctl)
    with pytest.raises(NotImplementedError, match="beam"):
        sb.model.generate(**inputs, generation_config=GenerationConfig(num_beams=2, max_new_tokens=3), sde_control=ctl)
    with pytest.raises(NotImplementedError, match="assisted"):
        sb.model.generate(**inputs, assistant_model=make_stories().model, max_new_tokens=3, sde_control=ctl)
    with pytest.raises(NotImplementedError, match="prompt-lookup"):
        sb.model.generate(**inputs, prompt_lookup_num_tokens=2, max_new_tokens=3, sde_control=ctl)
    with pytest.raises(NotImplementedError, match="prompt-lookup"):
        sb.model.generate(**inputs, generation_config=GenerationConfig(prompt_lookup_num_tokens=2, max_new_tokens=3),
                          sde_control=ctl)
    assert all_hooks(sb.model) == {}


# ----- streaming, stop strings, lengths ---------------------------------------------------------------
def test_streamer_thread_with_callback(sb):
    inputs = encode(sb.tok, PROMPTS[:1])
    width = inputs["input_ids"].shape[1]
    streamer = TextIteratorStreamer(sb.tok, skip_prompt=True, skip_special_tokens=True)
    steps: list[SDEStep] = []
    ctl = SDEControl(sb.heads, mode="temperature", callback=steps.append)
    result = {}

    def target():
        torch.manual_seed(0)
        result["out"] = sb.model.generate(**inputs, do_sample=True, top_k=0, max_new_tokens=NEW, streamer=streamer,
                                          sde_control=ctl, return_dict_in_generate=True, eos_token_id=None)

    thread = threading.Thread(target=target)
    thread.start()
    text = "".join(chunk for chunk in streamer)
    thread.join(timeout=120)
    assert not thread.is_alive()
    out = result["out"]
    new = out.sequences[0, width:]
    assert new.numel() == NEW
    assert text == sb.tok.decode(new, skip_special_tokens=True)
    assert len(steps) == NEW and [s.index for s in steps] == list(range(NEW))
    tr = out.sde_trace
    for k, s in enumerate(steps):
        assert isinstance(s, SDEStep) and s.zscore.shape == (1,)
        assert s.zscore.item() == tr.zscore[0, k].item() and s.temperature.item() == tr.temperature[0, k].item()
        if k == 0:
            assert s.surprise_previous is None
        else:
            assert s.surprise_previous.item() == pytest.approx(tr.surprise[0, k - 1].item())


def test_stop_strings_and_max_new_tokens(sb):
    inputs = encode(sb.tok, PROMPTS[:1])
    width = inputs["input_ids"].shape[1]
    observe = dict(sde_control=SDEControl(sb.heads, "observe"), return_dict_in_generate=True, do_sample=False)
    free = sb.model.generate(**inputs, max_new_tokens=16, **observe)
    assert free.sequences.shape[1] - width == 16 and free.sde_trace.zscore.shape == (1, 16)
    new = free.sequences[0, width:].tolist()
    # A stop string made of the text of new tokens 3..4: generation stops as soon as it appears.
    stop = sb.tok.decode(new[3:5])
    stopped = sb.model.generate(**inputs, max_new_tokens=16, stop_strings=[stop], tokenizer=sb.tok, **observe)
    n = stopped.sequences.shape[1] - width
    assert n < 16 and sb.tok.decode(stopped.sequences[0, width:]).endswith(stop)
    assert stopped.sequences[0, width:].tolist() == new[:n]
    assert stopped.sde_trace.zscore.shape == (1, n) and torch.isfinite(stopped.sde_trace.zscore).all()
    short = run(sb.model.generate, inputs, 0, max_new_tokens=3, do_sample=True,
                sde_control=SDEControl(sb.heads, mode="temperature"), return_dict_in_generate=True)
    assert short.sequences.shape[1] - width <= 3 and short.sde_trace.zscore.shape[1] == short.sequences.shape[1] - width


# ----- precision --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models(dtype):
    tb = tiny_bundle(layer=1, dtype=dtype)  # heads fitted on the float32 model's trajectories
    model = enable_sde_control(tb.model)
    assert next(model.parameters()).dtype == dtype
    ids = torch.tensor([[1, 20, 21, 22, 23, 24], [0, 0, 1, 30, 31, 32]])
    mask = (ids != 0).long()
    for kwargs in (dict(mode="observe"), dict(mode="temperature", beta=1.0),
                   dict(mode="steer", alpha=0.2), dict(mode="temperature+steer", alpha=0.2, steer_layer=2,
                                                       direction="attractor", gate="sigmoid")):
        ctl = SDEControl(tb.heads, **kwargs)
        out = run(model.generate, {"input_ids": ids, "attention_mask": mask}, 0, do_sample=True, max_new_tokens=6,
                  sde_control=ctl, return_dict_in_generate=True, eos_token_id=None)
        tr = out.sde_trace
        assert tr.zscore.shape == (2, 6)
        for name in FLOAT_FIELDS:
            v = getattr(tr, name)
            assert v.dtype == torch.float32
            assert torch.isfinite(v[:, :-1] if name == "surprise" else v).all(), (kwargs, name)
        if ctl.steers:
            assert (tr.steer_norm > 0).all()


@pytest.mark.parametrize("mode", ["observe", "temperature", "steer"])
def test_custom_logits_processor_sees_the_current_step(sb, mode):
    """The callback runs in the forward hook, so a caller's logits processor reads this step's statistics (the
    way to build a sampler on z / surprise), whatever the mode; its view of z equals the trace."""
    inputs = encode(sb.tok, PROMPTS)
    steps: list[SDEStep] = []

    class Reads(LogitsProcessor):
        def __init__(self):
            self.seen = []

        def __call__(self, input_ids, scores):
            self.seen.append((steps[-1].index, steps[-1].zscore.clone()))
            return scores

    reads = Reads()
    ctl = SDEControl(sb.heads, mode=mode, alpha=0.1, callback=steps.append)
    out = sb.model.generate(**inputs, do_sample=False, max_new_tokens=NEW, sde_control=ctl, logits_processor=[reads],
                            return_dict_in_generate=True, eos_token_id=None)
    assert [k for k, _ in reads.seen] == list(range(NEW))
    seen_z = torch.stack([z for _, z in reads.seen], 1)
    torch.testing.assert_close(seen_z, out.sde_trace.zscore)
