"""The README and the documentation pages are executed, not just read: every ```bash block runs verbatim in a
fresh shell, every ```python block as a script.

Conventions (generic, so that the README and the docs can be rewritten freely):

* Every fenced block whose info string is ``bash`` (or ``sh`` / ``shell``) is a command block, and every one whose
  info string is ``python`` (or ``py``) a Python block, run as a script by the environment's ``python``. Blocks under a
  heading containing "Set up" / "Setup" are the set-up commands and are not run (the checkout under test is
  already set up); neither is a block directly preceded by an HTML comment ``<!-- readme-test: skip (why) -->``
  (servers that run until stopped, uploads that need the network, the test suite itself).
* A fenced block without an info string (or ``text`` / ``console`` / ``output``) directly after a command block
  (only blank lines between) is its expected output, compared loosely: numbers are masked, lines containing
  ``...`` and blank lines are ignored, and every other shown line must appear in what the block printed
  (stdout and stderr together, in any order, whitespace collapsed).
* Blocks run in order, each with ``bash -e -o pipefail -c BLOCK`` (or ``python BLOCK``) in one scratch copy of
  the checkout per page (its tracked files, with ``../shared`` beside it), so later blocks of a page see what
  earlier ones wrote and the checkout stays clean. The environment is fresh (``env -i``): only ``PATH``, ``HOME`` and ``LANG`` come from the test
  process, plus ``HF_SDE_SMOKE=1`` (hf-sde commands cap their work; see ``hf-sde --help``) and ``PYTHONPATH``
  set to the scratch copy (the code under test). The shell starts the way the set-up leaves a user's shell:
  the virtual environment is activated (``.venv/bin/activate`` of the checkout, else of the running Python),
  so whatever the set-up's activate script exports (the offline hub cache) is what the blocks get.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMAND_LANGS = {"bash", "sh", "shell"}
PYTHON_LANGS = {"python", "py"}
DOCS = sorted((REPO / "docs").glob("*.md"))
OUTPUT_LANGS = {"", "text", "console", "output"}
SKIP_MARK = re.compile(r"<!--\s*readme-test:\s*skip\b.*?-->", re.S)
SETUP_HEADING = re.compile(r"set[\s-]?up", re.I)
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


@dataclass
class Block:
    heading: str
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None = None  # why it is not run
    expected: str | None = None
    lang: str = "bash"  # "bash" or "python"


def parse_readme(text: str) -> list[Block]:
    """The README's command blocks, with their skip reason and expected output."""
    lines = text.splitlines()
    blocks: list[Block] = []
    heading, i, last_block_end, pending_skip = "", 0, None, None
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", line)
        if not fence:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            mark = SKIP_MARK.search(line)
            if mark:
                pending_skip = mark.group(0)
            elif line.strip():
                pending_skip, last_block_end = None, None
            i += 1
            continue
        marker, lang = fence.group(2), fence.group(3).lower()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(marker):
            j += 1
        body = "\n".join(lines[i + 1:j])
        if lang in COMMAND_LANGS or lang in PYTHON_LANGS:
            skip = "set-up block" if SETUP_HEADING.search(heading) else pending_skip
            blocks.append(Block(heading, i + 1, body, skip, lang="python" if lang in PYTHON_LANGS else "bash"))
            last_block_end = len(blocks)
        elif lang in OUTPUT_LANGS and last_block_end == len(blocks) and blocks and blocks[-1].expected is None:
            blocks[-1].expected = body
            last_block_end = None
        else:
            last_block_end = None
        pending_skip = None
        i = j + 1
    return blocks


def _normalize(line: str) -> str:
    return " ".join(NUMBER.sub("<N>", line).split())


def missing_lines(expected: str, actual: str) -> list[str]:
    """Shown lines (numbers masked, ``...`` lines and blank lines ignored) that the output does not contain."""
    got = [_normalize(x) for x in actual.splitlines()]
    missing = []
    for line in expected.splitlines():
        if not line.strip() or "..." in line:
            continue
        want = _normalize(line)
        if not any(want in g for g in got):
            missing.append(line)
    return missing


def _activate_script(root: Path) -> Path | None:
    for venv in (root / ".venv", REPO / ".venv", Path(sys.prefix)):
        script = venv / "bin" / "activate"
        if script.is_file():
            return script
    return None


def scratch_checkout(tmp: Path) -> Path:
    """A copy of the checkout's tracked files at ``tmp/repo``, with ``tmp/shared`` pointing at ``../shared``."""
    root = tmp / "repo"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    shared = (REPO.parent / "shared").resolve()
    if shared.exists():
        (tmp / "shared").symlink_to(shared)
    # The set-up's virtual environment (not tracked): the blocks activate it as `. .venv/bin/activate`.
    venv = _activate_script(REPO)
    if venv is not None:
        (root / ".venv").symlink_to(venv.parent.parent)
    return root


def run_block(block: Block, root: Path) -> subprocess.CompletedProcess:
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    env.update(HF_SDE_SMOKE="1", PYTHONPATH=str(root))
    activate = _activate_script(root)
    prelude = f". {str(activate)!r}\n" if activate else ""
    code, args = block.code, []
    if block.lang == "python":  # the script as an argument: the shell's python is the activated environment's
        code, args = 'python -c "$0"', [block.code]
    return subprocess.run(["env", "-i", *(f"{k}={v}" for k, v in env.items()), "bash", "-e", "-o", "pipefail",
                           "-c", prelude + code, *args], cwd=root, capture_output=True, text=True)


# ----- the harness itself (fast) -------------------------------------------------------------------------
SAMPLE = """# Title

## Set up

```bash
python3 -m venv .venv && . .venv/bin/activate
```

## Use

```bash
echo "Held-out NLL: neural 1.3027, ou 1.3095"
echo "step token"
```
```
Held-out NLL: neural 9.9, ou 0.1
...
step token
```

<!-- readme-test: skip (serves until stopped) -->
```bash
python spaces/app.py
```

```python
print("a Python block")
```
```
a Python block
```

```text
not run
```
"""


def test_parse_finds_command_blocks_skips_and_expected_output():
    blocks = parse_readme(SAMPLE)
    assert [b.skip is None for b in blocks] == [False, True, False, True]
    assert [b.lang for b in blocks] == ["bash", "bash", "bash", "python"]
    assert blocks[3].expected == "a Python block"
    assert blocks[0].skip == "set-up block"
    assert blocks[1].heading == "Use" and "echo" in blocks[1].code
    assert blocks[1].expected.splitlines() == ["Held-out NLL: neural 9.9, ou 0.1", "...", "step token"]
    assert blocks[2].skip.startswith("<!-- readme-test: skip") and blocks[2].expected is None


def test_loose_comparison_masks_numbers_and_skips_ellipses():
    assert missing_lines("NLL: neural 9.9, ou 0.1\n...\nstep  token", "x\nNLL: neural 1.3027, ou 1.3095\nstep token") == []
    assert missing_lines("beats both baselines", "does NOT beat both baselines") == ["beats both baselines"]


def test_blocks_run_in_a_fresh_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SOMETHING_FROM_THE_TEST", "leak")
    block = Block("", 1, 'echo "smoke=$HF_SDE_SMOKE leak=${SOMETHING_FROM_THE_TEST:-none}"; false; echo unreachable')
    done = run_block(block, tmp_path)
    assert "smoke=1 leak=none" in done.stdout and "unreachable" not in done.stdout and done.returncode != 0


def test_python_blocks_run_as_scripts(tmp_path):
    ok = run_block(Block("", 1, 'import os\nprint("smoke", os.environ["HF_SDE_SMOKE"], "$0")', lang="python"), tmp_path)
    assert ok.returncode == 0 and "smoke 1 $0" in ok.stdout, ok.stderr
    failed = run_block(Block("", 1, 'raise SystemExit("broken snippet")', lang="python"), tmp_path)
    assert failed.returncode != 0 and "broken snippet" in failed.stderr


# ----- the README and the docs ----------------------------------------------------------------------------
def run_page(page: Path, tmp_path: Path) -> None:
    """Every block of ``page`` that is not skipped, in order, in one scratch checkout; fail with each mismatch."""
    blocks = [b for b in parse_readme(page.read_text()) if b.skip is None]
    root = scratch_checkout(tmp_path)
    failures = []
    for block in blocks:
        done = run_block(block, root)
        output = done.stdout + done.stderr
        where = f"{page.relative_to(REPO)} line {block.line} ({block.heading}):\n{block.code}\n"
        if done.returncode != 0:
            failures.append(f"{where}exit {done.returncode}; output:\n{output[-3000:]}")
        elif block.expected is not None and (missing := missing_lines(block.expected, output)):
            failures.append(f"{where}printed nothing like:\n" + "\n".join(missing) + f"\noutput:\n{output[-3000:]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_readme_command_blocks_run_verbatim(tmp_path):
    assert parse_readme((REPO / "README.md").read_text()), "README.md has no command blocks to run"
    run_page(REPO / "README.md", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_docs_blocks_run_verbatim(page, tmp_path):
    run_page(page, tmp_path)
