"""Sharded extraction with bounded memory, and the folder of shards read back as one corpus.

Process ``r`` of ``N`` takes the documents ``r::N`` of :func:`hf_sde.corpus.iter_documents` and writes them
``shard_size`` sequences at a time as ordinary :class:`~hf_sde.trajectories.Trajectories` files (the one
trajectory file format) whose ``meta`` records each sequence's global document index, so the shards of all
ranks reassemble into the single-process corpus order. A JSON manifest per rank sums its shards up.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data.corpus import CHAT_TEMPLATES, iter_documents
from .extract import (
    DEFAULT_MAX_LENGTH,
    Trajectories,
    check_chat_template,
    extract_from_ids,
    read_trajectory_header,
    tokenize_documents,
)

logger = logging.getLogger(__name__)

SHARD_PREFIX = "traj"


def shard_name(rank: int, world_size: int, index: int, prefix: str = SHARD_PREFIX) -> str:
    return f"{prefix}-rank{rank:05d}-of-{world_size:05d}-{index:05d}.safetensors"


def _process_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of the current ``torch.distributed`` group; ``(0, 1)`` without one."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return td.get_rank(), td.get_world_size()
    return 0, 1


class _ShardWriter:
    """Collects one rank's documents and writes a shard every ``shard_size`` of them."""

    def __init__(self, model, tokenizer, out_dir: str, layer: int, rank: int, world_size: int, prefix: str,
                 extract: dict, meta: dict):
        self.model, self.tokenizer, self.out_dir, self.layer = model, tokenizer, out_dir, layer
        self.rank, self.world_size, self.prefix, self.extract, self.meta = rank, world_size, prefix, extract, meta
        self.paths: list[str] = []
        self.docs: list = []
        self.doc_indices: list[int] = []
        self.groups: list = []
        self.seen = self.skipped = self.sequences = self.transitions = 0

    def add(self, doc_index: int, doc, group) -> None:
        self.docs.append(doc)
        self.doc_indices.append(doc_index)
        self.groups.append(group)
        self.seen += 1

    def flush(self) -> None:
        if not self.docs:
            return
        ids, starts = tokenize_documents(self.tokenizer, self.docs, self.extract["max_length"],
                                         self.extract["max_context"], template=self.meta["template"])
        first = starts or [0] * len(ids)
        usable = [i for i, x in enumerate(ids) if len(x) - first[i] >= 2]
        self.skipped += len(ids) - len(usable)
        if usable:
            traj = extract_from_ids(self.model, [ids[i] for i in usable], self.layer, progress=False,
                                    batch_size=self.extract["batch_size"],
                                    starts=[starts[i] for i in usable] if starts is not None else None)
            kept = {k: traj.meta[k] for k in ("path_start", "time_origin") if k in traj.meta}
            traj.meta = {"source": traj.meta.get("source", {}), **kept,
                         "doc_indices": [self.doc_indices[i] for i in usable],
                         "groups": [self.groups[i] for i in usable], "rank": self.rank,
                         "world_size": self.world_size, "shard": len(self.paths), **self.meta}
            path = os.path.join(self.out_dir, shard_name(self.rank, self.world_size, len(self.paths), self.prefix))
            traj.save(path + ".tmp")
            os.replace(path + ".tmp", path)
            self.paths.append(path)
            self.sequences += len(traj)
            self.transitions += traj.num_transitions
        self.docs.clear()
        self.doc_indices.clear()
        self.groups.clear()

    def write_manifest(self) -> None:
        manifest = {"rank": self.rank, "world_size": self.world_size, "documents": self.seen,
                    "skipped": self.skipped, "sequences": self.sequences, "transitions": self.transitions,
                    "shards": [os.path.basename(p) for p in self.paths]}
        name = f"{self.prefix}-rank{self.rank:05d}-of-{self.world_size:05d}.json"
        with open(os.path.join(self.out_dir, name), "w") as f:
            json.dump(manifest, f, indent=1)


def extract_to_shards(
    model,
    tokenizer,
    data: str | Iterable,
    out_dir: str,
    layer: int = -1,
    *,
    shard_size: int = 256,
    rank: int | None = None, world_size: int | None = None,  # this process's share of the documents
    prefix: str = SHARD_PREFIX,
    template: str | None = None, text_column: str | None = None, limit: int | None = None,  # as iter_documents
    max_length: int | None = DEFAULT_MAX_LENGTH,
    max_context: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[str]:
    """Extract trajectories of the documents ``rank::world_size`` into safetensors shards; return their paths.

    Memory is bounded by one shard (``shard_size`` documents and their hidden paths), whatever the corpus
    size. ``rank`` / ``world_size`` default to the current ``torch.distributed`` process group. Each shard is
    a :class:`~hf_sde.trajectories.Trajectories` file (float32 states, whatever the model dtype) whose
    ``meta`` holds ``doc_indices`` (global index of each kept document) and ``groups`` (and ``path_start`` /
    ``time_origin`` for chat templates, as :func:`~hf_sde.trajectories.extract_trajectories`); documents
    shorter than two tokens are skipped and counted. A ``{prefix}-rank....json`` manifest per rank sums it up.

    Example (each of N processes, e.g. under ``accelerate launch``):
        >>> paths = extract_to_shards(model, tok, "corpus.jsonl", "shards/", template="helpsteer-response")
    """
    if rank is None or world_size is None:
        rank, world_size = _process_rank()
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    if template in CHAT_TEMPLATES:
        check_chat_template(tokenizer, template, model)
    if max_context is None:
        max_context = getattr(model.config, "max_position_embeddings", None)
    meta = {"data": data if isinstance(data, str) else "<iterable>", "template": template, "max_length": max_length}
    writer = _ShardWriter(model, tokenizer, out_dir, layer, rank, world_size, prefix,
                          {"max_length": max_length, "max_context": max_context, "batch_size": batch_size}, meta)
    bar = tqdm(desc=f"Extracting (rank {rank}/{world_size})", unit="doc", disable=not progress or rank != 0)
    docs = iter_documents(data, template=template, text_column=text_column, limit=limit)
    for doc_index, (doc, group) in enumerate(docs):
        if doc_index % world_size != rank:
            continue
        writer.add(doc_index, doc, group)
        bar.update(1)
        if len(writer.docs) >= shard_size:
            writer.flush()
    writer.flush()
    bar.close()
    if writer.skipped:
        logger.warning("Rank %d skipped %d of %d documents shorter than 2 tokens.", rank, writer.skipped, writer.seen)
    writer.write_manifest()
    return writer.paths


def clear_shards(out_dir: str, prefix: str = SHARD_PREFIX) -> None:
    """Remove earlier shards and manifests (call on one rank, then barrier, before a new extraction)."""
    for p in glob.glob(os.path.join(out_dir, f"{prefix}-rank*")):
        os.remove(p)


# ----- reading shards lazily ----------------------------------------------------------------------------
@dataclass
class ShardInfo:
    path: str
    lengths: list[int]
    doc_indices: list[int] | None
    groups: list | None
    header: dict


def read_shard_info(path: str) -> ShardInfo:
    """A shard's lengths and metadata without reading its states."""
    header, lengths = read_trajectory_header(path)
    meta = header.get("meta") or {}
    return ShardInfo(path, lengths, meta.get("doc_indices"), meta.get("groups"), header)


def _shard_paths(shards: str | Sequence[str], prefix: str | None) -> list[str]:
    if not isinstance(shards, str):
        return list(shards)
    if os.path.isdir(shards):
        return sorted(glob.glob(os.path.join(shards, f"{prefix}-*.safetensors" if prefix else "*.safetensors")))
    return sorted(glob.glob(shards)) or [shards]


class ShardedCorpus:
    """The trajectories in a folder (or list) of shard files, indexed without loading any states.

    Sequences are ordered globally by ``doc_indices`` when every shard has them (the single-process
    corpus order of :func:`extract_to_shards` output), else by file name and position.
    """

    def __init__(self, shards: str | Sequence[str], prefix: str | None = None):
        paths = _shard_paths(shards, prefix)
        if not paths:
            raise ValueError(f"No trajectory shards (*.safetensors) in {shards!r}.")
        self.infos = [read_shard_info(p) for p in paths]
        first = self.infos[0].header
        for info in self.infos[1:]:
            for key in ("layer", "hidden_size"):
                if info.header.get(key) != first.get(key):
                    raise ValueError(f"Shards disagree on {key}: {info.path} has {info.header.get(key)}, "
                                     f"{self.infos[0].path} has {first.get(key)}.")
        self.layer, self.hidden_size = first["layer"], first["hidden_size"]
        self.num_layers, self.model_id = first.get("num_layers"), first.get("model_id")
        self.source = (first.get("meta") or {}).get("source") or {}  # where load_model got the weights
        self.time_origin = (first.get("meta") or {}).get("time_origin")
        self.skipped = sum(int(i.header.get("skipped", 0)) for i in self.infos)
        self.location = self._global_order()  # global position -> (shard, position in shard)
        self.global_pos = [[0] * len(i.lengths) for i in self.infos]
        for g, (s, p) in enumerate(self.location):
            self.global_pos[s][p] = g
        self.lengths = [self.infos[s].lengths[p] for s, p in self.location]
        groups = [self.infos[s].groups[p] if self.infos[s].groups is not None else None for s, p in self.location]
        self.groups = groups if any(g is not None for g in groups) else None

    def _global_order(self) -> list[tuple[int, int]]:
        with_docs = all(i.doc_indices is not None for i in self.infos)
        entries = sorted(((info.doc_indices[p],) if with_docs else (s, p), s, p)
                         for s, info in enumerate(self.infos) for p in range(len(info.lengths)))
        if with_docs:
            keys = [e[0] for e in entries]
            dup = next((k for a, k in zip(keys, keys[1:], strict=False) if a == k), None)
            if dup is not None:
                raise ValueError(f"Document {dup[0]} appears in two shards: the folder mixes shards of two "
                                 "extractions (remove the old ones, e.g. with clear_shards).")
        return [(s, p) for _, s, p in entries]

    def __len__(self) -> int:
        return len(self.location)

    @property
    def num_shards(self) -> int:
        return len(self.infos)

    def load_shard(self, s: int) -> Trajectories:
        return Trajectories.load(self.infos[s].path)

    def sequences(self, shards: Iterable[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """``(global position, states)`` of every sequence in ``shards``, one shard in memory at a time."""
        for s in shards:
            traj = self.load_shard(s)
            for p, states in enumerate(traj.states):
                yield self.global_pos[s][p], states

    def _per_sequence(self, key: str) -> list | None:
        values = [(self.infos[s].header.get("meta") or {}).get(key) for s, _ in self.location]
        return None if any(v is None for v in values) else [v[p] for v, (_, p) in zip(values, self.location,
                                                                                     strict=True)]

    def to_trajectories(self) -> Trajectories:
        """All sequences in global order as one in-memory :class:`Trajectories` (for :func:`fit_heads`)."""
        states: list[torch.Tensor | None] = [None] * len(self)
        for g, x in self.sequences(range(self.num_shards)):
            states[g] = x.clone()
        meta = {"groups": self.groups} if self.groups is not None else {}
        meta["source"] = self.source
        meta["doc_indices"] = self._per_sequence("doc_indices") or list(range(len(self)))
        if self.time_origin is not None:
            meta.update(time_origin=self.time_origin, path_start=self._per_sequence("path_start"))
        return Trajectories(states, self.layer, self.hidden_size, self.num_layers, self.model_id, self.skipped, meta)


def load_shards(shards: str | Sequence[str]) -> Trajectories:
    """Reassemble a folder of shards into one :class:`Trajectories` in corpus order."""
    return ShardedCorpus(shards).to_trajectories()
