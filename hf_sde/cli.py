"""The ``hf-sde`` command line: fit, push, generate, analyze, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

DEFAULT_MODEL = "ggml-org/models-moved"
DEFAULT_GGUF = "tinyllamas/stories260K.gguf"
DEFAULT_REVISION = "499bc8821c6b12b4e53c5bffcb21ec206f212d81"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local folder of a causal LM")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model (e.g. tinyllamas/stories260K.gguf)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--device", default=None, help="torch device for the model (default: CPU)")


def load_model_from_args(args):
    from .loading import load_model

    gguf = args.gguf_file
    if gguf is None and args.model == DEFAULT_MODEL:
        gguf = DEFAULT_GGUF
    revision = args.revision
    if revision is None and args.model == DEFAULT_MODEL:
        revision = DEFAULT_REVISION
    return load_model(args.model, gguf_file=gguf, revision=revision, device=args.device)


def _fit(args) -> int:
    import torch

    from .corpus import load_texts
    from .fitting import fit_heads
    from .trajectories import extract_from_ids, extract_trajectories, self_generate

    model, tokenizer = load_model_from_args(args)
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
        data_desc = {"corpus": f"{args.self_generate} samples of the model from {args.prompts}",
                     "max_new_tokens": args.max_new_tokens}
    else:
        if not args.data:
            raise SystemExit("hf-sde fit needs --data PATH_OR_DATASET or --self-generate N --prompts FILE.")
        traj = extract_trajectories(model, tokenizer, args.data, args.layer, max_length=args.max_length,
                                    batch_size=args.batch_size, template=args.template,
                                    text_column=args.text_column, limit=args.limit, progress=progress)
        data_desc = {"corpus": os.path.basename(args.data.rstrip("/")), "template": args.template,
                     "max_length": args.max_length}
    data_desc["sequences"] = len(traj)
    data_desc["skipped_short_texts"] = traj.skipped
    source = getattr(model, "hf_sde_source", {})
    torch.manual_seed(args.seed)
    result = fit_heads(
        traj, proj_dim=args.proj_dim, epochs=args.epochs, width=args.width, depth=args.depth, lr=args.lr,
        batch_size=args.fit_batch_size, heldout_fraction=args.heldout_fraction, seed=args.seed,
        patience=args.patience, early_stopping=args.early_stopping, progress=progress, base_model=source.get("name_or_path"),
        base_model_revision=source.get("revision"), gguf_file=source.get("gguf_file"),
        model_type=model.config.model_type, data_description=data_desc,
    )
    os.makedirs(args.out, exist_ok=True)
    result.heads.save_pretrained(args.out)
    with open(os.path.join(args.out, "fit_history.json"), "w") as f:
        json.dump({"history": result.history, "summary": result.summary()}, f, indent=2)
    if args.save_trajectories:
        traj.save(os.path.join(args.out, "trajectories.safetensors"))
    summary = result.summary()
    summary["out"] = args.out
    if args.json:
        print(json.dumps(summary))
    else:
        nll = summary["heldout_nll"]
        print(f"Fitted SDE heads on {len(traj)} sequences ({traj.num_transitions} transitions), layer "
              f"{result.heads.config.layer}, proj dim {result.heads.config.proj_dim}; saved to {args.out}")
        print("Held-out transition NLL (nats/dim, lower is better):")
        for k in ("neural", "ou", "brownian"):
            print(f"  {k:9s} {nll[k]:.4f}")
        verdict = "beats" if summary["neural_beats_baselines"] else "does NOT beat"
        print(f"The neural SDE {verdict} both baselines.")
    return 0


def _push(args) -> int:
    from huggingface_hub import HfApi, get_token

    from .heads import SDEHeads

    heads = SDEHeads.from_pretrained(args.folder)  # validate before uploading
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise SystemExit("hf-sde push needs the network, but HF_HUB_OFFLINE is set. Unset it to upload.")
    token = args.token or get_token()
    if token is None:
        raise SystemExit("hf-sde push needs a Hugging Face token: run `hf auth login` or pass --token / set HF_TOKEN.")
    # The card's usage snippet names the repo it lives in.
    heads.generate_model_card(repo_id=args.repo_id).save(os.path.join(args.folder, "README.md"))
    api = HfApi(token=token)
    api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    info = api.upload_folder(folder_path=args.folder, repo_id=args.repo_id, commit_message=args.message,
                             ignore_patterns=["trajectories.safetensors"])
    print(f"Pushed {args.folder} to https://huggingface.co/{args.repo_id} ({info})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-sde", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="extract hidden trajectories and fit SDE heads")
    add_model_args(fit)
    fit.add_argument("--data", help="corpus: .txt/.jsonl/.json/.csv/.parquet file or hub dataset id")
    fit.add_argument("--template", default=None, help="row template, e.g. helpsteer or helpsteer-response")
    fit.add_argument("--text-column", default=None)
    fit.add_argument("--limit", type=int, default=None, help="use only the first N documents")
    fit.add_argument("--self-generate", type=int, default=0, metavar="N",
                     help="use N of the model's own samples as the corpus (needs --prompts)")
    fit.add_argument("--prompts", default=None, help="file of prompts, one per line, for --self-generate")
    fit.add_argument("--max-new-tokens", type=int, default=128)
    fit.add_argument("--layer", type=int, default=-1, help="decoder layer (negative counts from the end)")
    fit.add_argument("--proj-dim", type=int, default=16, help="PCA dimensions (0: no projection)")
    fit.add_argument("--max-length", type=int, default=256)
    fit.add_argument("--batch-size", type=int, default=8, help="extraction batch size")
    fit.add_argument("--epochs", type=int, default=60)
    fit.add_argument("--width", type=int, default=128)
    fit.add_argument("--depth", type=int, default=2)
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--fit-batch-size", type=int, default=512)
    fit.add_argument("--patience", type=int, default=10)
    fit.add_argument("--heldout-fraction", type=float, default=0.2)
    fit.add_argument("--early-stopping", choices=("auto", "sequences", "transitions"), default="auto",
                     help="watch held-back training sequences (auto: from 10 groups up) or a transition slice")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--save-trajectories", action="store_true", help="also save trajectories.safetensors")
    fit.add_argument("--out", required=True, help="output folder for the heads")
    fit.add_argument("--json", action="store_true", help="print the fit summary as one JSON object")
    fit.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    fit.set_defaults(func=_fit)

    push = sub.add_parser("push", help="upload a saved heads folder to the Hub")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--token", default=None)
    push.add_argument("--private", action="store_true")
    push.add_argument("--message", default="Upload SDE heads with hf-sde")
    push.set_defaults(func=_push)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Sub-commands that live beside the concept they expose."""
    import importlib

    for module, name in (("generate_cli", "register"), ("export", "register_cli"), ("report", "register_cli"),
                         ("demo", "register_cli"), ("distributed", "register_cli")):
        try:
            mod = importlib.import_module(f"hf_sde.{module}")
        except ModuleNotFoundError as e:
            if e.name == f"hf_sde.{module}":
                continue
            raise
        yield getattr(mod, name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"hf-sde {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
