"""Loading: the stories260K GGUF through the ordinary hub path, the generic special-token repair, tokenizers."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch
from conftest import STORIES_GGUF, STORIES_REPO, STORIES_REVISION, TINYSTORIES, load_stories
from huggingface_hub import hf_hub_download
from transformers import GPT2Config, LlamaConfig

from hf_sde.data.loading import load_gguf_tokenizer, prepare_tokenizer, repair_config_token_ids


def test_stories_gguf_loads_and_logs_the_repaired_fields(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_sde.data.loading"):
        model, tok = load_stories()
    records = [r for r in caplog.records if r.name == "hf_sde.data.loading" and r.levelno == logging.WARNING]
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    message = records[0].getMessage()
    # The GGUF stores both ids as uint32 -1; the warning names each repaired field and its bad value.
    assert "pad_token_id=4294967295" in message
    assert "seperator_token_id=4294967295" in message
    assert "padding_token_id=4294967295" in message
    assert STORIES_GGUF in message
    # The repaired model really is stories260K (hidden 64, 5 layers, vocab 512) with a valid config.
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (64, 5, 512)
    assert cfg.pad_token_id is None or 0 <= cfg.pad_token_id < cfg.vocab_size
    assert not model.training
    assert model.hf_sde_source == {"name_or_path": STORIES_REPO, "gguf_file": STORIES_GGUF,
                                   "revision": STORIES_REVISION}
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")


def test_repair_config_token_ids_is_generic():
    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, pad_token_id=4294967295, bos_token_id=1, eos_token_id=2)
    repaired = repair_config_token_ids(cfg)
    assert repaired == ["config.pad_token_id=4294967295"]
    assert cfg.pad_token_id is None
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)  # valid ids are left alone

    # Negative ids and ids equal to the vocabulary size are out of range too.
    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, pad_token_id=-1, bos_token_id=100, eos_token_id=99)
    assert sorted(repair_config_token_ids(cfg)) == ["config.bos_token_id=100", "config.pad_token_id=-1"]
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (None, None, 99)

    # GPT-2's defaults (bos/eos 50256) are invalid for a shrunken vocabulary.
    cfg = GPT2Config(vocab_size=128)
    assert sorted(repair_config_token_ids(cfg)) == ["config.bos_token_id=50256", "config.eos_token_id=50256"]
    assert cfg.bos_token_id is None and cfg.eos_token_id is None

    # A list of EOS ids keeps its valid entries.
    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, eos_token_id=[2, 4294967295, 7])
    assert repair_config_token_ids(cfg) == ["config.eos_token_id=[2, 4294967295, 7]"]
    assert cfg.eos_token_id == [2, 7]

    # Nothing to repair: nothing changes and nothing is reported.
    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    assert repair_config_token_ids(cfg) == []
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)


def test_tokenizer_has_pad_and_left_padding(stories_model):
    model, tok = stories_model
    assert tok.pad_token is not None
    assert tok.pad_token == tok.eos_token  # the file has no pad token: EOS stands in
    assert tok.padding_side == "left"
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_greedy_continuation_is_coherent_tinystories_text(stories_model):
    model, tok = stories_model
    enc = tok("Once upon a time", return_tensors="pt")
    assert enc["input_ids"][0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=30, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith("Once upon a time")
    new_words = text[len("Once upon a time"):].split()
    assert len(new_words) >= 15
    # Greedy stories260K continues with the classic TinyStories opening.
    assert "there was a" in text
    # Plain English words and punctuation, no byte-fallback garbage or stray special tokens.
    assert all(re.fullmatch(r"[A-Za-z',.!?\"]+", w) for w in new_words), text


def test_stories_perplexity_shows_trained_weights(stories_model):
    model, tok = stories_model
    story = TINYSTORIES.read_text(encoding="utf-8").split("<|endoftext|>")[0].strip()
    enc = tok(story, return_tensors="pt", truncation=True, max_length=256)
    with torch.no_grad():
        loss = model(**enc, labels=enc["input_ids"]).loss
    # About 3.5 for the trained model; a random init of this shape is about 500.
    assert math.exp(loss.item()) < 8.0


def test_tokenizer_without_pad_token_still_batches(stories_model):
    path = hf_hub_download(STORIES_REPO, STORIES_GGUF, revision=STORIES_REVISION)
    raw, repaired = load_gguf_tokenizer(path)
    assert raw.pad_token is None  # the GGUF's padding id is invalid and was dropped
    assert any("padding_token_id" in r for r in repaired)
    with pytest.raises(ValueError):
        raw(["a b", "a much longer text here"], padding=True)

    tok = prepare_tokenizer(raw)
    assert tok.pad_token == "</s>" and tok.padding_side == "left"
    prompts = ["Once upon a time", "The little dog ran to the park and"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    short = len(tok(prompts[0])["input_ids"])
    assert enc["attention_mask"][0].tolist() == [0] * (enc["input_ids"].shape[1] - short) + [1] * short
    assert enc["input_ids"][0, 0].item() == tok.pad_token_id

    # Left-padded batched greedy generation gives what each prompt gives alone.
    model, _ = stories_model
    with torch.no_grad():
        batched = model.generate(**enc, max_new_tokens=12, do_sample=False)[:, enc["input_ids"].shape[1]:]
        for r, prompt in enumerate(prompts):
            alone = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=12, do_sample=False)
            assert batched[r].tolist() == alone[0, -12:].tolist()


def test_prepare_tokenizer_needs_some_special_token():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[X]": 2}, unk_token="[X]"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert tok.pad_token is None and tok.eos_token is None and tok.unk_token is None
    with pytest.raises(ValueError, match="pad"):
        prepare_tokenizer(tok)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[X]")
    assert prepare_tokenizer(tok).pad_token == "[X]"


# ----- the dequantized-weights cache (hf_sde.data.gguf_cache) ------------------------------------------------
def _stories(**kwargs):
    from hf_sde.data.loading import load_model

    return load_model(STORIES_REPO, gguf_file=STORIES_GGUF, revision=STORIES_REVISION, **kwargs)


def _logits(model, tok):
    with torch.no_grad():
        return model(**tok(["Once upon a time, there was a cat."], return_tensors="pt")).logits


@pytest.fixture
def gguf_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SDE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_SDE_GGUF_CACHE", raising=False)
    return tmp_path / "cache"


def _entry(cache):
    from hf_sde.data.gguf_cache import MANIFEST

    entries = [p.parent for p in cache.rglob(MANIFEST)]
    assert len(entries) == 1, entries
    return entries[0]


def test_gguf_cache_second_load_reads_the_cache_and_equals_a_direct_load(gguf_cache_dir, monkeypatch, caplog):
    direct_model, direct_tok = _stories(gguf_cache=False)
    model, tok = _stories()  # builds the entry
    entry = _entry(gguf_cache_dir)
    assert entry.parts[-3:] == ("ggml-org--models-moved", STORIES_REVISION,
                                "270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d")

    def no_dequantizing(*args, **kwargs):
        raise AssertionError("the second load dequantized the GGUF again")

    monkeypatch.setattr("hf_sde.data.loading._load_direct", no_dequantizing)
    with caplog.at_level(logging.WARNING, logger="hf_sde.data.loading"):
        again, again_tok = _stories()
    assert "padding_token_id=4294967295" in caplog.text  # the repair is still reported
    assert torch.equal(_logits(again, again_tok), _logits(direct_model, direct_tok))
    text = "Once upon a time, there was a cat.\nIt sat."
    assert again_tok(text)["input_ids"] == direct_tok(text)["input_ids"]
    assert (again_tok.pad_token, again_tok.padding_side) == (direct_tok.pad_token, "left")
    assert again.hf_sde_source == direct_model.hf_sde_source and again.config.name_or_path == STORIES_REPO
    assert again.config.to_diff_dict() == model.config.to_diff_dict()


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_a_corrupt_gguf_cache_entry_is_rebuilt_not_trusted(gguf_cache_dir, caplog, damage):
    from hf_sde.data.gguf_cache import MANIFEST

    reference = _logits(*_stories())
    entry = _entry(gguf_cache_dir)
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF  # same size, same header: only the checksum sees it
        weights.write_bytes(data)
    else:
        (entry / MANIFEST).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="hf_sde.data.gguf_cache"):
        model, tok = _stories()
    assert "is not valid" in caplog.text and "rebuilding it" in caplog.text
    assert torch.equal(_logits(model, tok), reference)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_sde.data.gguf_cache"):
        _stories()
    assert "rebuilding" not in caplog.text  # the rebuilt entry verifies


def test_an_unwritable_gguf_cache_loads_without_it_and_says_so_once(tmp_path, monkeypatch, caplog):
    import hf_sde.data.gguf_cache as gc

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("HF_SDE_CACHE", str(blocker))  # mkdir under a file fails, also as root
    monkeypatch.setattr(gc, "_warned_unwritable", False)
    with caplog.at_level(logging.WARNING, logger="hf_sde.data.gguf_cache"):
        model, tok = _stories()
        _stories()
    assert caplog.text.count("is not writable") == 1
    assert model.config.hidden_size == 64 and blocker.read_text() == "not a folder"
