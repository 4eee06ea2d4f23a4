"""Corpora: .txt (separator or one per line), .jsonl with templates, .csv / .parquet with a text column."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import HELPSTEER, TINYSTORIES

from hf_sde.data.corpus import load_texts
from hf_sde.trajectories.extract import extract_trajectories


def test_txt_with_separator_and_one_per_line(tmp_path):
    stories = load_texts(str(TINYSTORIES))
    assert len(stories) == 5
    assert all("<|endoftext|>" not in s and s == s.strip() and len(s) > 200 for s in stories)
    assert load_texts(str(TINYSTORIES), limit=2) == stories[:2]

    lines = tmp_path / "lines.txt"
    lines.write_text("first line\n\nsecond line\n   \nthird line\n", encoding="utf-8")
    assert load_texts(str(lines)) == ["first line", "second line", "third line"]

    custom = tmp_path / "custom.txt"
    custom.write_text("one\nstill one###two###\n###three", encoding="utf-8")
    assert load_texts(str(custom), separator="###") == ["one\nstill one", "two", "three"]

    assert load_texts(["a", " ", "b"]) == ["a", "b"]
    assert load_texts(TINYSTORIES) == stories  # a pathlib.Path is a path, not a list of texts


def test_jsonl_with_helpsteer_template_and_groups():
    rows = [json.loads(line) for line in HELPSTEER.read_text(encoding="utf-8").splitlines()[:12]]
    texts, groups = load_texts(str(HELPSTEER), template="helpsteer", limit=12, return_groups=True)
    assert texts == [f"{r['prompt'].strip()}\n\n{r['response'].strip()}" for r in rows]
    assert groups == [r["prompt"] for r in rows]
    assert len(set(groups)) < len(groups)  # several responses per prompt: why the split needs groups

    responses = load_texts(str(HELPSTEER), template="helpsteer-response", limit=3)
    assert responses == [r["response"].strip() for r in rows[:3]]
    plain, no_groups = load_texts(str(HELPSTEER), text_column="response", limit=3, return_groups=True)
    assert plain == [r["response"] for r in rows[:3]] and no_groups is None


def test_template_and_column_errors(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown template 'nope'.*helpsteer"):
        load_texts(str(HELPSTEER), template="nope")
    with pytest.raises(ValueError, match=r"no column 'text'.*prompt.*response"):
        load_texts(str(HELPSTEER))
    with pytest.raises(ValueError, match="no column 'story'"):
        load_texts(str(HELPSTEER), text_column="story")

    other = tmp_path / "other.jsonl"
    other.write_text('{"question": "q", "answer": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"needs column 'prompt'.*question"):
        load_texts(str(other), template="helpsteer")

    with pytest.raises(ValueError, match="does not exist"):
        load_texts(str(tmp_path / "missing.jsonl"))
    odd = tmp_path / "corpus.xml"
    odd.write_text("<a/>", encoding="utf-8")
    with pytest.raises(ValueError, match="Unsupported corpus file"):
        load_texts(str(odd))
    with pytest.raises(ValueError, match="Could not load corpus"):
        load_texts("no-such-org/no-such-dataset")  # offline: fails fast, never reaches the network


def test_csv_and_parquet_with_text_column(tmp_path):
    import datasets

    rows = [{"id": i, "story": f"Story number {i} about a cat."} for i in range(4)]
    rows[2]["story"] = "   "  # blank rows are dropped
    csv_path = tmp_path / "corpus.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "story"])
        writer.writeheader()
        writer.writerows(rows)
    expected = ["Story number 0 about a cat.", "Story number 1 about a cat.", "Story number 3 about a cat."]
    assert load_texts(str(csv_path), text_column="story") == expected
    with pytest.raises(ValueError, match=r"no column 'text'.*'id', 'story'"):
        load_texts(str(csv_path))

    parquet_path = tmp_path / "corpus.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet_path))
    assert load_texts(str(parquet_path), text_column="story") == expected
    assert load_texts(str(parquet_path), text_column="story", limit=1) == expected[:1]
    with pytest.raises(ValueError, match="no column 'body'"):
        load_texts(str(parquet_path), text_column="body")


def test_extract_from_a_jsonl_template_keeps_groups(stories_model):
    model, tok = stories_model
    traj = extract_trajectories(model, tok, str(HELPSTEER), template="helpsteer-response", limit=6,
                                max_length=24, progress=False)
    _, groups = load_texts(str(HELPSTEER), template="helpsteer-response", limit=6, return_groups=True)
    assert len(traj) == 6 and set(traj.lengths) == {24}
    assert traj.meta["groups"] == groups
    assert traj.meta["template"] == "helpsteer-response" and traj.meta["num_texts"] == 6
    assert traj.meta["data"] == str(HELPSTEER)

    from_path = extract_trajectories(model, tok, HELPSTEER, template="helpsteer-response", limit=6,
                                     max_length=24, progress=False)
    assert from_path.meta["data"] == str(HELPSTEER) and from_path.meta["groups"] == groups


# ----- bad input is reported by file and line, never as a loader's traceback (issue 11) ------------------
def _write(path, content: str | bytes):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n', r"bad\.jsonl, line 3: not valid JSON"),
    ("list.jsonl", '{"text": "a"}\n["b"]\n', r"list\.jsonl, line 2: a JSON list, not an object"),
    ("bad.csv", 'id,text\n1,hello\n2,hi,there\n', r"bad\.csv, line 3: 3 fields where the header has 2"),
    ("short.csv", 'id,text\n1\n', r"short\.csv, line 2: 1 fields"),
    ("scalar.json", '"hello"', r"scalar\.json holds a JSON str, not a list of rows"),
    ("nums.json", '[1, 2]', r"nums\.json: item 0 of the list is a JSON int"),
    ("broken.json", '[{"text": "a"},\n {"text": }]', r"broken\.json, line 2: not valid JSON"),
    ("fake.parquet", 'not parquet at all', r"fake\.parquet is not a readable Parquet file"),
    ("latin1.txt", b"good line\ncaf\xe9 au lait\n", r"latin1\.txt, line 2: not UTF-8 text"),
    ("latin1.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"latin1\.jsonl, line 2: not UTF-8 text"),
])
def test_bad_files_name_the_file_and_line(tmp_path, name, content, message):
    from hf_sde.data.corpus import iter_documents

    path = _write(tmp_path / name, content)
    with pytest.raises(ValueError, match=message):
        load_texts(path)
    with pytest.raises(ValueError, match=message):  # the lazy reader says the same
        list(iter_documents(path))


def test_json_shapes_that_datasets_reads_still_read(tmp_path):
    assert load_texts(_write(tmp_path / "rows.json", '[{"text": "a"}, {"text": "b"}]')) == ["a", "b"]
    assert load_texts(_write(tmp_path / "strings.json", '["doc one", "doc two"]')) == ["doc one", "doc two"]
    assert load_texts(_write(tmp_path / "columns.json", '{"text": ["a", "b"], "id": [1, 2]}')) == ["a", "b"]
    assert load_texts(_write(tmp_path / "one.json", '{"text": "only"}')) == ["only"]
    assert load_texts(_write(tmp_path / "lines.json", '{"text": "a"}\n{"text": "b"}\n')) == ["a", "b"]
    # Rows given directly (e.g. already in memory) go through the same templates and columns.
    assert load_texts([{"story": "x"}, {"story": " "}], text_column="story") == ["x"]
    with pytest.raises(ValueError, match=r"Template 'helpsteer' cannot read a row"):
        load_texts([{"prompt": None, "response": "r"}], template="helpsteer")
    with pytest.raises(ValueError, match="is empty"):
        load_texts(_write(tmp_path / "empty.jsonl", "\n\n"))
