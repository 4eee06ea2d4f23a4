"""A plain Hugging Face folder of a GGUF model, for vLLM (which serves folders, not hf-sde's GGUF loader).

SmolLM2-135M-Instruct lives only as a GGUF file in the hub cache. :func:`model_folder` loads it once with
:func:`hf_sde.load_model` (transformers' own GGUF dequantization), writes it with ``save_pretrained`` in
float32 (so vLLM and transformers see exactly the same weights) together with its tokenizer and chat
template, and returns the folder. Later calls return the folder at once. The folder lives in

    $HF_SDE_CACHE/vllm/<repo>/<revision>/<gguf sha256>/     (default ~/.cache/hf-sde/vllm/...)

and is never part of the repository. It is written into a temporary sibling and renamed, so an interrupted
export never leaves a half folder behind.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..data import gguf_cache
from ..data.loading import SMOLLM2, ModelSpec, _resolve_file


def export_root() -> Path:
    """``$HF_SDE_CACHE/vllm`` (default ``~/.cache/hf-sde/vllm``)."""
    return gguf_cache.cache_root().parent / "vllm"


def model_folder(spec: ModelSpec = SMOLLM2, out_dir: str | os.PathLike | None = None) -> Path:
    """The folder vLLM loads for ``spec`` (a GGUF model, default SmolLM2-135M-Instruct), made once.

    The folder is written and verified by :mod:`hf_sde.gguf_cache` (manifest with sizes and CRC-32 of every
    file, checked on each call; a damaged folder is rebuilt).

    Example:
        >>> from hf_sde.vllm import model_folder
        >>> path = model_folder()          # first call: ~30 s (dequantize + save); later: ~1 s (verify)
        >>> llm = vllm.LLM(str(path), dtype="float32", enforce_eager=True)
    """
    import torch

    if spec.gguf_file is None:
        raise ValueError(f"{spec.name_or_path} is not a GGUF model: give vLLM its folder or repo id directly.")
    gguf_path = _resolve_file(spec.name_or_path, spec.gguf_file, spec.revision)
    sha = gguf_cache.gguf_sha256(gguf_path)
    folder = Path(out_dir) if out_dir is not None else (
        export_root() / gguf_cache._safe(spec.name_or_path) / gguf_cache._safe(spec.revision or "no-revision") / sha)
    manifest, _ = gguf_cache.verify(folder, sha)
    if manifest is not None:
        return folder
    from ..data.loading import load_model

    # gguf_cache=False: hf-sde's GGUF cache is keyed by the transformers version, and this environment's
    # transformers (vLLM's pin) is not the main environment's, so sharing it would rebuild it from each in turn.
    model, tokenizer = load_model(spec.name_or_path, gguf_file=spec.gguf_file, revision=spec.revision,
                                  dtype=torch.float32, gguf_cache=False)
    folder.parent.mkdir(parents=True, exist_ok=True)
    source = {"name_or_path": spec.name_or_path, "gguf_file": spec.gguf_file, "revision": spec.revision,
              "gguf_sha256": sha}
    gguf_cache.write_entry(folder, model, tokenizer, [], source)  # float32 (dtype above)
    return folder
