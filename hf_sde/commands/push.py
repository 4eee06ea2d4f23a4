"""``hf-sde push``: upload a saved heads folder to the Hub."""

from __future__ import annotations

import os

HELP = "upload a saved heads folder to the Hub"


def add_arguments(p) -> None:
    p.add_argument("folder")
    p.add_argument("repo_id")
    p.add_argument("--token", default=None)
    p.add_argument("--private", action="store_true")
    p.add_argument("--message", default="Upload SDE heads with hf-sde")


def run(args) -> int:
    from huggingface_hub import HfApi, get_token

    from ..heads import SDEHeads

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
