"""The text a user reads (README, docs, benchmark notes and results, docstrings, comments and messages) names
no issue-tracker entries: "issue 13", "see #25" and the like mean nothing outside the tracker they came from.

Plain text scan, no imports of the package: Python files are tokenized, and only their comments and string
literals (docstrings, help texts, the markdown the benchmarks write) are read.
"""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# "issue 13", "Issue 13's", "issues #4", "issue-14"
ISSUE_RE = re.compile(r"\bissues?[\s-]*#?\d+", re.IGNORECASE)
# "#25" in prose; not "&#39;" (an HTML entity), "owner/repo#12" or "page.md#3" (a word character before it)
HASH_RE = re.compile(r"(?<![\w&#])#\d{1,4}\b")
# Removed before matching: CSS colours ("color:#222", "solid #888;", "#333}"), link targets ("](#1-install)",
# href="#2"), URLs.
HEX = r"#(?:[0-9a-fA-F]{8}|[0-9a-fA-F]{6}|[0-9a-fA-F]{3,4})\b"
STRIP_RE = re.compile(
    rf"(?<=:){HEX}|{HEX}(?=\s*[;}}\"'])"
    r"|\]\([^)\s]*\)"
    r"|\b(?:href|src|id)\s*=\s*(?:\"[^\"]*\"|'[^']*')"
    r"|\bhttps?://\S+"
)


def _blank(match: re.Match) -> str:
    return " " * len(match.group(0))  # keep offsets (and so line numbers) unchanged


def product_files() -> list[Path]:
    pats = ["README.md", "docs/*.md", "benchmarks/README.md", "benchmarks/results/*.md", "hf_sde/**/*.py",
            "benchmarks/*.py", "examples/*.py", "scripts/*", "spaces/*.md", "spaces/*.py"]
    return sorted({p for pat in pats for p in REPO.glob(pat) if p.is_file()})


def _python_texts(text: str):
    """(line, text) of every comment and string literal of a Python source."""
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING):
            body = tok.string.lstrip("#") if tok.type == tokenize.COMMENT else tok.string
            offset = len(tok.string) - len(body)
            yield tok.start[0], " " * offset + body


def hits_in(text: str, python: bool) -> list[tuple[int, str]]:
    """(line number, matched text) of every tracker reference in ``text``."""
    chunks = _python_texts(text) if python else [(1, text)]
    out = []
    for first_line, chunk in chunks:
        clean = STRIP_RE.sub(_blank, chunk)
        for rx in (ISSUE_RE, HASH_RE):
            for m in rx.finditer(clean):
                out.append((first_line + clean.count("\n", 0, m.start()), m.group(0)))
    return sorted(out)


def test_scanner_sees_references_and_ignores_lookalikes():
    bad = "See issue 12.\nIssue 13's target\nfixed in #25, see (#7)\nissues #4 and issue-14\n"
    assert sorted({line for line, _ in hits_in(bad, python=False)}) == [1, 2, 3, 4]
    fine = ("# Heading\n## 2. Second\nbody{color:#222} p{border:1px solid #888;} <p style=\"color:#777\">\n"
            "it&#39;s [link](#1-install) href=\"#2\" huggingface/transformers#1234 page.md#3 "
            "https://example.com/x#12 open an issue with the model class\n")
    assert hits_in(fine, python=False) == []
    src = 'x = 1  # see issue 9\ny = "#5 in a string"\nCSS = "a{color:#333}"\n'
    assert hits_in(src, python=True) == [(1, "issue 9"), (2, "#5")]


def test_no_tracker_references_in_product_text():
    files = product_files()
    assert any(p.name == "README.md" for p in files) and any(p.suffix == ".py" for p in files)
    found = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for line, hit in hits_in(text, python=path.suffix == ".py"):
            found.append(f"{path.relative_to(REPO)}:{line}: {hit!r}")
    if found:
        pytest.fail("tracker references in product text (say what is true of the software instead):\n"
                    + "\n".join(found))
