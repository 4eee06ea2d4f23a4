"""The documentation site: its API reference covers the public API, and it builds strictly (no broken link,
reference or anchor). The command blocks of its pages run in tests/test_readme.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hf_sde

REPO = Path(__file__).resolve().parents[1]


def test_api_reference_covers_the_public_api():
    documented = re.findall(r"^::: hf_sde\.(\w+)\s*$", (REPO / "docs" / "api.md").read_text(), re.M)
    assert len(documented) == len(set(documented)), "a name is documented twice"
    assert sorted(documented) == sorted(n for n in hf_sde.__all__ if n != "__version__")


def test_every_page_is_in_the_navigation():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda *a: None)  # mkdocs.yml may hold !!python tags
    nav = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=Loader)["nav"]
    pages = set(re.findall(r"[\w-]+\.md", str(nav)))
    assert pages == {p.name for p in (REPO / "docs").glob("*.md")}


@pytest.mark.slow
def test_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    assert mkdocs, "mkdocs is not installed: pip install -e '.[dev]'"
    done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()
    assert (tmp_path / "site" / "results" / "eval_fit" / "index.html").is_file()  # published by the hook
