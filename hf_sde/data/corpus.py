"""Reading corpora: hub ids, .txt, .jsonl/.json, .csv, .parquet, folders or globs of them; rows to documents.

One reader, :func:`iter_documents`, yields the documents lazily (bounded memory for sharded extraction);
:func:`load_texts` is the same stream collected into a list. A document is a string (plain text) or, for
the chat templates, a conversation: a list of ``{"role", "content"}`` messages whose last message is the
assistant's response (the modelled path; the earlier messages are its context, see
:func:`hf_sde.trajectories.tokenize_chats`). Local files are read with the standard library / pyarrow so
that a bad row is reported by file and line, not by a traceback from deep inside a loader.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator

DEFAULT_SEPARATOR = "<|endoftext|>"

Document = str | list  # text, or a conversation (list of {"role", "content"} messages)


def _chat_messages(row: dict) -> list[dict]:
    """A row as a conversation: a ``messages`` list (last message the assistant's), or ``prompt``/``response``."""
    if "messages" in row:
        messages = row["messages"]
        if (not isinstance(messages, list) or len(messages) < 2
                or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            raise ValueError("'messages' must be a list of at least two {'role', 'content'} dicts")
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"the last message must be the assistant's response, not {messages[-1]['role']!r}")
        return [{"role": m["role"], "content": str(m["content"])} for m in messages]
    return [{"role": "user", "content": str(row["prompt"]).strip()},
            {"role": "assistant", "content": str(row["response"]).strip()}]


def _chat_group(row: dict) -> str:
    """Responses in the same context share a group (kept on one side of the held-out split)."""
    if "messages" in row:
        return json.dumps(row["messages"][:-1], sort_keys=True)
    return str(row["prompt"])


#: Templates turn a row into the document whose hidden path we model (text, or a conversation).
TEMPLATES: dict[str, Callable[[dict], Document]] = {
    # HelpSteer: the prompt followed by the response, as the paper models the whole exchange.
    "helpsteer": lambda row: f"{row['prompt'].strip()}\n\n{row['response'].strip()}",
    # Only the response (the text the model "generates").
    "helpsteer-response": lambda row: row["response"].strip(),
    # The prompt as the user turn, the response as the assistant turn, through the tokenizer's chat template;
    # the path is the response, read in the context of the prompt.
    "helpsteer-chat": lambda row: _chat_messages({"prompt": row["prompt"], "response": row["response"]}),
    # User chat data: a ``messages`` column (ending with the assistant's turn) or ``prompt``/``response``.
    "chat": _chat_messages,
}

#: Templates whose documents are conversations (tokenized with ``tokenizer.apply_chat_template``).
CHAT_TEMPLATES = frozenset({"helpsteer-chat", "chat"})

#: Rows sharing a group key are kept on the same side of the train / held-out split.
GROUP_KEYS: dict[str, Callable[[dict], str]] = {
    "helpsteer": lambda row: row["prompt"],
    "helpsteer-response": lambda row: row["prompt"],
    "helpsteer-chat": lambda row: row["prompt"],
    "chat": _chat_group,
}

_READABLE = (".txt", ".jsonl", ".json", ".csv", ".parquet")


# ----- local files, one reader per format; errors name the file and the line ----------------------------
def _txt_separator(path: str, chunk: int = 1 << 20) -> str:
    """``<|endoftext|>`` if it occurs in the file, else newline; read block by block."""
    tail = ""
    with open(path, encoding="utf-8") as f:
        while block := f.read(chunk):
            if DEFAULT_SEPARATOR in tail + block:
                return DEFAULT_SEPARATOR
            tail = block[-len(DEFAULT_SEPARATOR):]
    return "\n"


def _not_utf8(path: str, err: UnicodeDecodeError) -> ValueError:
    """Point at the first line of ``path`` that is not UTF-8 (found by re-reading; the error path only)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return ValueError(f"{path}, line {number}: not UTF-8 text (byte {line[e.start:e.start + 1]!r} "
                                  f"at column {e.start + 1}); re-encode the file as UTF-8.")
    return ValueError(f"{path}: not UTF-8 text ({err}); re-encode the file as UTF-8.")


def _iter_txt(path: str, separator: str | None, chunk: int = 1 << 20) -> Iterator[str]:
    try:
        sep = separator if separator is not None else _txt_separator(path)
        buf = ""
        with open(path, encoding="utf-8") as f:
            while block := f.read(chunk):
                parts = (buf + block).split(sep)
                buf = parts.pop()
                yield from (p.strip() for p in parts if p.strip())
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    if buf.strip():
        yield buf.strip()


def _iter_jsonl(path: str) -> Iterator[tuple[str, dict]]:
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno}); "
                                     "each line of a .jsonl file must be one JSON object.") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object "
                                     "(each line of a .jsonl file must be one {\"column\": value} object).")
                yield f"line {number}", row
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


def _json_rows(path: str, value) -> list[tuple[str, dict]]:
    """The rows of a parsed .json file (with where each is: ``row N``, 1-based), in the shapes ``datasets``
    reads: a list of objects (or of strings, each a ``text``), an object of equal-length column lists, or a
    single object (one row)."""
    if isinstance(value, dict):
        columns = list(value.values())
        if columns and all(isinstance(c, list) for c in columns) and len({len(c) for c in columns}) == 1:
            return [(f"row {i}", dict(zip(value, row, strict=True)))
                    for i, row in enumerate(zip(*columns, strict=True), 1)]
        return [("row 1", value)]
    if not isinstance(value, list):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not a list of rows: write "
                         "[{\"text\": ...}, ...] (or one object per line in a .jsonl file).")
    rows = []
    for i, row in enumerate(value):
        if isinstance(row, str):
            row = {"text": row}
        if not isinstance(row, dict):
            raise ValueError(f"{path}: item {i} of the list is a JSON {type(row).__name__}, not a row object "
                             "(or a string).")
        rows.append((f"row {i + 1}", row))
    return rows


def _iter_json(path: str) -> Iterator[tuple[str, dict]]:
    """A .json file: rows as :func:`_json_rows` reads them (or JSON lines, as ``datasets`` also accepts)."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several values: JSON lines in a .json file
            yield from _iter_jsonl(path)
            return
        raise ValueError(f"{path}, line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}).") from None
    yield from _json_rows(path, rows)


def _iter_csv(path: str) -> Iterator[tuple[str, dict]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{path}, line {reader.line_num}: {len(row)} fields where the header has "
                                     f"{len(header)} ({header}); quote fields that contain commas.")
                yield f"line {reader.line_num}", dict(zip(header, row, strict=True))
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a readable CSV file ({e}).") from None


def _iter_parquet(path: str, batch_rows: int = 1024) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path} is not a readable Parquet file ({e}).") from None
    n = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            n += 1
            yield f"row {n}", row


_ROW_READERS = {".jsonl": _iter_jsonl, ".json": _iter_json, ".csv": _iter_csv, ".parquet": _iter_parquet}


def _iter_hub(name: str, split: str, streaming: bool) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, streaming=streaming)
        for i, row in enumerate(ds, 1):
            yield f"row {i}", row
    except Exception as e:  # noqa: BLE001 - any loader failure is re-raised with the fix
        raise ValueError(f"Could not load corpus {name!r}: not a local file and not a loadable dataset "
                         f"({type(e).__name__}: {e}). Pass a path or a hub dataset id (offline: a cached one).") from e


def _corpus_files(data: str) -> list[str] | None:
    """The files of a folder or glob of corpus files (sorted), or ``None`` for a single file / hub id."""
    if os.path.isdir(data):
        files = sorted(os.path.join(data, f) for f in os.listdir(data) if f.lower().endswith(_READABLE))
    elif any(c in data for c in "*?["):
        files = sorted(glob.glob(data))
    else:
        return None
    if not files:
        raise ValueError(f"No corpus files ({', '.join(_READABLE)}) in {data!r}.")
    return files


# ----- rows to documents --------------------------------------------------------------------------------
class _MissingFieldError(ValueError):
    """A row lacks the column its template (or the text column) needs: ``field``; ``fix`` says what to do."""

    def __init__(self, message: str, field: str, template: str | None, fix: str):
        super().__init__(message)
        self.field, self.template, self.fix = field, template, fix


def _row_to_document(row: dict, name: str, template: str | None, text_column: str | None, where: str | None = None):
    """``(document, group)`` of one row, with errors that say which column is missing (and, given ``where``,
    which row: ``line N`` of a .jsonl/.csv file, ``row N`` otherwise)."""
    at = f" ({where})" if where else ""
    if template is None:
        column = text_column or "text"
        if column not in row:
            fix = "pass text_column=... (--text-column) or template=... (--template)."
            raise _MissingFieldError(f"Corpus {name!r} has no column {column!r} (fields of the row{at}: {sorted(row)}); "
                                    f"{fix}", column, None, fix)
        return str(row[column]) if row[column] is not None else "", None
    try:
        doc = TEMPLATES[template](row)
        return doc, (GROUP_KEYS[template](row) if template in GROUP_KEYS else None)
    except KeyError as e:
        fix = f"choose the template that matches the columns (one of {sorted(TEMPLATES)}) or rename them."
        raise _MissingFieldError(f"Template {template!r} needs column {e.args[0]!r}, but {name!r} has {sorted(row)}"
                                f"{at}; {fix}", e.args[0], template, fix) from None
    except (ValueError, AttributeError, TypeError) as e:  # e.g. a null prompt: say which row shape fails
        nulls = sorted(k for k, v in row.items() if v is None)
        null = f"; null fields: {nulls}" if nulls else ""
        raise ValueError(f"Template {template!r} cannot read a row of {name!r}{at} ({e}{null}); row: "
                         f"{str(row)[:200]}") from None


def _missing_field(e: _MissingFieldError, name: str, where: str, row: dict, seen: dict[str, str],
                   rest: Iterator[tuple[str, dict]] | None) -> ValueError:
    """The error for a row of a file that lacks a field: the row, the field, and whether the file has that
    column elsewhere (an earlier row or, for local files, a later one: read on, on the error path only)."""
    field = e.field
    need = f"template {e.template!r} needs" if e.template else "the text column is"
    elsewhere = seen.get(field)
    if elsewhere is None and rest is not None:
        try:
            elsewhere = next((w for w, r in rest if isinstance(r, dict) and field in r), None)
        except ValueError:  # a later line that does not parse: this row's error is the one to report
            rest = None
    if elsewhere is not None:
        return ValueError(f"{name}, {where}: this row has no {field!r} field, which {need} (its fields: {sorted(row)}); "
                          f"the file has the column elsewhere ({elsewhere} has it), so fix or drop {where}.")
    nowhere = "no row of the file has it" if rest is not None else "the rows read so far lack it"
    if e.template:
        return ValueError(f"Template {e.template!r} needs column {field!r}, but {nowhere} ({name!r}, {where}: fields "
                          f"{sorted(row)}); {e.fix}")
    return ValueError(f"Corpus {name!r} has no column {field!r}: {nowhere} ({where}: fields {sorted(row)}); {e.fix}")


def _is_blank(doc: Document) -> bool:
    if isinstance(doc, str):
        return not doc.strip()
    return not doc[-1]["content"].strip()


def _documents(data, template: str | None, text_column: str | None, split: str, separator: str | None,
               streaming: bool) -> Iterator[tuple[Document, str | None]]:
    """Every ``(document, group)`` of ``data``, blank ones included."""
    if not isinstance(data, str):
        for i, item in enumerate(data, 1):
            if isinstance(item, dict):
                yield _row_to_document(item, "<list>", template, text_column, f"item {i}")
            else:
                yield str(item), None
        return
    files = _corpus_files(data)
    for path in files if files is not None else [data]:
        ext = os.path.splitext(path)[1].lower()
        if os.path.isfile(path) and ext == ".txt":
            for t in _iter_txt(path, separator):
                yield t, None
            continue
        local = os.path.exists(path)
        if local:
            if ext not in _ROW_READERS:
                raise ValueError(f"Unsupported corpus file {path!r}: use one of {list(_READABLE)} or a hub id.")
            rows = _ROW_READERS[ext](path)
        else:
            rows = _iter_hub(path, split, streaming)
        seen: dict[str, str] = {}  # column -> the first row that has it (to tell a bad row from a missing column)
        for where, row in rows:
            try:
                item = _row_to_document(row, path, template, text_column, where)
            except _MissingFieldError as e:
                raise _missing_field(e, path, where, row, seen, rows if local else None) from None
            for key in row:
                if key not in seen:
                    seen[key] = where
            yield item


def iter_documents(
    data: str | os.PathLike | Iterable,
    *,
    template: str | None = None,
    text_column: str | None = None,
    split: str = "train",
    separator: str | None = None,
    limit: int | None = None,
    streaming: bool = True,
) -> Iterator[tuple[Document, str | None]]:
    """Yield ``(document, group)`` for each non-blank document, lazily.

    ``data`` is a ``.txt``/``.jsonl``/``.json``/``.csv``/``.parquet`` file, a folder or glob of such files
    (read one after the other, in sorted order: a sharded local corpus), a hub dataset id (``streaming``:
    read without downloading it whole), or an iterable of strings or of row dicts. ``.txt`` documents are
    split on ``separator`` (default ``<|endoftext|>`` when present, else one per line); rows become
    documents through ``template`` (see ``TEMPLATES``) or ``text_column`` (default ``text``). ``group`` is
    the row's prompt for the HelpSteer and chat templates, else ``None``. Only the current row (and one
    read block of a ``.txt`` file) is held, except for a ``.json`` list, which is parsed whole.
    """
    if isinstance(data, os.PathLike):  # a pathlib.Path is a path, not an iterable of texts
        data = os.fspath(data)
    if template is not None and template not in TEMPLATES:
        raise ValueError(f"Unknown template {template!r}; choose one of {sorted(TEMPLATES)}.")
    if (isinstance(data, str) and not os.path.exists(data) and not any(c in data for c in "*?[")
            and os.path.splitext(data)[1].lower() in _READABLE):
        raise ValueError(f"Corpus file {data!r} does not exist (resolved to {os.path.abspath(data)!r}).")
    n = 0
    for doc, group in _documents(data, template, text_column, split, separator, streaming):
        if _is_blank(doc):
            continue
        if limit is not None and n >= limit:
            return
        n += 1
        yield doc, group


def load_texts(data: str | os.PathLike | Iterable, *, template: str | None = None, text_column: str | None = None,
               split: str = "train", separator: str | None = None, limit: int | None = None,
               return_groups: bool = False):
    """Return the documents of a corpus as a list (see :func:`iter_documents` for what ``data`` may be).

    Documents are strings, or conversations for the chat templates (``CHAT_TEMPLATES``). A hub dataset is
    downloaded (and cached) rather than streamed. With ``return_groups=True`` also returns a group key per
    document (the prompt for the HelpSteer and chat templates), or ``None`` when there are none.
    """
    pairs = list(iter_documents(data, template=template, text_column=text_column, split=split,
                                separator=separator, limit=limit, streaming=False))
    if not pairs:
        name = os.fspath(data) if isinstance(data, (str, os.PathLike)) else "<list>"
        raise ValueError(f"The corpus {name!r} is empty: no non-blank documents.")
    texts = [doc for doc, _ in pairs]
    groups = [g for _, g in pairs]
    if all(g is None for g in groups):
        groups = None
    return (texts, groups) if return_groups else texts
