"""Controlled generation with a per-token table (what ``hf-sde generate`` prints; also used by examples)."""

from __future__ import annotations

import math

import torch

from ..control import SDEControl, SDETrace, sde_generate
from .tokens import token_pieces


def token_table(tokenizer, new_tokens: list[int], trace: SDETrace, row: int = 0) -> list[dict]:
    """One dict per generated token: its display text, diffusion z, temperature, steer norm, surprise."""
    rows = []
    pieces = token_pieces(tokenizer, [int(t) for t in new_tokens])
    for k, tok in enumerate(new_tokens):
        z = float(trace.zscore[row, k])
        if math.isnan(z):
            break
        rows.append({
            "step": k, "token": pieces[k], "token_id": int(tok), "diffusion": float(trace.diffusion[row, k]),
            "zscore": z, "temperature": float(trace.temperature[row, k]), "steer_norm": float(trace.steer_norm[row, k]),
            "surprise": float(trace.surprise[row, k]),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'step':>4} {'token':<14} {'diff z':>7} {'temp':>6} {'steer':>7} {'surprise':>8}"]
    for r in rows:
        text = repr(r["token"])[1:-1]  # newlines and tabs visible, one line per token
        lines.append(f"{r['step']:>4} {text[:14]:<14} {r['zscore']:>7.2f} {r['temperature']:>6.2f} "
                     f"{r['steer_norm']:>7.3f} {r['surprise']:>8.2f}")
    return "\n".join(lines)


def format_prompt(tokenizer, prompt: str, chat: bool) -> str:
    """``prompt`` as the user turn of the tokenizer's chat template (with the assistant cue) when ``chat``."""
    if not chat:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat needs a tokenizer with a chat template; this one has none (use --no-chat).")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def run_generation(model, tokenizer, prompt: str, control: SDEControl, *, max_new_tokens: int,
                   do_sample: bool, seed: int, top_p: float | None = None, top_k: int | None = None,
                   chat: bool = False):
    """Generate once; ``mode="observe"`` gives the plain tokens (bit-identical) with the trace.

    ``chat``: format ``prompt`` with the tokenizer's chat template (the template adds the special tokens).
    """
    text = format_prompt(tokenizer, prompt, chat)
    enc = tokenizer([text], return_tensors="pt", add_special_tokens=not chat).to(next(model.parameters()).device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, return_dict_in_generate=True,
                  pad_token_id=tokenizer.pad_token_id)
    if do_sample:
        kwargs["top_k"] = top_k if top_k is not None else 0
        if top_p is not None:
            kwargs["top_p"] = top_p
    torch.manual_seed(seed)
    out = sde_generate(model, **enc, sde_control=control, **kwargs)
    n_prompt = enc["input_ids"].shape[1]
    new = out.sequences[0, n_prompt:].tolist()
    # Chat: the answer alone (the template's markup is not the user's text); plain: prompt + continuation.
    text = tokenizer.decode(out.sequences[0, n_prompt:] if chat else out.sequences[0], skip_special_tokens=True)
    return text, token_table(tokenizer, new, out.sde_trace)
