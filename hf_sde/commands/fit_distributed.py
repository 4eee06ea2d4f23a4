"""``hf-sde fit-distributed``: sharded extraction + data-parallel fit (under ``accelerate launch`` / ``torchrun``).

``python -m hf_sde.commands fit-distributed ...`` is the module form that ``accelerate launch -m`` needs.
"""

from __future__ import annotations

import json
import os

from . import _model
from ._args import positive_int
from ._output import check_output_dir, partial_dir, partial_path, publish
from .fit import add_fit_arguments, check_args  # noqa: F401 - the same --layer default as fit

HELP = "sharded extraction + data-parallel fit (run under accelerate launch / torchrun)"
SMOKE = {"limit": 8, "epochs": 2, "max_length": 64}
DTYPES = ("auto", "bfloat16", "float16", "float32")


def _library():
    """The distributed pieces: the process group, the shards and the one fitting core."""
    from ..fitting.fit import fit_heads_distributed
    from ..fitting.process_group import DistEnv
    from ..trajectories.shards import clear_shards, extract_to_shards

    return DistEnv, clear_shards, extract_to_shards, fit_heads_distributed


def add_arguments(p) -> None:
    _model.add_model_args(p)
    p.add_argument("--device-map", default=None,
                   help='e.g. "auto" (one process per node) to spread the model (default: one device per process)')
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="model dtype (states are stored float32; default: as the model loads)")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU even where CUDA is available")
    p.add_argument("--data", help="corpus: file, folder/glob of files (a sharded corpus) or hub dataset id (streamed; "
                                  "default: none, fit the --shards as they are)")
    p.add_argument("--shards", default=None,
                   help="trajectory shard folder: written by the extraction (default OUT/trajectories), or fitted "
                        "directly when --data is not given (default: OUT/trajectories)")
    p.add_argument("--shard-size", type=positive_int, default=256, help="documents per trajectory shard")
    p.add_argument("--mode", choices=("exact", "stream"), default="exact",
                   help="exact: equals the single-process fit; stream: one shard in memory at a time")
    add_fit_arguments(p, fit_batch_size_help="global batch size (all processes together; default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder for the heads (written by rank 0; new or empty, "
                                                 "else --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is not empty")
    p.add_argument("--json", action="store_true", help="print the fit summary as one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def interrupted(args) -> str:
    return (f"hf-sde fit-distributed: interrupted (Ctrl-C); --out {args.out} was not written (the unfinished "
            f"work in {partial_path(args.out)} is cleared by the next run).")


def _extract(args, env, shard_dir: str, clear_shards, extract_to_shards) -> tuple[dict, str | None]:
    import torch

    device = args.device
    if device is None and args.device_map is None and torch.cuda.is_available() and not args.cpu:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    dtype = None if args.dtype is None else (args.dtype if args.dtype == "auto" else getattr(torch, args.dtype))
    args.device = device
    model, tokenizer = _model.load_model_from_args(args, device_map=args.device_map, dtype=dtype)
    source, model_type = getattr(model, "hf_sde_source", {}), model.config.model_type
    if env.is_main:
        clear_shards(shard_dir)
    env.barrier()
    extract_to_shards(model, tokenizer, args.data, shard_dir, args.layer, shard_size=args.shard_size,
                      max_length=args.max_length, batch_size=args.batch_size, template=args.template,
                      text_column=args.text_column, limit=args.limit, progress=not args.quiet)
    del model
    env.barrier()
    return source, model_type


def _report(args, summary: dict, env, shard_dir: str) -> None:
    if args.json:
        print(json.dumps(summary))
        return
    nll = summary["heldout_nll"]
    print(f"Fitted SDE heads with {env.world_size} process(es) ({args.mode}) on "
          f"{summary['num_train_sequences'] + summary['num_heldout_sequences']} sequences from {shard_dir}; "
          f"saved to {args.out}")
    for k in ("neural", "ou", "brownian"):
        print(f"  {k:9s} {nll[k]:.4f}")


def run(args) -> int:
    DistEnv, clear_shards, extract_to_shards, fit_heads_distributed = _library()
    if not args.data and not args.shards:
        raise SystemExit("hf-sde fit-distributed needs --data (extract, then fit) or --shards DIR (fit only).")
    check_args(args)  # main() already did; again for callers of run() with parsed arguments
    check_output_dir(args.out, args.overwrite)  # every rank, before any work
    with DistEnv.init(cpu=True if args.cpu else None) as env:  # destroys the group even on error
        return _run(args, env, clear_shards, extract_to_shards, fit_heads_distributed)


def _run(args, env, clear_shards, extract_to_shards, fit_heads_distributed) -> int:
    if env.is_main:
        partial_dir(args.out)
    env.barrier()
    tmp = partial_path(args.out)
    shard_dir = args.shards or str(tmp / "trajectories")
    source, model_type = ({}, None)
    if args.data:
        source, model_type = _extract(args, env, shard_dir, clear_shards, extract_to_shards)
    data_desc = {"corpus": os.path.basename(args.data.rstrip("/")) if args.data else shard_dir,
                 "template": args.template, "max_length": args.max_length}
    result = fit_heads_distributed(
        shard_dir, mode=args.mode, proj_dim=args.proj_dim, epochs=args.epochs, width=args.width, depth=args.depth,
        lr=args.lr, batch_size=args.fit_batch_size, heldout_fraction=args.heldout_fraction, seed=args.seed,
        patience=args.patience, progress=not args.quiet, base_model=source.get("name_or_path"),
        base_model_revision=source.get("revision"), gguf_file=source.get("gguf_file"), model_type=model_type,
        data_description=data_desc, env=env, compile=args.compile, matmul_precision=args.matmul_precision,
        bf16=args.bf16,
    )
    summary = result.summary()
    final_shards = shard_dir if args.shards else os.path.join(args.out, "trajectories")
    summary.update(out=args.out, processes=env.world_size, mode=args.mode, shards=final_shards)
    if env.is_main:
        result.heads.save_pretrained(tmp)
        with open(tmp / "fit_history.json", "w") as f:
            json.dump({"history": result.history, "summary": summary}, f, indent=2)
        publish(tmp, args.out)
        _report(args, summary, env, final_shards)
    env.barrier()
    return 0
