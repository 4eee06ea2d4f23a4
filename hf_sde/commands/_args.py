"""Argument helpers shared by the sub-commands: a help formatter that states every default, checked numeric
types (a bad number is refused while parsing, before any model loads) and the ``--template`` help.
"""

from __future__ import annotations

import argparse
import math


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` states each option's default: ``(default: X)`` is appended unless the help already says one.

    Flags (``store_true``) read ``(default: off)``; an option whose default is ``None`` must say in its own
    help what leaving it out means (``tests/test_first_user.py`` checks that every option does).
    """

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default is argparse.SUPPRESS or "default" in text.lower()
                or action.default is None):
            return text
        if action.nargs == 0 and action.default is False:
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text!r}")
    return value


def any_int(text: str) -> int:
    return _number(int, text)


def finite_float(text: str) -> float:
    """Any finite number (negative allowed)."""
    return _number(float, text)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def open_fraction(text: str) -> float:
    """A number strictly between 0 and 1 (a share that must leave something on both sides)."""
    value = _number(float, text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text!r}")
    return value


def probability(text: str) -> float:
    """A number in (0, 1] (top-p: 1 keeps every token)."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1 keeps every token), got {text!r}")
    return value


def template_help(what: str = "row template", note: str = "") -> str:
    """The ``--template`` help, listing :data:`hf_sde.corpus.TEMPLATES` (chat templates marked)."""
    from ..data.corpus import CHAT_TEMPLATES, TEMPLATES

    names = ", ".join(f"{name} (chat)" if name in CHAT_TEMPLATES else name for name in TEMPLATES)
    return (f"{what}: one of {names}; a chat template reads each response in the context of its prompt through "
            f"the tokenizer's chat template{note} (default: none, each row's --text-column is the text)")


def template_choices() -> list[str]:
    from ..data.corpus import TEMPLATES

    return list(TEMPLATES)
