"""MkDocs hook: publish ``benchmarks/results/`` (the results tables and figures the benchmarks write) under
``results/`` in the documentation site, so pages link the files themselves instead of copies."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
PUBLISHED = {".md", ".png", ".svg", ".json"}


def on_files(files: Files, config) -> Files:
    for path in sorted(RESULTS.iterdir()):
        if path.is_file() and path.suffix in PUBLISHED:
            files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
    return files
