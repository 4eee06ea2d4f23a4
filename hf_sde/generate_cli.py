"""``hf-sde generate``: controlled generation from the command line, with a per-token table."""

from __future__ import annotations

import argparse
import json
import math

import torch

from .control import MODES, SDEControl, SDETrace, sde_generate


def token_table(tokenizer, new_tokens: list[int], trace: SDETrace, row: int = 0) -> list[dict]:
    """One dict per generated token: text, diffusion z, temperature, steer norm, surprise."""
    rows = []
    for k, tok in enumerate(new_tokens):
        z = float(trace.zscore[row, k])
        if math.isnan(z):
            break
        rows.append({
            "step": k, "token": tokenizer.convert_ids_to_tokens(int(tok)), "diffusion": float(trace.diffusion[row, k]),
            "zscore": z, "temperature": float(trace.temperature[row, k]), "steer_norm": float(trace.steer_norm[row, k]),
            "surprise": float(trace.surprise[row, k]),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'step':>4} {'token':<14} {'diff z':>7} {'temp':>6} {'steer':>7} {'surprise':>8}"]
    for r in rows:
        lines.append(f"{r['step']:>4} {r['token'][:14]:<14} {r['zscore']:>7.2f} {r['temperature']:>6.2f} "
                     f"{r['steer_norm']:>7.3f} {r['surprise']:>8.2f}")
    return "\n".join(lines)


def _json_safe(obj):
    """NaN / inf (e.g. the last step's surprise) as JSON null: ``json.dumps`` would write bare ``NaN``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def run_generation(model, tokenizer, prompt: str, control: SDEControl, *, max_new_tokens: int,
                   do_sample: bool, seed: int, top_p: float | None = None, top_k: int | None = None):
    """Generate once; ``mode="observe"`` gives the plain tokens (bit-identical) with the trace."""
    enc = tokenizer([prompt], return_tensors="pt").to(next(model.parameters()).device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, return_dict_in_generate=True,
                  pad_token_id=tokenizer.pad_token_id)
    if do_sample:
        kwargs["top_k"] = top_k if top_k is not None else 0
        if top_p is not None:
            kwargs["top_p"] = top_p
    torch.manual_seed(seed)
    out = sde_generate(model, **enc, sde_control=control, **kwargs)
    new = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
    text = tokenizer.decode(out.sequences[0], skip_special_tokens=True)
    return text, token_table(tokenizer, new, out.sde_trace)


def _generate(args) -> int:
    from .cli import DEFAULT_MODEL, load_model_from_args
    from .heads import SDEHeads

    heads = SDEHeads.from_pretrained(args.heads)
    cfg = heads.config
    # No model given: use the one the heads were fitted on (another GGUF file of the default repo included).
    if args.model == DEFAULT_MODEL and args.gguf_file is None and args.revision is None and cfg.base_model:
        args.model, args.gguf_file, args.revision = cfg.base_model, cfg.gguf_file, cfg.base_model_revision
    model, tokenizer = load_model_from_args(args)
    control = SDEControl(heads, mode=args.mode, beta=args.beta, temperature=args.temperature,
                         min_temperature=args.min_temperature, max_temperature=args.max_temperature,
                         alpha=args.alpha, direction=args.direction, gate=args.gate,
                         gate_threshold=args.gate_threshold)
    common = dict(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, seed=args.seed, top_p=args.top_p)
    text, rows = run_generation(model, tokenizer, args.prompt, control, **common)
    result = {"prompt": args.prompt, "mode": args.mode, "text": text, "tokens": rows}
    if args.compare:
        plain_text, plain_rows = run_generation(model, tokenizer, args.prompt, SDEControl(heads, mode="observe"),
                                                **common)
        result["plain"] = {"text": plain_text, "tokens": plain_rows}
    if args.json:
        print(json.dumps(_json_safe(result), allow_nan=False))
        return 0
    print(f"=== SDE-controlled ({args.mode}) ===\n{text}\n")
    print(format_table(rows))
    if args.compare:
        print(f"\n=== plain (same seed, trace observed only) ===\n{result['plain']['text']}\n")
        print(format_table(result["plain"]["tokens"]))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from .cli import add_model_args

    p = sub.add_parser("generate", help="generate with SDE control and print per-token statistics")
    add_model_args(p)
    p.add_argument("--heads", required=True, help="heads folder or hub repo id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--mode", choices=MODES, default="temperature")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0, help="base temperature tau_0")
    p.add_argument("--min-temperature", type=float, default=0.3)
    p.add_argument("--max-temperature", type=float, default=1.5)
    p.add_argument("--alpha", type=float, default=0.0, help="steering strength")
    p.add_argument("--direction", choices=("drift", "attractor"), default="drift")
    p.add_argument("--gate", choices=("always", "threshold", "sigmoid"), default="always")
    p.add_argument("--gate-threshold", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", action="store_true", help="also run plain generation with the same seed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_generate)
