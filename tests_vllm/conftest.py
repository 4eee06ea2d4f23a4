"""Fixtures for hf-sde inside vLLM. Run in the vLLM environment (scripts/setup_vllm_venv.sh):

    .venv-vllm/bin/python -m pytest -q tests_vllm

One in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) serves every offline test. It is sized so that
one short batch goes through chunked prefill (32-token steps, prompts of ~40 tokens), preemption (5 KV blocks
of 32 tokens for 4 requests of ~70 tokens) and prefix caching, in float32 like the transformers reference.
"""

from __future__ import annotations

import os
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_CACHE", str((_ROOT / ".." / "shared" / "hf-cache" / "hub").resolve()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
# One OpenMP thread: with two on 2 cores shared with other jobs, every oneDNN / vLLM CPU kernel waits ~3 ms at its
# barrier for a descheduled thread (measured here: 1.3 tok/s batch 1 with two threads, 12 tok/s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ["HF_SDE_VLLM_HEADS"] = "smollm2"

import pytest  # noqa: E402
import torch  # noqa: E402

# Chat prompts of 51-54 tokens: two prefill chunks each, and every request crosses the 64-token KV block
# boundary within NEW_TOKENS, so four of them do not fit the 5-block cache together (preemption).
PROMPTS = [
    "Give three short tips for staying healthy during a busy week at work, and explain in one sentence why each "
    "tip helps.",
    "What is the capital of France? Explain briefly how it became the capital and name one famous building there.",
    "Write a short poem about the sea and the wind, with four lines that rhyme, for a child who loves boats.",
    "How do I make a good cup of green tea at home? Give the water temperature and the steeping time too.",
]
NEW_TOKENS = 16
BLOCK_SIZE = 32
NUM_BLOCKS = 5


@pytest.fixture(scope="session")
def folder() -> str:
    from hf_sde.vllm import model_folder

    return str(model_folder())


@pytest.fixture(scope="session")
def hf(folder):
    from hf_sde import load_model

    model, tokenizer = load_model(folder, dtype=torch.float32)
    return model, tokenizer


@pytest.fixture(scope="session")
def heads():
    from hf_sde import DEFAULT_HEADS, SDEHeads

    return SDEHeads.from_pretrained(DEFAULT_HEADS)


@pytest.fixture(scope="session")
def prompt_ids(hf) -> list[list[int]]:
    _, tokenizer = hf
    out = []
    for text in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        out.append(list(ids))
    return out


@pytest.fixture(scope="session")
def llm(folder):
    from vllm import LLM

    from hf_sde.vllm import llm_kwargs

    engine = LLM(folder, **llm_kwargs(max_model_len=128, max_num_batched_tokens=32, max_num_seqs=8, seed=0,
                                      block_size=BLOCK_SIZE, num_gpu_blocks_override=NUM_BLOCKS,
                                      enable_prefix_caching=True, logprobs_mode="processed_logprobs"))
    scheduler = engine.llm_engine.engine_core.engine_core.scheduler
    original = scheduler._preempt_request
    engine.preemptions = 0

    def counting(*args, **kwargs):
        engine.preemptions += 1
        return original(*args, **kwargs)

    scheduler._preempt_request = counting
    return engine


def engine_config(hidden_size: int = 576, num_hidden_layers: int = 30, **changes):
    """A stand-in ``VllmConfig`` with what hf-sde's engine checks read: an eager, single-worker Llama engine
    without speculative decoding or prefix caching; ``changes`` maps dotted paths to other values
    (``{"model_config.enforce_eager": False}``)."""
    from types import SimpleNamespace

    hf_config = SimpleNamespace(architectures=["LlamaForCausalLM"], hidden_size=hidden_size,
                                num_hidden_layers=num_hidden_layers)
    cfg = SimpleNamespace(
        model_config=SimpleNamespace(enforce_eager=True, hf_config=hf_config),
        compilation_config=SimpleNamespace(mode=0),
        speculative_config=None,
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1, enable_dbo=False,
                                        decode_context_parallel_size=1, prefill_context_parallel_size=1),
        cache_config=SimpleNamespace(enable_prefix_caching=False),
    )
    for path, value in changes.items():
        obj = cfg
        *parents, last = path.split(".")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, last, value)
    return cfg
