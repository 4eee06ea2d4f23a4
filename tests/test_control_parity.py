"""Observe mode changes nothing: the whole decoding matrix is bitwise equal to stock ``generate``.

Every decoder-only family the tests build (tiny random configs, as transformers' own tests use) x {dynamic,
static cache; sliding-window configs where the family has them} x {greedy, sampling with top-k / top-p / min-p /
repetition penalty} x {no prompt (BOS), prompt, left-padded batch, inputs_embeds}: sequences, scores and raw
logits equal stock ``generate`` bit for bit, with a finite trace of the right shape. A compiled forward
(``compile_config``, dynamo with the eager backend: what is tested is the tracing of the hooks, not inductor's
numerics) runs a reduced set per family. Where stock ``generate`` refuses a combination, SDE control must refuse
it with the same error type.
"""

from __future__ import annotations

import pytest
import torch
from control_fixtures import PARITY_FAMILIES, SLIDING_FAMILIES, parity_bundle
from transformers import CompileConfig

from hf_sde import SDEControl, sde_generate

NEW = 4
DECODING = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
}
INPUTS = ("none", "prompt", "left-padded", "embeds")
CACHES = [(f, c, False) for f in PARITY_FAMILIES for c in ("dynamic", "static")]
CACHES += [(f, c, True) for f in SLIDING_FAMILIES for c in ("dynamic", "static")]


def _inputs(model, kind: str) -> dict:
    ids = torch.tensor([[1, 5, 9, 13, 17, 21], [0, 0, 1, 40, 41, 42]])
    mask = (ids != 0).long()
    if kind == "none":
        return {}
    if kind == "prompt":
        return dict(input_ids=ids[:1], attention_mask=mask[:1])
    if kind == "left-padded":
        return dict(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        return dict(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask)


def _generate(fn, seed: int, **kw):
    torch.manual_seed(seed)
    try:
        return fn(**kw), None
    except Exception as e:  # noqa: BLE001 - compared with stock's own error below
        return None, e


def assert_parity(bundle, label: str, **kw):
    model, heads = bundle.model, bundle.heads
    kw = dict(max_new_tokens=NEW, return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)
    stock, stock_err = _generate(lambda **k: type(model).generate(model, **k), 0, **kw)
    ours, our_err = _generate(lambda **k: sde_generate(model, sde_control=SDEControl(heads, mode="observe"), **k),
                              0, **kw)
    if stock_err is not None:
        assert type(our_err) is type(stock_err), f"{label}: stock raised {stock_err!r}, SDE control {our_err!r}"
        return
    assert our_err is None, f"{label}: stock generated, SDE control raised {our_err!r}"
    assert torch.equal(ours.sequences, stock.sequences), label
    for name in ("scores", "logits"):
        a, b = getattr(ours, name), getattr(stock, name)
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), f"{label}: {name}"
    tr = ours.sde_trace
    n = len(stock.scores)
    assert tr.zscore.shape == (stock.sequences.shape[0], n), label
    valid = tr.positions >= 0  # -1 (and NaN statistics) after a row's EOS
    assert valid[:, 0].all() and torch.isfinite(tr.zscore[valid]).all() and tr.zscore[~valid].isnan().all(), label


@pytest.mark.parametrize(("family", "cache", "sliding"), CACHES,
                         ids=[f"{f}-{c}{'-sliding' if s else ''}" for f, c, s in CACHES])
def test_observe_equals_stock_generate(family, cache, sliding):
    bundle = parity_bundle(family, sliding)
    for decoding, dkw in DECODING.items():
        for kind in INPUTS:
            assert_parity(bundle, f"{family}/{cache}/{decoding}/{kind}", cache_implementation=cache,
                          **dkw, **_inputs(bundle.model, kind))


@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_observe_equals_stock_generate_compiled(family):
    """generate's compiled forward: stock compiles it, and so does SDE control, with the step inside its own
    compiled graph (no warning, no eager fallback); with a bitwise-eager backend the outputs are equal."""
    import warnings

    bundle = parity_bundle(family)
    compile_config = CompileConfig(backend="eager", fullgraph=False, dynamic=False)
    compile_config._compile_all_devices = True  # generate compiles the forward on CPU only when told to
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*eagerly.*")
        for decoding in DECODING:
            assert_parity(bundle, f"{family}/compiled/{decoding}", cache_implementation="static",
                          compile_config=compile_config, **DECODING[decoding], **_inputs(bundle.model, "left-padded"))
    assert not hasattr(bundle.model, "_hf_sde_leftover") and "get_compiled_call" not in bundle.model.__dict__


def test_forward_compiled_without_the_hooks_is_an_error_not_a_short_trace():
    import copy

    model = copy.deepcopy(parity_bundle("llama").model)
    heads = parity_bundle("llama").heads
    kw = dict(input_ids=torch.tensor([[1, 5, 9, 13]]), max_new_tokens=NEW, do_sample=False)
    # (earlier compiled tests may have spent the recompile limit that every model's forward shares, after which
    # dynamo runs it eagerly: start from an empty dynamo cache so the forward really is compiled)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="eager")
    stock = model.generate(**kw)  # traced without hooks
    with pytest.raises(RuntimeError, match=r"saw 0 of 4 decoding steps.*compiled by the caller.*compile_config"):
        sde_generate(model, sde_control=SDEControl(heads, mode="observe"), **kw)
    assert stock.shape[1] == 4 + NEW


# The same class of defect on other paths: chunked prefill (with static caches and per-layer-type masks),
# low precision, several samples per prompt, no cache.
OTHER_PATHS = {
    "chunked-prefill-static": dict(cache_implementation="static", prefill_chunk_size=2),
    "chunked-prefill-dynamic": dict(prefill_chunk_size=2),
    "num-return-sequences": dict(num_return_sequences=2),
    "no-cache": dict(use_cache=False),
}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("path", list(OTHER_PATHS))
def test_observe_equals_stock_on_other_paths(family, path):
    bundle = parity_bundle(family)
    assert_parity(bundle, f"{family}/{path}", **OTHER_PATHS[path], **DECODING["sample"],
                  **_inputs(bundle.model, "left-padded"))


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_observe_equals_stock_in_bfloat16(family):
    import copy

    from control_fixtures import Bundle

    src = parity_bundle(family)
    bundle = Bundle(copy.deepcopy(src.model).to(torch.bfloat16), None, src.heads)
    for cache in ("dynamic", "static"):
        assert_parity(bundle, f"{family}/bf16/{cache}", cache_implementation=cache, **DECODING["sample"],
                      **_inputs(bundle.model, "left-padded"))
