"""The one model-argument resolver of the command line (``--model``, ``--gguf-file``, ``--revision``, ``--device``).

Every sub-command that loads a model goes through :func:`add_model_args` and :func:`model_spec_from_args`;
the default model and the pinned files of known repos live in :mod:`hf_sde.loading` (defined once).
"""

from __future__ import annotations

import argparse

from ..data.loading import DEFAULT_MODEL, ModelSpec, resolve_model_spec


def add_model_args(p: argparse.ArgumentParser, *, from_heads: bool = False) -> None:
    """Add the model arguments; ``from_heads``: without ``--model`` the heads' recorded base model is used."""
    default = ("the base model the heads record, else " if from_heads else "") + DEFAULT_MODEL.name_or_path
    p.add_argument("--model", default=None,
                   help=f"hub id or local folder of a causal LM (default: {default}; known hub ids fill in "
                        "their pinned --gguf-file and --revision)")
    p.add_argument("--gguf-file", default=None,
                   help="GGUF file inside --model (e.g. tinyllamas/stories260K.gguf; default: the pinned file of a "
                        "known model, else none: safetensors weights)")
    p.add_argument("--revision", default=None,
                   help="hub revision (branch, tag or commit; default: the pinned commit of a known model, else main)")
    p.add_argument("--device", default=None, help="torch device for the model (default: CPU)")


def model_spec_from_args(args, heads_config=None) -> ModelSpec:
    """The model a command loads: ``--model`` (resolved), else what the heads record, else the default."""
    if args.model is None and heads_config is not None and getattr(heads_config, "base_model", None):
        if args.gguf_file is None and args.revision is None:
            return ModelSpec(heads_config.base_model, heads_config.base_model_revision, heads_config.gguf_file)
        return resolve_model_spec(heads_config.base_model, args.gguf_file, args.revision)  # an explicit file wins
    return resolve_model_spec(args.model, args.gguf_file, args.revision)


def load_model_from_args(args, heads_config=None, **kwargs):
    """``(model, tokenizer)`` for the parsed arguments (see :func:`model_spec_from_args`)."""
    spec = model_spec_from_args(args, heads_config)
    args.model, args.gguf_file, args.revision = spec.name_or_path, spec.gguf_file, spec.revision
    return spec.load(device=getattr(args, "device", None), **kwargs)
