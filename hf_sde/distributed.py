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
    Memory per rank: its own *projected* transitions with time features (``2 d + 1 + 2 F`` floats each,
    e.g. 41 for d = 16 instead of D for the hidden state) plus one int64 per global transition for the shared
    permutation. The hidden states themselves are only ever read one shard at a time.
  - ``mode="stream"`` never holds more than one shard: the training batches come from an
    :class:`hf_sde.transitions.StreamData` (shards in a seeded per-epoch order, transitions shuffled
    within a shard, carried over between shards), every evaluation is a pass over the shards. Peak
    memory is flat in the corpus size. The gradient sync is the same weighted all-reduce, but the batch
    order (and the early-stopping slice, chosen per transition by a seeded hash of its document) differs
    from ``fit_heads``, so it matches the single-process fit statistically, not to rounding. The PCA,
    horizon, baselines and the held-out split are identical to ``mode="exact"``.

The fit itself is :mod:`hf_sde.fitting` (``fit_heads`` is its one-process case: the same early-stopping
rule and PCA); :func:`fit_heads_distributed` is re-exported here.

Command line: ``hf-sde fit-distributed`` (see :func:`register_cli`; ``python -m hf_sde.distributed
fit-distributed`` works without the ``hf-sde`` wiring), e.g.::

    accelerate launch --cpu --num_processes 2 -m hf_sde.distributed fit-distributed \
        --data ../shared/data/helpsteer_sample_500.jsonl --template helpsteer-response --out heads/dist
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .fitting import fit_heads_distributed  # noqa: F401 - re-exported: the fit lives in the fitting core
from .process_group import DistEnv
from .trajectories import Trajectories, extract_from_ids, tokenize_texts

logger = logging.getLogger(__name__)

SHARD_PREFIX = "traj"
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_CORPUS_EXTS = (".txt", *_FILE_BUILDERS)


# ----- lazy corpus reading ----------------------------------------------------------------------------
def _txt_separator(path: str, chunk: int = 1 << 20) -> str:
    """``load_texts``' rule without reading the file at once: ``<|endoftext|>`` if it occurs, else newline."""
    from .corpus import DEFAULT_SEPARATOR

    tail = ""
    with open(path, encoding="utf-8") as f:
        while block := f.read(chunk):
            if DEFAULT_SEPARATOR in tail + block:
                return DEFAULT_SEPARATOR
            tail = block[-len(DEFAULT_SEPARATOR):]
    return "\n"


def _iter_txt(path: str, separator: str | None, chunk: int = 1 << 20) -> Iterator[str]:
    sep = separator if separator is not None else _txt_separator(path)
    buf = ""
    with open(path, encoding="utf-8") as f:
        while block := f.read(chunk):
            parts = (buf + block).split(sep)
            buf = parts.pop()
            for p in parts:
                if p.strip():
                    yield p.strip()
    if buf.strip():
        yield buf.strip()


def _corpus_files(data: str) -> list[str] | None:
    """The files of a folder or glob of corpus files (sorted), or ``None`` for a single file / hub id."""
    if os.path.isdir(data):
        files = sorted(os.path.join(data, f) for f in os.listdir(data) if f.lower().endswith(_CORPUS_EXTS))
    elif any(c in data for c in "*?["):
        files = sorted(glob.glob(data))
    else:
        return None
    if not files:
        raise ValueError(f"No corpus files ({', '.join(_CORPUS_EXTS)}) in {data!r}.")
    return files


def _rows_to_texts(rows: Iterable[dict], name: str, template: str | None,
                   text_column: str | None) -> Iterator[tuple[str, str | None]]:
    from .corpus import GROUP_KEYS, TEMPLATES

    if template is not None and template not in TEMPLATES:
        raise ValueError(f"Unknown template {template!r}; choose one of {sorted(TEMPLATES)}.")
    column = text_column or "text"
    for row in rows:
        if template is not None:
            try:
                text = TEMPLATES[template](row)
                group = GROUP_KEYS[template](row) if template in GROUP_KEYS else None
            except KeyError as e:
                raise ValueError(f"Template {template!r} needs column {e.args[0]!r}, but {name!r} has "
                                 f"{sorted(row)}.") from None
        else:
            if column not in row:
                raise ValueError(f"Corpus {name!r} has no column {column!r} (columns: {sorted(row)}); pass "
                                 "text_column=... (--text-column) or template=... (--template).")
            text, group = str(row[column]), None
        yield text, group


def iter_documents(
    data: str | Iterable[str],
    *,
    template: str | None = None,
    text_column: str | None = None,
    split: str = "train",
    separator: str | None = None,
    limit: int | None = None,
) -> Iterator[tuple[str, str | None]]:
    """Yield ``(text, group)`` for each non-blank document, lazily, in :func:`~hf_sde.corpus.load_texts` order.

    ``data`` is an iterable of strings, a ``.txt``/``.jsonl``/``.json``/``.csv``/``.parquet`` file, a folder
    or glob of such files (read one after the other, in sorted order: a sharded local corpus), or a hub
    dataset id (read with ``streaming=True``). ``group`` is the HelpSteer prompt for the HelpSteer templates,
    else ``None``. Nothing but the current document (and one read block of a ``.txt`` file) is held.
    """
    import datasets

    def sources() -> Iterator[tuple[str, str | None]]:
        if not isinstance(data, str):
            for t in data:
                yield str(t), None
            return
        files = _corpus_files(data)
        for path in files if files is not None else [data]:
            ext = os.path.splitext(path)[1].lower()
            if os.path.isfile(path) and ext == ".txt":
                for t in _iter_txt(path, separator):
                    yield t, None
                continue
            if os.path.exists(path):
                if ext not in _FILE_BUILDERS:
                    raise ValueError(f"Unsupported corpus file {path!r}: use one of {list(_CORPUS_EXTS)} or a hub id.")
                ds = datasets.load_dataset(_FILE_BUILDERS[ext], data_files=path, split=split, streaming=True)
            else:
                try:
                    ds = datasets.load_dataset(path, split=split, streaming=True)
                except Exception as e:  # noqa: BLE001 - re-raised with the fix
                    raise ValueError(f"Could not stream corpus {path!r}: not a local file and not a loadable "
                                     f"dataset ({type(e).__name__}: {e}).") from e
            yield from _rows_to_texts(ds, path, template, text_column)

    n = 0
    for text, group in sources():
        if not (text and text.strip()):
            continue
        if limit is not None and n >= limit:
            return
        n += 1
        yield text, group


# ----- sharded extraction ------------------------------------------------------------------------------
def shard_name(rank: int, world_size: int, index: int, prefix: str = SHARD_PREFIX) -> str:
    return f"{prefix}-rank{rank:05d}-of-{world_size:05d}-{index:05d}.safetensors"


def extract_to_shards(
    model,
    tokenizer,
    data: str | Iterable[str],
    out_dir: str,
    layer: int = -1,
    *,
    shard_size: int = 256,
    max_length: int | None = 512,
    batch_size: int = 8,
    template: str | None = None,
    text_column: str | None = None,
    limit: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    prefix: str = SHARD_PREFIX,
    progress: bool = True,
) -> list[str]:
    """Extract trajectories of the documents ``rank::world_size`` into safetensors shards; return their paths.

    Memory is bounded by one shard (``shard_size`` documents and their hidden paths), whatever the corpus
    size. ``rank`` / ``world_size`` default to the current process group (see :class:`DistEnv`). Each shard is
    a :class:`~hf_sde.trajectories.Trajectories` file (float32 states, whatever the model dtype) whose
    ``meta`` holds ``doc_indices`` (global index of each kept document) and ``groups``; documents shorter
    than two tokens are skipped and counted. A ``{prefix}-rank....json`` manifest per rank sums it up.

    Example (each of N processes, e.g. under ``accelerate launch``):
        >>> paths = extract_to_shards(model, tok, "corpus.jsonl", "shards/", template="helpsteer-response")
    """
    if rank is None or world_size is None:
        env = DistEnv()
        rank, world_size = env.rank, env.world_size
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    paths: list[str] = []
    texts: list[str] = []
    docs: list[int] = []
    groups: list = []
    seen = skipped = sequences = transitions = 0

    def flush() -> None:
        nonlocal skipped, sequences, transitions
        if not texts:
            return
        ids = tokenize_texts(tokenizer, texts, max_length)
        usable = [i for i, x in enumerate(ids) if len(x) >= 2]
        skipped += len(ids) - len(usable)
        if usable:
            traj = extract_from_ids(model, [ids[i] for i in usable], layer, batch_size=batch_size, progress=False)
            traj.meta = {"source": traj.meta.get("source", {}),
                         "doc_indices": [docs[i] for i in usable], "groups": [groups[i] for i in usable],
                         "rank": rank, "world_size": world_size, "shard": len(paths),
                         "data": data if isinstance(data, str) else "<iterable>", "template": template,
                         "max_length": max_length}
            path = os.path.join(out_dir, shard_name(rank, world_size, len(paths), prefix))
            traj.save(path + ".tmp")
            os.replace(path + ".tmp", path)
            paths.append(path)
            sequences += len(traj)
            transitions += traj.num_transitions
        texts.clear()
        docs.clear()
        groups.clear()

    bar = tqdm(desc=f"Extracting (rank {rank}/{world_size})", unit="doc", disable=not progress or rank != 0)
    for doc_index, (text, group) in enumerate(iter_documents(data, template=template, text_column=text_column,
                                                             limit=limit)):
        if doc_index % world_size != rank:
            continue
        texts.append(text)
        docs.append(doc_index)
        groups.append(group)
        seen += 1
        bar.update(1)
        if len(texts) >= shard_size:
            flush()
    flush()
    bar.close()
    if skipped:
        logger.warning("Rank %d skipped %d of %d documents shorter than 2 tokens.", rank, skipped, seen)
    manifest = {"rank": rank, "world_size": world_size, "documents": seen, "skipped": skipped,
                "sequences": sequences, "transitions": transitions, "shards": [os.path.basename(p) for p in paths]}
    with open(os.path.join(out_dir, f"{prefix}-rank{rank:05d}-of-{world_size:05d}.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return paths


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
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            lengths = f.get_tensor("lengths").tolist() if "lengths" in f.keys() else None
    except Exception as e:  # noqa: BLE001 - any read failure means the same thing here
        raise ValueError(f"{path} is not a readable safetensors trajectory file: {e}") from e
    if "hf_sde_trajectories" not in metadata or lengths is None:
        raise ValueError(f"{path} is not an hf-sde trajectory file.")
    header = json.loads(metadata["hf_sde_trajectories"])
    meta = header.get("meta") or {}
    return ShardInfo(path, lengths, meta.get("doc_indices"), meta.get("groups"), header)


class ShardedCorpus:
    """The trajectories in a folder (or list) of shard files, indexed without loading any states.

    Sequences are ordered globally by ``doc_indices`` when every shard has them (the single-process
    corpus order of :func:`extract_to_shards` output), else by file name and position.
    """

    def __init__(self, shards: str | Sequence[str], prefix: str | None = None):
        if isinstance(shards, str):
            if os.path.isdir(shards):
                pattern = f"{prefix}-*.safetensors" if prefix else "*.safetensors"
                paths = sorted(glob.glob(os.path.join(shards, pattern)))
            else:
                paths = sorted(glob.glob(shards)) or [shards]
        else:
            paths = list(shards)
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
        self.skipped = sum(int(i.header.get("skipped", 0)) for i in self.infos)
        entries = []  # (sort key, shard, position)
        with_docs = all(i.doc_indices is not None for i in self.infos)
        for s, info in enumerate(self.infos):
            for p in range(len(info.lengths)):
                entries.append(((info.doc_indices[p],) if with_docs else (s, p), s, p))
        entries.sort()
        if with_docs:
            keys = [e[0] for e in entries]
            dup = next((k for a, k in zip(keys, keys[1:], strict=False) if a == k), None)
            if dup is not None:
                raise ValueError(f"Document {dup[0]} appears in two shards: the folder mixes shards of two "
                                 "extractions (remove the old ones, e.g. with clear_shards).")
        self.location = [(s, p) for _, s, p in entries]  # global position -> (shard, position in shard)
        self.global_pos = [[0] * len(i.lengths) for i in self.infos]
        for g, (s, p) in enumerate(self.location):
            self.global_pos[s][p] = g
        self.lengths = [self.infos[s].lengths[p] for s, p in self.location]
        groups = [self.infos[s].groups[p] if self.infos[s].groups is not None else None for s, p in self.location]
        self.groups = groups if any(g is not None for g in groups) else None

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

    def to_trajectories(self) -> Trajectories:
        """All sequences in global order as one in-memory :class:`Trajectories` (for :func:`fit_heads`)."""
        states: list[torch.Tensor | None] = [None] * len(self)
        for g, x in self.sequences(range(self.num_shards)):
            states[g] = x.clone()
        meta = {"groups": self.groups} if self.groups is not None else {}
        meta["source"] = self.source
        meta["doc_indices"] = [self.infos[s].doc_indices[p] if self.infos[s].doc_indices else g
                               for g, (s, p) in enumerate(self.location)]
        return Trajectories(states, self.layer, self.hidden_size, self.num_layers, self.model_id, self.skipped, meta)


def load_shards(shards: str | Sequence[str]) -> Trajectories:
    """Reassemble a folder of shards into one :class:`Trajectories` in corpus order."""
    return ShardedCorpus(shards).to_trajectories()


# ----- command line -------------------------------------------------------------------------------------
_DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _fit_distributed(args) -> int:
    from .cli import DEFAULT_GGUF, DEFAULT_MODEL, DEFAULT_REVISION
    from .loading import load_model

    env = DistEnv.init(cpu=True if args.cpu else None)
    progress = not args.quiet
    shard_dir = args.shards or os.path.join(args.out, "trajectories")
    source: dict = {}
    model_type = None
    if args.data:
        gguf = args.gguf_file or (DEFAULT_GGUF if args.model == DEFAULT_MODEL else None)
        revision = args.revision or (DEFAULT_REVISION if args.model == DEFAULT_MODEL else None)
        device = args.device
        if device is None and args.device_map is None and torch.cuda.is_available() and not args.cpu:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        model, tokenizer = load_model(args.model, gguf_file=gguf, revision=revision, device=device,
                                      device_map=args.device_map, dtype=_DTYPES[args.dtype] if args.dtype else None)
        source, model_type = getattr(model, "hf_sde_source", {}), model.config.model_type
        if env.is_main:
            clear_shards(shard_dir)
        env.barrier()
        extract_to_shards(model, tokenizer, args.data, shard_dir, args.layer, shard_size=args.shard_size,
                          max_length=args.max_length, batch_size=args.batch_size, template=args.template,
                          text_column=args.text_column, limit=args.limit, progress=progress)
        del model
        env.barrier()
    elif not args.shards:
        raise SystemExit("hf-sde fit-distributed needs --data (extract, then fit) or --shards DIR (fit only).")
    data_desc = {"corpus": os.path.basename(args.data.rstrip("/")) if args.data else shard_dir,
                 "template": args.template, "max_length": args.max_length}
    result = fit_heads_distributed(
        shard_dir, mode=args.mode, proj_dim=args.proj_dim, epochs=args.epochs, width=args.width, depth=args.depth,
        lr=args.lr, batch_size=args.fit_batch_size, heldout_fraction=args.heldout_fraction, seed=args.seed,
        patience=args.patience, progress=progress, base_model=source.get("name_or_path"),
        base_model_revision=source.get("revision"), gguf_file=source.get("gguf_file"), model_type=model_type,
        data_description=data_desc, env=env,
    )
    summary = result.summary()
    summary.update(out=args.out, processes=env.world_size, mode=args.mode, shards=shard_dir)
    if env.is_main:
        os.makedirs(args.out, exist_ok=True)
        result.heads.save_pretrained(args.out)
        with open(os.path.join(args.out, "fit_history.json"), "w") as f:
            json.dump({"history": result.history, "summary": summary}, f, indent=2)
        if args.json:
            print(json.dumps(summary))
        else:
            nll = summary["heldout_nll"]
            print(f"Fitted SDE heads with {env.world_size} process(es) ({args.mode}) on "
                  f"{summary['num_train_sequences'] + summary['num_heldout_sequences']} sequences from {shard_dir}; "
                  f"saved to {args.out}")
            for k in ("neural", "ou", "brownian"):
                print(f"  {k:9s} {nll[k]:.4f}")
    env.barrier()
    return 0


def register_cli(sub) -> None:
    """Add ``fit-distributed`` to the ``hf-sde`` sub-commands."""
    from .cli import add_model_args

    p = sub.add_parser("fit-distributed",
                       help="sharded extraction + data-parallel fit (run under accelerate launch / torchrun)")
    add_model_args(p)
    p.add_argument("--device-map", default=None, help='e.g. "auto" (one process per node) to spread the model')
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="model dtype (states are stored float32)")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU even where CUDA is available")
    p.add_argument("--data", help="corpus: file, folder/glob of files (a sharded corpus) or hub dataset id (streamed)")
    p.add_argument("--shards", default=None,
                   help="trajectory shard folder: written by the extraction (default OUT/trajectories), or fitted "
                        "directly when --data is not given")
    p.add_argument("--shard-size", type=int, default=256, help="documents per trajectory shard")
    p.add_argument("--mode", choices=("exact", "stream"), default="exact",
                   help="exact: equals the single-process fit; stream: one shard in memory at a time")
    p.add_argument("--template", default=None)
    p.add_argument("--text-column", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--layer", type=int, default=-1)
    p.add_argument("--proj-dim", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="extraction batch size")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fit-batch-size", type=int, default=512, help="global batch size (all processes together)")
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--heldout-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder for the heads (written by rank 0)")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_fit_distributed)


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_sde.distributed fit-distributed ...`` (the same as ``hf-sde fit-distributed``)."""
    import sys

    parser = argparse.ArgumentParser(prog="hf-sde")
    sub = parser.add_subparsers(dest="command", required=True)
    register_cli(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"hf-sde {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
