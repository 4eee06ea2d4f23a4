"""Token display text, shared by the report, the CLI tables and the Space."""

from __future__ import annotations

from collections.abc import Sequence


def token_pieces(tokenizer, ids: Sequence[int], context: Sequence[int] = (), *,
                 show_special: bool = True) -> list[str]:
    """The text each of ``ids`` adds after ``context`` (so sentencepiece spaces and byte tokens come out right).

    Decoding growing prefixes is what makes multi-byte characters and leading spaces right; a special token
    shows as ``[name]`` (or nothing with ``show_special=False``).
    """
    ids, context = list(ids), list(context)
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    pieces: list[str] = []
    prev = tokenizer.decode(context, skip_special_tokens=True) if context else ""
    for k, tok in enumerate(ids):
        if tok in special:
            pieces.append(f"[{tokenizer.convert_ids_to_tokens(tok)}]" if show_special else "")
            continue
        cur = tokenizer.decode(context + ids[: k + 1], skip_special_tokens=True)
        if cur.startswith(prev):
            pieces.append(cur[len(prev):])
        else:
            pieces.append(str(tokenizer.convert_ids_to_tokens(tok)).replace("\u2581", " "))
        prev = cur
    return pieces
