"""SDE control outside an hf-sde install: a Hub ``custom_generate`` folder (vLLM serving is :mod:`hf_sde.vllm`)."""

from .export import export_custom_generate

__all__ = ["export_custom_generate"]
