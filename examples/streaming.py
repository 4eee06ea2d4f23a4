"""Streaming with live per-token SDE statistics (TextIteratorStreamer + an SDEControl callback), in any mode.

    python examples/streaming.py [--heads FOLDER_OR_REPO_ID] [--mode temperature] [--prompt "..."] [--model HUB_ID]

Default: SmolLM2-135M-Instruct with the shipped heads, a chat prompt, SDE temperature control. Before each piece
of text it prints the step's diffusion z, temperature and (when steering) steer norm.
"""

import argparse
import queue
import threading

import _helpers
import torch
from transformers import TextIteratorStreamer

import hf_sde

MODES = {
    "observe": dict(mode="observe"),
    "temperature": dict(mode="temperature", beta=1.0),
    "steer": dict(mode="steer", alpha=0.1, direction="drift"),
    "temperature+steer": dict(mode="temperature+steer", beta=1.0, alpha=0.05),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _helpers.add_model_arguments(p, default_from_heads=True)
    _helpers.add_heads_argument(p)
    p.add_argument("--mode", choices=sorted(MODES), default="temperature")
    p.add_argument("--prompt", default=_helpers.CHAT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = _helpers.parse(p, argv)

    heads, model, tok = _helpers.setup(args)
    hf_sde.enable_sde_control(model)
    stats: queue.Queue = queue.Queue()
    ctl = hf_sde.SDEControl(heads, **MODES[args.mode],
                            callback=lambda step: stats.put((step.index, float(step.zscore[0]),
                                                             float(step.temperature[0]), float(step.steer_norm[0]))))
    chat = _helpers.use_chat(args.chat, tok, heads)
    enc = _helpers.encode(tok, [args.prompt], chat)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(args.seed)
    thread = threading.Thread(target=model.generate, kwargs=dict(**enc, do_sample=True, streamer=streamer,
                                                                 max_new_tokens=args.max_new_tokens, sde_control=ctl,
                                                                 pad_token_id=tok.pad_token_id))
    thread.start()
    print(f"mode {args.mode}; prompt ({'chat' if chat else 'plain text'}): {args.prompt}")
    if not chat:
        print(args.prompt, end="", flush=True)
    n = 0
    steering = "steer" in args.mode
    for piece in streamer:
        while not stats.empty():
            k, z, tau, steer = stats.get()
            n += 1
            extra = f" |s|={steer:.2f}" if steering else ""
            print(f"\x1b[2m[z={z:+.1f} T={tau:.2f}{extra}]\x1b[0m", end="")
        print(piece, end="", flush=True)
    thread.join()
    print(f"\n{n + stats.qsize()} steps streamed with live statistics.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
