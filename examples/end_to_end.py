"""The main job: fit SDE heads on a small corpus, generate with and without control, show per-token diffusion.

    python examples/end_to_end.py [--epochs 60] [--max-new-tokens 40] [--refit]

Heads are cached in .hf-sde-cache/tinystories-heads (delete it or pass --refit to fit again).
"""

import argparse
import os

import _offline  # noqa: F401  (sets HF_HUB_CACHE/HF_HUB_OFFLINE for the shared assets)
import torch

import hf_sde
from hf_sde.generate_cli import format_table, token_table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=_offline.TINYSTORIES)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--prompt", default="Once upon a time, there was a little dog")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--cache", default=os.path.join(_offline.REPO, ".hf-sde-cache", "tinystories-heads"))
    p.add_argument("--refit", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    model, tok = hf_sde.load_model(**_offline.MODEL)
    print(f"Model: {_offline.MODEL['name_or_path']}/{_offline.MODEL['gguf_file']} "
          f"({sum(p.numel() for p in model.parameters()):,} parameters)")

    if os.path.isfile(os.path.join(args.cache, "model.safetensors")) and not args.refit:
        heads = hf_sde.SDEHeads.from_pretrained(args.cache)
        print(f"Reusing heads from {args.cache} (pass --refit to fit again)")
    else:
        traj = hf_sde.extract_trajectories(model, tok, args.data, layer=-1, max_length=256)
        result = hf_sde.fit_heads(traj, proj_dim=16, epochs=args.epochs, base_model=_offline.MODEL["name_or_path"],
                                  base_model_revision=_offline.MODEL["revision"], gguf_file=_offline.MODEL["gguf_file"],
                                  model_type=model.config.model_type,
                                  data_description={"corpus": os.path.basename(args.data)})
        heads = result.heads
        heads.save_pretrained(args.cache)
        print("Held-out transition NLL (nats/dim):",
              ", ".join(f"{k} {v:.4f}" for k, v in result.heldout_nll.items()))
    print(f"Held-out NLL recorded with the heads: {heads.config.heldout_nll}")

    hf_sde.enable_sde_control(model)
    enc = tok([args.prompt], return_tensors="pt")
    runs = {
        "plain sampling (observed)": hf_sde.SDEControl(heads, mode="observe"),
        f"SDE temperature control (beta={args.beta})": hf_sde.SDEControl(heads, mode="temperature", beta=args.beta),
    }
    for name, ctl in runs.items():
        torch.manual_seed(args.seed)
        out = model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=args.max_new_tokens, sde_control=ctl,
                             return_dict_in_generate=True)
        new = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
        print(f"\n=== {name} ===")
        print(tok.decode(out.sequences[0], skip_special_tokens=True))
        print(format_table(token_table(tok, new, out.sde_trace)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
