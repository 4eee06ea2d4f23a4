"""``hf-sde push``: upload a saved heads folder to the Hub."""

from __future__ import annotations

import os

HELP = "upload a saved heads folder to the Hub"


def add_arguments(p) -> None:
    p.add_argument("folder", help="a saved heads folder (what hf-sde fit --out wrote)")
    p.add_argument("repo_id", help="the Hub model repo to upload to, e.g. user/my-heads (created if missing)")
    p.add_argument("--token", default=None,
                   help="Hugging Face token (default: HF_TOKEN or the one `hf auth login` stored)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--message", default="Upload SDE heads with hf-sde", help="commit message")


def interrupted(args) -> str:
    return (f"hf-sde push: interrupted (Ctrl-C); {args.repo_id} holds either its earlier files or this whole upload "
            "(the Hub commits all files at once): run the same command again to be sure.")


def run(args) -> int:
    from huggingface_hub import HfApi, get_token

    from ..fitting.heads import SDEHeads

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
