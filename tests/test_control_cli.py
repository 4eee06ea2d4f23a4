"""``hf-sde generate``: JSON and table output, same-seed comparison, model selection from the heads."""

from __future__ import annotations

import json

import control_fixtures
import pytest
from control_fixtures import encode, run

import hf_sde.commands._model
from hf_sde.commands import main
from hf_sde.data.loading import STORIES260K

DEFAULT_MODEL = STORIES260K.name_or_path

make_stories = control_fixtures.make_stories  # a fixture (fresh stories260K copies)

ROW_KEYS = {"step", "token", "token_id", "diffusion", "zscore", "temperature", "steer_norm", "surprise"}


def _strict_json(text: str):
    def no_constants(name):
        raise ValueError(f"not valid JSON: {name}")

    return json.loads(text, parse_constant=no_constants)


@pytest.fixture
def cli_setup(make_stories, tmp_path, monkeypatch):
    """Heads saved to a folder, and the CLI's model loader answering with a copy of the session model."""
    bundle = make_stories()
    folder = tmp_path / "heads"
    bundle.heads.save_pretrained(folder)
    calls = []

    def load(args, heads_config=None, **kwargs):
        spec = hf_sde.commands._model.model_spec_from_args(args, heads_config)
        calls.append((spec.name_or_path, spec.gguf_file, spec.revision))
        return make_stories().model, bundle.tok

    monkeypatch.setattr(hf_sde.commands._model, "load_model_from_args", load)
    return bundle, folder, calls


def test_generate_json_with_compare(cli_setup, capsys):
    bundle, folder, calls = cli_setup
    rc = main(["generate", "--heads", str(folder), "--prompt", "Once upon a time", "--mode", "temperature",
               "--compare", "--json", "--max-new-tokens", "8"])
    assert rc == 0
    # With no model flags, the model comes from what the heads recorded (fit_heads reads it off the trajectories).
    cfg = bundle.heads.config
    assert (cfg.base_model, cfg.gguf_file) == (DEFAULT_MODEL, "tinyllamas/stories260K.gguf")
    assert calls == [(cfg.base_model, cfg.gguf_file, cfg.base_model_revision)]
    data = _strict_json(capsys.readouterr().out)  # one strict JSON object (no bare NaN)
    assert data["prompt"] == "Once upon a time" and data["mode"] == "temperature"
    assert data["text"].startswith("Once upon a time")
    for part in (data, data["plain"]):
        rows = part["tokens"]
        assert 1 <= len(rows) <= 8 and all(set(r) == ROW_KEYS for r in rows)
        assert [r["step"] for r in rows] == list(range(len(rows)))
        assert rows[-1]["surprise"] is None and all(isinstance(r["surprise"], float) for r in rows[:-1])
        assert all(isinstance(r["zscore"], float) for r in rows)
    assert all(0.3 <= r["temperature"] <= 1.5 for r in data["tokens"])
    assert all(r["temperature"] == 1.0 for r in data["plain"]["tokens"])
    # "plain" is stock sampling with the same seed.
    model, tok = bundle.model, bundle.tok
    inputs = encode(tok, ["Once upon a time"])
    plain = run(model.generate, inputs, 0, do_sample=True, top_k=0, max_new_tokens=8)
    assert data["plain"]["text"] == tok.decode(plain[0], skip_special_tokens=True)
    new = plain[0, inputs["input_ids"].shape[1]:].tolist()
    assert [r["token_id"] for r in data["plain"]["tokens"]] == new[: len(data["plain"]["tokens"])]
    # The token column is display text: pieces that decode back to the continuation.
    assert "".join(r["token"] for r in data["plain"]["tokens"]) == tok.decode(new[: len(data["plain"]["tokens"])],
                                                                           skip_special_tokens=True)


def test_generate_table_output(cli_setup, capsys):
    _, folder, _ = cli_setup
    rc = main(["generate", "--heads", str(folder), "--prompt", "Once upon a time", "--mode", "steer", "--alpha",
               "0.2", "--greedy", "--compare", "--max-new-tokens", "5"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "=== SDE-controlled (steer) ===" in out and "=== plain (same seed" in out
    header = [line for line in out.splitlines() if line.split()[:2] == ["step", "token"]]
    assert len(header) == 2 and header[0].split() == ["step", "token", "diff", "z", "temp", "steer", "surprise"]
    table_rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(table_rows) == 10
    assert float(table_rows[0].split()[-2]) > 0  # steered: non-zero steer norm
    assert float(table_rows[5].split()[-2]) == 0  # plain: none


def test_generate_uses_the_heads_model_and_reports_errors(cli_setup, capsys, tmp_path):
    bundle, folder, calls = cli_setup
    cfg = bundle.heads.config
    cfg.base_model, cfg.gguf_file, cfg.base_model_revision = DEFAULT_MODEL, "tinyllamas/other.gguf", "abc"
    other = tmp_path / "other"
    bundle.heads.save_pretrained(other)
    main(["generate", "--heads", str(other), "--prompt", "Hi", "--max-new-tokens", "2", "--json"])
    assert calls[-1] == (DEFAULT_MODEL, "tinyllamas/other.gguf", "abc")
    main(["generate", "--heads", str(other), "--prompt", "Hi", "--max-new-tokens", "2", "--json",
          "--gguf-file", "tinyllamas/stories260K.gguf"])
    # an explicit file wins (the known repo's pinned revision with it)
    assert calls[-1] == (DEFAULT_MODEL, "tinyllamas/stories260K.gguf", STORIES260K.revision)
    capsys.readouterr()
    assert main(["generate", "--heads", str(tmp_path / "missing"), "--prompt", "Hi"]) == 2
    assert "error" in capsys.readouterr().err


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def test_generate_formats_chat_prompts_for_response_heads(cli_setup, capsys, tmp_path):
    """--chat defaults on when the tokenizer has a chat template and the heads model responses (prompt_end)."""
    bundle, folder, _ = cli_setup
    args = ["generate", "--prompt", "Tell a story", "--max-new-tokens", "3", "--json", "--greedy"]
    # stories260K has no chat template: plain prompt, and --chat says why it cannot.
    assert main([*args, "--heads", str(folder)]) == 0
    assert _strict_json(capsys.readouterr().out)["chat"] is False
    assert main([*args, "--heads", str(folder), "--chat"]) == 2
    assert "chat template" in capsys.readouterr().err
    bundle.tok.chat_template = CHAT_TEMPLATE
    try:
        assert main([*args, "--heads", str(folder)]) == 0  # heads fitted on whole sequences: still plain
        assert _strict_json(capsys.readouterr().out)["chat"] is False
        bundle.heads.config.time_origin = "prompt_end"
        response_heads = tmp_path / "response-heads"
        bundle.heads.save_pretrained(response_heads)
        assert main([*args, "--heads", str(response_heads)]) == 0
        data = _strict_json(capsys.readouterr().out)
        assert data["chat"] is True and not data["text"].startswith("Tell a story")  # the answer alone
        assert main([*args, "--heads", str(response_heads), "--no-chat"]) == 0
        assert _strict_json(capsys.readouterr().out)["text"].startswith("Tell a story")
    finally:
        bundle.tok.chat_template = None
