"""``hf-sde score``: sequence-level SDE statistics of texts (``hf_sde.score_texts``), as a table or JSON."""

from __future__ import annotations

from . import _cache, _model
from ._args import open_fraction, positive_int, template_choices, template_help
from ._output import print_json
from .generate import default_heads

HELP = "score texts: mean surprise, tube exits, path NLL (SDE vs OU), diffusion z, token NLL, entropy"
SMOKE = {"limit": 8, "max_length": 64, "ou_limit": 16}

COLUMNS = (("num_tokens", "tokens", "{:>6d}"), ("mean_surprise", "surprise", "{:>8.3f}"),
           ("tube_exit_rate", "tube-out", "{:>8.3f}"), ("sde_nll", "SDE NLL", "{:>8.4f}"),
           ("ou_nll", "OU NLL", "{:>8.4f}"), ("sde_minus_ou_nll", "SDE-OU", "{:>8.4f}"),
           ("mean_zscore", "diff z", "{:>7.3f}"), ("token_nll", "tok NLL", "{:>7.3f}"),
           ("entropy", "entropy", "{:>7.3f}"))


def add_arguments(p) -> None:
    from ..analysis.scoring import DEFAULT_TUBE

    p.add_argument("--heads", default=None,
                   help="heads folder or hub repo id (default: the heads shipped with hf-sde)")
    _model.add_model_args(p, from_heads=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", default=None, help="corpus: .txt/.jsonl/.json/.csv/.parquet file or hub dataset id "
                                                  "(this or --text is required)")
    src.add_argument("--text", action="append", default=None,
                     help="a text to score (repeat for several; this or --data is required)")
    p.add_argument("--prompt", action="append", default=None,
                   help="with --text: the prompt each text answers (repeat, one per --text); the text is then read "
                        "as the response in the tokenizer's chat template, as response heads were fitted "
                        "(default: none, each text is read on its own)")
    p.add_argument("--template", default=None, choices=template_choices(), metavar="TEMPLATE",
                   help=template_help("row template for --data",
                                      "; the shipped heads were fitted with helpsteer-chat"))
    p.add_argument("--text-column", default=None, help="text column of --data (default: text)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="score only the first N documents (default: all)")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="tokens of each text's path scored (default: as the heads were fitted)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="texts per forward")
    p.add_argument("--tube", type=open_fraction, default=DEFAULT_TUBE,
                   help="probability inside the tube: a step is outside when its standardized increment lies "
                        "outside this central ellipsoid of the fitted transition (default %(default)s)")
    p.add_argument("--ou-data", default=None,
                   help="reference corpus to fit the OU baseline on (e.g. the heads' training data), for the OU "
                        "NLL columns (default: none, and those columns print '-': the heads do not store an OU fit)")
    p.add_argument("--ou-template", default=None, choices=template_choices(), metavar="TEMPLATE",
                   help="row template for --ou-data (default: --template)")
    p.add_argument("--ou-limit", type=positive_int, default=None,
                   help="use only the first N documents of --ou-data (default: all)")
    _cache.add_trajectories(p, "to fit the OU baseline on instead of extracting --ou-data (e.g. the heads' training "
                               "corpus; at the heads' layer)")
    _cache.add_no_cache(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _documents(args):
    from ..data.corpus import load_texts

    if args.data is not None:
        if args.prompt:
            raise ValueError("--prompt goes with --text; for --data use a chat template (--template helpsteer-chat "
                             "or chat) to read each response in the context of its prompt.")
        return load_texts(args.data, template=args.template, text_column=args.text_column, limit=args.limit), None
    texts = args.text[: args.limit] if args.limit is not None else args.text
    prompts = args.prompt
    if prompts is not None:
        if len(prompts) != len(args.text):
            raise ValueError(f"got {len(prompts)} --prompt for {len(args.text)} --text; give one prompt per text.")
        prompts = prompts[: len(texts)]
    return texts, prompts


def format_table(scores, texts) -> str:
    """One line per text: the statistics (``-`` where there is no OU baseline) and the text's start."""
    widths = [len(fmt.format(0.0 if "f" in fmt else 0)) for _, _, fmt in COLUMNS]
    lines = [f"{'#':>4} " + " ".join(f"{label:>{w}}" for (_, label, _), w in zip(COLUMNS, widths, strict=True))
             + "  text"]
    for s in scores:
        cells = []
        for (key, _, fmt), width in zip(COLUMNS, widths, strict=True):
            value = getattr(s, key)
            cells.append(f"{'-':>{width}}" if value is None else fmt.format(value))
        doc = texts[s.index]
        text = doc[-1]["content"] if isinstance(doc, list) else doc
        lines.append(f"{s.index:>4} " + " ".join(cells) + "  " + repr(text[:40])[1:-1])
    return "\n".join(lines)


#: Printed under the table when the OU columns are empty.
OU_NOTE = ("Note: the OU NLL and SDE-OU columns are '-' because the heads store no OU fit; pass --ou-data FILE "
           "(e.g. the heads' training corpus, with --ou-template) to fit one and fill them.")


def _ou_baseline(args, model, tokenizer, heads):
    """The OU baseline of the OU columns: fitted on ``--trajectories`` or on ``--ou-data`` (through the trajectory
    cache where its paths are read as a fit reads them), else ``None``."""
    from ..analysis.scoring import _caps, fit_ou_baseline, ou_baseline_from_trajectories
    from ..data.corpus import CHAT_TEMPLATES

    progress = not args.quiet and not args.json
    if args.trajectories is not None:
        from ..trajectories import cache as tc

        traj, _ = tc.load_for_model(args.trajectories, model, tokenizer, heads.config.layer, "the heads' layer")
        return ou_baseline_from_trajectories(heads, traj)
    if args.ou_data is None:
        return None
    template = args.ou_template or args.template
    if heads.config.time_origin == "prompt_end" and template not in CHAT_TEMPLATES:
        # plain texts under response heads start at position 1 (scoring module doc): not a fit's extraction
        from ..data.corpus import load_texts

        reference = load_texts(args.ou_data, template=template, text_column=args.text_column, limit=args.ou_limit)
        return fit_ou_baseline(model, tokenizer, heads, reference, max_length=args.max_length,
                               batch_size=args.batch_size, progress=progress)
    from ..trajectories.extract import extract_trajectories

    heads.check_compatible(model)
    max_length, max_context = _caps(model, heads, args.max_length, None)
    traj = extract_trajectories(model, tokenizer, args.ou_data, heads.config.layer, max_length=max_length,
                                max_context=max_context, batch_size=args.batch_size, template=template,
                                text_column=args.text_column, limit=args.ou_limit, progress=progress,
                                cache=_cache.cache_flag(args))
    return ou_baseline_from_trajectories(heads, traj)


def run(args) -> int:
    from ..analysis.scoring import score_texts
    from ..fitting.heads import SDEHeads

    if args.trajectories is not None and args.ou_data is not None:
        raise ValueError("--trajectories replaces --ou-data (the OU baseline's reference paths); give one of them.")
    heads = SDEHeads.from_pretrained(args.heads or default_heads())
    texts, prompts = _documents(args)  # before the model loads: a bad file fails fast
    model, tokenizer = _model.load_model_from_args(args, heads.config)
    ou = _ou_baseline(args, model, tokenizer, heads)
    scores = score_texts(model, tokenizer, heads, texts, prompts=prompts, ou=ou, tube=args.tube,
                         batch_size=args.batch_size, max_length=args.max_length,
                         progress=not args.quiet and not args.json)
    if args.json:
        print_json({"heads": str(args.heads or default_heads()), "model": args.model, "tube": args.tube,
                    "ou_data": args.ou_data, "trajectories": args.trajectories,
                    "scores": [s.as_dict() for s in scores]})
        return 0
    print(format_table(scores, texts))
    if ou is None:
        print(OU_NOTE)
    return 0
