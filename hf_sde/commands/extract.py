"""``hf-sde extract``: extract hidden trajectories into a folder that ``fit`` / ``analyze`` / ``score`` read with
``--trajectories FOLDER`` (e.g. extract once on a GPU machine, fit and analyze anywhere)."""

from __future__ import annotations

from . import _model
from ._args import any_int, positive_int, template_choices, template_help
from ._cache import add_no_cache, cache_flag
from ._output import atomic_output_dir, check_output_dir, print_json
from .fit import _layer_help, default_layer

HELP = "extract hidden trajectories into a folder (read back with --trajectories by fit, analyze and score)"
SMOKE = {"limit": 8, "max_length": 64}  # as fit's, so that a smoke fit can read a smoke extraction


def add_arguments(p) -> None:
    from ..trajectories.extract import DEFAULT_MAX_LENGTH

    _model.add_model_args(p)
    p.add_argument("--data", required=True,
                   help="corpus: .txt/.jsonl/.json/.csv/.parquet file or hub dataset id")
    p.add_argument("--template", default=None, choices=template_choices(), metavar="TEMPLATE", help=template_help())
    p.add_argument("--text-column", default=None,
                   help="column holding the text when there is no --template (default: text)")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N documents (default: all)")
    p.add_argument("--layer", type=any_int, action="append", default=None,
                   help=_layer_help().replace(" (default:", "; repeat for several layers, all from one forward pass "
                                              "(default:", 1))
    p.add_argument("--max-length", type=positive_int, default=DEFAULT_MAX_LENGTH,
                   help="tokens of each document's path (longer documents are truncated)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="extraction batch size (documents per forward)")
    add_no_cache(p)
    p.add_argument("--out", required=True, help="output folder (new or empty, else --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is not empty")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def check_args(args) -> None:
    if args.layer is None:
        args.layer = [default_layer(args.model)]


def interrupted(args) -> str:
    return f"hf-sde extract: interrupted (Ctrl-C); nothing was written (--out {args.out} is as it was)."


def run(args) -> int:
    from ..data.corpus import load_texts
    from ..trajectories import cache as tc
    from ..trajectories.extract import corpus_description, extract_documents

    check_args(args)
    check_output_dir(args.out, args.overwrite)  # before the slow part
    model, tokenizer = _model.load_model_from_args(args)
    docs, groups = load_texts(args.data, template=args.template, text_column=args.text_column, limit=args.limit,
                              return_groups=True)
    corpus = corpus_description(args.data, args.template, args.text_column, args.limit)
    max_context = getattr(model.config, "max_position_embeddings", None)
    trajs = extract_documents(model, tokenizer, docs, list(args.layer), groups=groups, max_length=args.max_length,
                              max_context=max_context, batch_size=args.batch_size, template=args.template,
                              progress=not args.quiet, cache=cache_flag(args), corpus=corpus)
    unique = list({t.layer: t for t in trajs}.values())
    for traj in unique:
        traj.meta.pop("cache", None)
    key = tc.extraction_key(model, tokenizer, docs, groups, max_length=args.max_length, max_context=max_context)
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        tc.write_folder(tmp, key, unique, corpus)
    first = unique[0]
    summary = {"out": args.out, "layers": [t.layer for t in unique], "sequences": len(first),
               "transitions": first.num_transitions, "skipped_short_texts": first.skipped}
    if args.json:
        print_json(summary)
    else:
        layers = ", ".join(str(t.layer) for t in unique)
        print(f"Extracted {len(first)} sequences ({first.num_transitions} transitions) at layer {layers}; saved to "
              f"{args.out}")
    return 0
