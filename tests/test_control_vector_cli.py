"""The mean-difference steering vector of two corpora: ``mean_difference_vectors`` against a hand computation on the
real stories260K model, and ``hf-sde control-vector`` (the GGUF it writes, its summary, its refusals)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import STORIES_REPO

from hf_sde.commands import main
from hf_sde.commands.control_vector import layer_spec
from hf_sde.control.vectors import load_control_vector, mean_difference_vectors

POSITIVE = ["Once upon a time there was a happy little dog.", "The sun was warm and the girl smiled.",
            "Tom and his mom baked a big cake together."]
NEGATIVE = ["The storm was dark and the boy was scared.", "She cried because her toy broke.", "No."]


def _hand_mean(model, tok, texts, layer) -> torch.Tensor:
    """Mean of block ``layer``'s output over every token of ``texts`` pooled, one text per forward, read with a
    plain forward hook (``output_hidden_states=True`` would leave transformers' output-capturing hooks on the
    session's shared model, and its last entry is after the final norm)."""
    total, count = torch.zeros(model.config.hidden_size, dtype=torch.float64), 0
    captured = {}
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]])
        handle = model.model.layers[layer].register_forward_hook(lambda m, i, o: captured.update(h=o))
        try:
            with torch.no_grad():
                model(input_ids=ids)
        finally:
            handle.remove()
        states = captured["h"][0] if isinstance(captured["h"], tuple) else captured["h"]
        total += states[0, 1:].double().sum(0)  # every position but the first
        count += ids.shape[1] - 1
    return total / count


def test_the_vector_is_the_difference_of_the_pooled_token_means(stories_model):
    model, tok = stories_model
    vectors = mean_difference_vectors(model, tok, POSITIVE, NEGATIVE, [3, 1, -1], batch_size=2, progress=False)
    assert list(vectors) == [1, 3, 4]  # resolved, sorted
    for layer, v in vectors.items():
        expected = (_hand_mean(model, tok, POSITIVE, layer) - _hand_mean(model, tok, NEGATIVE, layer)).float()
        assert v.dtype == torch.float32 and v.shape == (64,)
        torch.testing.assert_close(v, expected, rtol=1e-4, atol=1e-5)
        assert v.norm() > 1e-2  # a real difference, not rounding noise
    # weighted by tokens, not by text: the mean of per-text means differs (the texts have different lengths)
    per_text = torch.stack([_hand_mean(model, tok, [t], 1) for t in POSITIVE]).mean(0)
    assert not torch.allclose(_hand_mean(model, tok, POSITIVE, 1), per_text, atol=1e-4)


def test_swapping_the_corpora_negates_the_vector(stories_model):
    model, tok = stories_model
    forward = mean_difference_vectors(model, tok, POSITIVE, NEGATIVE, [2, 4], progress=False)
    backward = mean_difference_vectors(model, tok, NEGATIVE, POSITIVE, [2, 4], progress=False)
    assert list(forward) == list(backward) == [2, 4]
    for layer in forward:
        assert torch.equal(backward[layer], -forward[layer])


def test_the_library_refuses_layer_0_an_empty_corpus_and_identical_means(stories_model):
    model, tok = stories_model
    for layer in (0, -5):  # -5 resolves to 0 on this 5-layer model
        with pytest.raises(ValueError, match=r"layer 0 .*llama\.cpp reserves index 0.*Pick layers 1 to 4"):
            mean_difference_vectors(model, tok, POSITIVE, NEGATIVE, [2, layer], progress=False)
    with pytest.raises(ValueError, match="valid layers are -5..4"):
        mean_difference_vectors(model, tok, POSITIVE, NEGATIVE, [5], progress=False)
    with pytest.raises(ValueError, match="at least one decoder layer"):
        mean_difference_vectors(model, tok, POSITIVE, NEGATIVE, [], progress=False)
    with pytest.raises(ValueError, match=r"^The negative corpus: .*empty"):
        mean_difference_vectors(model, tok, POSITIVE, ["   ", ""], [1], progress=False)
    with pytest.raises(ValueError, match=r"identical mean hidden states at layers 1, 3.*zero vector"):
        mean_difference_vectors(model, tok, POSITIVE, list(POSITIVE), [1, 3], progress=False)


# ----- the command --------------------------------------------------------------------------------------------
@pytest.fixture
def corpora(tmp_path):
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("\n".join(POSITIVE) + "\n")
    neg.write_text("\n".join(NEGATIVE) + "\n")
    return pos, neg


@pytest.fixture
def stories_loader(monkeypatch, stories_model):
    monkeypatch.delenv("HF_SDE_SMOKE", raising=False)
    calls = []

    def load(*args, **kwargs):
        calls.append(args)
        return stories_model

    monkeypatch.setattr("hf_sde.data.loading.load_model", load)
    return calls


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.delenv("HF_SDE_SMOKE", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("hf_sde.data.loading.load_model", refuse)


def _argv(corpora, out, *extra):
    pos, neg = corpora
    return ["control-vector", "--model", STORIES_REPO, "--positive", str(pos), "--negative", str(neg),
            "--out", str(out), "-q", *extra]


def test_the_command_writes_a_gguf_control_vector_equal_to_the_library_result(tmp_path, corpora, capsys,
                                                                             stories_loader, stories_model):
    import gguf

    out = tmp_path / "steer.gguf"
    assert main(_argv(corpora, out, "--layers", "1,3-4")) == 0
    assert stories_loader  # the model was loaded (once)
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert line.startswith("Wrote a control vector of 3 layers (layers 1, 3-4), hidden size 64, from 3 positive and "
                           "3 negative texts (")
    assert f"to {out}." in line and f"--control-vector {out}" in line
    assert f"vectors = hf_sde.load_control_vector({str(out)!r})" in line
    assert 'direction={k: v for k, v in vectors.items() if k >= heads.config.layer}' in line

    loaded = load_control_vector(out)
    model, tok = stories_model
    expected = mean_difference_vectors(model, tok, POSITIVE, NEGATIVE, [1, 3, 4], progress=False)
    assert list(loaded) == [1, 3, 4]
    for layer in expected:
        torch.testing.assert_close(loaded[layer], expected[layer], rtol=0, atol=0)

    reader = gguf.GGUFReader(str(out))
    arch = reader.get_field("general.architecture")
    assert bytes(arch.parts[-1]).decode() == "controlvector"
    assert bytes(reader.get_field("controlvector.model_hint").parts[-1]).decode() == "llama"
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.3", "direction.4"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the temporary file was renamed


def test_the_command_defaults_to_layers_1_to_the_last_and_prints_json(tmp_path, corpora, capsys, stories_loader):
    out = tmp_path / "steer.gguf"
    assert main(_argv(corpora, out, "--json", "--limit", "2")) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["layers"] == [1, 2, 3, 4] and summary["hidden_size"] == 64 and summary["model_hint"] == "llama"
    assert (summary["positive_texts"], summary["negative_texts"]) == (2, 2)
    assert summary["out"] == str(out) and set(summary["norms"]) == {"1", "2", "3", "4"}
    loaded = load_control_vector(out)
    assert list(loaded) == [1, 2, 3, 4]
    assert summary["norms"]["2"] == pytest.approx(float(loaded[2].norm()))
    # --overwrite replaces the file
    assert main(_argv(corpora, out, "--json", "--layers", "2", "--overwrite")) == 0
    assert list(load_control_vector(out)) == [2]


def test_a_zero_vector_is_an_error_exit_2_and_writes_nothing(tmp_path, corpora, capsys, stories_loader):
    out = tmp_path / "steer.gguf"
    pos, _ = corpora
    assert main(_argv((pos, pos), out, "--layers", "2")) == 2
    assert "identical mean hidden states at layer 2" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("extra,message", [
    (["--layers", "0-4"], "includes layer 0, which a control-vector GGUF cannot hold"),
    (["--layers", "2,0"], "llama.cpp reserves index 0"),
    (["--layers", "a,b"], "is not a layer list"),
    (["--layers", "5-2"], "is not a range"),
    (["--layers", "1,,2"], "is not a layer list"),
])
def test_bad_layers_exit_2_before_the_model_loads(tmp_path, corpora, capsys, no_model_load, extra, message):
    with pytest.raises(SystemExit) as exc:
        main(_argv(corpora, tmp_path / "steer.gguf", *extra))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --layers" in err and message in err


def test_bad_outputs_exit_2_before_the_model_loads(tmp_path, corpora, capsys, no_model_load):
    existing = tmp_path / "old.gguf"
    existing.write_bytes(b"keep me")
    cases = [(existing, "exists; choose a new file name or pass --overwrite"),
             (tmp_path / "steer.bin", "must end in .gguf"),
             (tmp_path / "missing" / "steer.gguf", "does not exist; create it first"),
             (tmp_path, "must end in .gguf")]
    folder = tmp_path / "dir.gguf"
    folder.mkdir()
    cases.append((folder, "is a folder"))
    for out, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(_argv(corpora, out))
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "hf-sde control-vector: error:" in err and message in err, (out, err)
    assert existing.read_bytes() == b"keep me"


def test_layer_spec_parses_lists_and_ranges():
    assert layer_spec("10,12,14") == [10, 12, 14]
    assert layer_spec("8-11") == [8, 9, 10, 11]
    assert layer_spec("2, 5-6,-1,5") == [2, 5, 6, -1]
    assert layer_spec("-3--1") == [-3, -2, -1]
    for bad in ("", "1-", "-3-1", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            layer_spec(bad)
