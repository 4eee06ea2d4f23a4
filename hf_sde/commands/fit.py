"""``hf-sde fit``: extract hidden trajectories and fit SDE heads."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..data.loading import resolve_model_spec
from ..fitting.compare import BASELINES, NAMES, interval_text, reasons_not_better
from ..fitting.fit import DEFAULT_BATCH_SIZE, MATMUL_PRECISIONS
from ..trajectories.extract import DEFAULT_MAX_LENGTH
from . import _cache, _model
from ._args import (
    any_int,
    nonnegative_int,
    open_fraction,
    positive_float,
    positive_int,
    template_choices,
    template_help,
)
from ._output import atomic_output_dir, check_output_dir

HELP = "extract hidden trajectories and fit SDE heads"
SMOKE = {"limit": 8, "epochs": 2, "max_length": 64, "self_generate": 4, "max_new_tokens": 16}

#: The shipped heads (``hf_sde/pretrained/*/config.json``), found by path: no import of ``hf_sde.pretrained``.
PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained"


def shipped_layers() -> dict[str, int]:
    """Base model id -> the decoder layer its shipped heads read (from their ``config.json``)."""
    layers: dict[str, int] = {}
    for cfg in sorted(PRETRAINED.glob("*/config.json")):
        try:
            c = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(c.get("base_model"), str) and isinstance(c.get("layer"), int):
            layers.setdefault(c["base_model"], c["layer"])
    return layers


def default_layer(model: str | None) -> int:
    """``--layer`` when it is not given: the shipped heads' layer for their model, else -1 (the last layer)."""
    return shipped_layers().get(resolve_model_spec(model).name_or_path, -1)


def _layer_help() -> str:
    known = "; ".join(f"{layer} for {name}, the layer its shipped heads read" for name, layer in shipped_layers().items())
    return ("decoder layer whose hidden states are modelled, negative counting from the end (default: "
            + (f"{known}; " if known else "") + "-1, the last layer, for other models)")


def add_fit_arguments(p, *, fit_batch_size_help: str | None = None) -> None:
    """The corpus-reading and fitting hyperparameters that ``fit`` and ``fit-distributed`` share."""
    p.add_argument("--template", default=None, choices=template_choices(), metavar="TEMPLATE", help=template_help())
    p.add_argument("--text-column", default=None,
                   help="column holding the text when there is no --template (default: text)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="use only the first N documents (default: all)")
    p.add_argument("--layer", type=any_int, default=None, help=_layer_help())
    p.add_argument("--proj-dim", type=nonnegative_int, default=16,
                   help="PCA dimensions the SDE runs in; 0: no projection, the SDE runs on every hidden dimension "
                        "(slower, and needs at least 10 x (hidden size + 1) training transitions)")
    p.add_argument("--max-length", type=positive_int, default=DEFAULT_MAX_LENGTH,
                   help="tokens of each document's path (longer documents are truncated)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="extraction batch size (documents per forward)")
    p.add_argument("--epochs", type=positive_int, default=60, help="training epochs at most (early stopping may end sooner)")
    p.add_argument("--width", type=positive_int, default=128, help="hidden width of the drift and diffusion MLPs")
    p.add_argument("--depth", type=positive_int, default=2, help="hidden layers of the drift and diffusion MLPs")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--fit-batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help=fit_batch_size_help or "training batch size (default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training loss (same fit; ~10-20 s to compile, pays on long fits)")
    p.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default=None,
                   help="torch.set_float32_matmul_precision for the training (medium: bfloat16 inputs to the "
                        "products on CPUs with AMX / AVX512-BF16, TF32 on CUDA; faster, the fit differs by their "
                        "rounding). Default: torch's current setting")
    p.add_argument("--bf16", action="store_true",
                   help="mixed-precision training (bfloat16 autocast of each batch's forward; float32 weights, "
                        "optimizer and loss; float32 evaluation and calibration), as TrainingArguments(bf16=True). "
                        "Faster only at large batches (--fit-batch-size 4096) on CPUs with native bfloat16 (AMX / "
                        "AVX512-BF16); slower at the default batch, several times slower without native bfloat16")
    p.add_argument("--patience", type=nonnegative_int, default=10,
                   help="epochs without improvement of the early-stopping NLL before training stops")
    p.add_argument("--heldout-fraction", type=open_fraction, default=0.2,
                   help="share of the sequences (of the prompts, for chat data) held out to compare the fit with "
                        "the baselines")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the split, the initialisation and the batches")


def add_arguments(p) -> None:
    _model.add_model_args(p)
    p.add_argument("--data", help="corpus: .txt/.jsonl/.json/.csv/.parquet file or hub dataset id "
                                  "(default: none; give it, --self-generate or --trajectories)")
    p.add_argument("--self-generate", type=nonnegative_int, default=0, metavar="N",
                   help="use N of the model's own samples as the corpus, with --prompts; 0 is off")
    p.add_argument("--prompts", default=None,
                   help="file of prompts, one per line, for --self-generate (default: none)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128,
                   help="tokens per sample of --self-generate")
    add_fit_arguments(p)
    p.add_argument("--early-stopping", choices=("auto", "sequences", "transitions"), default="auto",
                   help="watch held-back training sequences (auto: from 10 groups up) or a transition slice")
    p.add_argument("--save-trajectories", action="store_true", help="also save trajectories.safetensors")
    _cache.add_no_cache(p)
    _cache.add_trajectories(p, "instead of extracting --data (the data options not given are the folder's; those "
                               "given must match it, and --data, if given, must be the corpus it was made from)")
    p.add_argument("--out", required=True, help="output folder for the heads (new or empty, else --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is not empty")
    p.add_argument("--json", action="store_true", help="print the fit summary as one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def check_args(args) -> None:
    """Fill in ``--layer`` (before the model loads: it depends on the model name only)."""
    if args.layer is None:
        args.layer = default_layer(args.model)


def interrupted(args) -> str:
    return (f"hf-sde fit: interrupted (Ctrl-C) before the heads were saved; nothing was written "
            f"(--out {args.out} is as it was).")


def _from_folder(args, model, tokenizer):
    """The trajectories of ``--trajectories`` (checked against the model, ``--layer`` and, if given, ``--data``)."""
    from ..trajectories import cache as tc

    traj, manifest = tc.load_for_model(args.trajectories, model, tokenizer, args.layer)
    _cache.adopt_corpus_options(args, manifest, args.trajectories)
    corpus = manifest.get("corpus") or {}
    if args.data:
        from ..data.corpus import load_texts

        docs, groups = load_texts(args.data, template=args.template, text_column=args.text_column, limit=args.limit,
                                  return_groups=True)
        key = manifest.get("key") or {}
        tc.check_corpus(manifest, args.trajectories, docs, groups, args.max_length, key.get("max_context"))
    else:
        args.data = corpus.get("data") or "<unknown>"
    return traj


def _trajectories(args, model, tokenizer):
    """The corpus's trajectories and the description the heads record."""
    from ..data.corpus import load_texts
    from ..trajectories.extract import extract_from_ids, extract_trajectories, self_generate

    progress = not args.quiet
    if args.self_generate:
        if not args.prompts:
            raise SystemExit("--self-generate needs --prompts FILE (one prompt per line).")
        prompts = load_texts(args.prompts, separator="\n")
        ids = self_generate(model, tokenizer, prompts, args.self_generate, max_new_tokens=args.max_new_tokens,
                            seed=args.seed, progress=progress)
        if args.max_length:
            ids = [x[: args.max_length] for x in ids]
        traj = extract_from_ids(model, ids, args.layer, batch_size=args.batch_size, progress=progress)
        desc = {"corpus": f"{args.self_generate} samples of the model from {args.prompts}",
                "max_new_tokens": args.max_new_tokens}
    else:
        if args.trajectories:
            traj = _from_folder(args, model, tokenizer)
        else:
            traj = extract_trajectories(model, tokenizer, args.data, args.layer, max_length=args.max_length,
                                        batch_size=args.batch_size, template=args.template,
                                        text_column=args.text_column, limit=args.limit, progress=progress,
                                        cache=_cache.cache_flag(args))
            traj.meta.pop("cache", None)
        desc = {"corpus": os.path.basename(args.data.rstrip("/")), "template": args.template,
                "max_length": args.max_length}
    desc["sequences"] = len(traj)
    desc["skipped_short_texts"] = traj.skipped
    return traj, desc


def verdict_lines(cmp: dict) -> list[str]:
    """The fit's verdict (:mod:`hf_sde.fitting.compare`): "beats" only when every paired interval lies below 0,
    by at least ``MIN_NLL_GAIN``."""
    n = cmp["sequences"]
    lines = [f"  neural - {NAMES[b]:<8s} {cmp[b]['difference']:+.4f}  {interval_text(cmp[b]['interval'])}"
             for b in BASELINES]
    lines.append(f"  (paired bootstrap over the {n} held-out sequence{'s' if n != 1 else ''}, "
                 f"{cmp['resamples']} resamples)")
    if n < 2:
        lines.append(f"The neural SDE is not shown to beat the baselines: {n} held-out sequence gives no interval; "
                     "hold out more (more data or a larger --heldout-fraction).")
    elif cmp["neural_beats_baselines"]:
        lines.append("The neural SDE beats both baselines (both intervals lie below 0).")
    else:
        lost = [NAMES[b] for b in BASELINES if not cmp[b]["neural_better"]]
        lines.append(f"The neural SDE is no better than {' or '.join(lost)}: {'; '.join(reasons_not_better(cmp))}.")
    return lines


def print_summary(summary: dict, first_line: str, comparison: dict | None = None) -> None:
    nll = summary["heldout_nll"]
    print(first_line)
    print("Held-out transition NLL (nats/dim, lower is better):")
    for k in ("neural", "ou", "brownian"):
        print(f"  {k:9s} {nll[k]:.4f}")
    if comparison is not None:
        for line in verdict_lines(comparison):
            print(line)


def run(args) -> int:
    import torch

    from ..fitting.fit import fit_heads

    if not args.self_generate and not args.data and not args.trajectories:
        raise SystemExit("hf-sde fit needs --data PATH_OR_DATASET, --trajectories FOLDER or --self-generate N "
                         "--prompts FILE.")
    if args.self_generate and args.trajectories:
        raise ValueError("--trajectories replaces the extraction of --data; it does not go with --self-generate.")
    check_args(args)  # main() already did; again for callers of run() with parsed arguments
    check_output_dir(args.out, args.overwrite)  # before the slow part
    model, tokenizer = _model.load_model_from_args(args)
    traj, data_desc = _trajectories(args, model, tokenizer)
    source = getattr(model, "hf_sde_source", {})
    torch.manual_seed(args.seed)
    result = fit_heads(
        traj, proj_dim=args.proj_dim, epochs=args.epochs, width=args.width, depth=args.depth, lr=args.lr,
        batch_size=args.fit_batch_size, heldout_fraction=args.heldout_fraction, seed=args.seed,
        patience=args.patience, early_stopping=args.early_stopping, progress=not args.quiet,
        base_model=source.get("name_or_path"), base_model_revision=source.get("revision"),
        gguf_file=source.get("gguf_file"), model_type=model.config.model_type, data_description=data_desc,
        compile=args.compile, matmul_precision=args.matmul_precision, bf16=args.bf16,
    )
    summary = result.summary()
    comparison = summary["heldout_comparison"]
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        result.heads.save_pretrained(tmp)
        with open(tmp / "fit_history.json", "w") as f:
            json.dump({"history": result.history, "summary": summary}, f, indent=2)
        if args.save_trajectories:
            traj.save(str(tmp / "trajectories.safetensors"))
    summary["out"] = args.out
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary, f"Fitted SDE heads on {len(traj)} sequences ({traj.num_transitions} transitions), "
                               f"layer {result.heads.config.layer}, proj dim {result.heads.config.proj_dim}; "
                               f"saved to {args.out}", comparison)
    return 0
