"""What every example shares: ``--model`` / ``--heads`` arguments, chat prompts and ``HF_SDE_SMOKE=1`` caps.

By default the examples use SmolLM2-135M-Instruct (``hf_sde.data.loading.DEFAULT_MODEL``) with the heads shipped in
the package (``hf_sde.pretrained.DEFAULT_HEADS``). ``--model`` takes a hub id or folder; a known id (e.g.
``ggml-org/models-moved`` for stories260K) gets its pinned GGUF file and revision from
``hf_sde.data.loading.resolve_model_spec``.
"""

import argparse
import os

import _offline  # noqa: F401  (sets HF_HUB_CACHE/HF_HUB_OFFLINE for the shared assets before hf_sde loads)

import hf_sde
from hf_sde.commands._smoke import apply_smoke
from hf_sde.data.loading import DEFAULT_MODEL, resolve_model_spec
from hf_sde.pretrained import DEFAULT_HEADS

#: A chat prompt SmolLM2 answers coherently.
CHAT_PROMPT = "Give three tips for staying healthy."
#: HF_SDE_SMOKE=1 (the README test, CI) lowers these arguments to these caps; results are then not meaningful.
SMOKE_CAPS = {"max_new_tokens": 8, "limit": 8, "epochs": 2}


def add_model_arguments(parser, default_from_heads: bool = False) -> None:
    default = "the model the heads were fitted on" if default_from_heads else DEFAULT_MODEL.name_or_path
    parser.add_argument("--model", default=None, help=f"hub id or folder (default: {default})")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model (known ids: their pinned file)")
    parser.add_argument("--revision", default=None, help="hub revision (known ids: their pinned revision)")


def add_heads_argument(parser) -> None:
    parser.add_argument("--heads", default=None,
                        help="heads folder or hub repo id (default: the shipped heads, hf_sde.pretrained.DEFAULT_HEADS)")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="format prompts with the tokenizer's chat template (default: on when the tokenizer "
                             "has one and the heads model chat responses)")


def parse(parser, argv):
    """``parser.parse_args(argv)`` with the HF_SDE_SMOKE=1 caps applied (one line on stderr says which): the same
    rule as the ``hf-sde`` commands."""
    args = parser.parse_args(argv)
    apply_smoke(args, SMOKE_CAPS)
    return args


def load_heads(name_or_path):
    """The heads at ``name_or_path`` (folder or repo id), else the shipped heads."""
    if name_or_path is None:
        if not os.path.isfile(os.path.join(DEFAULT_HEADS, "config.json")):
            raise SystemExit(f"The shipped heads are missing ({DEFAULT_HEADS}); pass --heads FOLDER_OR_REPO_ID.")
        name_or_path = str(DEFAULT_HEADS)
    return hf_sde.SDEHeads.from_pretrained(name_or_path), name_or_path


def model_spec(args, heads=None):
    """``--model`` (resolved), else the model ``heads`` were fitted on, else ``DEFAULT_MODEL``."""
    if args.model is None and heads is not None and heads.config.base_model:
        cfg = heads.config
        return resolve_model_spec(cfg.base_model, args.gguf_file or cfg.gguf_file,
                                  args.revision or cfg.base_model_revision)
    return resolve_model_spec(args.model, args.gguf_file, args.revision)


def load_model(spec):
    model, tok = spec.load()
    where = spec.name_or_path + (f"/{spec.gguf_file}" if spec.gguf_file else "")
    print(f"Model: {where} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return model, tok


def use_chat(requested, tokenizer, heads=None) -> bool:
    """``--chat`` / ``--no-chat``, else chat when the tokenizer has a template and the heads model responses."""
    if requested is not None:
        return requested
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return has_template and (heads is None or heads.config.time_origin == "prompt_end")


def encode(tokenizer, prompts, chat: bool):
    """Model inputs for ``prompts``: each as the user turn of the chat template (with the assistant cue) when
    ``chat``, else as plain text; several prompts are left-padded into one batch."""
    if chat:
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        return tokenizer.apply_chat_template(conversations if len(prompts) > 1 else conversations[0],
                                             add_generation_prompt=True, return_tensors="pt", return_dict=True,
                                             padding=True)
    return tokenizer(list(prompts), return_tensors="pt", padding=True)


def setup(args):
    """``(heads, model, tokenizer)`` for parsed example arguments: the heads, the model they ask for (or
    ``--model``), their compatibility checked, and one line describing them printed."""
    heads, where = load_heads(args.heads)
    model, tok = load_model(model_spec(args, heads))
    heads.check_compatible(model)
    print(describe_heads(heads, where))
    return heads, model, tok


def describe_heads(heads, where) -> str:
    """Which heads, at which layer, and their held-out NLL against the OU and Brownian baselines."""
    cfg = heads.config
    nll = dict(cfg.heldout_nll)
    order = [k for k in ("neural", "ou", "brownian") if k in nll] + [k for k in nll if k not in ("neural", "ou", "brownian")]
    text = ", ".join(f"{k} {nll[k]:.4f}" for k in order) or "not recorded"
    if "neural" in nll and "ou" in nll:
        gain = nll["ou"] - nll["neural"]
        text += f" (neural {'beats' if gain > 0 else 'does not beat'} OU by {gain:+.4f})"
    return (f"Heads: {where} (layer {cfg.layer} of {cfg.num_layers}, proj dim {cfg.proj_dim}, "
            f"time origin {cfg.time_origin})\nHeld-out transition NLL (nats/dim, lower is better): {text}")
