"""Streaming with live per-token SDE statistics (TextIteratorStreamer + SDEControl callback).

    python examples/streaming.py --heads heads/helpsteer
"""

import argparse
import queue
import threading

import _offline
import torch
from transformers import TextIteratorStreamer

import hf_sde


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--heads", required=True)
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    model, tok = hf_sde.load_model(**_offline.MODEL)
    hf_sde.enable_sde_control(model)
    stats: queue.Queue = queue.Queue()
    ctl = hf_sde.SDEControl(hf_sde.SDEHeads.from_pretrained(args.heads), mode="temperature",
                            callback=lambda step: stats.put((step.index, float(step.zscore[0]),
                                                             float(step.temperature[0]))))
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    enc = tok([args.prompt], return_tensors="pt")
    torch.manual_seed(0)
    thread = threading.Thread(target=model.generate, kwargs=dict(**enc, do_sample=True, streamer=streamer,
                                                                 max_new_tokens=args.max_new_tokens, sde_control=ctl))
    thread.start()
    print(args.prompt, end="", flush=True)
    n = 0
    for piece in streamer:
        while not stats.empty():
            k, z, tau = stats.get()
            n += 1
            print(f"\x1b[2m[z={z:+.1f} T={tau:.2f}]\x1b[0m", end="")
        print(piece, end="", flush=True)
    thread.join()
    print(f"\n{n + stats.qsize()} steps streamed with live statistics.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
