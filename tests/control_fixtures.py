"""Shared models, heads and helpers for the decoding-time control tests (tests/test_control*.py).

The expensive objects (heads fitted on conftest's stories260K, a tiny random Llama and its heads) are built
once per process and handed out as deep copies, so a test may enable SDE control on its model, register
hooks or change its dtype without touching the others (or conftest's session model).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# Must be set before huggingface_hub / transformers are imported (they read them at import time).
if (SHARED / "hf-cache" / "hub").is_dir():
    os.environ.setdefault("HF_HUB_CACHE", str((SHARED / "hf-cache" / "hub").resolve()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy  # noqa: E402
import functools  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import hf_sde  # noqa: E402

PROMPTS = ["Once upon a time", "The little dog ran to the park and"]


def random_heads(seed: int = 0, **overrides) -> hf_sde.SDEHeads:
    """Heads for the tiny Llama (hidden 32, 3 layers, last layer) with random (non-zero) weights."""
    cfg = dict(hidden_size=32, proj_dim=6, layer=2, num_layers=3, horizon=50.0, base_model="tiny/llama",
               base_model_revision="abc123", width=16, depth=2, heldout_nll={"neural": 1.1, "ou": 1.2, "brownian": 1.5},
               data={"corpus": "unit-test"})
    cfg.update(overrides)
    heads = hf_sde.SDEHeads(hf_sde.SDEHeadsConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in heads.state_dict().items():
            if name != "frequencies":
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3 + (1.0 if name == "proj_scale" else 0.0))
        heads.proj_scale.abs_().add_(0.1)
    return heads


@dataclass
class Bundle:
    model: torch.nn.Module
    tok: object
    heads: hf_sde.SDEHeads


_HEADS: dict[str, hf_sde.SDEHeads] = {}


def stories_bundle(stories_model, stories_trajectories) -> Bundle:
    """A private copy of conftest's stories260K (never enabled) with heads fitted once on its last layer."""
    model, tok = stories_model
    if "stories" not in _HEADS:
        _HEADS["stories"] = hf_sde.fit_heads(stories_trajectories, proj_dim=16, epochs=5, progress=False).heads
    return Bundle(copy.deepcopy(model), tok, copy.deepcopy(_HEADS["stories"]))


@pytest.fixture
def make_stories(stories_model, stories_trajectories):
    """A factory of fresh stories260K bundles (conftest's session model is never modified)."""
    return lambda: stories_bundle(stories_model, stories_trajectories)


@pytest.fixture(scope="module", name="sb")
def enabled_stories(stories_model, stories_trajectories) -> Bundle:
    """``sb``: one stories260K bundle per test module, with SDE control enabled on its model (a private copy)."""
    bundle = stories_bundle(stories_model, stories_trajectories)
    hf_sde.enable_sde_control(bundle.model)
    return bundle


def tiny_llama_config(hidden_size: int = 32, num_layers: int = 3, vocab_size: int = 64) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


@functools.cache
def _tiny(hidden_size: int, num_layers: int, layer: int, seed: int):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size, num_layers)).eval()
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, 64, (int(n),), generator=g).tolist()
           for n in torch.randint(16, 33, (12,), generator=g)]
    traj = hf_sde.extract_from_ids(model, ids, layer, progress=False)
    heads = hf_sde.fit_heads(traj, proj_dim=8, epochs=3, width=32, progress=False).heads
    return model, heads


def tiny_bundle(hidden_size: int = 32, num_layers: int = 3, layer: int = -1, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> Bundle:
    """A random tiny Llama (copy) and heads fitted on its float32 trajectories at ``layer``."""
    model, heads = _tiny(hidden_size, num_layers, layer, seed)
    return Bundle(copy.deepcopy(model).to(dtype), None, copy.deepcopy(heads))


def encode(tok, prompts: list[str]) -> dict:
    return dict(tok(prompts, return_tensors="pt", padding=True, padding_side="left"))


def run(generate, inputs: dict, seed: int = 0, **kwargs):
    """Seed the global RNG and call ``generate`` (so two calls with the same seed sample alike)."""
    torch.manual_seed(seed)
    return generate(**inputs, **kwargs)


def all_hooks(model: torch.nn.Module) -> dict[str, int]:
    """Number of forward (pre-)hooks on every module that has any."""
    out = {}
    for name, m in model.named_modules():
        n = sum(len(getattr(m, attr)) for attr in ("_forward_hooks", "_forward_pre_hooks",
                                                   "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                                                   "_backward_hooks", "_forward_hooks_always_called"))
        if n:
            out[name or "<root>"] = n
    return out


# ----- the parity matrix (tests/test_control_parity.py) ------------------------------------------------
PARITY_FAMILIES = ("llama", "gpt2", "gpt_neox", "qwen2", "qwen3", "mistral", "gemma", "gemma2")
# Families whose configs take a sliding window (the cache then holds sliding layers).
SLIDING_FAMILIES = ("mistral", "qwen2", "gemma2")


def parity_config(family: str, sliding: bool = False):
    """conftest's tiny config of ``family`` (Gemma2 added here), optionally with a 4-token sliding window."""
    import transformers as tf
    from conftest import TINY_VOCAB, tiny_config

    if family == "gemma2":
        cfg = tf.Gemma2Config(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0, sliding_window=4 if sliding else 64)
    else:
        cfg = tiny_config(family)
    if sliding and family == "mistral":
        cfg.sliding_window = 4
    if sliding and family == "qwen2":
        cfg.use_sliding_window, cfg.sliding_window, cfg.max_window_layers = True, 4, 1
        cfg.layer_types = ["full_attention"] + ["sliding_attention"] * (cfg.num_hidden_layers - 1)
    return cfg


@functools.cache
def _parity_model(family: str, sliding: bool):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(parity_config(family, sliding), attn_implementation="eager").eval()
    cfg = hf_sde.SDEHeadsConfig(hidden_size=32, proj_dim=4, layer=1, num_layers=3, horizon=64.0, width=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        heads = hf_sde.SDEHeads(cfg)
        with torch.no_grad():
            for p in heads.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model, heads


def parity_bundle(family: str, sliding: bool = False) -> Bundle:
    """A tiny random model of ``family`` and random heads at layer 1 (built once per process; do not modify)."""
    model, heads = _parity_model(family, sliding)
    return Bundle(model, None, heads)
