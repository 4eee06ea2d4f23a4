"""Inputs at the edges: no prompt, greedy temperature control, prompts past the context or the heads' horizon,
prompt-lookup decoding; each either works like stock ``generate`` or says plainly what it means."""

from __future__ import annotations

import copy

import pytest
import torch
from control_fixtures import parity_bundle

from hf_sde import SDEControl, control, sde_generate


@pytest.fixture
def llama():
    return parity_bundle("llama")


def test_no_prompt_starts_from_bos_like_stock(llama):
    torch.manual_seed(0)
    stock = type(llama.model).generate(llama.model, max_new_tokens=4, do_sample=False)
    out = sde_generate(llama.model, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                       sde_control=SDEControl(llama.heads, mode="observe"))
    assert stock[0, 0].item() == llama.model.config.bos_token_id
    assert torch.equal(out.sequences, stock)
    assert out.sde_trace.zscore.shape == (1, 4) and out.sde_trace.positions[0].tolist() == [0, 1, 2, 3]


def test_temperature_under_greedy_warns_once(llama):
    control._WARNED.discard("greedy")
    kw = dict(input_ids=torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False)
    stock = type(llama.model).generate(llama.model, **kw)
    with pytest.warns(UserWarning, match="greedy decoding"):
        out = sde_generate(llama.model, sde_control=SDEControl(llama.heads, mode="temperature", beta=2.0), **kw)
    assert torch.equal(out, stock)  # the temperatures changed nothing, as the warning says
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sde_generate(llama.model, sde_control=SDEControl(llama.heads, mode="temperature", beta=2.0), **kw)


@pytest.mark.parametrize("origin", ["sequence", "prompt_end"])
def test_far_past_the_horizon_warns_with_the_meaning_of_t(llama, origin):
    heads = copy.deepcopy(llama.heads)
    heads.config.horizon = 4.0
    heads.config.time_origin = origin
    control._WARNED.clear()
    ids = torch.tensor([[1] + list(range(5, 15))])  # 11 prompt tokens
    new = 3 if origin == "sequence" else 12
    with pytest.warns(UserWarning, match="T=4 .*extrapolated") as rec:
        sde_generate(llama.model, input_ids=ids, max_new_tokens=new, do_sample=False,
                     sde_control=SDEControl(heads, mode="observe"))
    counted = "positions in the text" if origin == "sequence" else "tokens generated after the prompt"
    assert counted in str(rec[0].message)


def test_past_the_model_context_warns(llama):
    control._WARNED.clear()
    ctx = llama.model.config.max_position_embeddings
    ids = torch.ones(1, ctx - 1, dtype=torch.long)
    with pytest.warns(UserWarning, match="past the model's context"):
        out = sde_generate(llama.model, input_ids=ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                           sde_control=SDEControl(llama.heads, mode="observe"))
    assert out.sde_trace.positions[0].tolist() == [ctx - 2, ctx - 1, ctx, ctx + 1]


def test_prompt_lookup_refused_clearly(llama):
    with pytest.raises(NotImplementedError, match="prompt-lookup decoding"):
        sde_generate(llama.model, input_ids=torch.tensor([[1, 5, 9, 5, 9]]), max_new_tokens=3,
                     prompt_lookup_num_tokens=2, sde_control=SDEControl(llama.heads, mode="observe"))


def test_heads_given_as_a_path_or_string():
    """``SDEControl(DEFAULT_HEADS)`` (a ``pathlib.Path``) loads the heads like its string form; other types are refused."""
    from hf_sde.pretrained import DEFAULT_HEADS

    by_path, by_str = SDEControl(DEFAULT_HEADS), SDEControl(str(DEFAULT_HEADS))
    assert by_path.heads.config.layer == by_str.heads.config.layer == 22
    with pytest.raises(TypeError, match="path / repo id"):
        SDEControl(42)
