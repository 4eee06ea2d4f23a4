"""The ``hf-sde`` command line: fit (JSON summary, saved folder, errors) and push (never reaches the network)."""

from __future__ import annotations

import json
import os

import huggingface_hub
import pytest
import torch
from conftest import STORIES_REPO, TINYSTORIES

from hf_sde.commands import main
from hf_sde.fitting.heads import SDEHeads


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to build an HfApi client (the only way push reaches the Hub) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to reach the Hugging Face Hub")

    monkeypatch.setattr(huggingface_hub, "HfApi", refuse)


@pytest.fixture
def saved_heads(tmp_path, stories_trajectories):
    from hf_sde.fitting.fit import fit_heads

    folder = tmp_path / "heads"
    fit_heads(stories_trajectories, proj_dim=4, epochs=1, width=8, progress=False).heads.save_pretrained(folder)
    return folder


def test_fit_prints_one_json_summary_and_saves_heads(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["fit", "--model", STORIES_REPO, "--data", str(TINYSTORIES), "--json", "-q", "--epochs", "5",
               "--matmul-precision", "medium", "--bf16", "--out", str(out)])
    assert rc == 0 and torch.get_float32_matmul_precision() == "highest"  # the training's setting only
    stdout = capsys.readouterr().out
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, stdout
    summary = json.loads(lines[0])
    assert set(summary["heldout_nll"]) == {"neural", "ou", "brownian"}
    assert all(isinstance(v, float) and v == v for v in summary["heldout_nll"].values())
    assert summary["epochs_run"] <= 5 and summary["out"] == str(out)
    assert (summary["layer"], summary["proj_dim"], summary["hidden_size"]) == (4, 16, 64)
    assert (summary["num_train_sequences"], summary["num_heldout_sequences"]) == (4, 1)
    assert summary["base_model"] == "ggml-org/models-moved"
    assert {"model.safetensors", "config.json", "README.md", "fit_history.json"} <= set(os.listdir(out))
    heads = SDEHeads.from_pretrained(str(out))
    assert heads.config.gguf_file == "tinyllamas/stories260K.gguf"
    assert heads.config.base_model_revision == "499bc8821c6b12b4e53c5bffcb21ec206f212d81"
    assert heads.config.model_type == "llama"
    assert heads.config.heldout_nll == summary["heldout_nll"]
    assert heads.config.data["matmul_precision"] == "medium" and heads.config.data["bf16"] is True
    history = json.loads((out / "fit_history.json").read_text())
    assert len(history["history"]["train_total"]) == summary["epochs_run"]


def test_fit_with_a_bad_layer_exits_2_with_the_valid_range(tmp_path, capsys, monkeypatch, stories_model):
    monkeypatch.setattr("hf_sde.data.loading.load_model", lambda *args, **kwargs: stories_model)
    rc = main(["fit", "--model", STORIES_REPO, "--data", str(TINYSTORIES), "--layer", "5", "-q", "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "hf-sde fit: error:" in err and "valid layers are -5..4" in err
    assert not (tmp_path / "out").exists()


def test_fit_with_a_missing_corpus_exits_2(tmp_path, capsys, monkeypatch, stories_model):
    monkeypatch.setattr("hf_sde.data.loading.load_model", lambda *args, **kwargs: stories_model)
    rc = main(["fit", "--model", STORIES_REPO, "--data", str(tmp_path / "nope.txt"), "-q", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "nope.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="needs --data"):
        main(["fit", "--model", STORIES_REPO, "-q", "--out", str(tmp_path / "out")])


def test_push_without_a_token_exits_with_a_clear_message(saved_heads, monkeypatch, no_network):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online but logged out (no_network blocks any request)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(SystemExit) as info:
        main(["push", str(saved_heads), "someone/heads"])
    assert "needs a Hugging Face token" in str(info.value.code)
    assert "hf auth login" in str(info.value.code)


def test_push_offline_exits_with_a_clear_message(saved_heads, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as info:
        main(["push", str(saved_heads), "someone/heads", "--token", "hf_not_a_real_token"])
    assert "HF_HUB_OFFLINE" in str(info.value.code)


def test_push_validates_the_folder_first(tmp_path, capsys, no_network):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["push", str(empty), "someone/heads", "--token", "hf_not_a_real_token"]) == 2
    assert "not a saved SDEHeads folder" in capsys.readouterr().err


def test_fit_refuses_a_non_empty_out_unless_overwrite(tmp_path, capsys, monkeypatch, stories_model):
    """Before: `fit --out` into a folder of earlier heads silently overwrote them."""
    monkeypatch.setattr("hf_sde.data.loading.load_model", lambda *args, **kwargs: stories_model)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("earlier work")
    args = ["fit", "--model", STORIES_REPO, "--data", str(TINYSTORIES), "-q", "--epochs", "1", "--out", str(out)]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert main([*args, "--overwrite"]) == 0
    assert "notes.txt" not in os.listdir(out) and "config.json" in os.listdir(out)
    assert SDEHeads.from_pretrained(str(out)).config.base_model == STORIES_REPO
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no partial folder left beside it


def test_an_interrupted_fit_leaves_nothing_that_loads(tmp_path, monkeypatch, stories_model):
    monkeypatch.setattr("hf_sde.data.loading.load_model", lambda *args, **kwargs: stories_model)
    real_save = SDEHeads._save_pretrained

    def save_then_die(self, save_directory):
        real_save(self, save_directory)
        raise KeyboardInterrupt  # e.g. Ctrl-C after the weights, before fit_history.json

    monkeypatch.setattr(SDEHeads, "_save_pretrained", save_then_die)
    out = tmp_path / "out"
    # Ctrl-C: one line on stderr and exit status 130 (tests/test_first_user.py checks the line)
    assert main(["fit", "--model", STORIES_REPO, "--data", str(TINYSTORIES), "-q", "--epochs", "1",
                 "--out", str(out)]) == 130
    assert os.listdir(tmp_path) == []


def test_generate_with_a_missing_heads_folder_says_so(capsys):
    """Before: "Repo id must use alphanumeric chars" or a Hub connection error."""
    assert main(["generate", "--model", STORIES_REPO, "--heads", "does-not-exist/", "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert "No SDE heads folder at does-not-exist/" in err and "does not exist" in err


def test_generate_without_heads_needs_the_shipped_heads_or_says_what_to_pass(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "hf_sde.pretrained", None)  # as if the package shipped none
    with pytest.raises(SystemExit, match="pass --heads"):
        main(["generate", "--model", STORIES_REPO, "--prompt", "Hi"])


def test_smoke_environment_variable_caps_the_work(monkeypatch, capsys):
    from hf_sde.commands import build_parser
    from hf_sde.commands._smoke import apply_smoke

    args = build_parser().parse_args(["fit", "--data", "x.txt", "--out", "o", "--epochs", "60", "--limit", "3"])
    monkeypatch.delenv("HF_SDE_SMOKE", raising=False)
    assert apply_smoke(args, args.smoke) == {} and args.epochs == 60
    monkeypatch.setenv("HF_SDE_SMOKE", "1")
    changed = apply_smoke(args, args.smoke)
    assert args.epochs == 2 and args.limit == 3 and "limit" not in changed  # already below the cap
    assert "HF_SDE_SMOKE=1" in capsys.readouterr().err
    assert "HF_SDE_SMOKE=1" in build_parser().format_help()  # documented in `hf-sde --help`
