"""hf-sde inside vLLM's Model Runner V2 (the default wherever Triton runs: every CUDA machine).

V2's logits-processor interface (``vllm.v1.worker.gpu.sample.logits_processor.interface``) differs from V1's:

- Per-request state is keyed by the runner's *request slot* (``req_idx``), set in ``add_request(req_idx,
  sampling_params)``. Slots are recycled without a "removed" call, so ``add_request`` overwrites whatever the
  slot held; stale slots are harmless because only slots in the current batch are looked at.
- ``apply(logits, ctx)`` gets the step's :class:`LogitsContext`: logits rows are not slots; ``ctx.idx_mapping_np``
  maps each row (one per request: speculative decoding is refused) to its slot. It runs before vLLM's own
  temperature, min_p and top-k / top-p (V1: after temperature); SDE temperature requests run at
  ``temperature`` 1 or 0, where the two orders agree.
- Batch layout per forward: the runner's ``InputBatch`` (``req_ids``, ``idx_mapping_np``: batch position ->
  slot, ``query_start_loc_np``: batch position -> rows, ``input_ids``, ``positions``). The runner hands it to its
  model state's ``preprocess_state`` right before each real forward (never for dummy / profiling forwards);
  hf-sde records it there (:meth:`hf_sde.vllm.engine.ModelHooks.capture_batches`) and reads it in the block
  hooks. Request ids come from ``InputBatch.req_ids``, so traces are kept and fetched by vLLM request id (or
  ``sde_trace_id``) exactly as under V1, and continue across preemption.
- Trace length: V2 gives processors no output list, so a step is dropped when its input token is one of the
  request's stop tokens (asynchronous scheduling can compute one step past the end) or it is past
  ``max_tokens``.

Hooks need an eager model: with CUDA graphs or ``torch.compile`` the engine start is refused with the flag to set
(``enforce_eager=True`` / ``--enforce-eager``), as under V1.
"""

from __future__ import annotations

import logging

import torch

from . import engine
from .args import parse_request
from .engine import SDEBatch, Work
from .plugin import SDELogitsProcessor

logger = logging.getLogger("hf_sde.vllm")


class SDELogitsProcessorV2(SDELogitsProcessor, SDEBatch):
    """The Model-Runner-V2 implementation of :class:`~hf_sde.vllm.plugin.SDELogitsProcessor` (SDE control on)."""

    def __init__(self, vllm_config, req_states):
        self.req_states = req_states
        why = engine.refusals(vllm_config)
        runner = engine.find_runner()
        model_state = getattr(runner, "model_state", None)
        if runner is None:
            why.append("hf-sde could not find vLLM's model runner (this vLLM version is not supported)")
        elif not callable(getattr(model_state, "preprocess_state", None)):
            why.append("hf-sde could not find Model Runner V2's model state, through which it sees each batch "
                       "(this vLLM version is not supported; VLLM_USE_V2_MODEL_RUNNER=0 selects the V1 runner)")
        engine.refuse(why)
        self.model_state = model_state
        self.init_batch(runner.get_model, vllm_config)

    # -- vLLM interface -----------------------------------------------------------------------------------
    def add_request(self, req_idx: int, sampling_params) -> bool:
        """Track the slot's new request if it carries ``sde_*`` arguments (checked at admission already)."""
        self.slots.pop(req_idx, None)
        if sampling_params is None:
            return False
        try:
            request = parse_request(sampling_params.extra_args)
        except ValueError:
            # validate_params refused these at admission; getting here means the frontend's and this worker's
            # settings differ. Leave the request alone rather than stop the engine.
            logger.exception("hf-sde: request at slot %d has SDE arguments this worker refuses; it runs without "
                             "SDE control", req_idx)
            return False
        if request is None:
            return False
        base = sampling_params.temperature if sampling_params.temperature > 0 else 1.0
        stop_ids = set(getattr(sampling_params, "all_stop_token_ids", ()) or ())
        self.add_slot(req_idx, request, int(self.req_states.prompt_len.np[req_idx]), base, stop_ids=stop_ids,
                      min_tokens=int(getattr(sampling_params, "min_tokens", 0) or 0),
                      max_tokens=getattr(sampling_params, "max_tokens", None))
        self.hooks.capture_batches(self.model_state)
        return request.control.controls_temperature

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        tau = self.temperatures()
        if not tau or ctx is None:
            return logits
        slots = ctx.idx_mapping_np.tolist()
        if logits.shape[0] != len(slots):
            raise RuntimeError(f"hf-sde: {logits.shape[0]} logits rows for {len(slots)} requests (several rows per "
                               "request need speculative decoding, which SDE control refuses)")
        rows = [r for r, s in enumerate(slots) if s in tau]
        return self.divide(logits, rows, [tau[slots[r]] for r in rows])

    # -- per forward --------------------------------------------------------------------------------------
    def plan(self, positions: torch.Tensor) -> Work:
        """This forward's layout from the runner's ``InputBatch`` (``None`` for dummy / profiling forwards)."""
        batch = self.hooks.batch if self.hooks is not None else None
        if batch is None:
            return Work()
        starts = batch.query_start_loc_np
        layout = []
        for b, index in enumerate(batch.idx_mapping_np[: batch.num_reqs].tolist()):
            slot = self.slots.get(index)
            if slot is None or starts[b + 1] <= starts[b]:
                continue
            if slot.trace is None:
                self.start_trace(slot, batch.req_ids[b])
            layout.append((index, slot, int(starts[b]), int(starts[b + 1]) - 1))
        return self.plan_rows(layout, positions, tokens=batch.input_ids)
