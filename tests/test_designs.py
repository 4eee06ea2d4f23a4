"""The issue-14 decoding designs (benchmarks/_designs.py): their neutral settings are plain sampling, their
knobs move the distribution the way they claim, and the temperature fit recovers a known temperature."""

from __future__ import annotations

import sys

import control_fixtures
import pytest
import torch
from control_fixtures import PROMPTS, REPO, encode, run
from transformers import LogitsProcessorList

from hf_sde import SDEControl

sys.path.insert(0, str(REPO / "benchmarks"))
import _designs as D  # noqa: E402

NEW = 10


sb = control_fixtures.enabled_stories  # a fixture: stories260K with SDE control enabled, one per module


def _sample(sb, make_processor, seed=0, **kw):
    reader = D.StepReader()
    procs = LogitsProcessorList([make_processor(reader)]) if make_processor else None
    out = run(sb.model.generate, encode(sb.tok, PROMPTS), seed=seed, do_sample=True, top_k=0, max_new_tokens=NEW,
              eos_token_id=None, sde_control=SDEControl(sb.heads, mode="observe", callback=reader),
              logits_processor=procs, return_dict_in_generate=True, output_scores=True, **kw)
    return out


def test_neutral_settings_are_plain_sampling(sb):
    """Cooling never triggered, gamma = 0 gated min-p, and an untrained temperature head (tau = 1) sample
    exactly what plain sampling (or plain min-p) samples with the same seed."""
    plain = _sample(sb, None)
    head = D.TemperatureHead(D.INPUTS["sde+entropy"], torch.zeros(5), torch.ones(5), horizon=64.0)
    with torch.no_grad():
        head.net[-1].weight.zero_()
    for make in (lambda r: D.SurpriseCooling(r, tau0=1.0, threshold=float("inf"), cool=0.1),
                 lambda r: D.LearnedTemperature(r, head, scale=1.0)):
        assert torch.equal(_sample(sb, make).sequences, plain.sequences)
    min_p = _sample(sb, None, min_p=0.1)
    assert torch.equal(_sample(sb, lambda r: D.SDEGatedMinP(r, base=0.1, gamma=0.0)).sequences, min_p.sequences)


def test_processors_read_the_current_step(sb):
    """Cooling with threshold -inf cools every step after the first (surprise exists from step 1); gated min-p
    keeps fewer tokens as gamma grows where z > 0 (monotone in gamma)."""
    out = _sample(sb, lambda r: D.SurpriseCooling(r, tau0=1.0, threshold=-float("inf"), cool=0.5))
    plain = _sample(sb, None)
    # scores are the processed logits: step 0 is uncooled; step 1 (same prefix, same seed) is divided by 0.5
    torch.testing.assert_close(out.scores[0], plain.scores[0])
    torch.testing.assert_close(out.scores[1], plain.scores[1] * 2)
    reader = D.StepReader()
    logits = torch.randn(2, 512)
    step = type("S", (), {"zscore": torch.tensor([1.0, -1.0])})()
    reader.step = step
    kept = [int((D.SDEGatedMinP(reader, base=0.05, gamma=g)(None, logits.clone()) > -float("inf")).sum(-1)[0])
            for g in (0.0, 0.5, 1.0, 2.0)]
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]


def test_temperature_fit_recovers_a_known_temperature():
    """Tokens sampled from softmax(logits / 0.6) where the (fake) entropy is high and softmax(logits / 1.2)
    where it is low: the entropy head learns a lower tau where entropy is high, and beats any fixed tau."""
    g = torch.Generator().manual_seed(0)
    n, vocab = 3000, 50
    logits = torch.randn(n, vocab, generator=g) * 3
    high = torch.rand(n, generator=g) < 0.5
    tau_true = torch.where(high, 0.6, 1.2)
    y = torch.multinomial(torch.softmax(logits / tau_true[:, None], -1), 1, generator=g)[:, 0]
    seq = {"entropy": high.float().numpy() + 0.1 * torch.randn(n, generator=g).numpy(),
           "target_logit": logits.gather(1, y[:, None])[:, 0].numpy(),
           "lse": torch.stack([torch.logsumexp(logits * float(s), -1) for s in D.GRID], 1).numpy()}
    head = D.fit_temperature_head([seq], ("entropy",), horizon=1.0, steps=300)
    with torch.no_grad():
        tau = head(D.feature_matrix([seq], ("entropy",), 1.0))
        learned = D.token_nll(tau, torch.as_tensor(seq["target_logit"]), torch.as_tensor(seq["lse"])).mean()
    assert float(tau[high].mean()) == pytest.approx(0.6, abs=0.08)
    assert float(tau[~high].mean()) == pytest.approx(1.2, abs=0.15)
    assert float(learned) < float(D.fixed_temperature_nll([seq]).min()) - 0.01
    # interpolation on the grid agrees with the exact NLL at an off-grid temperature
    exact = (torch.logsumexp(logits / 0.77, -1) - logits.gather(1, y[:, None])[:, 0] / 0.77).mean()
    approx = D.token_nll(torch.full((n,), 0.77), torch.as_tensor(seq["target_logit"]), torch.as_tensor(seq["lse"])).mean()
    assert float(approx) == pytest.approx(float(exact), abs=5e-3)
