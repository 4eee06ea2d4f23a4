"""hf-sde inside vLLM's V1 model runner (the runner on CPU, and wherever Triton is missing).

What runs where, in the worker that owns the model (one per engine; tensor / pipeline parallelism refused):

- vLLM builds :class:`SDELogitsProcessorV1` with its persistent batch (``SDELogitsProcessor(vllm_config,
  device, is_pin_memory)`` returns one when ``HF_SDE_VLLM_HEADS`` is set). ``update_state`` keeps, per batch
  slot, the request's parsed :class:`~hf_sde.vllm.args.SDERequest` (from ``SamplingParams.extra_args``) and
  its trace, keyed by the request id the runner's persistent batch (``input_batch.req_ids``) holds at that slot.
  A slot that vanishes without a "removed" entry (finished requests can) is dropped when the batch shrinks
  past it.
- Batch layout per forward: in the V1 runner, request ``i`` of the forward is persistent-batch slot ``i``; the
  forward context's attention metadata (``query_start_loc``) says which rows are its.
- ``apply`` divides each temperature-controlled slot's logits row by the step's temperature (after vLLM's own
  temperature, before top-k / top-p, like hf-sde's processor in ``generate``).

The SDE work itself (hooks, heads, steering, traces) is :class:`hf_sde.vllm.engine.SDEBatch`, shared with
Model Runner V2's adapter (:mod:`hf_sde.vllm.processor_v2`).
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from . import engine
from .args import parse_request
from .engine import SUPPORTED_ARCHITECTURES, SDEBatch, Work
from .plugin import SDELogitsProcessor


class SDELogitsProcessorV1(SDELogitsProcessor, SDEBatch):
    """The V1-runner implementation of :class:`~hf_sde.vllm.plugin.SDELogitsProcessor` (SDE control on)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        why = engine.refusals(vllm_config)
        self.runner = engine.find_runner()
        if self.runner is None:
            why.append("hf-sde could not find vLLM's model runner (this vLLM version is not supported)")
        engine.refuse(why)
        self.init_batch(lambda: self.runner.get_model(), vllm_config)

    # -- vLLM interface -----------------------------------------------------------------------------------
    def is_argmax_invariant(self) -> bool:
        # Dividing logits by a positive temperature never moves the argmax; steering acts on hidden states.
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.slots.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            self.slots.pop(index, None)
            request = parse_request(params.extra_args) if params is not None else None
            if request is None:
                continue
            if prompt_ids is None:
                raise ValueError("SDE control needs token prompts (prompt embeddings carry no positions to read).")
            base = params.temperature if params.temperature > 0 else 1.0
            self.add_slot(index, request, len(prompt_ids), base, req_id=self._request_id(index),
                          output_ids=output_ids)
        for a, b, direction in batch_update.moved:
            sa, sb = self.slots.pop(a, None), self.slots.pop(b, None)
            if sa is not None:
                self.slots[b] = sa
            if direction == MoveDirectionality.SWAP and sb is not None:
                self.slots[a] = sb
        for index in [i for i in self.slots if i >= batch_update.batch_size]:
            del self.slots[index]

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        tau = self.temperatures()
        return self.divide(logits, list(tau), list(tau.values())) if tau else logits

    def _request_id(self, index: int) -> str:
        ids = self.runner.input_batch.req_ids
        if index < len(ids) and ids[index] is not None:
            return ids[index]
        raise RuntimeError(f"hf-sde: vLLM's batch has no request at slot {index}")

    # -- per forward --------------------------------------------------------------------------------------
    def plan(self, positions: torch.Tensor) -> Work:
        """This forward's layout from the forward context: request ``i`` is persistent-batch slot ``i``."""
        from vllm.forward_context import get_forward_context

        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, list):
            raise RuntimeError("hf-sde does not support micro-batched forwards (dual batch overlap).")
        first = next((m for m in (metadata or {}).values() if hasattr(m, "query_start_loc")), None)
        if first is None:
            return Work()  # a dummy / profiling forward
        starts = first.query_start_loc.tolist()
        n_reqs = len(starts) - 1
        layout = [(i, slot, starts[i], starts[i + 1] - 1) for i, slot in self.slots.items()
                  if i < n_reqs and starts[i + 1] > starts[i]]
        return self.plan_rows(layout, positions)


__all__ = ["SUPPORTED_ARCHITECTURES", "SDELogitsProcessor", "SDELogitsProcessorV1"]
