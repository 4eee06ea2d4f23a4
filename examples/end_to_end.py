"""The main job: SmolLM2-135M-Instruct with the shipped SDE heads, a chat prompt answered twice with the same seed
(plain sampling, observed; SDE temperature control), and per-token diffusion for both. No fitting step.

    python examples/end_to_end.py [--prompt "..."] [--max-new-tokens 48] [--beta 1.0] [--seed 0]
        [--heads FOLDER_OR_REPO_ID] [--model HUB_ID]

The heads (hf_sde.pretrained.DEFAULT_HEADS) were fitted on HelpSteer responses to chat prompts; fit your own
with examples/fit_helpsteer.py. `diff z` is the diffusion z-score of each step (how locally noisy the
hidden-state path is against the fit's calibration), `temp` the sampling temperature the control used.
"""

import argparse

import _helpers
import torch

import hf_sde
from hf_sde.analysis.generate_table import format_table, token_table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _helpers.add_model_arguments(p)
    _helpers.add_heads_argument(p)
    p.add_argument("--prompt", default=_helpers.CHAT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--beta", type=float, default=1.0, help="temperature law tau = exp(-beta * z), clipped")
    p.add_argument("--seed", type=int, default=0)
    args = _helpers.parse(p, argv)

    heads, where = _helpers.load_heads(args.heads)
    model, tok = _helpers.load_model(_helpers.model_spec(args))
    heads.check_compatible(model)
    print(_helpers.describe_heads(heads, where))

    chat = _helpers.use_chat(args.chat, tok, heads)
    enc = _helpers.encode(tok, [args.prompt], chat)
    n_prompt = enc["input_ids"].shape[1]
    print(f"Prompt ({'chat template, user turn' if chat else 'plain text'}): {args.prompt}")

    hf_sde.enable_sde_control(model)
    runs = {
        "plain sampling (observed)": hf_sde.SDEControl(heads, mode="observe"),
        f"SDE temperature control (beta={args.beta})": hf_sde.SDEControl(heads, mode="temperature", beta=args.beta),
    }
    for name, ctl in runs.items():
        torch.manual_seed(args.seed)  # same seed: the two answers differ only through the control
        out = model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=args.max_new_tokens, sde_control=ctl,
                             pad_token_id=tok.pad_token_id, return_dict_in_generate=True)
        new = out.sequences[0, n_prompt:].tolist()
        print(f"\n=== {name} ===")
        # Chat: the answer alone (the template's markup is not the user's text); plain text: prompt + continuation.
        print(tok.decode(new if chat else out.sequences[0], skip_special_tokens=True).strip())
        print(format_table(token_table(tok, new, out.sde_trace)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
