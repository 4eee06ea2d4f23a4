"""Generation that continues from a cache: the path and its time origin do not depend on what the cache holds.

A multi-turn chat reuses the previous turn's cache: the second call passes the whole conversation so far plus a
cache holding all of it but the last token. Its trace must equal the trace of the same tokens generated without
a cache (observe: z / surprise; temperature and steer: the same tokens with the same seed), for every family of
the parity matrix and every cache kind ``generate`` accepts from a caller (dynamic, static, sliding-window).
"""

from __future__ import annotations

import copy

import pytest
import torch
from control_fixtures import PARITY_FAMILIES, SLIDING_FAMILIES, parity_bundle
from transformers import StaticCache

from hf_sde import SDEControl, sde_generate

PROMPT = torch.tensor([[1, 5, 9, 13, 17, 21], [0, 0, 1, 40, 41, 42]])
NEXT_TURN = torch.tensor([[7, 8, 11], [12, 14, 15]])
CASES = [(f, c, False) for f in PARITY_FAMILIES for c in ("dynamic", "static")]
CASES += [(f, c, True) for f in SLIDING_FAMILIES for c in ("dynamic", "static")]
CONTROLS = {
    "observe": dict(mode="observe"),
    "temperature": dict(mode="temperature", beta=1.5, temperature=1.2),
    "steer": dict(mode="steer", alpha=0.5),
}


def _first_turn(model, cache_kind: str):
    """Stock generate of the first answer, returning its cache; then the second turn's inputs."""
    cache = StaticCache(config=model.config, max_cache_len=64) if cache_kind == "static" else None
    mask = (PROMPT != 0).long()
    first = model.generate(input_ids=PROMPT, attention_mask=mask, max_new_tokens=3, do_sample=False,
                           return_dict_in_generate=True, cache=cache)
    ids = torch.cat([first.sequences, NEXT_TURN], 1)
    mask = torch.cat([mask, torch.ones(2, ids.shape[1] - mask.shape[1], dtype=torch.long)], 1)
    return first.cache, ids, mask


def _call(model, heads, seed: int, ctl: dict, **kw):
    torch.manual_seed(seed)
    return sde_generate(model, sde_control=SDEControl(heads, **ctl), max_new_tokens=5, return_dict_in_generate=True,
                        **kw)


def _assert_same_path(cont, fresh, label: str, ctl: str) -> None:
    assert torch.equal(cont.sequences, fresh.sequences), label
    a, b = cont.sde_trace, fresh.sde_trace
    assert torch.equal(a.positions, b.positions), label
    for name in ("zscore", "diffusion", "temperature", "steer_norm"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5, equal_nan=True,
                                   msg=f"{label}: {name}")
    # The surprise reads the next state, whose attention ran over a cache in one call and a prefill in the other.
    torch.testing.assert_close(a.surprise, b.surprise, rtol=1e-5, atol=1e-4, equal_nan=True, msg=f"{label}: surprise")
    assert torch.isfinite(a.zscore[:, 0]).all(), label


@pytest.mark.parametrize(("family", "cache", "sliding"), CASES,
                         ids=[f"{f}-{c}{'-sliding' if s else ''}" for f, c, s in CASES])
def test_continued_call_equals_uncached_call(family, cache, sliding):
    bundle = parity_bundle(family, sliding)
    model, heads = bundle.model, bundle.heads
    past, ids, mask = _first_turn(model, cache)
    assert past.get_seq_length() == ids.shape[1] - NEXT_TURN.shape[1] - 1  # all but the last answer token
    for name, ctl in CONTROLS.items():
        label = f"{family}/{cache}/{name}"
        kw = dict(input_ids=ids, attention_mask=mask, do_sample=name != "observe")
        cont = _call(model, heads, 0, ctl, cache=copy.deepcopy(past), **kw)
        fresh = _call(model, heads, 0, ctl, **kw)
        _assert_same_path(cont, fresh, label, name)
        if name == "observe":  # and observe changes nothing: the stock continued call's tokens
            torch.manual_seed(0)
            stock = model.generate(cache=copy.deepcopy(past), max_new_tokens=5, **kw)
            assert torch.equal(stock, cont.sequences), label


@pytest.mark.parametrize("origin", ["sequence", "prompt_end"])
def test_time_origin_is_the_same_with_a_cache(origin):
    """k = 0 at the last prompt position (prompt_end) or t from the sequence start, exactly as without a cache."""
    bundle = parity_bundle("llama")
    heads = copy.deepcopy(bundle.heads)
    heads.config.time_origin = origin
    past, ids, mask = _first_turn(bundle.model, "dynamic")
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=True)
    cont = _call(bundle.model, heads, 3, CONTROLS["temperature"], cache=copy.deepcopy(past), **kw)
    fresh = _call(bundle.model, heads, 3, CONTROLS["temperature"], **kw)
    _assert_same_path(cont, fresh, origin, "temperature")
    assert cont.sde_trace.positions[:, 0].tolist() == [ids.shape[1] - 1, ids.shape[1] - 3]  # left padding: 2


def test_deprecated_past_key_values_name_continues_too():
    bundle = parity_bundle("qwen3")
    past, ids, mask = _first_turn(bundle.model, "dynamic")
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False)
    with pytest.warns(FutureWarning, match="past_key_values"):
        cont = _call(bundle.model, bundle.heads, 0, CONTROLS["observe"], past_key_values=copy.deepcopy(past), **kw)
    _assert_same_path(cont, _call(bundle.model, bundle.heads, 0, CONTROLS["observe"], **kw), "qwen3", "observe")


def test_only_the_new_tokens_with_the_full_mask():
    """The other way to continue: ``input_ids`` holds only the new turn, the attention mask the whole sequence."""
    bundle = parity_bundle("llama")
    past, ids, mask = _first_turn(bundle.model, "dynamic")
    cut = past.get_seq_length()
    kw = dict(attention_mask=mask, do_sample=True)
    cont = _call(bundle.model, bundle.heads, 1, CONTROLS["temperature"], input_ids=ids[:, cut:],
                 cache=copy.deepcopy(past), **kw)
    fresh = _call(bundle.model, bundle.heads, 1, CONTROLS["temperature"], input_ids=ids, **kw)
    assert torch.equal(cont.sequences, fresh.sequences[:, cut:])
    for name in ("zscore", "temperature"):
        torch.testing.assert_close(getattr(cont.sde_trace, name), getattr(fresh.sde_trace, name), rtol=1e-5,
                                   atol=1e-5)
    assert torch.equal(cont.sde_trace.positions, fresh.sde_trace.positions)


def test_three_turns_reuse_one_cache():
    """A chat: each turn passes the conversation so far and the previous turn's cache."""
    bundle = parity_bundle("mistral")
    model, heads = bundle.model, bundle.heads
    ids, cache, traces = PROMPT[:1], None, []
    turns = [torch.tensor([[30, 31]]), torch.tensor([[32, 33, 34]])]
    history = []
    for turn in range(3):
        torch.manual_seed(turn)
        out = sde_generate(model, input_ids=ids, cache=cache, max_new_tokens=4, do_sample=True,
                           sde_control=SDEControl(heads, mode="temperature"), return_dict_in_generate=True)
        torch.manual_seed(turn)
        fresh = sde_generate(model, input_ids=ids, max_new_tokens=4, do_sample=True,
                             sde_control=SDEControl(heads, mode="temperature"), return_dict_in_generate=True)
        _assert_same_path(out, fresh, f"turn {turn}", "temperature")
        traces.append(out.sde_trace)
        history.append(out.sequences)
        cache = out.cache
        if turn < 2:
            ids = torch.cat([out.sequences, turns[turn]], 1)
    assert [t.zscore.shape for t in traces] == [(1, 4)] * 3
    assert history[2].shape[1] == PROMPT.shape[1] + 4 + 2 + 4 + 3 + 4


def test_a_cache_of_other_rows_is_refused_clearly():
    bundle = parity_bundle("llama")
    past, ids, mask = _first_turn(bundle.model, "dynamic")
    with pytest.raises(ValueError, match=r"holds 2 sequence\(s\), the call decodes 1"):
        sde_generate(bundle.model, input_ids=ids[:1], attention_mask=mask[:1], cache=past, max_new_tokens=2,
                     sde_control=SDEControl(bundle.heads, mode="observe"))
    with pytest.raises(RuntimeError):  # stock fails too, later and less clearly
        bundle.model.generate(input_ids=ids[:1], attention_mask=mask[:1], cache=copy.deepcopy(past),
                              max_new_tokens=2)


def test_a_cache_holding_the_whole_input_is_refused_clearly():
    bundle = parity_bundle("llama")
    past, ids, mask = _first_turn(bundle.model, "dynamic")
    held = past.get_seq_length()
    with pytest.raises(ValueError, match="nothing is left to forward"):
        sde_generate(bundle.model, input_ids=ids[:, :held], attention_mask=mask[:, :held], cache=past,
                     max_new_tokens=2, sde_control=SDEControl(bundle.heads, mode="observe"))


# ----- every RuntimeError the runtime raises names its cause and the fix (the others: test_control_parity.py's
# compiled-by-the-caller forward, test_control_head_temperature.py's LM head) -------------------------------
def test_temperature_processor_outside_sde_generate_says_how_to_use_it():
    from hf_sde import SDETemperatureLogitsProcessor, sde_hooks

    bundle = parity_bundle("llama")
    with sde_hooks(bundle.model, SDEControl(bundle.heads, mode="temperature"), prompt_width=6) as runtime:
        with pytest.raises(RuntimeError, match=r"works only inside generate\(\.\.\., sde_control=\.\.\.\)"):
            SDETemperatureLogitsProcessor(runtime)(PROMPT, torch.zeros(2, 128))


def test_several_samples_per_prompt_continue_a_cache_of_as_many_rows():
    """num_return_sequences expands the rows generate decodes: the cache must hold that many (as stock needs)."""
    bundle = parity_bundle("llama")
    ids = PROMPT[:1]
    first = bundle.model.generate(input_ids=ids, max_new_tokens=3, do_sample=True, num_return_sequences=2,
                                  return_dict_in_generate=True)
    turn = torch.cat([first.sequences, NEXT_TURN], 1)          # 2 rows, a 2-row cache
    kw = dict(input_ids=turn, do_sample=True, num_return_sequences=1)
    cont = _call(bundle.model, bundle.heads, 0, CONTROLS["temperature"], cache=copy.deepcopy(first.cache), **kw)
    _assert_same_path(cont, _call(bundle.model, bundle.heads, 0, CONTROLS["temperature"], **kw), "nrs", "t")
    with pytest.raises(ValueError, match=r"holds 2 sequence\(s\), the call decodes 4"):
        _call(bundle.model, bundle.heads, 0, CONTROLS["observe"], input_ids=turn, num_return_sequences=2,
              cache=copy.deepcopy(first.cache))


def test_a_temperature_in_the_generation_config_conflicts_like_the_keyword():
    from transformers import GenerationConfig

    bundle = parity_bundle("llama")
    with pytest.raises(ValueError, match=r"generation_config.temperature = 0.3 conflicts"):
        sde_generate(bundle.model, input_ids=PROMPT[:1], max_new_tokens=2,
                     generation_config=GenerationConfig(do_sample=True, temperature=0.3),
                     sde_control=SDEControl(bundle.heads, mode="temperature"))
