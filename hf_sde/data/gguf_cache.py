"""A verified on-disk cache of dequantized GGUF weights, so a GGUF model loads in seconds after the first time.

transformers dequantizes a GGUF file to float32 on every ``from_pretrained(..., gguf_file=...)`` (30-50 s for
SmolLM2-135M on 2 cores). The first load here does exactly that, then saves the model (safetensors + config)
and its tokenizer with ``save_pretrained`` into

    $HF_SDE_CACHE/gguf/<repo>/<revision>/<gguf sha256>/      (default ~/.cache/hf-sde/gguf/...)

and every load reads that folder through the ordinary ``from_pretrained(folder)`` code path. An entry is
keyed by repo, revision and the GGUF file's sha256 (the hub cache's blob name when it is a blob, else hashed
once and remembered by path, size and modification time), and holds a manifest written last: the
transformers version, the tensor names and shapes, and a size + CRC-32 of every file. Each load checks all
of it (CRC-32 runs at ~0.5 GB/s even on a busy core); an entry that does not match is rebuilt, never
trusted, with a warning saying why. If the cache folder is not writable (read-only home, CI), models load
without it and one warning says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import uuid
import zlib
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "HF_SDE_CACHE"
DISABLE_ENV = "HF_SDE_GGUF_CACHE"
MANIFEST = "hf_sde_gguf_cache.json"
FORMAT = 1
_warned_unwritable = False


def enabled(flag: bool | None = None) -> bool:
    """``flag`` if given, else on unless ``HF_SDE_GGUF_CACHE=0``."""
    if flag is not None:
        return flag
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_root() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "hf-sde")
    return Path(base) / "gguf"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-.") or "_"


def entry_dir(name_or_path: str, revision: str | None, sha256: str) -> Path:
    return cache_root() / _safe(name_or_path) / _safe(revision or "no-revision") / sha256


def _crc32(path: Path, chunk: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def gguf_sha256(path: str) -> str:
    """The GGUF file's sha256: its hub blob name, else hashed once and remembered by (path, size, mtime)."""
    real = os.path.realpath(path)
    name = os.path.basename(real)
    if re.fullmatch(r"[0-9a-f]{64}", name):
        return name  # the hub cache stores LFS files as blobs named by their sha256
    st = os.stat(real)
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    index = cache_root() / "sha256-index.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    digest = h.hexdigest()
    known[key] = digest
    try:
        _write_json_atomic(index, known)
    except OSError:
        pass
    return digest


def _write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _safetensors_header(path: Path) -> dict:
    """Tensor name -> shape from a safetensors file's header (raises ValueError if unreadable)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("no header")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise ValueError("implausible header size")
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _describe_files(folder: Path) -> dict:
    return {p.name: {"size": p.stat().st_size, "crc32": _crc32(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def verify(entry: Path, sha256: str) -> tuple[dict | None, str]:
    """``(manifest, "")`` if ``entry`` is complete and intact, else ``(None, why not)``."""
    import transformers

    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as e:
        return None, f"unreadable manifest ({e})"
    if manifest.get("format") != FORMAT or manifest.get("gguf_sha256") != sha256:
        return None, "manifest of another format or file"
    if manifest.get("transformers") != transformers.__version__:
        return None, f"written by transformers {manifest.get('transformers')}, this is {transformers.__version__}"
    for name, want in manifest.get("files", {}).items():
        path = entry / name
        if not path.is_file() or path.stat().st_size != want["size"]:
            return None, f"{name} is missing or has the wrong size"
        if _crc32(path) != want["crc32"]:
            return None, f"{name} fails its checksum"
    try:
        tensors = {}
        for name in manifest["files"]:
            if name.endswith(".safetensors"):
                tensors.update(_safetensors_header(entry / name))
    except (OSError, ValueError, KeyError) as e:
        return None, f"unreadable safetensors header ({e})"
    if tensors != manifest.get("tensors"):
        return None, "tensor names or shapes differ from the manifest"
    return manifest, ""


def writable() -> bool:
    """Whether the cache folder can be written (warns once, then loads go without the cache)."""
    global _warned_unwritable
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError as e:
        if not _warned_unwritable:
            logger.warning("The GGUF weights cache %s is not writable (%s): GGUF models load without it (slow: "
                           "dequantized every time). Set %s to a writable folder to cache them.", root, e, CACHE_ENV)
            _warned_unwritable = True
        return False


def write_entry(entry: Path, model, tokenizer, repaired: list[str], source: dict) -> dict:
    """Save ``model`` and ``tokenizer`` into ``entry`` (a temporary sibling, renamed when complete)."""
    import transformers

    tmp = entry.with_name(f".{entry.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    try:
        # The GGUF "quantizer" only dequantized at load time; the weights are plain tensors now. Drop it so that
        # save_pretrained writes them (the caller discards this model and loads the entry instead).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = _describe_files(tmp)
        tensors = {}
        for name in files:
            if name.endswith(".safetensors"):
                tensors.update(_safetensors_header(tmp / name))
        manifest = {"format": FORMAT, "transformers": transformers.__version__, "files": files,
                    "tensors": tensors, "repaired": repaired, **source}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / MANIFEST).is_file():  # not another process's complete entry: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def load_cached(name_or_path: str, gguf_file: str, revision: str | None, gguf_path: str, *, build,
                dtype=None, device_map=None, **kwargs):
    """``(model, tokenizer, repaired)`` from the cache entry of this GGUF file, building it first if needed.

    ``build()`` returns ``(model, tokenizer, repaired)`` loaded directly from the GGUF file. Returns ``None``
    when the cache cannot be used (not writable), so the caller loads directly.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        sha = gguf_sha256(gguf_path)
    except OSError as e:
        logger.warning("Could not hash %s (%s); loading it without the weights cache.", gguf_path, e)
        return None
    entry = entry_dir(name_or_path, revision, sha)
    manifest, why = verify(entry, sha)
    if manifest is None:
        if not writable():
            return None
        if why != "missing":
            logger.warning("GGUF weights cache entry %s is not valid (%s): rebuilding it.", entry, why)
        else:
            logger.info("Dequantizing %s/%s once; later loads read %s.", name_or_path, gguf_file, entry)
        model, tokenizer, repaired = build()
        source = {"name_or_path": name_or_path, "gguf_file": gguf_file, "revision": revision, "gguf_sha256": sha}
        try:
            manifest = write_entry(entry, model, tokenizer, repaired, source)
        except OSError as e:
            logger.warning("Could not write the GGUF weights cache entry %s (%s).", entry, e)
            return None
    model_kwargs = dict(kwargs)
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    if device_map is not None:
        model_kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(str(entry), **model_kwargs)
    model.config._name_or_path = name_or_path
    tokenizer = AutoTokenizer.from_pretrained(str(entry))
    return model, tokenizer, list(manifest.get("repaired", []))
