"""The trajectory cache shared by ``fit`` / ``analyze`` / ``score`` and the folders of ``hf-sde extract``.

A second fit on the same data reads the cache (no extraction) and fits the same heads; another corpus byte, layer
or max length misses; a corrupt entry is rebuilt with a warning; ``--no-cache`` neither reads nor writes;
``extract --out`` + ``fit --trajectories`` equals a direct fit, and a folder of another layer or model is refused.
Model: stories260K (conftest) through a patched loader; the cache lives in ``tmp_path`` (``HF_SDE_CACHE``).
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from conftest import STORIES_REPO, TINYSTORIES
from safetensors.torch import load_file

import hf_sde
import hf_sde.trajectories.extract as trajectories_module
from hf_sde.commands import main

pytestmark = pytest.mark.filterwarnings("ignore:.*diffusion is \\(nearly\\) constant")

FAST = ["--epochs", "2", "--proj-dim", "4", "--width", "16", "-q"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The trajectory cache on, in ``tmp_path/cache/trajectories``."""
    monkeypatch.setenv("HF_SDE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_SDE_TRAJECTORY_CACHE", "1")
    return tmp_path / "cache" / "trajectories"


@pytest.fixture
def stories_loader(monkeypatch, stories_model):
    monkeypatch.setattr("hf_sde.data.loading.load_model", lambda *args, **kwargs: stories_model)


@pytest.fixture
def extractions(monkeypatch):
    """Every call of the extraction's forward passes (``extract_from_ids``), counted."""
    calls = []
    real = trajectories_module.extract_from_ids

    def counting(*args, **kwargs):
        calls.append(args[2] if len(args) > 2 else kwargs.get("layer"))
        return real(*args, **kwargs)

    monkeypatch.setattr(trajectories_module, "extract_from_ids", counting)
    return calls


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "stories.txt"
    shutil.copy(TINYSTORIES, path)
    return path


def entries(root) -> list:
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


def fit(out, *extra, data=None) -> dict:
    """``hf-sde fit`` (small and fast); its summary."""
    argv = ["fit", "--model", STORIES_REPO, *FAST, "--out", str(out), *extra]
    if data is not None:
        argv += ["--data", str(data)]
    assert main(argv) == 0
    return json.loads((out / "fit_history.json").read_text())["summary"]


def same_heads(a, b) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ----- the cache ---------------------------------------------------------------------------------------------
def test_a_second_fit_reads_the_cache_and_fits_the_same_heads(tmp_path, cache, stories_loader, extractions, corpus):
    first = fit(tmp_path / "a", data=corpus)
    assert len(extractions) == 1 and len(entries(cache)) == 1
    entry = entries(cache)[0]
    assert sorted(p.name for p in entry.iterdir()) == ["layer-4.safetensors", "manifest.json"]
    second = fit(tmp_path / "b", data=corpus)
    assert len(extractions) == 1  # no extraction the second time
    assert second["heldout_nll"] == first["heldout_nll"] and same_heads(tmp_path / "a", tmp_path / "b")
    assert entries(cache) == [entry]


def test_another_corpus_byte_layer_or_max_length_misses(tmp_path, cache, stories_loader, extractions, corpus):
    fit(tmp_path / "a", data=corpus)
    fit(tmp_path / "b", "--layer", "2", data=corpus)
    fit(tmp_path / "c", "--max-length", "128", data=corpus)
    text = corpus.read_bytes()
    at = text.index(b"Once") + 1
    corpus.write_bytes(text[:at] + (b"N" if text[at:at + 1] != b"N" else b"M") + text[at + 1:])  # one byte
    fit(tmp_path / "d", data=corpus)
    assert len(extractions) == 4 and len(entries(cache)) == 4
    fit(tmp_path / "e", "--layer", "-3", data=corpus)  # = layer 2 of 5, but of the changed corpus: a miss
    fit(tmp_path / "f", "--layer", "2", "--max-length", "128", data=corpus)
    assert len(extractions) == 6
    fit(tmp_path / "g", "--layer", "-3", data=corpus)  # -3 and 2 are one layer: a hit
    assert len(extractions) == 6


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "missing"])
def test_a_corrupt_entry_is_rebuilt_with_a_warning(tmp_path, cache, stories_loader, extractions, corpus, caplog,
                                                   damage):
    first = fit(tmp_path / "a", data=corpus)
    entry = entries(cache)[0]
    states = entry / "layer-4.safetensors"
    data = bytearray(states.read_bytes())
    if damage == "flip":
        data[-100] ^= 0xFF  # same size, another value: the CRC-32 sees it
        states.write_bytes(bytes(data))
    elif damage == "truncate":
        states.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "manifest":
        (entry / "manifest.json").write_text('{"format": "hf-sde-traj')
    else:
        states.unlink()
    with caplog.at_level(logging.WARNING, logger="hf_sde.trajectories.cache"):
        second = fit(tmp_path / "b", data=corpus)
    assert len(extractions) == 2 and second["heldout_nll"] == first["heldout_nll"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "hf_sde.trajectories.cache"]
    assert len(warnings) == 1 and "unusable" in warnings[0] and "extracting them again" in warnings[0]
    assert entries(cache) == [entry]
    fit(tmp_path / "c", data=corpus)  # the rebuilt entry is read
    assert len(extractions) == 2


def test_no_cache_neither_reads_nor_writes(tmp_path, cache, stories_loader, extractions, corpus):
    fit(tmp_path / "a", "--no-cache", data=corpus)
    assert len(extractions) == 1 and entries(cache) == []
    fit(tmp_path / "b", data=corpus)
    assert len(extractions) == 2 and len(entries(cache)) == 1
    fit(tmp_path / "c", "--no-cache", data=corpus)
    assert len(extractions) == 3 and len(entries(cache)) == 1
    assert same_heads(tmp_path / "a", tmp_path / "c")


def test_the_cache_can_be_turned_off_by_the_environment(tmp_path, cache, stories_loader, extractions, corpus,
                                                        monkeypatch):
    monkeypatch.setenv("HF_SDE_TRAJECTORY_CACHE", "0")
    fit(tmp_path / "a", data=corpus)
    fit(tmp_path / "b", data=corpus)
    assert len(extractions) == 2 and entries(cache) == []


def test_extract_trajectories_cache_argument(tmp_path, stories_model, extractions, corpus):
    model, tok = stories_model
    root = tmp_path / "api-cache"
    first = hf_sde.extract_trajectories(model, tok, corpus, layer=[4, 2], max_length=64, progress=False, cache=root)
    assert [t.meta["cache"]["status"] for t in first] == ["written", "written"] and len(entries(root)) == 2
    again = hf_sde.extract_trajectories(model, tok, corpus, layer=[2, -1], max_length=64, progress=False, cache=root)
    assert len(extractions) == 1 and [t.meta["cache"]["status"] for t in again] == ["read", "read"]
    for a, b in zip(again, reversed(first), strict=True):
        assert a.layer == b.layer and a.meta["kept_indices"] == b.meta["kept_indices"]
        assert all(torch.equal(x, y) for x, y in zip(a.states, b.states, strict=True))
    third = hf_sde.extract_trajectories(model, tok, corpus, layer=[1, 2], max_length=64, progress=False, cache=root)
    assert extractions[-1] == [1] and [t.layer for t in third] == [1, 2]  # only the missing layer is extracted
    hf_sde.extract_trajectories(model, tok, corpus, layer=2, max_length=64, progress=False)  # off by default
    assert len(extractions) == 3 and len(entries(root)) == 3
    # A model changed in memory is another model, under the same name.
    changed = type(model)(model.config)
    changed.load_state_dict(model.state_dict())
    changed.hf_sde_source = model.hf_sde_source
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight[0, 0] += 0.5
    hf_sde.extract_trajectories(changed, tok, corpus, layer=2, max_length=64, progress=False, cache=root)
    assert len(extractions) == 4


# ----- analyze and score share it ---------------------------------------------------------------------------------
ANALYZE_FAST = ["--n-paths", "1", "--max-starts", "2", "--max-samples", "100", "--examples", "1"]


def test_analyze_and_score_read_the_fit_cache_and_analyze_shows_the_extraction_bar(
        tmp_path, cache, stories_loader, extractions, corpus, capsys):
    fit(tmp_path / "heads", data=corpus)
    capsys.readouterr()
    assert main(["analyze", "--heads", str(tmp_path / "heads"), "--data", str(corpus), "--out", str(tmp_path / "r"),
                 "-q", *ANALYZE_FAST]) == 0
    assert len(extractions) == 1
    assert main(["score", "--heads", str(tmp_path / "heads"), "--text", "Once upon a time there was a cat.",
                 "--ou-data", str(corpus), "--json"]) == 0
    assert len(extractions) == 1
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["scores"]
    assert scores[0]["ou_nll"] is not None
    # Without the cache the extraction runs inside analyze, with its own per-batch progress bar.
    assert main(["analyze", "--heads", str(tmp_path / "heads"), "--data", str(corpus), "--out", str(tmp_path / "r2"),
                 "--no-cache", "--batch-size", "2", *ANALYZE_FAST]) == 0
    assert len(extractions) == 2
    err = capsys.readouterr().err
    assert "Extracting layer 4" in err and "5/5" in err and "hf-sde analyze" in err


# ----- hf-sde extract and --trajectories --------------------------------------------------------------------------
def test_extract_then_fit_trajectories_equals_a_direct_fit(tmp_path, cache, stories_loader, extractions, corpus,
                                                          capsys):
    folder = tmp_path / "traj"
    assert main(["extract", "--model", STORIES_REPO, "--data", str(corpus), "--out", str(folder), "--no-cache",
                 "-q"]) == 0
    assert "Extracted 5 sequences" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == ["layer-4.safetensors", "manifest.json"]
    assert len(extractions) == 1 and entries(cache) == []
    from_folder = fit(tmp_path / "a", "--trajectories", str(folder))
    assert len(extractions) == 1  # read, not extracted
    direct = fit(tmp_path / "b", "--no-cache", data=corpus)
    assert from_folder["heldout_nll"] == direct["heldout_nll"] and same_heads(tmp_path / "a", tmp_path / "b")
    cfg_a = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg_b = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg_a["data"]["corpus"] == cfg_b["data"]["corpus"] == "stories.txt"
    # --data with it is checked: the same corpus passes, another one is refused.
    fit(tmp_path / "c", "--trajectories", str(folder), data=corpus)
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text().replace("Once", "Twice", 1))
    argv = ["fit", "--model", STORIES_REPO, *FAST, "--trajectories", str(folder), "--out", str(tmp_path / "d")]
    assert main([*argv, "--data", str(other)]) == 2
    assert "other documents" in capsys.readouterr().err
    assert main([*argv, "--max-length", "64"]) == 2
    assert "--max-length 256, not 64" in capsys.readouterr().err
    # analyze and score read the folder too.
    assert main(["analyze", "--heads", str(tmp_path / "a"), "--trajectories", str(folder), "--out",
                 str(tmp_path / "r"), "-q", *ANALYZE_FAST]) == 0
    assert main(["score", "--heads", str(tmp_path / "a"), "--text", "Once upon a time there was a cat.",
                 "--trajectories", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["scores"][0]["ou_nll"] is not None
    assert len(extractions) == 2  # the direct fit's only


def test_trajectories_of_another_layer_or_model_are_refused(tmp_path, cache, stories_loader, corpus, capsys):
    folder = tmp_path / "traj"
    assert main(["extract", "--model", STORIES_REPO, "--data", str(corpus), "--layer", "2", "--out", str(folder),
                 "-q"]) == 0
    capsys.readouterr()
    assert main(["fit", "--model", STORIES_REPO, *FAST, "--trajectories", str(folder), "--layer", "-1", "--out",
                 str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "hf-sde fit: error:" in err and "holds layer 2, not layer 4 (--layer -1)" in err
    assert not (tmp_path / "a").exists()
    fit(tmp_path / "heads", data=corpus)  # layer 4 heads
    assert main(["analyze", "--heads", str(tmp_path / "heads"), "--trajectories", str(folder), "--out",
                 str(tmp_path / "r"), "-q"]) == 2
    assert "holds layer 2, not layer 4 (the heads' layer)" in capsys.readouterr().err
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["key"]["model"]["name_or_path"] = "someone/another-model"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert main(["fit", "--model", STORIES_REPO, *FAST, "--trajectories", str(folder), "--layer", "2", "--out",
                 str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "was extracted with model 'someone/another-model'" in err and STORIES_REPO in err
    assert main(["fit", "--model", STORIES_REPO, *FAST, "--trajectories", str(tmp_path), "--out",
                 str(tmp_path / "b")]) == 2
    assert "not a trajectory folder" in capsys.readouterr().err


def test_extract_writes_several_layers_from_one_pass(tmp_path, cache, stories_loader, extractions, corpus, capsys):
    folder = tmp_path / "traj"
    assert main(["extract", "--model", STORIES_REPO, "--data", str(corpus), "--layer", "1", "--layer", "-1",
                 "--max-length", "64", "--out", str(folder), "-q", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers"] == [1, 4] and summary["sequences"] == 5 and len(extractions) == 1
    fit(tmp_path / "a", "--trajectories", str(folder), "--layer", "1")
    summary = json.loads((tmp_path / "a" / "fit_history.json").read_text())["summary"]
    assert summary["layer"] == 1
    heads = json.loads((tmp_path / "a" / "config.json").read_text())
    assert heads["data"]["max_length"] == 64  # the folder's, as --max-length was not given
    assert len(extractions) == 1
