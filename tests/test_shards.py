"""Sharded extraction (hf_sde.trajectories.shards): manifests, the one trajectory file format, chat paths, bad folders."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import HELPSTEER

import hf_sde
from hf_sde.trajectories.shards import (
    ShardedCorpus,
    clear_shards,
    extract_to_shards,
    load_shards,
    read_shard_info,
)

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}:\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:\n{% endif %}")
CORPUS = dict(template="helpsteer-chat", limit=7, max_length=12)


@pytest.fixture(scope="module")
def chat_model(stories_model):
    model, tok = stories_model
    tok = copy.deepcopy(tok)  # the session's tokenizer stays as it is
    tok.chat_template = CHAT_TEMPLATE
    return model, tok


def test_chat_shards_reassemble_with_their_path_starts(chat_model, tmp_path):
    model, tok = chat_model
    ref = hf_sde.extract_trajectories(model, tok, HELPSTEER, 2, progress=False, **CORPUS)
    for rank in range(2):
        paths = extract_to_shards(model, tok, str(HELPSTEER), tmp_path, 2, shard_size=2, rank=rank, world_size=2,
                                  progress=False, **CORPUS)
        assert len(paths) == 2  # 4 and 3 documents per rank, 2 per shard
    manifest = json.loads((tmp_path / "traj-rank00001-of-00002.json").read_text())
    assert manifest["documents"] == 3 and manifest["sequences"] == 3 and manifest["skipped"] == 0
    assert manifest["transitions"] == 3 * 11

    info = read_shard_info(paths[0])  # lengths and metadata, states not read
    assert info.lengths == [12, 12] and info.doc_indices == [1, 3] and info.header["layer"] == 2
    merged = load_shards(str(tmp_path))
    assert merged.layer == 2 and merged.lengths == ref.lengths
    # Other batches, other padding: equal up to float rounding.
    assert max(float((a - b).abs().max()) for a, b in zip(merged.states, ref.states, strict=True)) < 1e-4
    for key in ("groups", "path_start", "time_origin"):
        assert merged.meta[key] == ref.meta[key]
    assert merged.meta["time_origin"] == "prompt_end" and merged.meta["doc_indices"] == list(range(7))

    clear_shards(str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_default_rank_and_plain_text_shards(stories_model, tmp_path):
    model, tok = stories_model
    paths = extract_to_shards(model, tok, ["Once upon a time there was a cat.", "x", "The dog ran home."],
                              tmp_path, shard_size=8, max_length=16, progress=False)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["traj-rank00000-of-00001-00000.safetensors"]
    traj = hf_sde.Trajectories.load(paths[0])  # a shard is an ordinary trajectory file
    assert "path_start" not in traj.meta and traj.meta["doc_indices"] == [0, 1, 2]
    manifest = json.loads((tmp_path / "traj-rank00000-of-00001.json").read_text())
    assert manifest["skipped"] == 0 and manifest["sequences"] == 3 and manifest["documents"] == 3


def test_bad_shard_folders_are_refused(stories_model, tmp_path):
    with pytest.raises(ValueError, match="No trajectory shards"):
        ShardedCorpus(str(tmp_path))
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not an hf-sde trajectory file"):
        ShardedCorpus(str(tmp_path))
    (tmp_path / "foreign.safetensors").unlink()
    hf_sde.Trajectories([torch.zeros(3, 4)], layer=0, hidden_size=4).save(str(tmp_path / "a.safetensors"))
    hf_sde.Trajectories([torch.zeros(3, 4)], layer=1, hidden_size=4).save(str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="disagree on layer"):
        ShardedCorpus(str(tmp_path))
    model, tok = stories_model
    with pytest.raises(ValueError, match="shard_size"):
        extract_to_shards(model, tok, ["a b c"], tmp_path / "out", shard_size=0, progress=False)
    with pytest.raises(ValueError, match=r"template='helpsteer-chat'.*chat template"):
        extract_to_shards(model, tok, str(HELPSTEER), tmp_path / "out", template="helpsteer-chat", progress=False)
