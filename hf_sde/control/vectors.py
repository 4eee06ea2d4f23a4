"""Steering ("control") vectors in the GGUF format of llama.cpp and repeng.

A control-vector file lets a steering direction found with hf-sde be used in llama.cpp
(``llama-cli --control-vector FILE``) and a vector made there (``llama-cvector-generator``) or with repeng
(``ControlVector.export_gguf``) be used here. The format, as llama.cpp's loader
(``common/common.cpp``: ``common_control_vector_load_one``) and repeng (``repeng/extract.py``: ``export_gguf`` /
``import_gguf``) read and write it:

- GGUF, ``general.architecture = "controlvector"``;
- ``controlvector.model_hint`` (string): the architecture the vector was made for. cvector-generator writes the
  model's llama.cpp architecture ("llama", "qwen2", ...), repeng the transformers ``model_type``; no loader
  checks it, so it only informs people.
- ``controlvector.layer_count``: the number of direction tensors in the file (repeng writes
  ``len(directions)`` as uint32, cvector-generator its number of tensors as int32). It is not the model's
  layer count, and no loader reads it: :func:`load_control_vector` ignores it too (even when it disagrees).
- one float32 1-D tensor of size ``n_embd`` per layer, named ``direction.<layer>``. llama.cpp refuses the whole
  file when a tensor has another name, another dtype (F16 included), more than one dimension, a size unlike
  the others, or layer index 0.

Layer numbering: llama.cpp adds ``direction.<il>`` to the output of decoder block ``il`` (0-based; each model's
graph calls ``build_cvec(cur, il)`` at the end of block ``il``), and repeng's layer ``L`` is also the output of
``model.layers[L]``. In hf-sde, layer ``L`` is the output of decoder block ``L`` (0-based) as well, so the indices
map one to one: ``direction.12`` is hf-sde layer 12, with no shift. Index 0 cannot be stored: llama.cpp's
control-vector buffer starts at layer 1 and its loader rejects ``direction.0``. (cvector-generator names the
vector it reads from the output of block ``N - 1`` ``direction.N``, so in its numbering 0 is the embedding
output; llama.cpp still adds ``direction.N`` to the output of block ``N``, and this module shifts nothing.)

``gguf`` and the extraction code are imported inside the functions, so that importing this module costs nothing.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

ARCH = "controlvector"
_TENSOR_NAME = re.compile(r"direction\.([+-]?\d+)")
_GGUF_MAGIC = b"GGUF"

# transformers model_type -> llama.cpp architecture name, where convert_hf_to_gguf.py names them differently
# (its ``@ModelBase.register(...)`` classes and their ``model_arch``). Every other model_type is used as is
# (llama, qwen2, qwen3, gemma, gemma2, gpt2, phi3, falcon, stablelm, starcoder2, olmo2, ... agree).
_LLAMA_CPP_ARCH = {
    "mistral": "llama",  # MistralForCausalLM is converted by LlamaModel (MODEL_ARCH.LLAMA)
    "mixtral": "llama",  # so is MixtralForCausalLM
    "gemma3_text": "gemma3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "gpt_neox": "gptneox",
    "phi": "phi2",  # PhiForCausalLM -> MODEL_ARCH.PHI2
    "gpt_bigcode": "starcoder",  # GPTBigCodeForCausalLM -> MODEL_ARCH.STARCODER
    "cohere": "command-r",  # CohereForCausalLM -> MODEL_ARCH.COMMAND_R
}


def model_hint_for(config: Any) -> str:
    """llama.cpp's architecture name for a transformers config (or a model), for ``save_control_vector``'s
    ``model_hint``: cvector-generator writes the llama.cpp name there, which differs from ``model_type`` for
    e.g. Mistral (converted as "llama"). Uses the decoder (text) config of multimodal models, since the steered
    blocks are the decoder's."""
    if not hasattr(config, "model_type") and hasattr(config, "config"):
        config = config.config  # a model
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(
            f"{type(config).__name__} has no model_type; pass a transformers config (model.config) or the "
            "llama.cpp architecture name as model_hint directly."
        )
    return _LLAMA_CPP_ARCH.get(model_type, model_type)


def _field_value(field: Any) -> Any:
    """A scalar or string GGUF metadata value (works with every gguf-py version: no ``ReaderField.contents``)."""
    import gguf

    if field is None or not len(field.parts):
        return None
    if field.types and field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", errors="replace")
    return field.parts[-1].tolist()[0]


def load_control_vector(path: str | os.PathLike) -> dict[int, torch.Tensor]:
    """Read a llama.cpp / repeng control-vector GGUF file: ``{layer: float32 CPU tensor of shape (n_embd,)}``,
    sorted by layer (hf-sde layer ``L`` = ``direction.L``, see the module docstring). Rejects what llama.cpp
    rejects, so a file that loads here also loads there. ``controlvector.layer_count`` and ``model_hint`` are not
    checked (no loader reads them)."""
    import gguf

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Control vector file {path!r} does not exist; check the path.")
    if not os.path.isfile(path):
        raise ValueError(f"Control vector path {path!r} is not a file; pass the .gguf file itself.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ValueError(
            f"{path!r} is not a GGUF file (it starts with {magic!r}, not {_GGUF_MAGIC!r}); control vectors are "
            "GGUF files as written by llama.cpp's cvector-generator, repeng's export_gguf or save_control_vector."
        )
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError / IndexError / struct errors on a damaged file
        raise ValueError(f"{path!r} is not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated.") from e

    arch = _field_value(reader.get_field("general.architecture"))
    if arch != ARCH:
        raise ValueError(
            f"{path!r} is a GGUF file with architecture {arch!r}, not {ARCH!r}: it is not a control vector (a "
            "model's weights, or a LoRA adapter?). Pass a file written by cvector-generator, repeng's export_gguf "
            "or save_control_vector."
        )

    directions: dict[int, torch.Tensor] = {}
    names: dict[int, str] = {}
    n_embd: int | None = None
    for tensor in reader.tensors:
        name = tensor.name
        match = _TENSOR_NAME.fullmatch(name)
        if match is None:
            raise ValueError(
                f"{path!r} has a tensor named {name!r}; a control vector holds only tensors named "
                "'direction.<layer>' with an integer layer (llama.cpp rejects the file). Remove or rename it."
            )
        layer = int(match.group(1))
        if layer < 1:
            raise ValueError(
                f"{path!r} has tensor {name!r} for layer {layer}: layer indices start at 1, llama.cpp reserves "
                "index 0 (the embedding output in cvector-generator's numbering; its control-vector buffer has no "
                "slot for it) and rejects the file. Drop that tensor."
            )
        if layer in names:
            raise ValueError(
                f"{path!r} has two tensors for layer {layer} ({names[layer]!r} and {name!r}); llama.cpp would add "
                "them, repeng keep the last. Merge them into one 'direction.<layer>' tensor."
            )
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            type_name = getattr(tensor.tensor_type, "name", str(tensor.tensor_type))
            raise ValueError(
                f"{path!r}: tensor {name!r} is {type_name}, but llama.cpp only loads F32 direction tensors (it "
                "rejects the file). Re-export it as float32 (e.g. save_control_vector)."
            )
        # llama.cpp's 1-D test is ggml_n_dims == 1: every ggml dimension after the first (ne[1:]) is 1.
        shape = [int(d) for d in tensor.shape]
        if len(shape) < 1 or any(d != 1 for d in shape[1:]):
            raise ValueError(
                f"{path!r}: tensor {name!r} has ggml shape {shape}, but a direction is 1-D (n_embd,); llama.cpp "
                "rejects the file. Store one vector per layer."
            )
        size = shape[0]
        if n_embd is None:
            n_embd = size
        elif size != n_embd:
            raise ValueError(
                f"{path!r}: tensor {name!r} has {size} values but the tensors before it have {n_embd}; all "
                "directions must have the model's hidden size (n_embd). llama.cpp rejects the file."
            )
        values = np.array(tensor.data, dtype=np.float32, copy=True).reshape(-1)  # copy: drop the memmap
        directions[layer] = torch.from_numpy(values)
        names[layer] = name

    if not directions:
        raise ValueError(
            f"{path!r} is a control-vector GGUF file without any 'direction.<layer>' tensor, so it steers nothing; "
            "re-export it with at least one layer."
        )
    return {layer: directions[layer] for layer in sorted(directions)}


def _checked_directions(directions: Mapping[int, Any]) -> dict[int, np.ndarray]:
    """The directions as contiguous float32 numpy vectors, sorted by layer; ``ValueError`` on what llama.cpp
    would reject (or what is surely a mistake: non-finite values)."""
    if not isinstance(directions, Mapping):
        raise TypeError(f"directions must be a mapping {{layer: 1-D tensor}}, not {type(directions).__name__}.")
    if not directions:
        raise ValueError("directions is empty: a control vector needs at least one layer (a 1-D tensor per layer).")
    out: dict[int, np.ndarray] = {}
    n_embd: int | None = None
    for key, value in directions.items():
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
            raise TypeError(f"Layer keys must be ints (hf-sde layer = 0-based decoder block), got {key!r}.")
        layer = int(key)
        if layer < 1:
            raise ValueError(
                f"Layer {layer} cannot be stored: llama.cpp reserves index 0 (its loader rejects 'direction.0' and "
                "its control-vector buffer starts at layer 1). Steer layers 1 and up."
            )
        tensor = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        if tensor.dim() != 1:
            raise ValueError(
                f"Direction for layer {layer} has shape {tuple(tensor.shape)}; it must be 1-D (hidden_size,)."
            )
        if tensor.numel() == 0:
            raise ValueError(f"Direction for layer {layer} is empty; it must have hidden_size values.")
        array = tensor.to(device="cpu", dtype=torch.float32).contiguous().numpy()
        if not np.isfinite(array).all():
            raise ValueError(
                f"Direction for layer {layer} has non-finite values (NaN or inf, possibly after the cast to "
                "float32); llama.cpp would add them to every token's hidden state."
            )
        if n_embd is None:
            n_embd = array.shape[0]
        elif array.shape[0] != n_embd:
            raise ValueError(
                f"Direction for layer {layer} has {array.shape[0]} values, others have {n_embd}: all directions "
                "must have the model's hidden size (llama.cpp rejects mixed sizes)."
            )
        out[layer] = np.array(array, dtype=np.float32, copy=True)
    return {layer: out[layer] for layer in sorted(out)}


def save_control_vector(directions: Mapping[int, torch.Tensor], path: str | os.PathLike, *, model_hint: str) -> str:
    """Write ``{layer: 1-D tensor}`` as a control-vector GGUF file that llama.cpp (``--control-vector``) and repeng
    (``ControlVector.import_gguf``) load, written the way repeng writes it. ``model_hint`` is the llama.cpp
    architecture name (see :func:`model_hint_for`). The file is written to a temporary name in the same folder and
    renamed over ``path``, so a failed save leaves no partial file (and an existing file untouched). Returns the
    path."""
    import gguf

    if not isinstance(model_hint, str) or not model_hint.strip():
        raise ValueError(
            "model_hint must be a non-empty string: the llama.cpp architecture name, e.g. 'llama', 'qwen2' "
            "(model_hint_for(model.config) gives it)."
        )
    arrays = _checked_directions(directions)

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Folder {folder!r} for the control vector does not exist; create it first.")
    # A name of our own rather than mkstemp: the file gets the usual permissions (umask), not 0600.
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            writer.add_string(f"{ARCH}.model_hint", model_hint)
            writer.add_uint32(f"{ARCH}.layer_count", len(arrays))
            for layer, array in arrays.items():
                writer.add_tensor(f"direction.{layer}", array)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


# ----- the mean-difference ("CAA" / repeng-style) vector of two corpora -----------------------------------------
#: Batches handed to one extraction call: the states of one batch at every requested layer are held at a time
#: (the sums are kept, not the states).
_CHUNK_BATCHES = 1
#: Two means closer than this (relative to their norm) are the same mean: their difference is rounding noise.
_SAME_MEAN_RTOL = 1e-6


def _corpus_sums(model, tokenizer, data, side: str, layers: list[int], *, template, text_column, limit, max_length,
                 batch_size, progress) -> tuple[dict[int, torch.Tensor], int, int]:
    """``({layer: float64 sum of the states}, texts, tokens)`` of one corpus: every path position but the first
    (the first token, often a sink with a huge norm, would weigh on the mean by the corpus's mean length)."""
    from tqdm.auto import tqdm

    from ..data.corpus import load_texts
    from ..data.layers import hidden_size
    from ..trajectories.extract import extract_from_ids, tokenize_documents

    try:
        docs = load_texts(data, template=template, text_column=text_column, limit=limit)
    except ValueError as e:
        raise ValueError(f"The {side} corpus: {e}") from None
    max_context = getattr(model.config, "max_position_embeddings", None)
    ids, starts = tokenize_documents(tokenizer, docs, max_length, max_context, template=template)
    # a path of one position has nothing after its first: such texts do not count (here, not per batch)
    keep = [i for i, row in enumerate(ids) if len(row) - (starts[i] if starts is not None else 0) >= 2]
    if not keep:
        raise ValueError(f"The {side} corpus has no token to average: every text has fewer than 2 tokens after "
                         "tokenization (the first position is left out of the mean).")
    ids = [ids[i] for i in keep]
    starts = [starts[i] for i in keep] if starts is not None else None
    width = hidden_size(model)
    sums = {layer: torch.zeros(width, dtype=torch.float64) for layer in layers}
    texts = tokens = 0
    chunk = _CHUNK_BATCHES * batch_size
    with tqdm(total=len(ids), desc=f"Mean hidden state of the {side} texts", disable=not progress,
              unit="text") as bar:
        for a in range(0, len(ids), chunk):
            part = ids[a:a + chunk]
            part_starts = starts[a:a + chunk] if starts is not None else None
            trajs = extract_from_ids(model, part, layers, batch_size=batch_size, progress=False, starts=part_starts)
            for traj in trajs:
                sums[traj.layer] += torch.cat([s[1:] for s in traj.states]).sum(0, dtype=torch.float64)
            first = trajs[0]
            texts += len(first)
            tokens += sum(length - 1 for length in first.lengths)
            bar.update(len(part))
    return sums, texts, tokens


def _mean_difference(model, tokenizer, positive, negative, layers, *, template=None, text_column=None, limit=None,
                     max_length=256, batch_size=8, progress=True) -> tuple[dict[int, torch.Tensor], dict]:
    """:func:`mean_difference_vectors` and what was counted: ``{"positive": {"texts", "tokens"}, "negative": ...}``."""
    from ..data.layers import num_decoder_layers, resolve_layer

    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty: name at least one decoder layer (1 and up) to compute a vector for.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}.")
    resolved = sorted({resolve_layer(model, layer) for layer in layers})
    if resolved[0] == 0:
        n = num_decoder_layers(model)
        given = [x for x in layers if resolve_layer(model, x) == 0]
        raise ValueError(
            f"Layer {given[0]} is layer 0 (the output of the first decoder block), which a control-vector GGUF "
            "cannot hold: llama.cpp reserves index 0 ('direction.0' is rejected, its control-vector buffer starts "
            f"at layer 1). Pick layers 1 to {n - 1} (e.g. a middle layer such as {n // 2})."
        )
    kw = dict(template=template, text_column=text_column, limit=limit, max_length=max_length,
              batch_size=batch_size, progress=progress)
    pos_sums, pos_texts, pos_tokens = _corpus_sums(model, tokenizer, positive, "positive", resolved, **kw)
    neg_sums, neg_texts, neg_tokens = _corpus_sums(model, tokenizer, negative, "negative", resolved, **kw)
    vectors, zero = {}, []
    for layer in resolved:
        pos_mean, neg_mean = pos_sums[layer] / pos_tokens, neg_sums[layer] / neg_tokens
        diff = pos_mean - neg_mean
        # Equal up to float rounding (the same texts batched differently): a direction of rounding noise.
        if float(diff.norm()) <= _SAME_MEAN_RTOL * max(float(pos_mean.norm()), float(neg_mean.norm()), 1e-30):
            zero.append(layer)
        vectors[layer] = diff.to(torch.float32)
    if zero:
        raise ValueError(
            f"The positive and negative corpora have identical mean hidden states at layer"
            f"{'s' if len(zero) > 1 else ''} {', '.join(map(str, zero))}, so the difference is the zero vector "
            "and steers nothing: pass two corpora that differ in what you want to steer (are they the same texts?)."
        )
    counts = {"positive": {"texts": pos_texts, "tokens": pos_tokens},
              "negative": {"texts": neg_texts, "tokens": neg_tokens}}
    return vectors, counts


def mean_difference_vectors(model, tokenizer, positive, negative, layers, *, template: str | None = None,
                            text_column: str | None = None, limit: int | None = None, max_length: int | None = 256,
                            batch_size: int = 8, progress: bool = True) -> dict[int, torch.Tensor]:
    """The mean-difference ("CAA" / repeng-style) steering vector of two corpora at each of ``layers``.

    For each decoder layer ``L`` (hf-sde's numbering: the output of decoder block ``L``, 0-based; negative indices
    count from the end), the vector is ``mean(h_L over the positive tokens) - mean(h_L over the negative tokens)``:
    each mean is over the token positions of all texts of that side pooled (a text weighs as many tokens as it
    has), as hf-sde extracts them (``hf-sde extract``: truncated to ``max_length`` tokens; with a chat template the
    response and the position before it, read in the context of the prompt), leaving out each path's first
    position (the first token's state, often a sink with a very large norm, would otherwise enter the difference
    in proportion to the corpora's mean lengths). CAA and repeng read paired prompts at their answer or last
    token; this is the unpaired version for two corpora. It is a raw difference of mean states, float32, shape ``(hidden_size,)``, not normalized: its
    norm is how far apart the two means are. ``SDEControl(heads, mode="steer", direction=vectors, alpha=a)`` (or
    ``direction=vectors[L], steer_layer=L`` for one layer) uses only each vector's direction: it normalizes it and
    adds ``alpha * ||h||`` times it to each new state, whereas llama.cpp (``--control-vector FILE``, or
    ``--control-vector-scaled FILE S``) adds the vector as it is, times its scale.

    ``positive`` / ``negative``: anything :func:`hf_sde.data.corpus.load_texts` reads (a file, folder or hub
    dataset id, or a list of strings), each read with ``template`` / ``text_column`` and its first ``limit``
    documents. All requested layers are read in one forward pass per batch of ``batch_size`` texts; only running
    sums are kept. Layer 0 is refused: a control-vector GGUF cannot hold it (see the module docstring).

    Returns ``{layer: vector}`` sorted by layer (resolved to ``0..n-1``), ready for :func:`save_control_vector`.
    Raises ``ValueError`` for an empty corpus or when the two means are equal (a zero vector).
    """
    return _mean_difference(model, tokenizer, positive, negative, layers, template=template,
                            text_column=text_column, limit=limit, max_length=max_length, batch_size=batch_size,
                            progress=progress)[0]


__all__ = ["load_control_vector", "mean_difference_vectors", "model_hint_for", "save_control_vector"]
