"""Controlled generation in every mode: observe, temperature (cool / heat where noisy), steer (drift, attractor,
gated), temperature+steer, on a batch of chat prompts with the same seed.

    python examples/controlled_generation.py [--heads FOLDER_OR_REPO_ID] [--max-new-tokens 32]
        [--prompt "..." "..."] [--model HUB_ID]

Default: SmolLM2-135M-Instruct with the shipped heads (hf_sde.pretrained.DEFAULT_HEADS).
"""

import argparse

import _helpers
import torch

import hf_sde

SETTINGS = {
    "observe": dict(mode="observe"),
    "temperature beta=+1 (cool where noisy)": dict(mode="temperature", beta=1.0),
    "temperature beta=-1 (heat where noisy)": dict(mode="temperature", beta=-1.0),
    "steer along the drift, alpha=0.1": dict(mode="steer", alpha=0.1, direction="drift"),
    "steer to the attractor, sigmoid gate": dict(mode="steer", alpha=0.2, direction="attractor", gate="sigmoid"),
    "temperature+steer": dict(mode="temperature+steer", beta=1.0, alpha=0.05),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _helpers.add_model_arguments(p, default_from_heads=True)
    _helpers.add_heads_argument(p)
    p.add_argument("--prompt", nargs="+", default=[_helpers.CHAT_PROMPT, "Write a haiku about the sea."])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = _helpers.parse(p, argv)

    heads, model, tok = _helpers.setup(args)
    chat = _helpers.use_chat(args.chat, tok, heads)
    enc = _helpers.encode(tok, args.prompt, chat)
    n_prompt = enc["input_ids"].shape[1]
    for row, prompt in enumerate(args.prompt):
        print(f"Prompt [{row}] ({'chat' if chat else 'plain text'}): {prompt}")

    hf_sde.enable_sde_control(model)
    for name, kw in SETTINGS.items():
        ctl = hf_sde.SDEControl(heads, **kw)
        torch.manual_seed(args.seed)
        out = model.generate(**enc, do_sample=True, top_p=0.95, max_new_tokens=args.max_new_tokens, sde_control=ctl,
                             pad_token_id=tok.pad_token_id, return_dict_in_generate=True)
        tr = out.sde_trace
        print(f"\n=== {name} ===")
        texts = tok.batch_decode(out.sequences[:, n_prompt:] if chat else out.sequences, skip_special_tokens=True)
        for row, text in enumerate(texts):
            print(f"[{row}] " + " ".join(text.split()))
        print(f"mean temperature {tr.temperature.nanmean():.3f}, mean |steer| {tr.steer_norm.nanmean():.3f}, "
              f"mean diffusion z {tr.zscore.nanmean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
