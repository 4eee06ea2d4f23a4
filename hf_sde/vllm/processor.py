"""hf-sde inside vLLM's V1 engine: a logits processor plus forward hooks on the model's decoder blocks.

What runs where, in the worker that owns the model (one per engine; tensor / pipeline parallelism refused):

- :class:`SDELogitsProcessor` is built by vLLM with its persistent batch. ``update_state`` keeps, per batch
  slot, the request's parsed :class:`~hf_sde.vllm.args.SDERequest` (from ``SamplingParams.extra_args``) and its
  trace. A slot that vanishes without a "removed" entry (finished requests can) is dropped when the batch
  shrinks past it.
- Forward hooks on the decoder block(s) the requests read (the heads' layer) and steer. vLLM flattens the
  batch's tokens; the forward context's attention metadata (``query_start_loc``) says which rows belong to
  which slot, and the block's ``positions`` argument gives each row's position. A Llama block returns
  ``(hidden, residual)``; their sum is the block output transformers' hooks see.
- Per request and step: the state of the row that produces the next token (position ``prompt_len - 1 + k``)
  goes through the heads exactly as in :func:`hf_sde.sde_generate` — ``SDEHeads.project``, ``heads(z, t)`` with
  ``heads.times``, ``heads.diffusion_magnitude``, ``heads.zscore``, ``SDEControl.temperature_law`` and
  ``SDEControl.gate_value`` — and is recorded. ``apply`` divides that slot's logits row by the temperature
  (after vLLM's own temperature, before top-k / top-p, like hf-sde's processor in ``generate``).
- Steering adds ``alpha * gate(z) * ||h|| * unit(v)`` to every computed position ``>= prompt_len - 1`` of the
  request: in a decode step that is the newest position only (the KV cache keeps the rest, steered once), and
  when vLLM recomputes a preempted request it steers the recomputed positions again, so its KV cache equals
  the one it lost.

Traces live in the worker (:mod:`hf_sde.vllm.traces`); callers fetch them through the worker extension
(:class:`hf_sde.vllm.worker.SDEWorkerExtension`) with ``collective_rpc``.
"""

from __future__ import annotations

import inspect
import logging
import weakref

import torch

from ..control import SDEControl
from ..layers import block_output, replace_block_output
from . import traces
from .args import SDERequest, check_sampling, parse_request
from .heads_registry import ENV, allowlist, enabled, resolve_heads

try:
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError as e:  # pragma: no cover - only without vLLM
    raise ImportError("hf_sde.vllm needs vLLM: pip install 'hf-sde[vllm]' (see scripts/setup_vllm_venv.sh)") from e

logger = logging.getLogger(__name__)

#: Architectures whose decoder blocks were checked to return ``(hidden, residual)`` with ``hidden + residual``
#: equal to transformers' block output (measured on SmolLM2 / Llama, tests_vllm/test_parity.py).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


def _find_runner():
    """vLLM's model runner, which is building this processor (its ``__init__`` is on the call stack)."""
    frame = inspect.currentframe()
    while frame is not None:
        obj = frame.f_locals.get("self")
        if obj is not None and hasattr(obj, "get_model") and hasattr(obj, "execute_model"):
            return obj
        frame = frame.f_back
    return None


class _Slot:
    """One SDE request in the persistent batch."""

    __slots__ = ("request", "req_id", "prompt_len", "trace")

    def __init__(self, request: SDERequest, req_id: str, prompt_len: int, trace: traces.RequestTrace):
        self.request, self.req_id, self.prompt_len, self.trace = request, req_id, prompt_len, trace

    @property
    def control(self):
        return self.request.control


class _Work:
    """What one forward computes: per layer, the rows to read / steer and the per-row bookkeeping."""

    def __init__(self):
        self.read: dict[int, list[tuple[_Slot, list[int], list[int], bool]]] = {}  # layer -> (slot, rows, ks, record)
        self.steer: dict[int, list[tuple[_Slot, list[int], torch.Tensor, bool]]] = {}  # layer -> (slot, rows, unit*scale, record)
        self.tau: dict[int, torch.Tensor] = {}   # batch slot -> temperature of this step (temperature modes)


class _ModelHooks:
    """The hooks on one vLLM model; they serve whichever processor is current for it."""

    def __init__(self, model: torch.nn.Module, layers: torch.nn.ModuleList):
        self.model, self.layers = model, layers
        self.processor = None
        self.owner = None  # weakref to the processor instance that acts (one, even if vLLM built two)
        self.hooked: set[int] = set()
        self.work: _Work | None = None
        self.forward_id = 0
        model.register_forward_pre_hook(self._reset)

    def _reset(self, _module, _args):
        self.work = None
        self.forward_id += 1

    def ensure(self, layer: int) -> None:
        if layer not in self.hooked:
            self.layers[layer].register_forward_hook(self._make_hook(layer), with_kwargs=True)
            self.hooked.add(layer)

    def _make_hook(self, layer: int):
        def hook(_module, args, kwargs, output):
            proc = self.processor
            if proc is None or not proc.slots:
                return None
            positions = args[0] if args else kwargs.get("positions")
            if self.work is None:
                self.work = proc.plan(positions)
            return proc.on_block(layer, self.work, output)
        return hook


class SDELogitsProcessor(LogitsProcessor):
    """vLLM V1 logits processor for hf-sde's observe / temperature / steer modes, per request.

    Load it with ``logits_processors=["hf_sde.vllm:SDELogitsProcessor"]`` (offline ``LLM``) or
    ``--logits-processors hf_sde.vllm:SDELogitsProcessor`` (server), or through the ``vllm.logits_processors``
    entry point of an installed hf-sde. It is inert unless ``HF_SDE_VLLM_HEADS`` names the served heads.
    Requests opt in with ``sde_*`` keys in ``SamplingParams.extra_args`` / ``vllm_xargs``
    (:mod:`hf_sde.vllm.args`).
    """

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        request = parse_request(sampling_params.extra_args)
        if request is not None:
            check_sampling(sampling_params, request)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.slots: dict[int, _Slot] = {}
        self.hooks: _ModelHooks | None = None
        self.runner = None
        self.active = enabled()
        if not self.active:
            return
        served = allowlist()
        model_config = vllm_config.model_config
        why = []
        if vllm_config.speculative_config is not None:
            why.append("speculative decoding is on (the heads read one state per token; drafts would be read "
                       "and steered before they are accepted)")
        compile_mode = getattr(vllm_config.compilation_config, "mode", 0)
        if not model_config.enforce_eager or int(compile_mode or 0) != 0:
            why.append("the model is compiled (torch.compile / CUDA graphs never call module hooks, so the SDE "
                       "would silently read nothing): start vLLM with enforce_eager=True / --enforce-eager")
        par = vllm_config.parallel_config
        if par.tensor_parallel_size > 1 or par.pipeline_parallel_size > 1:
            why.append("tensor / pipeline parallelism is on (hf-sde reads whole hidden states in one worker)")
        archs = list(getattr(model_config.hf_config, "architectures", None) or [])
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            why.append(f"architecture {archs} is not one whose decoder-block output hf-sde can read in vLLM "
                       f"(supported: {list(SUPPORTED_ARCHITECTURES)})")
        text = model_config.hf_config.get_text_config() if hasattr(model_config.hf_config, "get_text_config") \
            else model_config.hf_config
        for name in served:
            _, heads = resolve_heads(name)
            cfg = heads.config
            if cfg.hidden_size != text.hidden_size or cfg.num_layers != text.num_hidden_layers:
                why.append(f"heads {name!r} were fitted on a model with hidden size {cfg.hidden_size} and "
                           f"{cfg.num_layers} layers, this one has {text.hidden_size} and {text.num_hidden_layers}")
        self.runner = _find_runner()
        if self.runner is None:
            why.append("hf-sde could not find vLLM's model runner (this vLLM version is not supported)")
        if why:
            raise RuntimeError(f"hf-sde SDE control cannot run here ({ENV} is set, so it was asked to): "
                               + "; ".join(why) + ".")
        self.prefix_caching = bool(vllm_config.cache_config.enable_prefix_caching)
        self._warned_salt = False
        traces.configure(vllm_config)

    # -- vLLM interface -----------------------------------------------------------------------------------
    def is_argmax_invariant(self) -> bool:
        # Dividing logits by a positive temperature never moves the argmax; steering acts on hidden states.
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not self.active or batch_update is None:
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
            self._add(index, request, len(prompt_ids), output_ids, base)
        for a, b, direction in batch_update.moved:
            sa, sb = self.slots.pop(a, None), self.slots.pop(b, None)
            if sa is not None:
                self.slots[b] = sa
            if direction == MoveDirectionality.SWAP and sb is not None:
                self.slots[a] = sb
        for index in [i for i in self.slots if i >= batch_update.batch_size]:
            del self.slots[index]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.hooks is None or self.hooks.owner() is not self:
            return logits
        work = self.hooks.work
        if not work or not work.tau:
            return logits
        rows = torch.tensor(list(work.tau), device=logits.device)
        tau = torch.stack([work.tau[i] for i in work.tau]).to(logits.device, logits.dtype).unsqueeze(-1)
        logits[rows] = logits[rows] / tau
        return logits

    # -- requests -----------------------------------------------------------------------------------------
    def _add(self, index: int, request: SDERequest, prompt_len: int, output_ids: list[int],
             base_temperature: float) -> None:
        req_id = self._request_id(index)
        trace = traces.get_or_start(req_id, request, prompt_len, output_ids, base_temperature)
        slot = _Slot(request, req_id, prompt_len, trace)
        self.slots[index] = slot
        hooks = self._hooks()
        hooks.ensure(request.control.heads.config.layer)
        if request.control.steers:
            hooks.ensure(self._steer_layer(slot))
            if self.prefix_caching and not self._warned_salt:
                self._warned_salt = True
                logger.warning("hf-sde: steering with prefix caching on. Steered positions' KV must not be "
                               "shared: give every steered request its own cache_salt (the hf-sde server "
                               "middleware and hf_sde.vllm.sde_prompt do).")

    def _request_id(self, index: int) -> str:
        ids = self.runner.input_batch.req_ids
        if index < len(ids) and ids[index] is not None:
            return ids[index]
        raise RuntimeError(f"hf-sde: vLLM's batch has no request at slot {index}")

    @staticmethod
    def _steer_layer(slot: _Slot) -> int:
        ctl = slot.control
        return ctl.steer_layer if ctl.steer_layer is not None else ctl.heads.config.layer

    def _hooks(self) -> _ModelHooks:
        if self.hooks is None:
            from ..layers import decoder_layers

            model = self.runner.get_model()
            hooks = getattr(model, "_hf_sde_hooks", None)
            if hooks is None:
                hooks = _ModelHooks(model, decoder_layers(model))
                model._hf_sde_hooks = hooks
            # The newest instance acts. vLLM builds a second instance when hf-sde is both installed as an entry
            # point and named in logits_processors; only one may divide the logits.
            hooks.processor = weakref.proxy(self)
            hooks.owner = weakref.ref(self)
            self.hooks = hooks
        return self.hooks

    # -- per forward --------------------------------------------------------------------------------------
    def plan(self, positions: torch.Tensor) -> _Work:
        """Which rows of this forward each SDE request reads and steers (called once, at the first hook)."""
        from vllm.forward_context import get_forward_context

        work = _Work()
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, list):
            raise RuntimeError("hf-sde does not support micro-batched forwards (dual batch overlap).")
        first = next((m for m in (metadata or {}).values() if hasattr(m, "query_start_loc")), None)
        if first is None:
            return work  # a dummy / profiling forward
        starts = first.query_start_loc.tolist()
        n_reqs = len(starts) - 1
        slots = [(i, s) for i, s in self.slots.items() if i < n_reqs and starts[i + 1] > starts[i]]
        if not slots:
            return work
        ends = torch.tensor([[starts[i], starts[i + 1] - 1] for i, _ in slots])
        edge = positions[ends.flatten().to(positions.device)].view(-1, 2).tolist()
        for (index, slot), (s, _e), (p_first, p_last) in zip(slots, ends.tolist(), edge, strict=True):
            p0 = slot.prompt_len - 1
            if p_last < p0:
                continue  # a prompt chunk that does not reach the last prompt position yet
            record = p_last - p0 == len(slot.trace)
            if slot.control.steers:
                lo = max(p_first, p0)
                rows = list(range(s + lo - p_first, s + p_last - p_first + 1))
                ks = list(range(lo - p0, p_last - p0 + 1))
            elif record:
                rows, ks = [s + p_last - p_first], [p_last - p0]
            else:
                continue
            work.read.setdefault(slot.control.heads.config.layer, []).append((slot, rows, ks, record))
            if record:
                slot.trace.pending_slot = index
        return work

    def on_block(self, layer: int, work: _Work, output):
        hidden = block_output(output)
        residual = output[1] if isinstance(output, tuple) and len(output) == 2 else None
        if residual is not None and not isinstance(residual, torch.Tensor):
            raise RuntimeError(f"hf-sde: decoder block {layer} returned {type(residual).__name__} as its second "
                               "output, not the residual tensor: this architecture is not supported.")

        def state(idx: torch.Tensor) -> torch.Tensor:
            """The block output (hidden + residual) of the rows ``idx`` only, in float32."""
            rows = hidden[idx] if residual is None else hidden[idx] + residual[idx]
            return rows.float()

        for slot, rows, ks, record in work.read.get(layer, ()):
            self._read(slot, rows, ks, record, state(torch.tensor(rows, device=hidden.device)), work)
        steer = work.steer.get(layer)
        if not steer:
            return None
        for slot, rows, unit, record in steer:
            idx = torch.tensor(rows, device=hidden.device)
            delta = SDEControl.steer_delta(unit, state(idx))
            hidden.index_add_(0, idx, delta.to(hidden.dtype))
            if record:
                slot.trace.set_steer_norm(torch.linalg.vector_norm(delta[-1]))
        return replace_block_output(output, hidden)

    def _read(self, slot: _Slot, rows: list[int], ks: list[int], record: bool, state: torch.Tensor,
              work: _Work) -> None:
        """Heads on ``state`` (the block output of ``rows``): record the step, set its temperature and direction."""
        ctl = slot.control
        heads = ctl.heads
        with torch.no_grad():
            z = heads.project(state)
            origin = getattr(heads.config, "time_origin", "sequence")
            k = torch.tensor(ks, device=state.device)
            t = heads.times(k if origin == "prompt_end" else k + (slot.prompt_len - 1))
            mean, std = heads(z, t)
            diffusion = heads.diffusion_magnitude(std)
            zscore = heads.zscore(diffusion)
            if record:
                tau = ctl.temperature_law(zscore[-1]) if ctl.controls_temperature else None
                slot.trace.record(z[-1], mean[-1], std[-1], diffusion[-1], zscore[-1],
                                  torch.linalg.vector_norm(mean[-1]) / heads.dt, tau,
                                  position=slot.prompt_len - 1 + ks[-1])
                if tau is not None:
                    work.tau[slot.trace.pending_slot] = tau
            if ctl.steers:
                step = ctl.steering_vector(mean, z, zscore, heads.lift)
                work.steer.setdefault(self._steer_layer(slot), []).append((slot, rows, step, record))
