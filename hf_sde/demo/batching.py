"""One worker thread per model that batches concurrent requests into shared ``generate`` calls.

Why a single worker: the SDE hooks are installed on the model object, so two generations on one model at once
would read each other's hidden states; and on a CPU a batch of 16 rows costs little more per step than one row,
so batching is what makes throughput grow with load. Rows whose hooks behave alike (plain rows and temperature
rows only observe; steering rows with equal direction and alpha) run in one call.

Why per-row sampling: each row draws its own Gumbel noise from a generator seeded with its request's seed, and
its temperature (fixed, or the row's SDE law applied to the z-score the hooks just computed) is applied here.
So a row's tokens do not depend on which requests shared its batch, and the plain and controlled runs of one
request use the same random draws, as the demo promises.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from ..control import SDEControl, SDEStep, SDETrace, sde_generate
from ..fitting.heads import SDEHeads

logger = logging.getLogger(__name__)


class Cancelled(Exception):
    """The row was cancelled before it ran."""


@dataclass
class RowRequest:
    """One continuation to sample; events go to ``events`` as ``(tag, kind, payload)``."""

    tag: str
    prompt_ids: list[int]
    seed: int
    max_new_tokens: int
    temperature: float
    control: SDEControl  # the row's SDE settings ("observe" for the plain row)
    events: queue.SimpleQueue
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def hook_key(self) -> tuple:
        """Rows with equal keys behave alike inside the model's hooks and can share a generate call."""
        ctl = self.control
        return ("steer", ctl.direction, float(ctl.alpha)) if ctl.steers else ("observe",)


@dataclass
class RowOutput:
    """A finished row: its new token ids, SDE trace ``(1, n)`` and projected path ``(prompt + n, d)``."""

    token_ids: list[int]
    trace: SDETrace
    path: torch.Tensor | None


class _Stop(StoppingCriteria):
    """Stops each row at its own length, at cancellation, or after its EOS."""

    def __init__(self, batch: _Batch):
        self.batch = batch

    def __call__(self, input_ids, scores, **kwargs):
        return self.batch.stop(input_ids)


class _Batch(LogitsProcessor):
    """Per-row sampling, per-row stopping and token streaming for one batched ``generate`` call."""

    def __init__(self, rows: list[RowRequest], width: int, eos: set[int]):
        self.rows, self.width, self.eos = rows, width, eos
        self.gens = [torch.Generator().manual_seed(r.seed) for r in rows]
        self.zscore: torch.Tensor | None = None
        self.last: SDEStep | None = None
        self.taus: list[list[float]] = [[] for _ in rows]
        self.active = [True] * len(rows)
        self.prompt_seen = False

    def on_step(self, step: SDEStep) -> None:  # SDEControl.callback: runs in the forward, before __call__
        self.last = step

    def _tau(self, i: int, row: RowRequest) -> float:
        if self.last is not None and row.control.controls_temperature:
            z = self.last.zscore[i: i + 1].float()
            if torch.isfinite(z).all():
                return float(row.control.temperature_law(z)[0])
        return row.temperature

    def __call__(self, input_ids, scores):
        out = torch.empty_like(scores, dtype=torch.float32)
        for i, row in enumerate(self.rows):
            tau = self._tau(i, row)
            self.taus[i].append(tau)
            u = torch.rand(scores.shape[-1], generator=self.gens[i]).clamp_(1e-20, 1.0)
            out[i] = scores[i].float() / tau - torch.log(-torch.log(u))  # Gumbel-max: a sample of softmax(s/tau)
        return out

    def stop(self, input_ids) -> torch.Tensor:
        n = input_ids.shape[1] - self.width
        return torch.tensor([r.cancelled.is_set() or n >= r.max_new_tokens or not a
                             for r, a in zip(self.rows, self.active, strict=True)], dtype=torch.bool, device=input_ids.device)

    # streamer protocol: the first put is the prompt, then one token per row per step
    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        step = self.last
        for i, (row, tok) in enumerate(zip(self.rows, value.reshape(-1).tolist(), strict=True)):
            if not self.active[i]:
                continue
            stats = {"temperature": self.taus[i][-1] if self.taus[i] else row.temperature}
            if step is not None:
                for name in ("diffusion", "zscore", "steer_norm"):
                    stats[name] = float(getattr(step, name)[i])
            row.events.put((row.tag, "token", (int(tok), stats)))
            if int(tok) in self.eos or row.cancelled.is_set():
                self.active[i] = False

    def end(self) -> None:
        pass


class BatchScheduler:
    """Collects rows from request threads and runs them, batched, on the one thread that owns the model.

    Args:
        max_batch: rows per ``generate`` call. window_s: how long to wait for companions once a row arrives.
    """

    def __init__(self, model, tokenizer, heads: SDEHeads, *, max_batch: int = 16, window_s: float = 0.02):
        self.model, self.tokenizer, self.heads = model, tokenizer, heads
        self.max_batch, self.window_s = max_batch, window_s
        self._pending: list[RowRequest] = []
        self._cond = threading.Condition()
        self._closed = False
        self.batches: list[int] = []  # sizes of the batches run (recent ones), for tests and benchmarks
        self._thread = threading.Thread(target=self._loop, name="hf-sde-demo-worker", daemon=True)
        self._thread.start()

    def submit(self, rows: list[RowRequest]) -> None:
        """Queue rows (their events arrive on each row's queue)."""
        with self._cond:
            if self._closed:
                raise RuntimeError("The demo's worker is closed.")
            self._pending.extend(rows)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for row in self._pending:
                row.events.put((row.tag, "error", Cancelled("The server is shutting down.")))
            self._pending.clear()
            self._cond.notify()

    def _next_batch(self) -> list[RowRequest] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
        time.sleep(self.window_s)  # let requests that arrive together share the batch
        with self._cond:
            live = [r for r in self._pending if not r.cancelled.is_set()]
            for r in self._pending:
                if r.cancelled.is_set():
                    r.events.put((r.tag, "error", Cancelled("cancelled")))
            key = live[0].hook_key if live else None
            batch = [r for r in live if r.hook_key == key][: self.max_batch]
            chosen = {id(r) for r in batch}
            self._pending = [r for r in live if id(r) not in chosen]
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            self.batches = (self.batches + [len(batch)])[-1000:]
            try:
                self._run(batch)
            except BaseException as e:  # noqa: BLE001 - handed to every waiting request, the worker carries on
                logger.warning("hf-sde demo: a batch of %d failed: %s: %s", len(batch), type(e).__name__, e)
                for row in batch:
                    row.events.put((row.tag, "error", e))

    def _eos(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        return {int(e) for e in eos if e is not None} | ({self.tokenizer.eos_token_id} - {None})

    def _run(self, rows: list[RowRequest]) -> None:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        width = max(len(r.prompt_ids) for r in rows)
        device = next(self.model.parameters()).device
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=device)
        eos = self._eos()
        state = _Batch(rows, width, eos)
        first = rows[0].control
        control = SDEControl(self.heads, mode="steer" if first.steers else "observe", alpha=first.alpha,
                             direction=first.direction, callback=state.on_step)

        # The callback runs in the forward hook, so the per-row sampler (a logits processor) sees this step's z.
        with torch.no_grad():
            out = sde_generate(self.model, input_ids=ids, attention_mask=mask, sde_control=control,
                               logits_processor=LogitsProcessorList([state]),
                               do_sample=False, max_new_tokens=max(r.max_new_tokens for r in rows), top_k=None,
                               top_p=None, temperature=None, pad_token_id=pad, streamer=state,
                               stopping_criteria=StoppingCriteriaList([_Stop(state)]), return_dict_in_generate=True)
        self._finish(rows, state, out, width, eos)

    def _finish(self, rows, state: _Batch, out, width: int, eos: set[int]) -> None:
        """Per-row token ids, traces (temperature: the one this module applied) and SDE paths."""
        from ..trajectories.extract import extract_from_ids

        news = []
        for i, row in enumerate(rows):
            new = out.sequences[i, width:].tolist()[: row.max_new_tokens]
            cut = next((k + 1 for k, t in enumerate(new) if t in eos), len(new))
            news.append(new[:cut])
        seqs = [r.prompt_ids + n for r, n in zip(rows, news, strict=True)]
        keep = [i for i, s in enumerate(seqs) if len(s) >= 2 and not rows[i].cancelled.is_set()]
        paths: dict[int, torch.Tensor] = {}
        if keep:
            traj = extract_from_ids(self.model, [seqs[i] for i in keep], layer=self.heads.config.layer,
                                    batch_size=len(keep), progress=False)
            with torch.no_grad():
                for i, states in zip(keep, traj.states, strict=True):
                    paths[i] = self.heads.project(states.to(self.heads.proj_basis.device)).cpu()
        for i, row in enumerate(rows):
            n = len(news[i])
            trace = out.sde_trace[i]
            trace = SDETrace(*(getattr(trace, f)[:, :n] for f in trace.__dataclass_fields__))
            taus = torch.tensor(state.taus[i][:n], dtype=trace.temperature.dtype).reshape(1, -1)
            if taus.shape == trace.temperature.shape:
                trace.temperature = taus.masked_fill(torch.isnan(trace.zscore), float("nan"))
            row.events.put((row.tag, "done", RowOutput(news[i], trace, paths.get(i))))
