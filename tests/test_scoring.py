"""score_texts / hf-sde score: sequence-level SDE statistics of texts, on stories260K with heads fitted here."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import STORIES_REPO, TINYSTORIES, make_tiny_model

import hf_sde
from hf_sde.analysis.scoring import path_statistics, rescore, score_texts, tube_threshold
from hf_sde.commands import main
from hf_sde.data.layers import register_block_hook

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}:\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:\n{% endif %}")
SHORT = "Tom saw a big dog. The dog was happy."


@pytest.fixture(scope="module")
def fit(stories_trajectories):
    return hf_sde.fit_heads(stories_trajectories, proj_dim=8, epochs=8, lr=1e-2, width=32, progress=False, seed=0)


@pytest.fixture(scope="module")
def texts():
    return hf_sde.load_texts(str(TINYSTORIES))


def _assert_same(a, b, tol=1e-4):
    assert a.num_tokens == b.num_tokens
    for key in ("mean_surprise", "tube_exit_rate", "sde_nll", "ou_nll", "mean_zscore", "token_nll", "entropy"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None and y is None) or abs(x - y) < tol, (key, x, y)


def test_fields_agree_with_extraction_and_a_plain_forward(stories_model, fit, texts):
    model, tok = stories_model
    heads, ou = fit.heads, fit.baselines["ou"]
    scores = score_texts(model, tok, heads, texts, ou=ou, return_steps=True)
    traj = hf_sde.extract_trajectories(model, tok, texts, layer=heads.config.layer, max_length=256, progress=False)
    assert [s.index for s in scores] == list(range(len(texts)))
    for s, states in zip(scores, traj.states, strict=True):
        n = states.shape[0] - 1
        assert s.num_tokens == n and s.steps["z"].shape == (n + 1, heads.config.proj_dim)
        assert all(v.shape == (n,) for k, v in s.steps.items() if k not in ("z", "positions"))
        # the hook reads exactly the states the fit's extraction reads
        torch.testing.assert_close(s.steps["z"], heads.project(states), atol=1e-4, rtol=0)
        step = path_statistics(heads, heads.project(states), ou=ou)
        torch.testing.assert_close(s.steps["sde_nll"], step["sde_nll"], atol=1e-4, rtol=0)
        assert s.sde_minus_ou_nll == pytest.approx(s.sde_nll - s.ou_nll)
        # mean surprise is the path NLL standardized by the training transitions' constants
        cfg = heads.config
        assert s.mean_surprise == pytest.approx((s.sde_nll - cfg.nll_mean) / cfg.nll_std, abs=1e-5)
        assert 0 <= s.tube_exit_rate <= 1 and s.entropy > 0 and s.token_nll > 0
        assert all(math.isfinite(v) for v in s.as_dict().values() if isinstance(v, float))
    # the model's statistics equal those of an ordinary forward with all logits
    ids = hf_sde.trajectories.extract.tokenize_texts(tok, texts[:1], 256)[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    token_nll = -logp.gather(-1, torch.tensor(ids[1:])[:, None]).mean()
    entropy = -(logp.exp() * logp).sum(-1).mean()
    assert scores[0].token_nll == pytest.approx(float(token_nll), abs=1e-4)
    assert scores[0].entropy == pytest.approx(float(entropy), abs=1e-4)


def test_batched_equals_unbatched_and_padding_does_not_matter(stories_model, fit, texts):
    model, tok = stories_model
    heads, ou = fit.heads, fit.baselines["ou"]
    mixed = [SHORT, *texts]  # the short text is right-padded to the longest in its batch
    batched = score_texts(model, tok, heads, mixed, ou=ou, batch_size=len(mixed))
    alone = [score_texts(model, tok, heads, [t], ou=ou)[0] for t in mixed]
    for a, b in zip(batched, alone, strict=True):
        _assert_same(a, b)
    left = copy.deepcopy(tok)
    left.padding_side = "left"  # the tokenizer's padding side is irrelevant: score_texts pads itself
    for a, b in zip(score_texts(model, left, heads, mixed, ou=ou, batch_size=3), batched, strict=True):
        _assert_same(a, b)


def test_perturbed_states_are_more_surprising(stories_model, stories_trajectories, fit, texts):
    model, tok = stories_model
    heads = fit.heads
    clean = score_texts(model, tok, heads, texts)
    scale = torch.cat(stories_trajectories.states).std(0)  # per-dimension spread of the real states
    g = torch.Generator().manual_seed(0)

    def noise(h):
        return h + scale * torch.randn(h.shape, generator=g)

    handle = register_block_hook(model, heads.config.layer, noise)  # runs before score_texts' own hook
    try:
        noisy = score_texts(model, tok, heads, texts)
    finally:
        handle.remove()
    for c, n in zip(clean, noisy, strict=True):
        # noise of one state-std per dimension: surprise up by ~1.6 (training std units), tube exits 1% -> ~20%
        assert n.mean_surprise > c.mean_surprise + 1.0, (c.mean_surprise, n.mean_surprise)
        assert n.tube_exit_rate > c.tube_exit_rate + 0.1, (c.tube_exit_rate, n.tube_exit_rate)
    _assert_same(score_texts(model, tok, heads, texts[:1])[0], clean[0])  # the hook is gone


def test_rescore_adds_an_ou_baseline_without_a_forward(stories_model, fit, texts):
    model, tok = stories_model
    heads, ou = fit.heads, fit.baselines["ou"]
    plain = score_texts(model, tok, heads, texts[:2], return_steps=True)
    assert plain[0].ou_nll is None and plain[0].sde_minus_ou_nll is None
    for a, b in zip([rescore(heads, s, ou=ou) for s in plain], score_texts(model, tok, heads, texts[:2], ou=ou),
                    strict=True):
        _assert_same(a, b, tol=1e-6)
    with pytest.raises(ValueError, match="return_steps=True"):
        rescore(heads, score_texts(model, tok, heads, texts[:1])[0], ou=ou)


def test_tube_threshold_is_the_chi_square_quantile(fit):
    heads = fit.heads
    d = heads.config.proj_dim
    assert tube_threshold(d, 0.5) == pytest.approx(d - 2 / 3, abs=0.1)  # chi2 median ~ d (1 - 2/(9d))^3
    # increments drawn from the fitted transition leave the 99% tube about 1% of the time
    g = torch.Generator().manual_seed(0)
    paths, steps = 40, 100
    z = [torch.zeros(paths, d)]
    with torch.no_grad():
        for k in range(steps):
            mean, std = heads(z[-1], heads.times(torch.full((paths,), k)))
            z.append(z[-1] + mean + std * torch.randn(paths, d, generator=g))
    z = torch.stack(z, 1)  # (paths, steps + 1, d)
    rate = torch.cat([path_statistics(heads, p)["outside_tube"] for p in z]).mean()
    assert 0.005 < float(rate) < 0.02, rate
    with pytest.raises(ValueError, match="tube"):
        tube_threshold(d, 1.0)


def test_chat_prompts_and_the_chat_row_template_read_the_same_path(stories_model, fit):
    model, tok = stories_model
    chat = copy.deepcopy(tok)
    chat.chat_template = CHAT_TEMPLATE
    heads = fit.heads
    prompts = ["Tell me about a dog.", "What did Lily do?"]
    answers = [SHORT, "Lily went to the park and played with her ball."]
    by_prompt = score_texts(model, chat, heads, answers, prompts=prompts)
    rows = [{"prompt": p, "response": a} for p, a in zip(prompts, answers, strict=True)]
    by_rows = score_texts(model, chat, heads, rows, template="helpsteer-chat")
    ids, starts = hf_sde.trajectories.extract.tokenize_chats(chat, hf_sde.load_texts(rows, template="helpsteer-chat"))
    for a, b, text, seq, start in zip(by_prompt, by_rows, answers, ids, starts, strict=True):
        _assert_same(a, b, tol=1e-6)
        # the scored tokens are the response's, predicted from the last prompt position on
        assert a.num_tokens == len(seq) - start - 1 and chat.decode(seq[start + 1:]).strip() == text
    with pytest.raises(ValueError, match="chat template"):
        score_texts(model, tok, heads, answers, prompts=prompts)  # stories260K's own tokenizer has none


def test_response_heads_keep_the_first_position_out_of_a_plain_text(stories_model, fit):
    model, tok = stories_model
    heads = copy.deepcopy(fit.heads)
    n = len(tok(SHORT)["input_ids"])
    assert score_texts(model, tok, heads, [SHORT])[0].num_tokens == n - 1
    heads.config.time_origin = "prompt_end"
    assert score_texts(model, tok, heads, [SHORT])[0].num_tokens == n - 2


def test_clear_errors(stories_model, fit, texts):
    model, tok = stories_model
    heads = fit.heads
    with pytest.raises(ValueError, match="no texts"):
        score_texts(model, tok, heads, [])
    with pytest.raises(ValueError, match="text 1 is empty"):
        score_texts(model, tok, heads, [SHORT, "  "])
    with pytest.raises(TypeError, match="wrap it in a list"):
        score_texts(model, tok, heads, SHORT)
    with pytest.raises(ValueError, match="one prompt per text"):
        score_texts(model, tok, heads, [SHORT, SHORT], prompts=["Hi"])
    with pytest.raises(ValueError, match="reads rows"):
        score_texts(model, tok, heads, [SHORT], template="helpsteer-chat")
    with pytest.raises(ValueError, match="hidden size"):
        score_texts(make_tiny_model("llama"), tok, heads, [SHORT])

    def poison(h):
        h = h.clone()
        h[:, 3] = float("nan")
        return h

    handle = register_block_hook(model, heads.config.layer, poison)
    try:
        with pytest.raises(ValueError, match="Non-finite hidden state"):
            score_texts(model, tok, heads, [SHORT])
    finally:
        handle.remove()


def test_fit_ou_baseline_reads_texts_like_score_texts(stories_model, fit, texts):
    model, tok = stories_model
    heads = fit.heads
    ou = hf_sde.fit_ou_baseline(model, tok, heads, texts)
    scored = score_texts(model, tok, heads, texts, ou=ou)
    # OU fitted on these very paths by least squares: no neural fit of 3 epochs explains them much better
    assert all(math.isfinite(s.ou_nll) for s in scored)
    pooled = sum(s.sde_minus_ou_nll * s.num_tokens for s in scored) / sum(s.num_tokens for s in scored)
    assert pooled > -0.1
    with pytest.raises(ValueError, match="Too little reference text"):
        hf_sde.fit_ou_baseline(model, tok, heads, [SHORT])


@pytest.fixture(scope="module")
def saved_heads(tmp_path_factory, fit):
    folder = tmp_path_factory.mktemp("heads") / "heads"
    fit.heads.save_pretrained(folder)
    return folder


def test_cli_score_json(saved_heads, capsys, stories_model, fit, texts):
    args = ["score", "--heads", str(saved_heads), "--model", STORIES_REPO, "--data", str(TINYSTORIES), "--limit", "3",
            "--json", "--ou-data", str(TINYSTORIES)]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tube"] == 0.99 and len(out["scores"]) == 3
    model, tok = stories_model
    ou = hf_sde.fit_ou_baseline(model, tok, fit.heads, texts)
    expected = score_texts(model, tok, fit.heads, texts[:3], ou=ou)
    for row, s in zip(out["scores"], expected, strict=True):
        assert row["index"] == s.index and row["num_tokens"] == s.num_tokens
        for key in ("mean_surprise", "tube_exit_rate", "sde_nll", "ou_nll", "sde_minus_ou_nll", "mean_zscore",
                    "token_nll", "entropy"):
            assert row[key] == pytest.approx(getattr(s, key), abs=1e-4), key
    # without --ou-data the OU columns are null; the table shows them as "-"
    assert main(["score", "--heads", str(saved_heads), "--model", STORIES_REPO, "--text", SHORT, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["scores"][0]
    assert row["ou_nll"] is None and row["sde_nll"] > 0
    assert main(["score", "--heads", str(saved_heads), "--model", STORIES_REPO, "--text", SHORT, "--text", "Hi there"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "surprise" in table[0] and len(table) == 4 and " - " in table[1]
    assert table[3].startswith("Note: the OU NLL and SDE-OU columns are '-'")  # and why: no --ou-data


def test_cli_score_errors_exit_2(saved_heads, capsys):
    base = ["score", "--heads", str(saved_heads), "--model", STORIES_REPO]
    assert main([*base, "--text", SHORT, "--prompt", "a", "--prompt", "b"]) == 2
    assert "one prompt per text" in capsys.readouterr().err
    assert main([*base, "--text", SHORT, "--prompt", "Tell me a story."]) == 2  # stories260K has no chat template
    assert "chat template" in capsys.readouterr().err
