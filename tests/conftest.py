"""Shared fixtures for the test suite: the real stories260K model (offline), tiny random causal LMs, data paths.

The hub cache and offline mode are set here, before anything imports huggingface_hub or transformers
(both read these variables at import time). The assets live in ``<repo>/../shared`` and are read in place.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO.parent / "shared").resolve()
HUB_CACHE = SHARED / "hf-cache" / "hub"
os.environ["HF_HUB_CACHE"] = str(HUB_CACHE)
os.environ["HF_HUB_OFFLINE"] = "1"
# The hf-sde commands reuse extracted trajectories from $HF_SDE_CACHE/trajectories; the suite does not, so that no
# test reads what another one (or an earlier run) wrote. tests/test_trajectory_cache.py turns it on in tmp_path.
os.environ.setdefault("HF_SDE_TRAJECTORY_CACHE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# The models here are tiny: intra-op threads buy nothing, and on a busy 2-core machine OpenMP's spin-waiting
# made every matmul 10-40x slower (CPU time and wall time alike). One thread keeps the suite fast.
torch.set_num_threads(1)

STORIES_REPO = "ggml-org/models-moved"
STORIES_GGUF = "tinyllamas/stories260K.gguf"
STORIES_REVISION = "499bc8821c6b12b4e53c5bffcb21ec206f212d81"
TINYSTORIES = SHARED / "data" / "tinystories_sample.txt"
HELPSTEER = SHARED / "data" / "helpsteer_sample_500.jsonl"

TINY_VOCAB = 128
TINY_ARCHITECTURES = ("llama", "gpt2", "gpt_neox", "qwen2", "qwen3", "mistral", "gemma")


def load_stories():
    """Load stories260K through the package's loader (a fresh copy each call)."""
    import hf_sde

    return hf_sde.load_model(STORIES_REPO, gguf_file=STORIES_GGUF, revision=STORIES_REVISION)


def tiny_config(arch: str):
    """A tiny config (hidden 32, 3 layers, vocab 128) of one architecture, in the style of transformers' tests."""
    import transformers as tf

    common = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if arch == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, **common)
    if arch == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(num_key_value_heads=2, head_dim=8, **common)
    if arch == "gemma":
        return tf.GemmaConfig(num_key_value_heads=2, head_dim=8, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(**common)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=TINY_VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    raise ValueError(f"no tiny config for {arch!r}")


def make_tiny_model(arch: str, seed: int = 0):
    """A seeded, randomly initialised tiny causal LM in eval mode (float32, CPU)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


def random_ids(lengths, seed: int = 0, vocab: int = TINY_VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="session")
def stories_model():
    """``(model, tokenizer)`` of the real stories260K GGUF, loaded once per session. Do not modify it."""
    return load_stories()


@pytest.fixture(scope="session")
def stories_trajectories(stories_model):
    """Last-layer trajectories of the five TinyStories sample stories (truncated to 256 tokens)."""
    import hf_sde

    model, tok = stories_model
    return hf_sde.extract_trajectories(model, tok, str(TINYSTORIES), layer=-1, max_length=256, progress=False)


@pytest.fixture(scope="session")
def tiny_models():
    """A cache ``arch -> model`` of tiny random causal LMs, built on first use."""
    cache: dict[str, torch.nn.Module] = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = make_tiny_model(arch)
        return cache[arch]

    return get
