"""Load heads back by hub repo id (through the hub cache, offline if it is cached) and use them.

    python examples/load_from_repo.py user/stories260k-sde
"""

import argparse

import _offline
import torch

import hf_sde


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("repo_id")
    p.add_argument("--revision", default=None)
    args = p.parse_args(argv)
    heads = hf_sde.SDEHeads.from_pretrained(args.repo_id, revision=args.revision)
    cfg = heads.config
    print(f"Heads for {cfg.base_model} layer {cfg.layer}, proj dim {cfg.proj_dim}, held-out NLL {cfg.heldout_nll}")
    model, tok = hf_sde.load_model(**_offline.MODEL)
    heads.check_compatible(model)
    hf_sde.enable_sde_control(model)
    enc = tok(["Once upon a time"], return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, max_new_tokens=20, return_dict_in_generate=True,
                         sde_control=hf_sde.SDEControl(heads, mode="temperature"))
    print(tok.decode(out.sequences[0], skip_special_tokens=True))
    print("diffusion z per step:", [round(x, 2) for x in out.sde_trace.zscore[0].tolist()])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
