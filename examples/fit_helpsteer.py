"""Fit SDE heads on HelpSteer responses, save them, and push them to the Hub.

    python examples/fit_helpsteer.py --out heads/helpsteer [--limit 500] [--epochs 60] [--push user/stories260k-sde]

Pushing needs a Hugging Face token (`hf auth login`) and the network; without them it says so and stops.
"""

import argparse
import os

import _offline

import hf_sde


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=_offline.HELPSTEER)
    p.add_argument("--out", default="heads/helpsteer")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--push", default=None, metavar="REPO_ID")
    args = p.parse_args(argv)

    model, tok = hf_sde.load_model(**_offline.MODEL)
    traj = hf_sde.extract_trajectories(model, tok, args.data, layer=-1, template="helpsteer-response",
                                       max_length=args.max_length, limit=args.limit)
    result = hf_sde.fit_heads(traj, proj_dim=16, epochs=args.epochs, base_model=_offline.MODEL["name_or_path"],
                              base_model_revision=_offline.MODEL["revision"], gguf_file=_offline.MODEL["gguf_file"],
                              model_type=model.config.model_type,
                              data_description={"corpus": os.path.basename(args.data), "template": "helpsteer-response"})
    print("Held-out transition NLL (nats/dim):", {k: round(v, 4) for k, v in result.heldout_nll.items()})
    result.heads.save_pretrained(args.out)
    print(f"Saved to {args.out}: {sorted(os.listdir(args.out))}")
    if args.push:
        from huggingface_hub import get_token

        if os.environ.get("HF_HUB_OFFLINE", "0") in ("1", "true", "True") or get_token() is None:
            print(f"Not pushing to {args.push}: pushing needs a Hugging Face token (`hf auth login`) and the network "
                  "(HF_HUB_OFFLINE is set or no token was found).")
            return 1
        result.heads.push_to_hub(args.push)
        print(f"Pushed to https://huggingface.co/{args.push}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
