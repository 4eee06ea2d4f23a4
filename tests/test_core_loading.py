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

from hf_sde.loading import load_gguf_tokenizer, prepare_tokenizer, repair_config_token_ids


def test_stories_gguf_loads_and_logs_the_repaired_fields(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_sde.loading"):
        model, tok = load_stories()
    records = [r for r in caplog.records if r.name == "hf_sde.loading" and r.levelno == logging.WARNING]
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
