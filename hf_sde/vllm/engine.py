"""The SDE work that hf-sde's V1 and V2 vLLM processors share: engine checks, per-request slots, block hooks.

Both processors (:mod:`hf_sde.vllm.processor` for vLLM's V1 model runner, :mod:`hf_sde.vllm.processor_v2` for
Model Runner V2) are thin adapters over :class:`SDEBatch`: they turn their runner's batch into a *layout* (per SDE
request in this forward: its slot, its first and last row in the flattened batch) and hand it to
:meth:`SDEBatch.plan_rows`; everything after that is common.

- Forward hooks on the decoder block(s) the requests read (the heads' layer) and steer. vLLM flattens the
  batch's tokens; the block's ``positions`` argument gives each row's position. A Llama block returns
  ``(hidden, residual)``; their sum is the block output transformers' hooks see.
- Per request and step: the state of the row that produces the next token (position ``prompt_len - 1 + k``)
  goes through the heads exactly as in :func:`hf_sde.sde_generate` — ``SDEHeads.project``, ``heads(z, t)`` with
  ``heads.times``, ``heads.diffusion_magnitude``, ``heads.zscore``, ``SDEControl.temperature_law`` and
  ``SDEControl.steering_vector`` / ``SDEControl.steer_delta`` — and is recorded. The adapter's ``apply`` divides
  that request's logits row by the temperature (:meth:`SDEBatch.temperatures`).
- Steering adds ``alpha * gate(z) * ||h|| * unit(v)`` to every computed position ``>= prompt_len - 1`` of the
  request: in a decode step that is the newest position only (the KV cache keeps the rest, steered once), and
  when vLLM recomputes a preempted request it steers the recomputed positions again, so its KV cache equals
  the one it lost.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch

from ..control import SDEControl
from ..layers import block_output, decoder_layers, replace_block_output
from . import traces
from .args import SDERequest
from .heads_registry import ENV, allowlist, resolve_heads

logger = logging.getLogger("hf_sde.vllm")

#: Architectures whose decoder blocks were checked to return ``(hidden, residual)`` with ``hidden + residual``
#: equal to transformers' block output (measured on SmolLM2 / Llama, tests_vllm/test_parity.py).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


def find_runner():
    """vLLM's model runner, which is building this processor (V1: its ``__init__``; V2: its ``load_model``).

    vLLM hands logits processors neither the runner nor the model; this one-time look-up at construction is
    the only place hf-sde walks the call stack.
    """
    frame = inspect.currentframe()
    while frame is not None:
        obj = frame.f_locals.get("self")
        if obj is not None and hasattr(obj, "get_model") and hasattr(obj, "execute_model"):
            return obj
        frame = frame.f_back
    return None


def refusals(vllm_config) -> list[str]:
    """Why SDE control cannot run in an engine configured by ``vllm_config`` (empty: it can)."""
    model_config = vllm_config.model_config
    why = []
    if getattr(vllm_config, "speculative_config", None) is not None:
        why.append("speculative decoding is on (the heads read one state per token; drafts would be read "
                   "and steered before they are accepted)")
    compile_mode = getattr(vllm_config.compilation_config, "mode", 0)
    if not model_config.enforce_eager or int(compile_mode or 0) != 0:
        why.append("the model is compiled (torch.compile / CUDA graphs never call module hooks, so the SDE "
                   "would silently read nothing): start vLLM with enforce_eager=True / --enforce-eager")
    par = vllm_config.parallel_config
    if par.tensor_parallel_size > 1 or par.pipeline_parallel_size > 1:
        why.append("tensor / pipeline parallelism is on (hf-sde reads whole hidden states in one worker)")
    if getattr(par, "decode_context_parallel_size", 1) > 1 or getattr(par, "prefill_context_parallel_size", 1) > 1:
        why.append("context parallelism is on (hf-sde reads whole hidden states in one worker)")
    if getattr(par, "enable_dbo", False):
        why.append("dual batch overlap is on (--enable-dbo splits each forward into micro-batches)")
    archs = list(getattr(model_config.hf_config, "architectures", None) or [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        why.append(f"architecture {archs} is not one whose decoder-block output hf-sde can read in vLLM "
                   f"(supported: {list(SUPPORTED_ARCHITECTURES)})")
    hf_config = model_config.hf_config
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    for name in allowlist():
        _, heads = resolve_heads(name)
        cfg = heads.config
        if cfg.hidden_size != text.hidden_size or cfg.num_layers != text.num_hidden_layers:
            why.append(f"heads {name!r} were fitted on a model with hidden size {cfg.hidden_size} and "
                       f"{cfg.num_layers} layers, this one has {text.hidden_size} and {text.num_hidden_layers}")
    return why


def refuse(why: list[str]) -> None:
    if why:
        raise RuntimeError(f"hf-sde SDE control cannot run here ({ENV} is set, so it was asked to): "
                           + "; ".join(why) + ".")


@dataclass(eq=False)
class Slot:
    """One SDE request in the batch: its settings, where its generated part starts, and its trace.

    ``trace`` is ``None`` until the request's vLLM id is known (V2 learns it from the first batch it is in).
    ``stop_ids`` / ``max_tokens`` (V2 only) say when a step belongs to a request that already finished, which
    vLLM's asynchronous scheduling can still compute once; V1 truncates traces by its output list instead.
    """

    request: SDERequest
    prompt_len: int
    base_temperature: float
    trace: traces.RequestTrace | None = None
    stop_ids: frozenset[int] = frozenset()
    min_tokens: int = 0
    max_tokens: int | None = None

    @property
    def control(self) -> SDEControl:
        return self.request.control

    @property
    def steer_layer(self) -> int:
        ctl = self.control
        return ctl.steer_layer if ctl.steer_layer is not None else ctl.heads.config.layer

    def ended_before(self, k: int, token: int | None) -> bool:
        """Whether step ``k`` (reading position ``prompt_len - 1 + k``, whose input is ``token``) is past the end."""
        if self.max_tokens is not None and k >= self.max_tokens:
            return True
        return token is not None and k >= 1 and k - 1 >= self.min_tokens and token in self.stop_ids


@dataclass
class Work:
    """What one forward computes: per layer, the rows to read / steer, and this step's temperatures."""

    read: dict[int, list[tuple[Slot, list[int], list[int], bool, int]]] = field(default_factory=dict)
    steer: dict[int, list[tuple[Slot, list[int], torch.Tensor, bool]]] = field(default_factory=dict)
    tau: dict[int, torch.Tensor] = field(default_factory=dict)  # slot index -> temperature of this step


class ModelHooks:
    """The hooks on one vLLM model; they serve whichever processor is current for it.

    ``batch`` is the V2 runner's ``InputBatch`` of the forward being run (``None`` under V1, and for V2's dummy
    / profiling forwards): :meth:`capture_batches` records it when the runner hands it to its model state's
    ``preprocess_state`` (called for real batches only, right before the forward), and the model's forward
    pre-hook makes it current.
    """

    def __init__(self, model: torch.nn.Module, layers: torch.nn.ModuleList):
        self.model, self.layers = model, layers
        self.processor = None
        self.owner: Callable[[], object] = lambda: None  # weakref to the processor that acts (the newest)
        self.hooked: set[int] = set()
        self.work: Work | None = None
        self.forward_id = 0
        self.batch = None
        self._pending_batch = None
        self._captured: weakref.WeakSet | None = None
        model.register_forward_pre_hook(self._reset)

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelHooks:
        hooks = getattr(model, "_hf_sde_hooks", None)
        if hooks is None:
            hooks = cls(model, decoder_layers(model))
            model._hf_sde_hooks = hooks
        return hooks

    def _reset(self, _module, _args):
        self.work = None
        self.forward_id += 1
        self.batch, self._pending_batch = self._pending_batch, None

    def capture_batches(self, model_state) -> None:
        """Record each ``InputBatch`` the V2 runner gives ``model_state.preprocess_state`` (once per model state)."""
        if self._captured is None:
            self._captured = weakref.WeakSet()
        if model_state in self._captured:
            return
        original = model_state.preprocess_state

        def preprocess_state(input_batch, *args, **kwargs):
            self._pending_batch = input_batch
            return original(input_batch, *args, **kwargs)

        model_state.preprocess_state = preprocess_state
        self._captured.add(model_state)

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


#: One SDE request's share of a forward: (slot index, slot, first row, last row) in the flattened batch.
Layout = list[tuple[int, Slot, int, int]]


class SDEBatch:
    """Per-request SDE state and the per-forward work, whatever runner feeds it (mixed into both adapters).

    Subclasses implement ``plan(positions) -> Work`` (their runner's layout, then :meth:`plan_rows`) and call
    :meth:`init_batch` from their ``__init__``.
    """

    slots: dict[int, Slot]
    hooks: ModelHooks | None

    def init_batch(self, get_model: Callable[[], torch.nn.Module], prefix_caching: bool) -> None:
        self.slots = {}
        self.hooks = None
        self._get_model = get_model
        self.prefix_caching = prefix_caching
        self._warned_salt = False
        traces.configure()

    # -- requests -----------------------------------------------------------------------------------------
    def add_slot(self, index: int, request: SDERequest, prompt_len: int, base_temperature: float, *,
                 req_id: str | None = None, output_ids: list[int] | None = None,
                 stop_ids: Collection[int] = (), min_tokens: int = 0, max_tokens: int | None = None) -> Slot:
        """Track the SDE request at ``index``; its trace starts now if ``req_id`` is known."""
        slot = Slot(request, prompt_len, base_temperature, stop_ids=frozenset(stop_ids), min_tokens=min_tokens,
                    max_tokens=max_tokens)
        if req_id is not None:
            self.start_trace(slot, req_id, output_ids)
        self.slots[index] = slot
        hooks = self.model_hooks()
        hooks.ensure(request.control.heads.config.layer)
        if request.control.steers:
            hooks.ensure(slot.steer_layer)
            if self.prefix_caching and not self._warned_salt:
                self._warned_salt = True
                logger.warning("hf-sde: steering with prefix caching on. Steered positions' KV must not be "
                               "shared: give every steered request its own cache_salt (the hf-sde server "
                               "middleware and hf_sde.vllm.sde_prompt do).")
        return slot

    @staticmethod
    def start_trace(slot: Slot, req_id: str, output_ids: list[int] | None = None) -> None:
        """The trace of vLLM request ``req_id`` (continued when vLLM recomputes it after preemption)."""
        slot.trace = traces.get_or_start(req_id, slot.request, slot.prompt_len, output_ids, slot.base_temperature)

    def model_hooks(self) -> ModelHooks:
        if self.hooks is None:
            hooks = ModelHooks.of(self._get_model())
            # The newest instance acts. vLLM builds a second instance when hf-sde is both installed as an entry
            # point and named in logits_processors; only one may divide the logits.
            hooks.processor = weakref.proxy(self)
            hooks.owner = weakref.ref(self)
            self.hooks = hooks
        return self.hooks

    def temperatures(self) -> dict[int, torch.Tensor]:
        """``{slot index: temperature}`` of the forward just run, if this instance is the one that acts."""
        if self.hooks is None or self.hooks.owner() is not self or not self.hooks.work:
            return {}
        return self.hooks.work.tau

    @staticmethod
    def divide(logits: torch.Tensor, rows: list[int], tau: list[torch.Tensor]) -> torch.Tensor:
        """Divide ``logits[rows]`` by ``tau`` (one temperature per row), in place."""
        if rows:
            index = torch.tensor(rows, device=logits.device)
            logits[index] = logits[index] / torch.stack(tau).to(logits.device, logits.dtype).unsqueeze(-1)
        return logits

    # -- per forward --------------------------------------------------------------------------------------
    def plan_rows(self, layout: Layout, positions: torch.Tensor, tokens: torch.Tensor | None = None) -> Work:
        """Which rows of this forward each SDE request reads and steers (called once, at the first hook).

        ``tokens`` (V2): the forward's input ids, to skip a step computed for a request that already stopped.
        """
        work = Work()
        layout = [entry for entry in layout if entry[1].trace is not None]
        if not layout:
            return work
        ends = torch.tensor([[s, e] for _, _, s, e in layout])
        edge = positions[ends.flatten().to(positions.device)].view(-1, 2).tolist()
        last_tokens = [None] * len(layout)
        if tokens is not None and any(slot.stop_ids or slot.max_tokens is not None for _, slot, _, _ in layout):
            last_tokens = tokens[ends[:, 1].to(tokens.device)].tolist()
        for (index, slot, s, _e), (p_first, p_last), token in zip(layout, edge, last_tokens, strict=True):
            p0 = slot.prompt_len - 1
            if p_last < p0:
                continue  # a prompt chunk that does not reach the last prompt position yet
            if slot.ended_before(p_last - p0, token):
                continue  # a step computed after the request stopped; vLLM drops its token
            record = p_last - p0 == len(slot.trace)
            if slot.control.steers:
                lo = max(p_first, p0)
                rows = list(range(s + lo - p_first, s + p_last - p_first + 1))
                ks = list(range(lo - p0, p_last - p0 + 1))
            elif record:
                rows, ks = [s + p_last - p_first], [p_last - p0]
            else:
                continue
            work.read.setdefault(slot.control.heads.config.layer, []).append((slot, rows, ks, record, index))
        return work

    def on_block(self, layer: int, work: Work, output):
        hidden = block_output(output)
        residual = output[1] if isinstance(output, tuple) and len(output) == 2 else None
        if residual is not None and not isinstance(residual, torch.Tensor):
            raise RuntimeError(f"hf-sde: decoder block {layer} returned {type(residual).__name__} as its second "
                               "output, not the residual tensor: this architecture is not supported.")

        def state(idx: torch.Tensor) -> torch.Tensor:
            """The block output (hidden + residual) of the rows ``idx`` only, in float32."""
            rows = hidden[idx] if residual is None else hidden[idx] + residual[idx]
            return rows.float()

        for slot, rows, ks, record, index in work.read.get(layer, ()):
            self._read(slot, rows, ks, record, index, state(torch.tensor(rows, device=hidden.device)), work)
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

    def _read(self, slot: Slot, rows: list[int], ks: list[int], record: bool, index: int, state: torch.Tensor,
              work: Work) -> None:
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
                    work.tau[index] = tau
            if ctl.steers:
                step = ctl.steering_vector(mean, z, zscore, heads.lift)
                work.steer.setdefault(slot.steer_layer, []).append((slot, rows, step, record))
