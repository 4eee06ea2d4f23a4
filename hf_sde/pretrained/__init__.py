"""Heads shipped with hf-sde, so the default model observes and controls decoding without a fitting step.

Each folder is a saved :class:`~hf_sde.SDEHeads` in the Hub layout (``model.safetensors``, ``config.json``, a
model card with the fit's numbers), exactly what ``hf-sde push`` uploads; ``SDEHeads.from_pretrained`` reads
it as a folder here or, after a push, by repo id through the hub cache.
"""

from __future__ import annotations

from pathlib import Path

#: SmolLM2-135M-Instruct (the pinned Q4_1 GGUF), HelpSteer sample responses as chat, layer chosen by a sweep
#: over depth (benchmarks/results/sweep_layers.md).
SMOLLM2_HEADS = Path(__file__).resolve().parent / "smollm2-135m-instruct-helpsteer"
#: The repo id these heads carry in their model card (what ``hf-sde push`` would create).
SMOLLM2_HEADS_REPO_ID = "hf-sde/SmolLM2-135M-Instruct-sde-helpsteer"
#: The heads the CLI, the Space and the examples use when none are given.
DEFAULT_HEADS = SMOLLM2_HEADS

__all__ = ["DEFAULT_HEADS", "SMOLLM2_HEADS", "SMOLLM2_HEADS_REPO_ID"]
