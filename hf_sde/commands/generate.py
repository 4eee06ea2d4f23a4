"""``hf-sde generate``: generate with SDE control and print per-token statistics."""

from __future__ import annotations

import argparse

from . import _model
from ._args import finite_float, nonnegative_int, positive_float, positive_int, probability
from ._output import print_json

HELP = "generate with SDE control and print per-token statistics"
SMOKE = {"max_new_tokens": 8}


def add_arguments(p) -> None:
    from ..control import MODES

    _model.add_model_args(p, from_heads=True)
    p.add_argument("--heads", default=None,
                   help="heads folder or hub repo id (default: the heads shipped with hf-sde, "
                        "hf_sde.pretrained.DEFAULT_HEADS)")
    p.add_argument("--prompt", required=True, help="the prompt to continue (the user turn with --chat)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="format the prompt with the tokenizer's chat template (default: on when the tokenizer "
                        "has one and the heads model response paths, time_origin 'prompt_end')")
    p.add_argument("--mode", choices=MODES, default="temperature",
                   help="what the heads control: the sampling temperature, steering of the hidden state, both, or "
                        "nothing (observe: plain sampling with the per-token statistics)")
    p.add_argument("--beta", type=finite_float, default=1.0,
                   help="temperature sensitivity: tau = clip(tau_0 exp(-beta z), min, max) of the diffusion z-score; "
                        "0 is plain sampling")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="base temperature tau_0 (> 0)")
    p.add_argument("--min-temperature", type=positive_float, default=0.3, help="lowest temperature the law may set")
    p.add_argument("--max-temperature", type=positive_float, default=1.5, help="highest temperature the law may set")
    p.add_argument("--alpha", type=finite_float, default=0.0, help="steering strength (modes steer, temperature+steer)")
    p.add_argument("--direction", choices=("drift", "attractor"), default="drift",
                   help="steer along the drift or towards the attractor")
    p.add_argument("--gate", choices=("always", "threshold", "sigmoid"), default="always",
                   help="when to steer: always, where z > --gate-threshold, or smoothly around it")
    p.add_argument("--gate-threshold", type=finite_float, default=1.0, help="diffusion z-score of the steering gate")
    p.add_argument("--top-p", type=probability, default=None,
                   help="nucleus sampling: keep the smallest set of tokens with this probability, in (0, 1] "
                        "(default: off, every token)")
    p.add_argument("--max-new-tokens", type=positive_int, default=48, help="tokens to generate at most")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="sampling seed (the same for --compare)")
    p.add_argument("--compare", action="store_true", help="also run plain generation with the same seed")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")


def check_args(args) -> None:
    if args.min_temperature > args.max_temperature:
        raise ValueError(f"--min-temperature {args.min_temperature:g} is above --max-temperature "
                         f"{args.max_temperature:g}; give min <= max.")


def default_heads() -> str:
    """The shipped heads (``hf_sde.pretrained.DEFAULT_HEADS``), looked up only when ``--heads`` is omitted."""
    try:
        from ..pretrained import DEFAULT_HEADS
    except ImportError:
        raise SystemExit("hf-sde generate: no --heads given and this hf-sde ships no default heads "
                         "(hf_sde.pretrained.DEFAULT_HEADS); pass --heads FOLDER_OR_REPO "
                         "(fit some with `hf-sde fit`).") from None
    return str(DEFAULT_HEADS)


def use_chat(requested: bool | None, tokenizer, heads_config) -> bool:
    """``--chat`` / ``--no-chat``, else on when the tokenizer has a template and the heads model responses."""
    if requested is not None:
        return requested
    return bool(getattr(tokenizer, "chat_template", None)) and getattr(heads_config, "time_origin", None) == "prompt_end"


def run(args) -> int:
    from ..analysis.generate_table import format_table, run_generation
    from ..control import SDEControl
    from ..fitting.heads import SDEHeads

    heads = SDEHeads.from_pretrained(args.heads or default_heads())
    model, tokenizer = _model.load_model_from_args(args, heads.config)
    control = SDEControl(heads, mode=args.mode, beta=args.beta, temperature=args.temperature,
                         min_temperature=args.min_temperature, max_temperature=args.max_temperature,
                         alpha=args.alpha, direction=args.direction, gate=args.gate,
                         gate_threshold=args.gate_threshold)
    common = dict(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, seed=args.seed, top_p=args.top_p,
                  chat=use_chat(args.chat, tokenizer, heads.config))
    text, rows = run_generation(model, tokenizer, args.prompt, control, **common)
    result = {"prompt": args.prompt, "mode": args.mode, "chat": common["chat"], "text": text, "tokens": rows}
    if args.compare:
        plain_text, plain_rows = run_generation(model, tokenizer, args.prompt, SDEControl(heads, mode="observe"),
                                                **common)
        result["plain"] = {"text": plain_text, "tokens": plain_rows}
    if args.json:
        print_json(result)
        return 0
    print(f"=== SDE-controlled ({args.mode}) ===\n{text}\n")
    print(format_table(rows))
    if args.compare:
        print(f"\n=== plain (same seed, trace observed only) ===\n{result['plain']['text']}\n")
        print(format_table(result["plain"]["tokens"]))
    return 0
