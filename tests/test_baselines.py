"""The EDT baseline logits processor (hf_sde.control.processors)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LogitsProcessorList

from hf_sde.control.processors import EntropyDynamicTemperatureLogitsProcessor as EDT


def _scores_with_entropies(batch: int = 6, vocab: int = 50) -> torch.Tensor:
    """Rows from peaked to flat: increasing entropy by construction."""
    base = torch.randn(vocab, generator=torch.Generator().manual_seed(0))
    scales = torch.linspace(8.0, 0.05, batch)
    return base.unsqueeze(0) * scales.unsqueeze(1)


def test_shape_dtype_and_formula():
    scores = _scores_with_entropies()
    edt = EDT(temperature=1.0, base=0.8, theta=0.5, min_temperature=1e-6)
    out = edt(torch.zeros(scores.shape[0], 3, dtype=torch.long), scores)
    assert out.shape == scores.shape and out.dtype == scores.dtype
    h = EDT.entropy(scores)
    expected_tau = (1.0 * 0.8 ** (0.5 / h)).clamp(1e-6, 1.0)
    torch.testing.assert_close(edt.last_temperature, expected_tau)
    torch.testing.assert_close(out, scores / expected_tau.unsqueeze(-1))


def test_temperature_within_bounds():
    scores = torch.cat([_scores_with_entropies(), torch.full((1, 50), 0.0)])  # include a uniform row
    scores[0, 1:] = -float("inf")  # a one-hot row: entropy 0
    edt = EDT(temperature=1.2, base=0.8, theta=2.0, min_temperature=0.1)
    edt(torch.zeros(scores.shape[0], 1, dtype=torch.long), scores)
    tau = edt.last_temperature
    assert torch.isfinite(tau).all()
    assert (tau >= 0.1 - 1e-7).all() and (tau <= 1.2 + 1e-7).all()
    assert tau[0] == pytest.approx(0.1)  # H = 0: cooled to the floor
    # Uniform row: H = log(V), T = T0 * N^(theta / log V).
    assert tau[-1] == pytest.approx(1.2 * 0.8 ** (2.0 / math.log(50)), rel=1e-5)


def test_monotone_in_entropy():
    scores = _scores_with_entropies(batch=12)
    h = EDT.entropy(scores)
    assert (h[1:] > h[:-1]).all(), "fixture rows must have increasing entropy"
    for theta in (0.1, 0.5, 2.0):
        edt = EDT(temperature=1.0, base=0.8, theta=theta, min_temperature=1e-6)
        edt(torch.zeros(12, 1, dtype=torch.long), scores)
        assert (edt.last_temperature[1:] >= edt.last_temperature[:-1]).all()
    # Larger theta cools more at the same entropy.
    t_small = EDT(theta=0.2, min_temperature=1e-6).temperature_for(h)
    t_large = EDT(theta=2.0, min_temperature=1e-6).temperature_for(h)
    assert (t_large <= t_small).all()


def test_masked_scores_entropy_is_finite():
    scores = torch.tensor([[0.0, 0.0, -float("inf"), -float("inf")]])
    assert EDT.entropy(scores).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"base": -1.0}, {"theta": float("nan")},
                                    {"min_temperature": 2.0, "max_temperature": 1.0}])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        EDT(**kwargs)


def test_in_generate_records_every_step():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64)).eval()
    edt = EDT(temperature=1.0, base=0.8, theta=0.5, record=True)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                         max_new_tokens=5, min_new_tokens=5, pad_token_id=0,
                         logits_processor=LogitsProcessorList([edt]))
    assert out.shape == (2, 8)
    assert len(edt.temperatures) == 5
    assert all(t.shape == (2,) and (t > 0).all() and (t <= 1.0 + 1e-6).all() for t in edt.temperatures)


# ----- the SDE baselines (hf_sde.fitting.baselines) ---------------------------------------------------------------
def test_sde_baselines_from_summed_statistics_equal_the_pooled_fit():
    """Statistics of two halves, summed, give the baselines of the whole (what N processes all-reduce)."""
    from hf_sde.fitting.baselines import BrownianBaseline, OUBaseline, TransitionStats
    from hf_sde.fitting.fit import make_transitions

    g = torch.Generator().manual_seed(0)
    tr = make_transitions([torch.randn(40, 3, generator=g).cumsum(0) * 0.1 for _ in range(6)], horizon=40)
    half = len(tr) // 2
    a, b = tr.index(torch.arange(half)), tr.index(torch.arange(half, len(tr)))
    pooled = TransitionStats.of(a.z, a.dz) + TransitionStats.of(b.z, b.dz)
    ou, ou_split = OUBaseline.fit(tr), OUBaseline.from_stats(pooled)
    torch.testing.assert_close(ou_split.weight, ou.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(ou_split.std, ou.std, atol=1e-6, rtol=0)
    bm = BrownianBaseline.from_stats(pooled)
    torch.testing.assert_close(bm.mean, tr.dz.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(bm.std, tr.dz.std(0, unbiased=False), atol=1e-6, rtol=0)
    # The residual std expanded from the sums is the std of the actual residuals.
    mean, _ = ou.predict(tr.z, tr.t)
    torch.testing.assert_close(ou.std, (tr.dz - mean).std(0, unbiased=False), atol=1e-6, rtol=0)


# ----- truncation samplers: top-nσ and p-less ---------------------------------------------------------------
from hf_sde.control.processors import PLessLogitsProcessor, TopNSigmaLogitsProcessor  # noqa: E402

IDS = torch.zeros(4, 1, dtype=torch.long)


def _logits(seed: int = 0, batch: int = 4, vocab: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * torch.linspace(0.5, 6.0, batch).unsqueeze(1)


def test_top_n_sigma_keeps_what_is_within_n_sigma_of_the_max():
    scores = _logits()
    for n in (0.5, 1.0, 2.0):
        out = TopNSigmaLogitsProcessor(n)(IDS, scores)
        keep = scores >= scores.amax(-1, keepdim=True) - n * scores.std(-1, unbiased=False, keepdim=True)
        assert torch.equal(torch.isfinite(out), keep)
        assert torch.equal(out[keep], scores[keep])  # kept logits untouched
    sizes = [int(torch.isfinite(TopNSigmaLogitsProcessor(n)(IDS, scores)).sum()) for n in (0.5, 1.0, 2.0)]
    assert sizes[0] < sizes[1] < sizes[2]  # more sigmas, more tokens


def test_top_n_sigma_is_temperature_invariant_and_ignores_removed_tokens():
    scores = _logits(1)
    kept = torch.isfinite(TopNSigmaLogitsProcessor(1.0)(IDS, scores))
    for t in (0.3, 1.7, 5.0):
        assert torch.equal(torch.isfinite(TopNSigmaLogitsProcessor(1.0)(IDS, scores / t)), kept)
    masked = scores.clone()
    masked[:, 100:] = -float("inf")  # an earlier processor removed half the vocabulary
    out = TopNSigmaLogitsProcessor(1.0)(IDS, masked)
    part = scores[:, :100]
    keep = part >= part.amax(-1, keepdim=True) - part.std(-1, unbiased=False, keepdim=True)
    assert torch.equal(torch.isfinite(out[:, :100]), keep) and not torch.isfinite(out[:, 100:]).any()


def test_p_less_keeps_tokens_at_least_as_likely_as_a_collision():
    scores = _logits(2)
    out = PLessLogitsProcessor()(IDS, scores)
    p = torch.softmax(scores, -1)
    assert torch.equal(torch.isfinite(out), p >= (p ** 2).sum(-1, keepdim=True))
    assert torch.isfinite(out.gather(1, scores.argmax(-1, keepdim=True))).all()  # the mode is always kept
    sizes = torch.isfinite(out).sum(-1)
    assert (sizes[:-1] >= sizes[1:]).all() and sizes[0] > sizes[-1]  # sharper rows keep fewer tokens
    flat = PLessLogitsProcessor()(IDS[:1], torch.zeros(1, 50))
    assert torch.isfinite(flat).all()  # a uniform distribution keeps everything


def test_p_less_threshold_is_taken_at_generates_temperature():
    scores = _logits(3)
    hot = PLessLogitsProcessor(temperature=2.0)(IDS, scores)
    p = torch.softmax(scores / 2.0, -1)
    assert torch.equal(torch.isfinite(hot), p >= (p ** 2).sum(-1, keepdim=True))
    assert torch.equal(hot[torch.isfinite(hot)], scores[torch.isfinite(hot)])  # generate divides, not this
    assert (torch.isfinite(hot).sum(-1) >= torch.isfinite(PLessLogitsProcessor()(IDS, scores)).sum(-1)).all()


@pytest.mark.parametrize("make", [lambda: TopNSigmaLogitsProcessor(1.0), lambda: PLessLogitsProcessor(1.3)])
def test_truncation_samplers_in_generate_only_sample_kept_tokens(make):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)).eval()
    torch.manual_seed(1)
    out = model.generate(torch.tensor([[1, 2, 3]]), do_sample=True, top_k=0, temperature=1.3, max_new_tokens=8,
                         min_new_tokens=8, pad_token_id=0, logits_processor=LogitsProcessorList([make()]),
                         return_dict_in_generate=True, output_scores=True)
    new = out.sequences[0, 3:]
    for step, token in enumerate(new):
        scores = out.scores[step][0]
        assert torch.isfinite(scores[token]) and not torch.isfinite(scores).all()  # truncated, and obeyed


@pytest.mark.parametrize("bad", [lambda: TopNSigmaLogitsProcessor(0), lambda: TopNSigmaLogitsProcessor(float("nan")),
                                 lambda: PLessLogitsProcessor(0.0), lambda: PLessLogitsProcessor(filter_value=float("nan"))])
def test_truncation_samplers_refuse_bad_settings(bad):
    with pytest.raises(ValueError, match="must be"):
        bad()
