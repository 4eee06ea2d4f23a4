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

``gguf`` is imported inside the functions: this package is copied into custom_generate exports, which must import
without it.
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


__all__ = ["load_control_vector", "model_hint_for", "save_control_vector"]
