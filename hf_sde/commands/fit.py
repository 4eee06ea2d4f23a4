"""``hf-sde fit``: extract hidden trajectories and fit SDE heads."""

from __future__ import annotations

import json
import os

from ..fitting import DEFAULT_BATCH_SIZE, MATMUL_PRECISIONS
from ..trajectories import DEFAULT_MAX_LENGTH
from . import _model
from ._output import atomic_output_dir, check_output_dir

HELP = "extract hidden trajectories and fit SDE heads"
SMOKE = {"limit": 8, "epochs": 2, "max_length": 64, "self_generate": 4, "max_new_tokens": 16}


def add_fit_arguments(p, *, fit_batch_size_help: str | None = None) -> None:
    """The corpus-reading and fitting hyperparameters that ``fit`` and ``fit-distributed`` share."""
    p.add_argument("--template", default=None, help="row template, e.g. helpsteer or helpsteer-response")
    p.add_argument("--text-column", default=None)
    p.add_argument("--limit", type=int, default=None, help="use only the first N documents")
    p.add_argument("--layer", type=int, default=-1, help="decoder layer (negative counts from the end)")
    p.add_argument("--proj-dim", type=int, default=16, help="PCA dimensions (0: no projection)")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    p.add_argument("--batch-size", type=int, default=8, help="extraction batch size")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fit-batch-size", type=int, default=DEFAULT_BATCH_SIZE,
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
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--heldout-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)


def add_arguments(p) -> None:
    _model.add_model_args(p)
    p.add_argument("--data", help="corpus: .txt/.jsonl/.json/.csv/.parquet file or hub dataset id")
    p.add_argument("--self-generate", type=int, default=0, metavar="N",
                   help="use N of the model's own samples as the corpus (needs --prompts)")
    p.add_argument("--prompts", default=None, help="file of prompts, one per line, for --self-generate")
    p.add_argument("--max-new-tokens", type=int, default=128)
    add_fit_arguments(p)
    p.add_argument("--early-stopping", choices=("auto", "sequences", "transitions"), default="auto",
                   help="watch held-back training sequences (auto: from 10 groups up) or a transition slice")
    p.add_argument("--save-trajectories", action="store_true", help="also save trajectories.safetensors")
    p.add_argument("--out", required=True, help="output folder for the heads (new or empty, else --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is not empty")
    p.add_argument("--json", action="store_true", help="print the fit summary as one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _trajectories(args, model, tokenizer):
    """The corpus's trajectories and the description the heads record."""
    from ..corpus import load_texts
    from ..trajectories import extract_from_ids, extract_trajectories, self_generate

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
        traj = extract_trajectories(model, tokenizer, args.data, args.layer, max_length=args.max_length,
                                    batch_size=args.batch_size, template=args.template,
                                    text_column=args.text_column, limit=args.limit, progress=progress)
        desc = {"corpus": os.path.basename(args.data.rstrip("/")), "template": args.template,
                "max_length": args.max_length}
    desc["sequences"] = len(traj)
    desc["skipped_short_texts"] = traj.skipped
    return traj, desc


def print_summary(summary: dict, first_line: str) -> None:
    nll = summary["heldout_nll"]
    print(first_line)
    print("Held-out transition NLL (nats/dim, lower is better):")
    for k in ("neural", "ou", "brownian"):
        print(f"  {k:9s} {nll[k]:.4f}")
    verdict = "beats" if summary["neural_beats_baselines"] else "does NOT beat"
    print(f"The neural SDE {verdict} both baselines.")


def run(args) -> int:
    import torch

    from ..fitting import fit_heads

    if not args.self_generate and not args.data:
        raise SystemExit("hf-sde fit needs --data PATH_OR_DATASET or --self-generate N --prompts FILE.")
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
                               f"saved to {args.out}")
    return 0
