"""Extracted trajectories kept on disk and reused: the cache behind ``hf-sde fit`` / ``analyze`` / ``score`` (and
``extract_trajectories(..., cache=True)``) and the folders written by ``hf-sde extract --out``.

An extraction is named by everything that decides its numbers, its *key*:

* the model: where it was loaded from (hub id or folder, revision, GGUF file), a digest of its weights (rounded
  sums and a strided sample of every parameter and buffer, so a model changed in memory is another model), its
  dtype and device type, and the tokenizer (class, size, special ids, chat template, the ids of a probe text);
* the documents read: the sha256 of the documents after the row template, with their prompt groups. One changed
  byte in a row that is read is another key, for a file, a folder, a hub dataset or a list alike; the template,
  text column and limit act through these documents (and are recorded beside the key);
* ``max_length`` and ``max_context``; the layer (as an index ``0..n-1``);
* the extraction code: :data:`EXTRACTION_VERSION`, the sha256 of the source of ``hf_sde/trajectories.py`` and
  ``hf_sde/layers.py``, and the torch and transformers versions.

A trajectory folder (a cache entry and an ``hf-sde extract`` folder alike) holds one
:class:`~hf_sde.trajectories.Trajectories` safetensors file per layer (``layer-<L>.safetensors``, float32 states)
and ``manifest.json``, written last: the key, the corpus description, and per layer the file's size, CRC-32,
sequence count and states shape. Reading checks all of it. The cache lives in
``$HF_SDE_CACHE/trajectories/<sha256 of key and layer>/`` (default ``~/.cache/hf-sde``), one layer per entry,
written into a temporary folder and renamed into place; an entry that does not check out is extracted again with
a one-line warning, never trusted. ``HF_SDE_TRAJECTORY_CACHE=0`` turns the default cache off; a cache folder that
cannot be written is skipped with one warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch

from ..data.gguf_cache import _crc32  # the same file check as the weights cache
from .extract import Trajectories

logger = logging.getLogger(__name__)

#: Bump when extraction changes its numbers in a way the source hashes below cannot see.
EXTRACTION_VERSION = 1
FORMAT = "hf-sde-trajectories/1"
MANIFEST = "manifest.json"
CACHE_ENV = "HF_SDE_CACHE"
DISABLE_ENV = "HF_SDE_TRAJECTORY_CACHE"
_PROBE = "Once upon a time, 1234 hidden states: ÄÖ 漢字 🙂."
_warned_unwritable = False


class TrajectoryFolderError(ValueError):
    """A trajectory folder that is missing, corrupt, or made for another model, layer or corpus."""


# ----- where -------------------------------------------------------------------------------------------------
def enabled() -> bool:
    """The default cache is on unless ``HF_SDE_TRAJECTORY_CACHE=0``."""
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_root() -> Path:
    """``$HF_SDE_CACHE/trajectories`` (default ``~/.cache/hf-sde/trajectories``)."""
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "hf-sde")
    return Path(base) / "trajectories"


def resolve_cache(cache) -> Path | None:
    """The cache folder for ``extract_trajectories(cache=...)``: ``True`` the default one (unless turned off by
    ``HF_SDE_TRAJECTORY_CACHE=0``), a path that folder, ``None`` / ``False`` none."""
    if cache is None or cache is False:
        return None
    if cache is True:
        return cache_root() if enabled() else None
    return Path(cache)


# ----- the key -----------------------------------------------------------------------------------------------
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
                          .encode("utf-8")).hexdigest()


def _code_digest() -> str:
    from ..data import layers
    from . import extract as trajectories

    h = hashlib.sha256()
    for module in (trajectories, layers):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def _state_token(model) -> tuple:
    return tuple((id(t), t.data_ptr(), t._version) for t in [*model.parameters(), *model.buffers()])


@torch.no_grad()
def weights_digest(model) -> str:
    """A digest of the weights: per tensor its name, shape, dtype, float64 sum and absolute sum (10 significant
    digits, so that summation order does not matter) and a strided sample of 1024 raw values. Remembered until a
    parameter is replaced or changed in place."""
    token = _state_token(model)
    memo = getattr(model, "_hf_sde_weights_digest", None)
    if memo is not None and memo[0] == token:
        return memo[1]
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            h.update(f"{name}|meta|{tuple(t.shape)}".encode())
            continue
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024].float().cpu()
        if flat.is_floating_point():
            total = float(flat.sum(dtype=torch.float64))
            absolute = float(torch.linalg.vector_norm(flat, 1, dtype=torch.float64))
        else:
            total = absolute = float(flat.double().sum())
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{total:.10e}|{absolute:.10e}|".encode())
        h.update(sample.numpy().tobytes())
    digest = h.hexdigest()
    try:
        model._hf_sde_weights_digest = (token, digest)
    except AttributeError:
        pass
    return digest


def tokenizer_digest(tokenizer) -> str:
    ids = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    return _digest({"class": type(tokenizer).__name__, "size": len(tokenizer), "probe": list(ids),
                    "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
                    "chat_template": getattr(tokenizer, "chat_template", None)})


def model_identity(model, tokenizer) -> dict:
    """Where the model came from and digests of its weights and tokenizer (part of the key)."""
    from ..data.layers import hidden_size, num_decoder_layers
    from .extract import model_name

    source = getattr(model, "hf_sde_source", None) or {}
    name = model_name(model)
    if isinstance(name, str) and os.path.isdir(name):
        name = os.path.abspath(name)
    first = next(model.parameters())
    return {"name_or_path": name, "revision": source.get("revision"), "gguf_file": source.get("gguf_file"),
            "hidden_size": hidden_size(model), "num_layers": num_decoder_layers(model),
            "weights": weights_digest(model), "dtype": str(first.dtype).removeprefix("torch."),
            "device": first.device.type, "tokenizer": tokenizer_digest(tokenizer)}


def documents_digest(docs, groups=None) -> str:
    """sha256 of the documents (texts or conversations) and their prompt groups, in order."""
    h = hashlib.sha256()
    for i, doc in enumerate(docs):
        h.update(json.dumps([doc, groups[i] if groups is not None else None], ensure_ascii=False,
                            sort_keys=True).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def extraction_key(model, tokenizer, docs, groups, *, max_length, max_context) -> dict:
    """The key of extracting ``docs`` with ``model`` (every layer: the layer is added per entry)."""
    import transformers

    return {"format": FORMAT, "extraction_version": EXTRACTION_VERSION, "code": _code_digest(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "model": model_identity(model, tokenizer),
            "corpus": {"documents": documents_digest(docs, groups), "num_documents": len(docs)},
            "max_length": max_length, "max_context": max_context}


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}")
    return out


# ----- folders -----------------------------------------------------------------------------------------------
def layer_file(layer: int) -> str:
    return f"layer-{layer}.safetensors"


def write_folder(folder: str | os.PathLike, key: dict, trajectories: list[Trajectories], corpus: dict) -> Path:
    """Write ``trajectories`` (one per layer) and the manifest (last) into the existing ``folder``."""
    folder = Path(folder)
    layers = {}
    for traj in trajectories:
        path = folder / layer_file(traj.layer)
        traj.save(str(path))
        layers[str(traj.layer)] = {"file": path.name, "sequences": len(traj), "transitions": traj.num_transitions,
                                   "states_shape": [sum(traj.lengths), traj.hidden_size],
                                   "size": path.stat().st_size, "crc32": _crc32(path)}
    manifest = {"format": FORMAT, "key": key, "corpus": corpus, "layers": layers}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)
    return folder


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise TrajectoryFolderError(f"No trajectory folder at {os.fspath(folder)!r}.")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrajectoryFolderError(f"{os.fspath(folder)} is not a trajectory folder: no {MANIFEST} (write one "
                                    "with hf-sde extract --out).") from None
    except (OSError, ValueError) as e:
        raise TrajectoryFolderError(f"{path} is unreadable ({e}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("layers"), dict):
        raise TrajectoryFolderError(f"{path} is not an hf-sde trajectory manifest of format {FORMAT!r}.")
    return manifest


def manifest_layers(manifest: dict) -> list[int]:
    return sorted(int(x) for x in manifest["layers"])


def read_folder(folder: str | os.PathLike, layer: int, key: dict | None = None) -> tuple[Trajectories, dict]:
    """The trajectories of ``layer`` in ``folder`` and its manifest, checked: the manifest's ``key`` (when given),
    the file's size and CRC-32, and the states' layer and shape. Raises :class:`TrajectoryFolderError`."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if key is not None and manifest.get("key") != key:
        diff = _differences(manifest.get("key") or {}, key)
        raise TrajectoryFolderError(f"its key differs ({', '.join(diff[:4])})")
    entry = manifest["layers"].get(str(layer))
    if entry is None:
        raise TrajectoryFolderError(f"{folder} holds layer {_layers_text(manifest)}, not layer {layer}.")
    path = folder / entry["file"]
    if not path.is_file():
        raise TrajectoryFolderError(f"{path} is missing.")
    if path.stat().st_size != entry["size"] or _crc32(path) != entry["crc32"]:
        raise TrajectoryFolderError(f"{path} does not match its manifest (size or CRC-32): corrupt or changed.")
    try:
        traj = Trajectories.load(str(path))
    except ValueError as e:
        raise TrajectoryFolderError(str(e)) from None
    shape = [sum(traj.lengths), traj.hidden_size]
    if traj.layer != layer or len(traj) != entry["sequences"] or shape != entry["states_shape"]:
        raise TrajectoryFolderError(f"{path} holds layer {traj.layer}, {len(traj)} sequences of shape {shape}; its "
                                    f"manifest says layer {layer}, {entry['sequences']} of {entry['states_shape']}.")
    return traj, manifest


def _layers_text(manifest: dict) -> str:
    return ", ".join(map(str, manifest_layers(manifest))) or "none"


# ----- the cache ---------------------------------------------------------------------------------------------
def entry_dir(root: Path, key: dict, layer: int) -> Path:
    return Path(root) / _digest({"key": key, "layer": layer})[:40]


def lookup(root: Path, key: dict, layer: int) -> Trajectories | None:
    """The cached trajectories of ``layer`` under ``key``, or ``None`` (an unusable entry: a warning, then ``None``)."""
    entry = entry_dir(root, key, layer)
    if not entry.exists():
        return None
    try:
        traj, _ = read_folder(entry, layer, key)
    except (TrajectoryFolderError, OSError) as e:
        logger.warning("hf-sde: the cached trajectories in %s are unusable (%s); extracting them again.", entry, e)
        return None
    logger.info("Read the trajectories of layer %d from the cache (%s).", layer, entry)
    return traj


def store(root: Path, key: dict, traj: Trajectories, corpus: dict) -> Path | None:
    """Write ``traj`` as the entry of its layer (temporary folder, then rename); ``None`` if the cache is not
    writable (one warning per process)."""
    global _warned_unwritable
    entry = entry_dir(root, key, traj.layer)
    tmp = Path(root) / f".tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir(parents=True)
        write_folder(tmp, key, [traj], corpus)
        if entry.exists():  # an unusable entry (lookup said why) or one another process just wrote
            old = Path(root) / f".old-{uuid.uuid4().hex}"
            os.rename(entry, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, entry)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if entry.exists():  # another process won the race: its entry is as good
            return entry
        if not _warned_unwritable:
            _warned_unwritable = True
            logger.warning("hf-sde: cannot write the trajectory cache in %s (%s); extracting without it.", root, e)
        return None
    return entry


# ----- explicit folders (--trajectories) ---------------------------------------------------------------------
def _describe_model(m: dict) -> str:
    extra = ", ".join(f"{k} {m[k]}" for k in ("revision", "gguf_file") if m.get(k))
    return f"{m.get('name_or_path')!r}" + (f" ({extra})" if extra else "")


def check_model(manifest: dict, model, tokenizer, folder: str) -> None:
    """Refuse a folder extracted with another model: another id / revision / GGUF file, another shape, or (at
    the same dtype) other weights or another tokenizer."""
    theirs = (manifest.get("key") or {}).get("model") or {}
    ours = model_identity(model, tokenizer)
    why = None
    if any(theirs.get(k) != ours.get(k) for k in ("name_or_path", "revision", "gguf_file", "hidden_size", "num_layers")):
        why = f"was extracted with model {_describe_model(theirs)}, not {_describe_model(ours)}"
    elif theirs.get("tokenizer") != ours.get("tokenizer"):
        why = f"was extracted with another tokenizer of {_describe_model(ours)}"
    elif theirs.get("dtype") == ours.get("dtype") and theirs.get("weights") != ours.get("weights"):
        why = f"was extracted from other weights of {_describe_model(ours)} (changed since?)"
    if why:
        raise TrajectoryFolderError(f"--trajectories {folder} {why}; extract them again with hf-sde extract for "
                                    "this model, or drop --trajectories.")


def load_for_model(folder: str, model, tokenizer, layer: int, layer_source: str = "--layer") -> tuple[Trajectories, dict]:
    """The trajectories of ``layer`` in an ``hf-sde extract`` folder, refused (naming both) when the folder was
    made for another model or holds another layer."""
    from ..data.layers import resolve_layer

    manifest = read_manifest(folder)
    check_model(manifest, model, tokenizer, folder)
    wanted = resolve_layer(model, layer)
    if str(wanted) not in manifest["layers"]:
        given = f"{layer_source} {layer}" if layer != wanted else layer_source
        raise TrajectoryFolderError(
            f"--trajectories {folder} holds layer {_layers_text(manifest)}, not layer {wanted} ({given}); extract "
            f"layer {wanted} with hf-sde extract --layer {wanted}, or use heads / --layer of layer "
            f"{_layers_text(manifest)}.")
    return read_folder(folder, wanted)


def check_corpus(manifest: dict, folder: str, docs, groups, max_length, max_context, what: str = "--data") -> None:
    """Refuse a folder extracted from other documents or with another ``max_length`` / ``max_context``."""
    key = manifest.get("key") or {}
    corpus = manifest.get("corpus") or {}
    if (key.get("corpus") or {}).get("documents") != documents_digest(docs, groups):
        raise TrajectoryFolderError(
            f"--trajectories {folder} was extracted from other documents than {what} with these options (it records "
            f"data {corpus.get('data')!r}, template {corpus.get('template')}, text column "
            f"{corpus.get('text_column')}, limit {corpus.get('limit')}); pass the same data options or drop {what}.")
    if key.get("max_length") != max_length:
        raise TrajectoryFolderError(f"--trajectories {folder} was extracted with --max-length {key.get('max_length')}, "
                                    f"not {max_length}; pass --max-length {key.get('max_length')} or extract again.")
    if key.get("max_context") != max_context:
        raise TrajectoryFolderError(f"--trajectories {folder} was extracted with a context of {key.get('max_context')} "
                                    f"tokens, not {max_context}; extract again.")


__all__ = ["EXTRACTION_VERSION", "TrajectoryFolderError", "cache_root", "check_corpus", "check_model",
           "extraction_key", "load_for_model", "lookup", "read_folder", "read_manifest", "resolve_cache", "store",
           "write_folder"]
