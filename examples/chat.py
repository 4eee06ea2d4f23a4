"""A multi-turn chat with SDE temperature control that reuses the KV cache between turns.

    python examples/chat.py [--heads FOLDER_OR_REPO_ID] [--model HUB_ID] [--max-new-tokens 48]

Each turn passes the whole conversation so far (the previous turn's sequences plus the new user turn) together
with the previous turn's cache: only the new tokens are forwarded, and the trace is the one the same tokens
would get without a cache. Default: SmolLM2-135M-Instruct with the shipped heads and its chat template; a model
without a chat template gets the turns as plain text. Prints each reply and its per-turn trace summary.
"""

import argparse

import _helpers
import torch

import hf_sde

TURNS = [
    "Give three tips for staying healthy.",
    "Which of them matters most for sleep?",
    "Summarise your advice in one sentence.",
]
STORY_TURNS = ["Once upon a time", " Then the dog", " In the end"]


def turn_ids(tok, sequences, messages, text: str, chat: bool) -> torch.Tensor:
    """The next call's input ids: the tokens so far (what the cache holds, plus the last one) and the new turn."""
    if not chat:
        new = tok(text, add_special_tokens=sequences is None, return_tensors="pt").input_ids
        return new if sequences is None else torch.cat([sequences, new], 1)
    after = tok.apply_chat_template(messages + [{"role": "user", "content": text}], tokenize=False,
                                    add_generation_prompt=True)
    if sequences is None:
        return tok(after, add_special_tokens=False, return_tensors="pt").input_ids
    # The template's text for the conversation so far ends with the reply's end token, which the sequences end with.
    before = tok.apply_chat_template(messages, tokenize=False).rstrip()
    if not after.startswith(before):
        raise ValueError("this chat template rewrites earlier turns, so the cache cannot be reused across turns")
    new = tok(after[len(before):], add_special_tokens=False, return_tensors="pt").input_ids
    if sequences[0, -1].item() != tok.eos_token_id:  # a reply cut by max_new_tokens: close it as the template does
        sequences = torch.cat([sequences, torch.tensor([[tok.eos_token_id]])], 1)
    return torch.cat([sequences, new], 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _helpers.add_model_arguments(p, default_from_heads=True)
    _helpers.add_heads_argument(p)
    p.add_argument("--max-new-tokens", type=int, default=48, help="per reply (default: 48)")
    p.add_argument("--beta", type=float, default=1.0, help="temperature law's beta (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    args = _helpers.parse(p, argv)

    heads, model, tok = _helpers.setup(args)
    hf_sde.enable_sde_control(model)
    chat = _helpers.use_chat(args.chat, tok, heads)
    control = hf_sde.SDEControl(heads, mode="temperature", beta=args.beta)
    messages, sequences, cache = [], None, None
    torch.manual_seed(args.seed)
    for turn, text in enumerate(TURNS if chat else STORY_TURNS, 1):
        ids = turn_ids(tok, sequences, messages, text, chat)
        cached = cache.get_seq_length() if cache is not None else 0
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, do_sample=True,
                             max_new_tokens=args.max_new_tokens, sde_control=control, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        reply = tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        trace = out.sde_trace
        valid = trace.positions[0] >= 0
        print(f"--- turn {turn}: forwarded {ids.shape[1] - cached} new prompt tokens (the cache held {cached})")
        print(f"user: {text.strip()}")
        print(f"assistant: {reply.strip()}")
        print(f"trace: {int(valid.sum())} steps, positions {int(trace.positions[0, 0])}..{int(trace.positions[0, valid][-1])}, "
              f"mean diffusion z {trace.zscore[0, valid].mean():+.2f}, "
              f"mean temperature {trace.temperature[0, valid].mean():.2f}")
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.strip()}]
        sequences, cache = out.sequences, out.cache


if __name__ == "__main__":
    main()
