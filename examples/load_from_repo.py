"""Load heads by hub repo id (through the hub cache; offline when it is cached) and generate with them.

    python examples/load_from_repo.py [REPO_ID] [--revision REV] [--model HUB_ID] [--prompt "..."]

REPO_ID defaults to the shipped heads' repo id (hf_sde.pretrained.SMOLLM2_HEADS_REPO_ID), which
`hf-sde push` creates from hf_sde/pretrained/smollm2-135m-instruct-helpsteer. The model defaults to the one the
heads were fitted on (their config's base_model, GGUF file and revision).
"""

import argparse
import os

import _helpers
import torch

import hf_sde
from hf_sde.pretrained import SMOLLM2_HEADS, SMOLLM2_HEADS_REPO_ID


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repo_id", nargs="?", default=SMOLLM2_HEADS_REPO_ID)
    p.add_argument("--revision", default=None, help="revision of the heads repo")
    p.add_argument("--model", default=None, help="hub id or folder (default: the model the heads were fitted on)")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--model-revision", default=None)
    p.add_argument("--prompt", default=_helpers.CHAT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=20)
    args = _helpers.parse(p, argv)

    try:
        heads = hf_sde.SDEHeads.from_pretrained(args.repo_id, revision=args.revision)
    except FileNotFoundError as e:
        if args.repo_id != SMOLLM2_HEADS_REPO_ID or not os.path.isfile(os.path.join(SMOLLM2_HEADS, "config.json")):
            raise
        # Offline without a cached copy of the pushed repo: the same heads ship inside the package.
        print(f"{e}\nLoading the same heads from the package instead: {SMOLLM2_HEADS}")
        heads = hf_sde.SDEHeads.from_pretrained(SMOLLM2_HEADS)
    cfg = heads.config
    print(f"Heads for {cfg.base_model} layer {cfg.layer}, proj dim {cfg.proj_dim}, held-out NLL {cfg.heldout_nll}")
    args.revision = args.model_revision  # model_spec reads --revision as the model's
    model, tok = _helpers.load_model(_helpers.model_spec(args, heads))
    heads.check_compatible(model)
    hf_sde.enable_sde_control(model)
    chat = _helpers.use_chat(None, tok, heads)
    enc = _helpers.encode(tok, [args.prompt], chat)
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, max_new_tokens=args.max_new_tokens, return_dict_in_generate=True,
                         pad_token_id=tok.pad_token_id, sde_control=hf_sde.SDEControl(heads, mode="temperature"))
    new = out.sequences[0, enc["input_ids"].shape[1]:]
    print(tok.decode(new if chat else out.sequences[0], skip_special_tokens=True).strip())
    print("diffusion z per step:", [round(x, 2) for x in out.sde_trace.zscore[0].tolist()])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
