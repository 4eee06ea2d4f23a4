"""``hf-sde control-vector``: the mean-difference ("CAA" / repeng-style) steering vector of two corpora, written
as a llama.cpp / repeng control-vector GGUF file (see :func:`hf_sde.control.vectors.mean_difference_vectors`)."""

from __future__ import annotations

import argparse
import os
import re

from . import _model
from ._args import positive_int, template_choices, template_help
from ._output import print_json

HELP = ("the mean-difference steering vector of two corpora (positive minus negative mean hidden state, per layer), "
        "written as a llama.cpp / repeng control-vector GGUF file")
SMOKE = {"limit": 8, "max_length": 64}

_INT = re.compile(r"-?\d+")
_RANGE = re.compile(r"(-?\d+)-(-?\d+)")


def layer_spec(text: str) -> list[int]:
    """``"10,12,14"``, ``"8-20"`` (inclusive) or a mix (``"2,5-7,-1"``) as a list of layers, in the order given
    without repeats. Layer 0 is refused here (a control-vector GGUF cannot hold it); a negative layer is resolved,
    and checked against the model's depth, once the model is loaded."""
    layers: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if _INT.fullmatch(item):
            values = [int(item)]
        elif match := _RANGE.fullmatch(item):
            first, last = int(match.group(1)), int(match.group(2))
            if (first < 0) != (last < 0) or first > last:
                raise argparse.ArgumentTypeError(
                    f"{item!r} is not a range: write FIRST-LAST with FIRST <= LAST, both from the start (8-20) or "
                    "both from the end (-4--1)")
            values = list(range(first, last + 1))
        else:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a layer list: write layers separated by commas (10,12,14), inclusive ranges "
                "(8-20) or both (2,5-7,-1)")
        if 0 in values:
            raise argparse.ArgumentTypeError(
                f"{text!r} includes layer 0, which a control-vector GGUF cannot hold: llama.cpp reserves index 0 "
                "(it rejects 'direction.0'; its control-vector buffer starts at layer 1). Start at layer 1 "
                "(e.g. 1-4 instead of 0-4)")
        layers.extend(v for v in values if v not in layers)
    return layers


def add_arguments(p) -> None:
    from ..trajectories.extract import DEFAULT_MAX_LENGTH

    _model.add_model_args(p)
    p.add_argument("--positive", required=True, metavar="PATH_OR_DATASET",
                   help="the corpus to steer toward: .txt/.jsonl/.json/.csv/.parquet file, folder or hub dataset id")
    p.add_argument("--negative", required=True, metavar="PATH_OR_DATASET",
                   help="the corpus to steer away from (same forms as --positive)")
    p.add_argument("--layers", type=layer_spec, default=None, metavar="SPEC",
                   help="decoder layers (output of block L, 0-based) to compute, all from one forward pass: "
                        "comma-separated (10,12,14), inclusive ranges (8-20) or both; negative counts from the end "
                        "(--layers=-3--1: the last three blocks); not 0, which GGUF cannot hold (default: every layer from 1 to the "
                        "last)")
    p.add_argument("--template", default=None, choices=template_choices(), metavar="TEMPLATE",
                   help=template_help(note="; applies to the rows of both corpora, .txt files are read as text"))
    p.add_argument("--text-column", default=None,
                   help="column holding the text of both corpora when there is no --template (default: text)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="use only the first N documents of each corpus (default: all)")
    p.add_argument("--max-length", type=positive_int, default=DEFAULT_MAX_LENGTH,
                   help="tokens read of each document (longer documents are truncated)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="documents per forward pass")
    p.add_argument("--out", required=True, metavar="FILE.gguf",
                   help="the control-vector file to write (its folder must exist)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary instead of the sentence")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def check_args(args) -> None:
    """The output file, checked before the model loads (``ValueError``: argparse error, exit 2)."""
    out = args.out
    if not out.lower().endswith(".gguf"):
        raise ValueError(f"--out {out} must end in .gguf (a llama.cpp control-vector file), e.g. --out "
                         f"{os.path.splitext(out)[0] or 'steer'}.gguf")
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder; name the .gguf file to write, e.g. --out "
                         f"{os.path.join(out, 'steer.gguf')}")
    if os.path.exists(out) and not args.overwrite:
        raise ValueError(f"--out {out} exists; choose a new file name or pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ValueError(f"the folder of --out {out} ({folder}) does not exist; create it first (mkdir -p)")


def interrupted(args) -> str:
    return f"hf-sde control-vector: interrupted (Ctrl-C); nothing was written (--out {args.out} is as it was)."


def run(args) -> int:
    from ..control.vectors import _mean_difference, model_hint_for, save_control_vector
    from ..data.layers import num_decoder_layers

    check_args(args)
    model, tokenizer = _model.load_model_from_args(args)
    layers = args.layers
    if layers is None:
        layers = list(range(1, num_decoder_layers(model)))
        if not layers:
            raise ValueError("the model has a single decoder layer (layer 0), which a control-vector GGUF cannot "
                             "hold; use a deeper model")
    vectors, counts = _mean_difference(model, tokenizer, args.positive, args.negative, layers,
                                       template=args.template, text_column=args.text_column, limit=args.limit,
                                       max_length=args.max_length, batch_size=args.batch_size,
                                       progress=not args.quiet)
    hint = model_hint_for(model.config)
    save_control_vector(vectors, args.out, model_hint=hint)  # atomic: a temporary file renamed over --out
    layer_list = list(vectors)
    width = int(next(iter(vectors.values())).numel())
    pos, neg = counts["positive"], counts["negative"]
    if args.json:
        print_json({"out": args.out, "layers": layer_list, "hidden_size": width, "model_hint": hint,
                    "positive_texts": pos["texts"], "positive_tokens": pos["tokens"],
                    "negative_texts": neg["texts"], "negative_tokens": neg["tokens"],
                    "norms": {str(layer): float(v.norm()) for layer, v in vectors.items()}})
        return 0
    shown = _layer_text(layer_list)
    print(f"Wrote a control vector of {len(layer_list)} layer{'s' if len(layer_list) > 1 else ''} ({shown}), "
          f"hidden size {width}, from {pos['texts']} positive and {neg['texts']} negative texts "
          f"({pos['tokens']} and {neg['tokens']} tokens) to {args.out}. Steer with it: vectors = "
          f"hf_sde.load_control_vector({args.out!r}), then SDEControl(heads, mode=\"steer\", alpha=0.05, "
          f"direction={{k: v for k, v in vectors.items() if k >= heads.config.layer}}) (the layers from the heads' "
          f"layer on; alpha applies at each), or in llama.cpp: --control-vector {args.out}")
    return 0


def _layer_text(layers: list[int]) -> str:
    """``[1, 2, 3, 5]`` as ``"1-3, 5"``."""
    parts, start = [], 0
    for i in range(1, len(layers) + 1):
        if i == len(layers) or layers[i] != layers[i - 1] + 1:
            first, last = layers[start], layers[i - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = i
    return "layer " + parts[0] if len(parts) == 1 and "-" not in parts[0] else "layers " + ", ".join(parts)
