"""The SDE work that hf-sde's V1 and V2 vLLM processors share: engine checks, per-request slots, block hooks.

Both processors (:mod:`hf_sde.vllm.processor` for vLLM's V1 model runner, :mod:`hf_sde.vllm.processor_v2` for
Model Runner V2) are thin adapters over :class:`SDEBatch`: they turn their runner's batch into a *layout* (per SDE
request in this forward: its slot, its first and last row in the flattened batch) and hand it to
:meth:`SDEBatch.plan_rows`; everything after that is common.

- Forward hooks on the decoder block(s) the requests read (the heads' layer) and steer. vLLM flattens the
  batch's tokens; the block's ``positions`` argument gives each row's position. How a block's output carries
  the residual stream (the block output transformers' hooks see) is the one family-specific fact, kept in
  :data:`STREAMS` (architecture -> :class:`BlockStream`); any other architecture is refused at engine start.
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
from typing import Any

import torch

from ..control import SDEControl
from ..control.laws import temperature_law
from ..data.layers import block_output, decoder_layers
from . import traces
from .args import SDERequest
from .heads_registry import ENV, allowlist, resolve_heads

logger = logging.getLogger("hf_sde.vllm")


@dataclass(frozen=True)
class BlockStream:
    """How a vLLM decoder block's output carries the residual stream: transformers' block output for the same
    family, the state ``SDEHeads`` are fitted on and steering edits.

    ``read(output, rows)``: the stream at ``rows`` of the flattened batch (model dtype).
    ``add(output, rows, delta)``: add ``delta`` to the stream at ``rows`` so every later consumer (the next
    block, the final norm) sees it; returns the block output to pass on.
    """

    name: str
    read: Callable[[Any, torch.Tensor], torch.Tensor]
    add: Callable[[Any, torch.Tensor, torch.Tensor], Any]


def _pair(output) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(output, (tuple, list)) and len(output) == 2
            and all(isinstance(t, torch.Tensor) for t in output)):
        got = type(output).__name__ if not isinstance(output, (tuple, list)) else \
            f"({', '.join(type(t).__name__ for t in output)})"
        raise RuntimeError(f"hf-sde: a vLLM decoder block returned {got}, not (hidden, residual) tensors: this "
                           "model's blocks are not the ones hf-sde's table of architectures describes.")
    return output[0], output[1]


def _pair_read(output, rows: torch.Tensor) -> torch.Tensor:
    hidden, residual = _pair(output)
    return hidden[rows] + residual[rows]


def _pair_add(output, rows: torch.Tensor, delta: torch.Tensor):
    hidden, _ = _pair(output)
    hidden.index_add_(0, rows, delta.to(hidden.dtype))
    return output


#: vLLM's fused add-norm blocks: ``forward(positions, hidden, residual) -> (hidden, residual)``, where the
#: returned ``residual`` is the stream before the block's last branch and ``hidden`` that branch's output, added
#: by the next block's ``input_layernorm(hidden, residual)`` (or the final ``norm``). The stream is their sum;
#: steering adds to ``hidden``, and that fused add carries it into the stream every later block and the final
#: norm see (the first block, given no residual, takes its input embedding as the residual).
FUSED_ADD_NORM = BlockStream("(hidden, residual), stream = hidden + residual", _pair_read, _pair_add)

#: Architecture (``config.architectures``) -> how its vLLM decoder blocks carry the stream. Each was read in
#: vLLM's model file and measured against transformers' ``generate`` (tests_vllm/test_parity.py on SmolLM2,
#: tests_vllm/test_families.py on tiny random models of every family). The only place family knowledge lives.
STREAMS: dict[str, BlockStream] = {
    "LlamaForCausalLM": FUSED_ADD_NORM,    # llama.py LlamaDecoderLayer
    "MistralForCausalLM": FUSED_ADD_NORM,  # mistral.py MistralDecoderLayer (a LlamaDecoderLayer)
    "Qwen2ForCausalLM": FUSED_ADD_NORM,    # qwen2.py Qwen2DecoderLayer
    "Qwen3ForCausalLM": FUSED_ADD_NORM,    # qwen3.py Qwen3DecoderLayer (q / k norms stay inside attention)
    # gemma2.py Gemma2DecoderLayer: its post-attention / post-feedforward norms act on the branch before the add
    # (inside ``hidden``), and the sqrt(hidden_size) embedding scale is in embed_input_ids, so the first
    # block's residual is the scaled embedding, as in transformers.
    "Gemma2ForCausalLM": FUSED_ADD_NORM,
}

#: The architectures hf-sde can read and steer in vLLM (:data:`STREAMS`).
SUPPORTED_ARCHITECTURES = tuple(STREAMS)


def stream_of(hf_config) -> BlockStream | None:
    """The :class:`BlockStream` of the first of ``hf_config.architectures`` that :data:`STREAMS` covers."""
    archs = getattr(hf_config, "architectures", None) or []
    return next((STREAMS[a] for a in archs if a in STREAMS), None)


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
    if stream_of(model_config.hf_config) is None:
        why.append(f"architecture {archs} is not one whose decoder-block output hf-sde can read in vLLM "
                   f"(supported: {list(SUPPORTED_ARCHITECTURES)})")
    elif getattr(model_config, "model_impl", "auto") == "transformers":
        why.append("the model runs on vLLM's Transformers backend (model_impl='transformers'), whose blocks are "
                   "not the vLLM blocks hf-sde reads: serve it with model_impl='auto' / 'vllm'")
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
    units: dict[int, torch.Tensor] | None = None
    layers: tuple[int, ...] | None = None

    @property
    def control(self) -> SDEControl:
        return self.request.control

    @property
    def steer_layer(self) -> int:
        ctl = self.control
        return ctl.steer_layer if ctl.steer_layer is not None else ctl.heads.config.layer

    @property
    def steer_layers(self) -> tuple[int, ...]:
        """The layers this request steers, in forward order (several for a per-layer direction)."""
        if self.layers is None:  # a per-layer direction's keys are resolved and sorted by SDEControl
            ctl = self.control
            self.layers = tuple(ctl.direction) if ctl.per_layer else (self.steer_layer,)
        return self.layers

    def layer_units(self, device: torch.device) -> dict[int, torch.Tensor]:
        """A per-layer direction's unit vectors on ``device``, made once per request."""
        if self.units is None:
            self.units = self.control.unit_directions(device)
        return self.units

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

    def init_batch(self, get_model: Callable[[], torch.nn.Module], vllm_config) -> None:
        """Start empty; ``vllm_config`` passed :func:`refusals` (so its architecture has a :class:`BlockStream`)."""
        self.slots = {}
        self.hooks = None
        self._get_model = get_model
        self.prefix_caching = bool(vllm_config.cache_config.enable_prefix_caching)
        self.stream = stream_of(vllm_config.model_config.hf_config)
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
            for layer in slot.steer_layers:
                hooks.ensure(layer)
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
        """Read, then steer, the stream at block ``layer``'s output (through this architecture's :class:`BlockStream`).

        Batched over the requests: one heads call per heads object for the requests read at this layer, one
        steering add for the requests steered here, and one copy to the host of what the traces record (steering
        norms stay on the device until a trace is fetched). What remains per request is its steering vector
        (each request has its own direction and gate) and Python bookkeeping.
        """
        reads = work.read.get(layer)
        if reads:
            groups: dict[int, list] = {}
            for entry in reads:
                groups.setdefault(id(entry[0].control.heads), []).append(entry)
            for group in groups.values():
                self._read(group, output, work)
        steer = work.steer.get(layer)
        if not steer:
            return None
        device = block_output(output).device
        idx = torch.tensor([r for _, rows, _, _ in steer for r in rows], device=device)
        h = self.stream.read(output, idx).float()
        units = torch.cat([unit for _, _, unit, _ in steer]) if len(steer) > 1 else steer[0][2]
        delta = SDEControl.steer_delta(units, h)
        output = self.stream.add(output, idx, delta)
        ends, end = [], 0
        for _, rows, _, _ in steer:
            end += len(rows)
            ends.append(end - 1)
        recorded = [i for i, (_, _, _, record) in enumerate(steer) if record]
        if recorded:  # kept on the device (no sync mid-forward); a per-layer direction's norms are summed
            norms = torch.linalg.vector_norm(delta[[ends[i] for i in recorded]], dim=-1)
            for j, i in enumerate(recorded):
                slot = steer[i][0]
                slot.trace.add_steer_norm(norms[j], first=layer == slot.steer_layers[0])
        return output

    def _read(self, group: list, output, work: Work) -> None:
        """Heads on the block output of every request in ``group`` (requests with the same heads), in one call:
        record each request's step, set its temperature and its steering vectors."""
        heads = group[0][0].control.heads
        device = block_output(output).device
        origin = getattr(heads.config, "time_origin", "sequence")
        rows, times, ends = [], [], []
        for slot, slot_rows, ks, _record, _index in group:
            rows += slot_rows
            offset = 0 if origin == "prompt_end" else slot.prompt_len - 1
            times += [k + offset for k in ks]
            ends.append(len(rows))
        with torch.no_grad():
            state = self.stream.read(output, torch.tensor(rows, device=device)).float()
            z = heads.project(state)
            mean, std = heads(z, heads.times(torch.tensor(times, device=device)))
            diffusion = heads.diffusion_magnitude(std)
            zscore = heads.zscore(diffusion)
            recorded = [i for i, entry in enumerate(group) if entry[3]]
            if recorded:
                self._record([group[i] for i in recorded], [ends[i] - 1 for i in recorded], z, mean, std, diffusion,
                             zscore, heads, work)
            start = 0
            for (slot, slot_rows, _ks, record, _index), end in zip(group, ends, strict=True):
                ctl = slot.control
                if ctl.steers:
                    part = slice(start, end)
                    if ctl.per_layer:
                        gain = ctl.gain(zscore[part])  # (N, 1)
                        for layer, unit in slot.layer_units(device).items():
                            work.steer.setdefault(layer, []).append((slot, slot_rows, gain * unit, record))
                    else:
                        step = ctl.steering_vector(mean[part], z[part], zscore[part], heads.lift)
                        work.steer.setdefault(slot.steer_layer, []).append((slot, slot_rows, step, record))
                start = end

    @staticmethod
    def _record(entries: list, last: list[int], z, mean, std, diffusion, zscore, heads, work: Work) -> None:
        """Each recorded request's step (its newest row): statistics and temperature computed for all of them at
        once and moved to the host in one copy each."""
        device = z.device
        idx = torch.tensor(last, device=device)
        d_rec, z_rec, mean_rec = diffusion[idx], zscore[idx], mean[idx]
        temperature = torch.tensor([slot.base_temperature for slot, *_ in entries], device=device,
                                   dtype=d_rec.dtype)
        hot = [j for j, (slot, *_) in enumerate(entries) if slot.control.controls_temperature]
        if hot:
            law = [entries[j][0].control for j in hot]
            params = torch.tensor([[c.temperature, c.beta, c.min_temperature, c.max_temperature] for c in law],
                                  device=device, dtype=d_rec.dtype)
            zh = z_rec[hot] if len(hot) < len(entries) else z_rec
            tau = temperature_law(zh, *params.unbind(1))  # per request: tau0, beta, low, high
            temperature[hot] = tau
            for j, i in enumerate(hot):
                work.tau[entries[i][4]] = tau[j]
        stats = torch.stack([d_rec, z_rec, torch.linalg.vector_norm(mean_rec, dim=-1) / heads.dt, temperature,
                             torch.zeros_like(d_rec)], 1)
        d = z.shape[1]
        host = torch.cat([stats, z[idx], mean_rec, std[idx]], 1).cpu()  # one copy to the host
        for j, (slot, _rows, ks, _record, _index) in enumerate(entries):
            row = host[j].clone()  # its own storage: a kept trace must not hold the whole batch
            slot.trace.record(row[:5], row[5:5 + d], row[5 + d:], position=slot.prompt_len - 1 + ks[-1])
