"""Reading corpora with `datasets`: hub ids, .txt, .jsonl/.json, .csv, .parquet, text columns or templates."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

DEFAULT_SEPARATOR = "<|endoftext|>"

#: Rows sharing a group key are kept on the same side of the train / held-out split.
GROUP_KEYS: dict[str, Callable[[dict], str]] = {
    "helpsteer": lambda row: row["prompt"],
    "helpsteer-response": lambda row: row["prompt"],
}

#: Templates turn a row into the text whose hidden path we model.
TEMPLATES: dict[str, Callable[[dict], str]] = {
    # HelpSteer: the prompt followed by the response, as the paper models the whole exchange.
    "helpsteer": lambda row: f"{row['prompt'].strip()}\n\n{row['response'].strip()}",
    # Only the response (the text the model "generates").
    "helpsteer-response": lambda row: row["response"].strip(),
}

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _split_txt(path: str, separator: str | None) -> list[str]:
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    if separator is None:
        separator = DEFAULT_SEPARATOR if DEFAULT_SEPARATOR in raw else "\n"
    return [doc.strip() for doc in raw.split(separator) if doc.strip()]


def load_texts(
    data: str | os.PathLike | Iterable[str],
    *,
    template: str | None = None,
    text_column: str | None = None,
    split: str = "train",
    separator: str | None = None,
    limit: int | None = None,
    return_groups: bool = False,
):
    """Return the documents of a corpus as strings.

    ``data`` is a list of strings, a local file (``.txt``: documents split on ``separator``, by default
    ``<|endoftext|>`` when present else one per line; ``.jsonl``/``.json``/``.csv``/``.parquet`` through
    ``datasets``) or a hub dataset id. Rows become text through ``template`` (see ``TEMPLATES``) or
    ``text_column`` (default: ``text``). With ``return_groups=True`` also returns a group key per text
    (the HelpSteer prompt for the HelpSteer templates, else ``None``).
    """
    groups = None
    if isinstance(data, os.PathLike):  # a pathlib.Path is a path, not an iterable of texts
        data = os.fspath(data)
    if template is not None and template not in TEMPLATES:
        raise ValueError(f"Unknown template {template!r}; choose one of {sorted(TEMPLATES)}.")
    if isinstance(data, str) and not os.path.exists(data) and os.path.splitext(data)[1].lower() in _BUILDERS:
        raise ValueError(f"Corpus file {data!r} does not exist (resolved to {os.path.abspath(data)!r}).")
    if not isinstance(data, str):
        texts = [str(t) for t in data]
    else:
        ext = os.path.splitext(data)[1].lower()
        if os.path.isfile(data) and ext == ".txt":
            texts = _split_txt(data, separator)
        else:
            import datasets

            if os.path.exists(data):
                if ext not in _BUILDERS:
                    raise ValueError(f"Unsupported corpus file {data!r}: use one of {sorted(_BUILDERS)} or a hub id.")
                ds = datasets.load_dataset(_BUILDERS[ext], data_files=data, split=split)
            else:
                try:
                    ds = datasets.load_dataset(data, split=split)
                except Exception as e:  # noqa: BLE001 - re-raised with the fix
                    raise ValueError(
                        f"Could not load corpus {data!r}: not a local file and not a loadable dataset "
                        f"({type(e).__name__}: {e}). Pass a path or a hub dataset id (offline: a cached one)."
                    ) from e
            if template is not None:
                fn = TEMPLATES[template]
                try:
                    texts = [fn(row) for row in ds]
                    if template in GROUP_KEYS:
                        groups = [GROUP_KEYS[template](row) for row in ds]
                except KeyError as e:
                    raise ValueError(
                        f"Template {template!r} needs column {e.args[0]!r}, but {data!r} has {ds.column_names}."
                    ) from None
            else:
                column = text_column or "text"
                if column not in ds.column_names:
                    raise ValueError(
                        f"Corpus {data!r} has no column {column!r} (columns: {ds.column_names}); "
                        "pass text_column=... (--text-column) or template=... (--template)."
                    )
                texts = [str(t) for t in ds[column]]
    keep = [i for i, t in enumerate(texts) if t and t.strip()]
    if limit is not None:
        keep = keep[:limit]
    texts = [texts[i] for i in keep]
    groups = [groups[i] for i in keep] if groups is not None else None
    if not texts:
        raise ValueError(f"The corpus {data if isinstance(data, str) else '<list>'!r} is empty: no non-blank documents.")
    return (texts, groups) if return_groups else texts
