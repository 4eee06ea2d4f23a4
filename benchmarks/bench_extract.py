"""Extraction throughput: ``extract_from_ids`` / ``extract_trajectories`` versus a plain batched forward.

The baseline does exactly the forward passes extraction does (same corpus, same length-sorted batches,
same right padding, ``use_cache=False``) and throws the output away; extraction adds the block hook, the
copy of each row's states and the finiteness check. Throughput is real (unpadded) tokens per second;
the figure is the per-round ratio extraction / plain (interleaved rounds), target >= 0.97.

    python benchmarks/bench_extract.py [--smoke | --full]
"""

from __future__ import annotations

import argparse
import functools

import _common as C

SETTINGS = {
    "smoke": {"cells": [("stories260K", "tinystories", 2, 32)], "batch_size": 8, "reps": (1, 1, 0)},
    # SmolLM2 (the target's row): HelpSteer responses at the last layer and at the shipped heads' layer 22.
    "default": {"cells": [("stories260K", "helpsteer", 500, 256), ("stories260K", "tinystories", 5, 512),
                          ("gpt2-124M", "random", 24, 128), ("SmolLM2", "helpsteer", 32, 256)],
                "batch_size": 8, "reps": (6, 20, 90), "reps_big": (4, 6, 150)},
    "full": {"cells": [("stories260K", "helpsteer", 500, 256), ("stories260K", "tinystories", 5, 512),
                       ("gpt2-124M", "random", 64, 256), ("SmolLM2", "helpsteer", 128, 256)],
             "batch_size": 8, "reps": (5, 20, 120), "reps_big": (3, 6, 400)},
}
# Layers extracted besides the last one (each an extra variant of the cell).
EXTRA_LAYERS = {"SmolLM2": [22]}
TARGET = 0.97  # target: extraction >= 0.97 of a plain batched forward


def plain_forward(model, token_ids, batch_size):
    """The forward passes ``extract_from_ids`` makes, with nothing captured (``model`` may also be the
    decoder without its LM head, ``model.base_model``: what an extraction that skips the head would cost)."""
    import torch

    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            lengths = [len(token_ids[i]) for i in idx]
            width = max(lengths)
            input_ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                input_ids[r, : lengths[r]] = torch.tensor(token_ids[i])
                mask[r, : lengths[r]] = 1
            model(input_ids=input_ids, attention_mask=mask, use_cache=False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    args = p.parse_args(argv)
    C.setup_env(args.threads)
    import hf_sde

    scale = C.scale_of(args)
    cfg = SETTINGS[scale]
    run = C.Run("bench_extract", args, cfg)
    results, rows = {}, []
    model = tok = None
    current = None
    for name, corpus, n, max_length in cfg["cells"]:
        if current != name:
            model = None
            if name == "stories260K":
                model, tok = C.load_stories()
            elif name == "SmolLM2":
                model, tok = C.load_smollm2()
            else:
                model = C.build_gpt2(name.split("-", 1)[1], args.seed)
            current = name
        if corpus == "helpsteer":
            ids, _ = C.helpsteer_ids(tok, max_length, limit=n)
            texts = None
        elif corpus == "tinystories":
            texts = C.tinystories_texts()[:n]
            ids = hf_sde.trajectories.extract.tokenize_texts(tok, texts, max_length)
        else:
            import torch

            texts = None
            g = torch.Generator().manual_seed(args.seed)
            lengths = torch.randint(max_length // 4, max_length + 1, (n,), generator=g).tolist()
            ids = [x[:L] for x, L in zip(C.random_ids(n, max_length, model.config.vocab_size, args.seed), lengths,
                                         strict=True)]
        tokens = sum(len(x) for x in ids)
        bs = cfg["batch_size"]
        fns = {
            "plain_forward": functools.partial(plain_forward, model, ids, bs),
            "extract_from_ids": functools.partial(hf_sde.extract_from_ids, model, ids, -1, batch_size=bs,
                                                  progress=False),
        }
        # Not a baseline but the headroom: the same forwards without the LM head (extraction needs only the
        # block output; for GPT-2 the 768 x 50257 head is over a third of the forward).
        fns["decoder_only_forward"] = functools.partial(plain_forward, model.base_model, ids, bs)
        for layer in EXTRA_LAYERS.get(name, []):
            fns[f"extract_from_ids (layer {layer})"] = functools.partial(hf_sde.extract_from_ids, model, ids, layer,
                                                                        batch_size=bs, progress=False)
        if texts is not None:  # the text entry point: tokenization included
            fns["extract_trajectories"] = functools.partial(hf_sde.extract_trajectories, model, tok, texts, -1,
                                                            max_length=max_length, batch_size=bs, progress=False)
        reps = cfg.get("reps_big", cfg["reps"]) if name in ("gpt2-124M", "SmolLM2") else cfg["reps"]
        times, rounds = C.interleaved(fns, min_reps=reps[0], max_reps=reps[1], budget_s=reps[2], seed=args.seed)
        ratios = C.paired_ratios(times, "plain_forward")
        cell = {"sequences": len(ids), "tokens": tokens, "rounds": rounds, "times": times, "throughput": {}}
        for k in fns:
            tput = [tokens / t for t in times[k]]
            rel = [1 / r for r in [a / b for a, b in zip(times[k], times["plain_forward"], strict=True)]]
            cell["throughput"][k] = {"tokens_per_s": C.summarize(tput), "ratio_vs_plain": C.summarize(rel)}
            q = cell["throughput"][k]["ratio_vs_plain"]
            met = "-" if k in ("plain_forward", "decoder_only_forward") else ("yes" if q["median"] >= TARGET else "no")
            rows.append([name, corpus, str(len(ids)), str(tokens), k, f"{cell['throughput'][k]['tokens_per_s']['median']:.0f}",
                         q["median"], f"{q['q25']:.3f}–{q['q75']:.3f}", str(rounds), met])
        cell["ratios"] = ratios
        results[f"{name}/{corpus}"] = cell
    body = (f"Batch size {cfg['batch_size']}, layer -1, length-sorted batches with right padding. "
            "Throughput ratio = (tokens/s of the variant) / (tokens/s of the plain forward) per interleaved "
            f"round; target >= {TARGET}. `extract_trajectories` includes tokenization of the texts. "
            "`decoder_only_forward` (no LM head) is not a baseline but the headroom an extraction that skips "
            "the head (or stops after the hooked block) would have.\n\n"
            + C.md_table(["model", "corpus", "seqs", "tokens", "variant", "tokens/s (median)", "ratio vs plain",
                          "IQR", "rounds", f">= {TARGET}"], rows))
    run.finish(results, body)
    print(body)
    return results


if __name__ == "__main__":
    main()
