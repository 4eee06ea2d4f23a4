"""Scale-out: sharded / streaming extraction and data-parallel fitting under ``accelerate launch``.

Three pieces, each usable alone:

* :func:`iter_documents` reads a corpus lazily (``.txt`` files chunk by chunk, ``.jsonl``/``.csv``/
  ``.parquet`` and hub datasets through ``datasets`` with ``streaming=True``, folders or globs of such files
  one file after the other), with the same documents in the same order as :func:`hf_sde.corpus.load_texts`.
* :func:`extract_to_shards` extracts trajectories with bounded memory: process ``r`` of ``N`` takes the
  documents ``r::N`` and writes them ``shard_size`` sequences at a time as ordinary
  :class:`~hf_sde.trajectories.Trajectories` safetensors files whose metadata records each sequence's
  global document index (so the shards of all ranks reassemble into the single-process corpus order).
* :func:`fit_heads_distributed` fits the heads on a folder of shards, data-parallel over the processes of
  ``torch.distributed`` (started by ``accelerate launch`` / ``torchrun``; one process works too):

  - ``mode="exact"`` reproduces :func:`hf_sde.fitting.fit_heads` on the same data and seed (equal in exact
    arithmetic, equal to float rounding in practice). Every statistic of the single-process fit is a sum
    over sequences or transitions, so each rank sums over the shards it owns and the sums are all-reduced:
    the PCA (mean and covariance, then an eigendecomposition), the horizon, both baselines (Brownian
    moments, OU normal equations and residual moments), the held-out / early-stopping NLL and the
    calibration. Training uses the single-process global batch order (the same seeded generator over
    *global* transition ids on every rank); each rank computes the gradient of its slice of each global
    batch as a *sum* of per-element losses, the flattened gradients are all-reduced (one call per step,
    with the slice sizes), divided by the global batch size, clipped and stepped identically everywhere.
    Memory per rank: its own *projected* transitions (``(2 d + 1)`` floats each, e.g. 33 floats for
    d = 16 instead of D for the hidden state) plus one int64 per global transition for the shared
    permutation. The hidden states themselves are only ever read one shard at a time.
  - ``mode="stream"`` never holds more than one shard: the training batches come from an
    :class:`ShardTransitions` ``IterableDataset`` (shards in a seeded per-epoch order, transitions shuffled
    within a shard, carried over between shards), every evaluation is a pass over the shards. Peak
    memory is flat in the corpus size. The gradient sync is the same weighted all-reduce, but the batch
    order (and the early-stopping slice, chosen per transition by a seeded hash of its document) differs
    from ``fit_heads``, so it matches the single-process fit statistically, not to rounding. The PCA,
    horizon, baselines and the held-out split are identical to ``mode="exact"``.

Differences from ``fit_heads`` worth knowing: the PCA uses *all* training states (``fit_heads``
subsamples 200 000 rows when there are more), and is computed from the covariance (``eigh``) rather than
an SVD of the data (same basis up to rounding; signs fixed by the same rule).

Command line: ``hf-sde fit-distributed`` (:mod:`hf_sde.commands.fit_distributed`), e.g.::

    accelerate launch --cpu --num_processes 2 -m hf_sde.commands fit-distributed \
        --data ../shared/data/helpsteer_sample_500.jsonl --template helpsteer-response --out heads/dist
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .fitting import (
    HALF_LOG_2PI,
    BrownianBaseline,
    FitResult,
    OUBaseline,
    init_at_ou,
    make_optimizer,
    split_sequences,
)
from .heads import SDEHeads, SDEHeadsConfig
from .shards import ShardedCorpus, clear_shards, extract_to_shards
from .shards import load_shards as load_shards  # re-exported for benchmarks/distributed_bench.py

logger = logging.getLogger(__name__)

# ----- process group ----------------------------------------------------------------------------------
class DistEnv:
    """Rank, world size and the few collectives the fit needs; a no-op stand-in in a single process."""

    def __init__(self) -> None:
        import torch.distributed as td

        self._td = td if td.is_available() and td.is_initialized() else None
        self.rank = self._td.get_rank() if self._td else 0
        self.world_size = self._td.get_world_size() if self._td else 1
        backend = str(self._td.get_backend()) if self._td else "none"
        # A pure NCCL group cannot reduce CPU tensors; accelerate's default "cuda:nccl,cpu:gloo" can.
        self._device = (torch.device("cuda", torch.cuda.current_device())
                        if backend == "nccl" and torch.cuda.is_available() else None)

    @classmethod
    def init(cls, cpu: bool | None = None) -> DistEnv:
        """Join the process group that ``accelerate launch`` / ``torchrun`` describe in the environment.

        Without those variables (a plain ``python`` run) this is a single process and nothing is started.
        """
        import torch.distributed as td

        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
            from accelerate import PartialState

            if cpu is None:
                cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes") or \
                    not torch.cuda.is_available()
            PartialState(cpu=cpu)
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (sum or max) of a CPU tensor; returns it."""
        if self._td is None or self.world_size == 1:
            return tensor
        red = self._td.ReduceOp.SUM if op == "sum" else self._td.ReduceOp.MAX
        if self._device is not None:
            moved = tensor.to(self._device)
            self._td.all_reduce(moved, op=red)
            tensor.copy_(moved.cpu())
        else:
            self._td.all_reduce(tensor, op=red)
        return tensor

    def barrier(self) -> None:
        if self._td is not None and self.world_size > 1:
            self._td.barrier()


# ----- per-rank transition data -------------------------------------------------------------------------
@dataclass
class _Chunk:
    z: torch.Tensor
    t: torch.Tensor
    dz: torch.Tensor

    def __len__(self) -> int:
        return self.z.shape[0]


def _transitions(z: torch.Tensor, horizon: float) -> _Chunk:
    n = z.shape[0] - 1
    return _Chunk(z[:-1], torch.arange(n, dtype=z.dtype) / horizon, z[1:] - z[:-1])


def _es_mask(doc_key: int, n: int, fraction: float, seed: int) -> torch.Tensor:
    """Seeded per-document Bernoulli choice of early-stopping transitions (stream mode)."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{doc_key}".encode(), digest_size=8).digest(), "little")
    g = torch.Generator().manual_seed(h & ((1 << 63) - 1))
    return torch.rand(n, generator=g) < fraction


class _Plan:
    """What every rank knows without communication: the global order, split, horizon and ownership."""

    def __init__(self, corpus: ShardedCorpus, env: DistEnv, heldout_fraction: float, seed: int,
                 horizon: float | None):
        self.corpus, self.env = corpus, env
        n = len(corpus)
        self.train_idx, self.val_idx = split_sequences(n, heldout_fraction, seed, corpus.groups)
        self.is_train = torch.zeros(n, dtype=torch.bool)
        self.is_train[self.train_idx] = True
        self.horizon = float(horizon) if horizon is not None else float(max(corpus.lengths[i] for i in self.train_idx))
        self.my_shards = [s for s in range(corpus.num_shards) if s % env.world_size == env.rank]
        # Global transition offset of each training sequence (make_transitions order: train_idx ascending).
        self.offset = torch.full((n,), -1, dtype=torch.long)
        total = 0
        for i in self.train_idx:
            self.offset[i] = total
            total += corpus.lengths[i] - 1
        self.num_train_transitions = total
        self.num_heldout_transitions = sum(corpus.lengths[i] - 1 for i in self.val_idx)

    def doc_key(self, g: int) -> int:
        s, p = self.corpus.location[g]
        docs = self.corpus.infos[s].doc_indices
        return docs[p] if docs is not None else g


class ShardTransitions(torch.utils.data.IterableDataset):
    """This rank's training transitions as a stream of shuffled batches, one shard in memory at a time.

    Each epoch visits the rank's shards in a seeded order, shuffles the transitions of each shard with a
    seeded generator, carries the remainder into the next shard and yields ``(z, t, dz)`` batches of
    ``batch_size`` rows (the last may be shorter).
    """

    def __init__(self, plan: _Plan, project, batch_size: int, es_fraction: float, seed: int):
        super().__init__()
        self.plan, self.project, self.batch_size = plan, project, batch_size
        self.es_fraction, self.seed, self.epoch = es_fraction, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[_Chunk]:
        plan = self.plan
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 1009 + plan.env.rank)
        shards = [plan.my_shards[i] for i in torch.randperm(len(plan.my_shards), generator=g).tolist()]
        carry: _Chunk | None = None
        for s in shards:
            parts = []
            for gpos, states in plan.corpus.sequences([s]):
                if not plan.is_train[gpos]:
                    continue
                c = _transitions(self.project(states), plan.horizon)
                if self.es_fraction > 0:
                    keep = ~_es_mask(plan.doc_key(gpos), len(c), self.es_fraction, self.seed + 1)
                    c = _Chunk(c.z[keep], c.t[keep], c.dz[keep])
                parts.append(c)
            if carry is not None:
                parts.insert(0, carry)
            if not parts:
                continue
            allc = _Chunk(*(torch.cat([getattr(p, k) for p in parts]) for k in ("z", "t", "dz")))
            perm = torch.randperm(len(allc), generator=g)
            allc = _Chunk(allc.z[perm], allc.t[perm], allc.dz[perm])
            full = len(allc) // self.batch_size * self.batch_size
            for a in range(0, full, self.batch_size):
                yield _Chunk(allc.z[a:a + self.batch_size], allc.t[a:a + self.batch_size], allc.dz[a:a + self.batch_size])
            carry = _Chunk(allc.z[full:], allc.t[full:], allc.dz[full:]) if full < len(allc) else None
        if carry is not None:
            yield carry


class _StreamData:
    """Transitions of this rank's shards, re-read and projected on every pass (flat memory)."""

    def __init__(self, plan: _Plan, project, batch_size: int, es_fraction: float, seed: int):
        self.plan, self.project, self.es_fraction, self.seed = plan, project, es_fraction, seed
        self.dataset = ShardTransitions(plan, project, max(1, batch_size // plan.env.world_size), es_fraction, seed)

    def chunks(self, kind: str) -> Iterator[_Chunk]:
        plan = self.plan
        for gpos, states in plan.corpus.sequences(plan.my_shards):
            if (kind == "heldout") == bool(plan.is_train[gpos]):
                continue
            c = _transitions(self.project(states), plan.horizon)
            if kind == "es":
                if self.es_fraction <= 0:
                    continue
                m = _es_mask(plan.doc_key(gpos), len(c), self.es_fraction, self.seed + 1)
                c = _Chunk(c.z[m], c.t[m], c.dz[m])
            if len(c):
                yield c

    def batches(self, epoch: int) -> Iterator[_Chunk | None]:
        self.dataset.set_epoch(epoch)
        yield from self.dataset


class _ExactData:
    """This rank's projected training transitions in memory, batched in the single-process global order."""

    def __init__(self, plan: _Plan, project, batch_size: int, es_fraction: float, seed: int):
        self.plan, self.project, self.batch_size = plan, project, batch_size
        N = plan.num_train_transitions
        zs, ts, dzs, gids = [], [], [], []
        for gpos, states in plan.corpus.sequences(plan.my_shards):
            if not plan.is_train[gpos]:
                continue
            c = _transitions(project(states), plan.horizon)
            zs.append(c.z)
            ts.append(c.t)
            dzs.append(c.dz)
            gids.append(plan.offset[gpos] + torch.arange(len(c)))
        d = project(torch.zeros(1, plan.corpus.hidden_size)).shape[1]
        self.z = torch.cat(zs) if zs else torch.zeros(0, d)
        self.t = torch.cat(ts) if ts else torch.zeros(0)
        self.dz = torch.cat(dzs) if dzs else torch.zeros(0, d)
        gid = torch.cat(gids) if gids else torch.zeros(0, dtype=torch.long)
        self.local_of = torch.full((N,), -1, dtype=torch.long)
        self.local_of[gid] = torch.arange(len(gid))
        # The same generator, consumed in the same order, as fit_heads.
        self.g = torch.Generator().manual_seed(seed + 1)
        perm = torch.randperm(N, generator=self.g)
        n_es = int(N * es_fraction) if N >= 20 else 0
        self.es_ids, self.train_ids = perm[:n_es], perm[n_es:]
        es_local = self.local_of[self.es_ids]
        self.es_rows = es_local[es_local >= 0]

    def _rows(self, rows: torch.Tensor) -> _Chunk:
        return _Chunk(self.z[rows], self.t[rows], self.dz[rows])

    def chunks(self, kind: str, size: int = 65536) -> Iterator[_Chunk]:
        if kind == "heldout":
            plan = self.plan
            for gpos, states in plan.corpus.sequences(plan.my_shards):
                if not plan.is_train[gpos]:
                    yield _transitions(self.project(states), plan.horizon)
            return
        rows = self.es_rows if kind == "es" else torch.arange(len(self.z))
        for a in range(0, len(rows), size):
            yield self._rows(rows[a:a + size])

    def batches(self, epoch: int) -> Iterator[_Chunk | None]:
        order = torch.randperm(len(self.train_ids), generator=self.g)
        for a in range(0, len(order), self.batch_size):
            loc = self.local_of[self.train_ids[order[a:a + self.batch_size]]]
            yield self._rows(loc[loc >= 0])


# ----- sufficient statistics ----------------------------------------------------------------------------
def _projection(plan: _Plan, proj_dim: int | None, standardize: bool):
    """PCA of all training states from all-reduced first and second moments (two passes over the shards)."""
    env, D = plan.env, plan.corpus.hidden_size
    d = D if proj_dim is None or proj_dim <= 0 else proj_dim
    if d > D:
        raise ValueError(f"proj_dim={d} exceeds the hidden size {D}; use proj_dim <= {D} (or 0 for no projection).")
    first = torch.zeros(D + 1, dtype=torch.float64)
    for g, x in plan.corpus.sequences(plan.my_shards):
        if plan.is_train[g]:
            first[:D] += x.double().sum(0)
            first[D] += x.shape[0]
    env.all_reduce_(first)
    n = float(first[D])
    mean = first[:D] / n
    scatter = torch.zeros(D, D, dtype=torch.float64)
    for g, x in plan.corpus.sequences(plan.my_shards):
        if plan.is_train[g]:
            xc = x.double() - mean
            scatter += xc.T @ xc
    env.all_reduce_(scatter)
    cov = scatter / max(n - 1, 1.0)
    if d == D:
        basis = torch.eye(D, dtype=torch.float64)
    else:
        evals, evecs = torch.linalg.eigh(cov)
        basis = evecs[:, torch.argsort(evals, descending=True)[:d]]
        signs = torch.sign(basis[basis.abs().argmax(0), torch.arange(d)])
        basis = basis * signs
    scale = (torch.einsum("ij,jk,ki->i", basis.T, cov, basis).clamp_min(0).sqrt().clamp_min(1e-8)
             if standardize else torch.ones(d, dtype=torch.float64))
    return basis.float(), mean.float(), scale.float()


def _baselines(data, env: DistEnv, d: int, ridge: float = 1e-6) -> tuple[BrownianBaseline, OUBaseline]:
    """Brownian and OU baselines on the training transitions, as ``BrownianBaseline.fit`` / ``OUBaseline.fit``."""
    acc = torch.zeros(1 + d + (d + 1) * (d + 1) + (d + 1) * d, dtype=torch.float64)
    for c in data.chunks("train"):
        x = torch.cat([c.z, torch.ones(len(c), 1, dtype=c.z.dtype)], dim=1).double()
        dz = c.dz.double()
        acc += torch.cat([torch.tensor([float(len(c))], dtype=torch.float64), dz.sum(0), (x.T @ x).flatten(),
                          (x.T @ dz).flatten()])
    env.all_reduce_(acc)
    n = float(acc[0])
    bm_mean = acc[1:1 + d] / n
    o = 1 + d
    gram = acc[o:o + (d + 1) ** 2].view(d + 1, d + 1) + ridge * n * torch.eye(d + 1, dtype=torch.float64)
    rhs = acc[o + (d + 1) ** 2:].view(d + 1, d)
    w = torch.linalg.solve(gram, rhs).float()
    second = torch.zeros(2 * d, dtype=torch.float64)
    for c in data.chunks("train"):
        resid = c.dz - torch.cat([c.z, torch.ones(len(c), 1, dtype=c.z.dtype)], dim=1) @ w
        second += torch.cat([(c.dz.double() - bm_mean).pow(2).sum(0), resid.double().sum(0)])
    env.all_reduce_(second)
    bm_std = (second[:d] / n).sqrt()
    r_mean = second[d:] / n
    third = torch.zeros(d, dtype=torch.float64)
    for c in data.chunks("train"):
        resid = c.dz - torch.cat([c.z, torch.ones(len(c), 1, dtype=c.z.dtype)], dim=1) @ w
        third += (resid.double() - r_mean).pow(2).sum(0)
    env.all_reduce_(third)
    return (BrownianBaseline(bm_mean.float(), bm_std.float().clamp_min(1e-6)),
            OUBaseline(w, (third / n).sqrt().float().clamp_min(1e-6)))


def _evaluate(fn, data, kind: str, env: DistEnv) -> dict[str, float]:
    """Per-dimension NLL parts over all ranks' ``kind`` transitions (as ``fitting._evaluate``)."""
    acc = torch.zeros(5, dtype=torch.float64)
    with torch.no_grad():
        for c in data.chunks(kind):
            mean, std = fn(c.z, c.t)
            drift = 0.5 * ((c.dz - mean) / std).pow(2)
            diff = std.log()
            acc += torch.tensor([float(drift.double().sum()), float(diff.double().sum()),
                                 float((c.dz - mean).pow(2).double().sum()), float(c.dz.numel()), float(len(c))],
                                dtype=torch.float64)
    env.all_reduce_(acc)
    m = max(float(acc[3]), 1.0)
    drift, diffusion = float(acc[0]) / m, float(acc[1]) / m + HALF_LOG_2PI
    return {"total": drift + diffusion, "drift": drift, "diffusion": diffusion, "drift_mse": float(acc[2]) / m,
            "_count": float(acc[4])}


def _sync_step(heads: SDEHeads, params: list[torch.nn.Parameter], opt, batch: _Chunk | None,
               env: DistEnv) -> tuple[float, float, float] | None:
    """One data-parallel step; ``None`` once every rank is out of batches.

    Each rank backpropagates the *sum* of its per-element losses (divided by d), the flat gradients and
    slice sizes are all-reduced in one call, and the sum is divided by the global batch size: the update of
    the mean loss over the union of the slices.
    """
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            p.grad.zero_()
    stats = torch.zeros(3, dtype=torch.float64)
    if batch is not None and len(batch):
        d = batch.dz.shape[1]
        mean, std = heads(batch.z, batch.t)
        drift = 0.5 * ((batch.dz - mean) / std).pow(2).sum() / d
        diff = std.log().sum() / d
        (drift + diff).backward()
        stats = torch.tensor([float(len(batch)), float(drift.detach()), float(diff.detach())], dtype=torch.float64)
    flat = torch.cat([p.grad.flatten() for p in params])
    bundle = torch.cat([flat.double(), stats])
    env.all_reduce_(bundle)
    count = float(bundle[-3])
    if count == 0:
        return None
    flat = (bundle[:-3] / count).to(flat.dtype)
    off = 0
    for p in params:
        p.grad.copy_(flat[off:off + p.numel()].view_as(p))
        off += p.numel()
    torch.nn.utils.clip_grad_norm_(params, 10.0)
    opt.step()
    return count, float(bundle[-2]), float(bundle[-1])


def fit_heads_distributed(
    shards: str | Sequence[str] | ShardedCorpus,
    *,
    mode: str = "exact",
    proj_dim: int | None = 16,
    standardize: bool = True,
    horizon: float | None = None,
    width: int = 128,
    depth: int = 2,
    time_frequencies: int = 4,
    epochs: int = 60,
    batch_size: int = 512,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    patience: int = 10,
    heldout_fraction: float = 0.2,
    early_stopping_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    base_model: str | None = None,
    base_model_revision: str | None = None,
    gguf_file: str | None = None,
    model_type: str | None = None,
    data_description: dict | None = None,
    env: DistEnv | None = None,
) -> FitResult:
    """:func:`hf_sde.fitting.fit_heads` on trajectory shards, data-parallel over the current process group.

    Call it on every rank (the result is the same on all; save it on rank 0). ``mode="exact"`` equals
    ``fit_heads(load_shards(shards), ...)`` up to float rounding; ``mode="stream"`` keeps one shard in
    memory (see the module docstring for both). ``batch_size`` is the *global* batch size.

    Example (under ``accelerate launch --num_processes N``):
        >>> env = DistEnv.init()
        >>> result = fit_heads_distributed("shards/", proj_dim=16, epochs=60)
        >>> if env.is_main: result.heads.save_pretrained("heads/")
    """
    if mode not in ("exact", "stream"):
        raise ValueError(f"mode must be 'exact' or 'stream', got {mode!r}")
    env = env or DistEnv()
    corpus = shards if isinstance(shards, ShardedCorpus) else ShardedCorpus(shards)
    if len(corpus) == 0:
        raise ValueError("fit_heads_distributed got no trajectories: the shards are empty.")
    torch.manual_seed(seed)
    plan = _Plan(corpus, env, heldout_fraction, seed, horizon)
    basis, mean, scale = _projection(plan, proj_dim, standardize)
    d = basis.shape[1]
    T = plan.horizon

    def project(s: torch.Tensor) -> torch.Tensor:
        return ((s.float() - mean) @ basis) / scale

    es_fraction = early_stopping_fraction if plan.num_train_transitions >= 20 else 0.0
    data = (_ExactData if mode == "exact" else _StreamData)(plan, project, batch_size, es_fraction, seed)
    brownian, ou = _baselines(data, env, d)

    config = SDEHeadsConfig(
        hidden_size=corpus.hidden_size, proj_dim=d, layer=corpus.layer, num_layers=corpus.num_layers or -1,
        horizon=T, base_model=base_model or corpus.model_id,
        base_model_revision=base_model_revision or corpus.source.get("revision"),
        gguf_file=gguf_file or corpus.source.get("gguf_file"), model_type=model_type, width=width, depth=depth, time_frequencies=time_frequencies,
        standardize=standardize, data=dict(data_description or {}),
    )
    torch.manual_seed(seed)  # the same initial weights on every rank, and as fit_heads draws them
    heads = SDEHeads(config)
    heads.proj_basis.copy_(basis)
    heads.proj_mean.copy_(mean)
    heads.proj_scale.copy_(scale)
    init_at_ou(heads, ou)
    opt = make_optimizer(heads, lr, weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=lr * 0.05)
    params = list(heads.parameters())
    history: dict[str, list[float]] = {f"{s}_{p}": [] for s in ("train", "val") for p in ("total", "drift", "diffusion")}
    history["early_stopping"] = []
    es0 = _evaluate(heads, data, "es", env) if es_fraction > 0 else None
    initial = es0["total"] if es0 is not None and es0["_count"] > 0 else math.inf
    best = (initial, -1, copy.deepcopy(heads.state_dict()))  # epoch -1: the OU starting point
    bad = 0
    bar = tqdm(range(epochs), desc=f"Fitting SDE heads ({env.world_size} proc, {mode})",
               disable=not progress or not env.is_main, unit="epoch")
    for epoch in bar:
        heads.train()
        sums = torch.zeros(3, dtype=torch.float64)
        it = data.batches(epoch)
        while True:
            out = _sync_step(heads, params, opt, next(it, None), env)
            if out is None:
                break
            sums += torch.tensor(out, dtype=torch.float64)
        sched.step()
        heads.eval()
        n_seen = max(float(sums[0]), 1.0)
        history["train_drift"].append(float(sums[1]) / n_seen)
        history["train_diffusion"].append(float(sums[2]) / n_seen + HALF_LOG_2PI)
        history["train_total"].append(history["train_drift"][-1] + history["train_diffusion"][-1])
        val = _evaluate(heads, data, "heldout", env)
        for k in ("total", "drift", "diffusion"):
            history[f"val_{k}"].append(val[k])
        es = _evaluate(heads, data, "es", env) if es_fraction > 0 else None
        monitor = es["total"] if es is not None and es["_count"] > 0 else history["train_total"][-1]
        history["early_stopping"].append(monitor)
        bar.set_postfix(train=f"{history['train_total'][-1]:.3f}", val=f"{val['total']:.3f}")
        if monitor < best[0] - 1e-4:
            best, bad = (monitor, epoch, copy.deepcopy(heads.state_dict())), 0
        else:
            bad += 1
            if bad >= patience:
                break
    bar.close()
    heads.load_state_dict(best[2])
    heads.eval()

    # Calibration over all training transitions: means, then unbiased standard deviations.
    def calib(center: torch.Tensor | None) -> torch.Tensor:
        acc = torch.zeros(3, dtype=torch.float64)
        with torch.no_grad():
            for c in data.chunks("train"):
                mean_inc, std_inc = heads(c.z, c.t)
                v = torch.stack([heads.diffusion_magnitude(std_inc).log(),
                                 heads.transition_nll(c.dz, mean_inc, std_inc).mean(-1)]).double()
                if center is None:
                    acc += torch.cat([v.sum(1), torch.tensor([float(len(c))], dtype=torch.float64)])
                else:
                    acc[:2] += (v - center[:, None]).pow(2).sum(1)
        return env.all_reduce_(acc)

    first = calib(None)
    n_train = float(first[2])
    centers = first[:2] / n_train
    ssd = calib(centers)[:2]
    stds = (ssd / max(n_train - 1, 1.0)).sqrt()
    config.log_diffusion_mean = float(centers[0])
    config.log_diffusion_std = max(float(stds[0]), 1e-6)
    config.nll_mean = float(centers[1])
    config.nll_std = max(float(stds[1]), 1e-6)

    parts = {"neural": _evaluate(heads, data, "heldout", env), "ou": _evaluate(ou.predict, data, "heldout", env),
             "brownian": _evaluate(brownian.predict, data, "heldout", env)}
    for v in parts.values():
        v.pop("_count")
    heldout_nll = {k: v["total"] for k, v in parts.items()}
    config.heldout_nll = dict(heldout_nll)
    config.data = {**config.data, "train_sequences": len(plan.train_idx), "heldout_sequences": len(plan.val_idx),
                   "train_transitions": plan.num_train_transitions,
                   "heldout_transitions": plan.num_heldout_transitions,
                   "fit": {"processes": env.world_size, "mode": mode, "shards": corpus.num_shards}}
    return FitResult(heads, history, heldout_nll, parts, plan.train_idx, plan.val_idx,
                     {"ou": ou, "brownian": brownian}, best[1], seed, heldout_fraction)
