"""Rough edges a first user hits: help that states defaults, numbers checked before the model loads, saving over
earlier heads, degenerate calibrations, honest fit verdicts, corpus rows named by line, Ctrl-C, the score
table's empty OU columns, the Space's handler signature, the report's reading aids and the transformers pin.

Each test failed before its fix. Models: stories260K (conftest) through a patched loader, or no model at all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO, STORIES_REPO, TINYSTORIES
from control_fixtures import random_heads

from hf_sde.commands import COMMANDS, build_parser, main
from hf_sde.data.corpus import CHAT_TEMPLATES, TEMPLATES, load_texts
from hf_sde.fitting.heads import SDEHeads

SHIPPED_CONFIG = REPO / "hf_sde" / "pretrained" / "smollm2-135m-instruct-helpsteer" / "config.json"


def _heads(**overrides) -> SDEHeads:
    """Small heads (hidden 32, 3 layers) with random non-zero weights and a sound calibration."""
    return random_heads(**{"log_diffusion_std": 0.2, "base_model_revision": None, "data": {}, **overrides})


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"hf-sde": parser, **sub.choices}


def _help(parser: argparse.ArgumentParser, option: str) -> str:
    """The rendered help of one option, unwrapped (argparse wraps lines at hyphens)."""
    action = next(a for a in parser._actions if option in a.option_strings)
    return parser._get_formatter()._expand_help(action) if action.help else ""


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: argument errors must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("hf_sde.data.loading.load_model", refuse)


@pytest.fixture
def stories_loader(monkeypatch, stories_model):
    monkeypatch.setattr("hf_sde.data.loading.load_model", lambda *args, **kwargs: stories_model)


# ----- 1. help ----------------------------------------------------------------------------------------------
def test_every_option_of_every_command_states_its_default():
    """Before: --epochs, --width, --lr, --seed, --beta, --top-p, -v ... had no help or no default in it."""
    parsers = _subparsers()
    assert set(parsers) == {"hf-sde", *COMMANDS}
    missing = []
    for name, parser in parsers.items():
        one_of = {id(a) for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
        for action in parser._actions:
            if (not action.option_strings or action.required or id(action) in one_of
                    or isinstance(action, argparse._HelpAction)):
                continue
            text = parser._get_formatter()._expand_help(action) if action.help else ""
            if "default" not in text.lower():
                missing.append(f"{name} {'/'.join(action.option_strings)}: {text!r}")
    assert not missing, "\n".join(missing)
    fit = parsers["fit"]
    for option, default in (("--epochs", "60"), ("--width", "128"), ("--depth", "2"), ("--lr", "0.001"),
                            ("--patience", "10"), ("--seed", "0"), ("--proj-dim", "16"), ("--max-length", "256")):
        assert f"(default: {default})" in _help(fit, option), option
    gen = parsers["generate"]
    for option, default in (("--beta", "1.0"), ("--temperature", "1.0"), ("--min-temperature", "0.3"),
                            ("--max-temperature", "1.5"), ("--max-new-tokens", "48")):
        assert f"(default: {default})" in _help(gen, option), option
    assert "default" in _help(gen, "--top-p") and "default" in _help(parsers["hf-sde"], "-v")
    assert "0: no projection" in _help(fit, "--proj-dim")  # what 0 means


@pytest.mark.parametrize("command", ["fit", "fit-distributed", "analyze", "score"])
def test_template_help_lists_every_template(command):
    """Before: "e.g. helpsteer or helpsteer-response", never helpsteer-chat (the one the shipped heads use)."""
    text = _help(_subparsers()[command], "--template")
    for name in TEMPLATES:
        assert re.search(rf"(^|[ ,:]){re.escape(name)}( \(chat\))?[,;]", text), (name, text)
    assert all(f"{name} (chat)" in text for name in CHAT_TEMPLATES)


def test_fit_layer_default_is_the_shipped_heads_layer_for_their_model():
    """Before: --layer defaulted to -1 for every model, though the shipped SmolLM2 heads read layer 22."""
    from hf_sde.commands import _check

    shipped = json.loads(SHIPPED_CONFIG.read_text())
    parsers = _subparsers()
    for command in ("fit", "fit-distributed"):
        text = _help(parsers[command], "--layer")
        assert f"{shipped['layer']} for {shipped['base_model']}" in text and "-1" in text
    for argv, layer in ((["fit", "--data", "x.txt", "--out", "o"], shipped["layer"]),
                        (["fit", "--model", shipped["base_model"], "--data", "x.txt", "--out", "o"], shipped["layer"]),
                        (["fit", "--model", STORIES_REPO, "--data", "x.txt", "--out", "o"], -1),
                        (["fit", "--data", "x.txt", "--out", "o", "--layer", "3"], 3)):
        args = build_parser().parse_args(argv)
        _check(args)
        assert args.layer == layer, argv


# ----- 2. numbers checked while parsing -----------------------------------------------------------------------
FIT = ["fit", "--data", str(TINYSTORIES), "--out", "never-written"]
GENERATE = ["generate", "--prompt", "Hi", "--model", STORIES_REPO]
SCORE = ["score", "--text", "Hi", "--model", STORIES_REPO]
ANALYZE = ["analyze", "--heads", "h/", "--data", str(TINYSTORIES), "--out", "never-written"]


@pytest.mark.parametrize("argv,option,message", [
    (FIT + ["--proj-dim", "-3"], "--proj-dim", "0 or a positive integer"),
    (FIT + ["--epochs", "0"], "--epochs", "positive integer"),
    (FIT + ["--lr", "0"], "--lr", "> 0"),
    (FIT + ["--lr", "nan"], "--lr", "finite"),
    (FIT + ["--width", "-1"], "--width", "positive integer"),
    (FIT + ["--depth", "0"], "--depth", "positive integer"),
    (FIT + ["--patience", "-1"], "--patience", "0 or a positive integer"),
    (FIT + ["--max-length", "0"], "--max-length", "positive integer"),
    (FIT + ["--heldout-fraction", "1"], "--heldout-fraction", "between 0 and 1"),
    (FIT + ["--fit-batch-size", "0"], "--fit-batch-size", "positive integer"),
    (FIT + ["--limit", "0"], "--limit", "positive integer"),
    (FIT + ["--seed", "-1"], "--seed", "0 or a positive integer"),
    (FIT + ["--epochs", "ten"], "--epochs", "'ten' is not an integer"),
    (FIT + ["--template", "helpsteer-chatt"], "--template", "invalid choice"),
    (GENERATE + ["--temperature", "0"], "--temperature", "> 0"),
    (GENERATE + ["--min-temperature", "-1"], "--min-temperature", "> 0"),
    (GENERATE + ["--top-p", "0"], "--top-p", "(0, 1]"),
    (GENERATE + ["--top-p", "1.5"], "--top-p", "(0, 1]"),
    (GENERATE + ["--max-new-tokens", "0"], "--max-new-tokens", "positive integer"),
    (GENERATE + ["--beta", "inf"], "--beta", "finite"),
    (GENERATE + ["--min-temperature", "2", "--max-temperature", "1"], "--min-temperature", "min <= max"),
    (SCORE + ["--tube", "1.5"], "--tube", "between 0 and 1"),
    (SCORE + ["--max-length", "-5"], "--max-length", "positive integer"),
    (ANALYZE + ["--n-paths", "0"], "--n-paths", "positive integer"),
])
def test_bad_numbers_are_refused_before_the_model_loads(argv, option, message, capsys, no_model_load):
    """Before: --proj-dim -3 was taken as "no projection"; --epochs 0, --lr 0, --top-p 2 ... failed (or not) after
    the 8-10 s model load."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and message in err, err
    assert not Path("never-written").exists()


def test_proj_dim_zero_is_valid_and_means_no_projection():
    args = build_parser().parse_args([*FIT, "--proj-dim", "0"])
    assert args.proj_dim == 0


# ----- 3. saving over earlier heads ----------------------------------------------------------------------------
def test_save_pretrained_refuses_earlier_heads_and_overwrite_removes_the_stale_fit(tmp_path):
    """Before: a second save silently replaced the heads and left the first fit's fit_history.json beside them."""
    folder = tmp_path / "heads"
    _heads(layer=1).save_pretrained(folder)
    (folder / "fit_history.json").write_text('{"summary": "of the earlier fit"}')
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"already holds.*overwrite=True"):
        _heads(layer=2).save_pretrained(folder)
    assert SDEHeads.from_pretrained(str(folder)).config.layer == 1  # untouched
    _heads(layer=2).save_pretrained(folder, overwrite=True)
    assert SDEHeads.from_pretrained(str(folder)).config.layer == 2
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors", "notes.txt"]
    _heads().save_pretrained(tmp_path / "new")  # a new (or empty) folder needs nothing
    (tmp_path / "empty").mkdir()
    _heads().save_pretrained(tmp_path / "empty")


def test_the_model_card_keeps_corpus_template_and_max_length(tmp_path):
    data = {"corpus": "helpsteer_sample_500.jsonl", "template": "helpsteer-chat", "max_length": 256, "sequences": 500}
    _heads(data=data).save_pretrained(tmp_path / "known")
    card = (tmp_path / "known" / "README.md").read_text()
    assert "Corpus `helpsteer_sample_500.jsonl`, template `helpsteer-chat`, paths of at most 256 tokens." in card
    assert "sequences: 500" in card
    _heads(data={"sequences": 5}).save_pretrained(tmp_path / "unknown")
    card = (tmp_path / "unknown" / "README.md").read_text()
    assert "not recorded" in card and "data_description=" in card


# ----- 4. degenerate calibrations -----------------------------------------------------------------------------
def test_a_constant_diffusion_warns_at_save_and_at_load(tmp_path):
    """Before: heads with log_diffusion_std = 1e-6 (every token the same z) saved and loaded without a word."""
    with pytest.warns(UserWarning, match=r"log_diffusion_std=1e-06.*same on every token.*refit"):
        _heads(log_diffusion_std=1e-6).save_pretrained(tmp_path / "flat")
    with pytest.warns(UserWarning, match=r"Loading .*log_diffusion_std=1e-06"):
        SDEHeads.from_pretrained(str(tmp_path / "flat"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a sound spread: silent
        _heads(log_diffusion_std=0.2).save_pretrained(tmp_path / "sound")
        SDEHeads.from_pretrained(str(tmp_path / "sound"))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="log_diffusion_std"):
            _heads(log_diffusion_std=bad).save_pretrained(tmp_path / f"bad{bad}")


# ----- 5. fit verdicts -------------------------------------------------------------------------------------------
def test_a_fit_that_ties_ou_is_not_said_to_beat_it(tmp_path, capsys, stories_loader):
    """Before: a fit whose neural NLL equalled OU's up to rounding printed "The neural SDE beats both baselines"
    (or not, by the rounding's sign). lr 1e-12: early stopping keeps the OU starting point."""
    out = tmp_path / "heads"
    with pytest.warns(UserWarning, match="nearly\\) constant"):  # and the flat diffusion is flagged at save
        rc = main(["fit", "--model", STORIES_REPO, "--data", str(TINYSTORIES), "--proj-dim", "4", "--width", "8",
                   "--epochs", "1", "--lr", "1e-12", "--heldout-fraction", "0.4", "-q", "--out", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "beats" not in stdout and "The neural SDE is no better than OU" in stdout, stdout
    assert re.search(r"neural - OU\s+[+-]0\.0000\s+95% interval \[[+-]0\.0000, [+-]0\.0000\]", stdout), stdout
    assert "paired bootstrap over the 2 held-out sequences" in stdout
    summary = json.loads((out / "fit_history.json").read_text())["summary"]
    cmp = summary["heldout_comparison"]
    assert cmp["sequences"] == 2 and cmp["neural_beats_baselines"] is False and cmp["ou"]["neural_better"] is False
    assert abs(cmp["ou"]["difference"]) < 1e-4
    assert summary["neural_beats_baselines"] is False  # the summary's headline follows the interval, not the sign


def test_the_report_verdict_needs_the_same_margin():
    """Before: the report and `hf-sde analyze` said "beats" whenever the neural point estimate was lowest."""
    from hf_sde.analysis.report import verdicts
    from hf_sde.fitting.compare import compare_on_paths

    torch.manual_seed(0)
    paths = [torch.randn(20, 3).cumsum(0) * 0.1 for _ in range(6)]

    def model(shift, std):
        return lambda z, t: (torch.full_like(z, shift), torch.full_like(z, std))

    # neural a hair better than OU on every sequence (OU's spread 1e-6 too wide), far from a real gain: a tie
    cmp = compare_on_paths({"neural": model(0.0, 1.0), "ou": model(0.0, 1.0 + 1e-6), "brownian": model(2.0, 1.0)},
                           paths, 20.0)
    assert cmp["ou"]["difference"] < 0 and not cmp["ou"]["neural_better"] and not cmp["neural_beats_baselines"]
    assert cmp["brownian"]["neural_better"]
    sim = {"sliced_wasserstein": {"neural": 0.2, "ou": 0.3, "brownian": 0.5}, "neural_ou_gap_within_noise": None,
           "neural_closer_than_ou": True}
    nll = {"neural": 1.0, "ou": 1.0 + 1e-9, "brownian": 2.0}
    said = verdicts({"heldout_nll": nll, "neural_beats_baselines": cmp["neural_beats_baselines"],
                     "heldout_comparison": cmp, "simulation": sim})["nll"]
    assert "does NOT beat" in said and "95% interval" in said and "neural and OU differ by less than" in said, said


def test_the_verdict_says_beats_only_when_every_interval_excludes_zero():
    from hf_sde.commands.fit import verdict_lines
    from hf_sde.fitting.compare import MIN_NLL_GAIN, paired_bootstrap

    # every held-out sequence 0.1 nats/dim better: the interval is a point at -0.1
    assert paired_bootstrap([-10.0, -20.0, -5.0], [100, 200, 50]) == pytest.approx((-0.1, -0.1))
    assert paired_bootstrap([-1.0], [10]) is None  # one sequence: no interval
    lo, hi = paired_bootstrap([-5.0, 4.0, -3.0, 4.5], [100, 100, 100, 100])
    assert lo < 0 < hi
    win = {"difference": -0.1, "interval": [-0.12, -0.08], "neural_better": True}
    tie = {"difference": -0.001, "interval": [-0.01, 0.008], "neural_better": False}
    worse = {"difference": 0.05, "interval": [0.02, 0.08], "neural_better": False}
    base = {"sequences": 4, "resamples": 2000, "level": 0.95, "min_gain": MIN_NLL_GAIN}
    assert verdict_lines({**base, "ou": win, "brownian": win, "neural_beats_baselines": True})[-1] == \
        "The neural SDE beats both baselines (both intervals lie below 0)."
    said = verdict_lines({**base, "ou": tie, "brownian": win, "neural_beats_baselines": False})
    assert said[0] == "  neural - OU       -0.0010  95% interval [-0.0100, +0.0080]"
    assert said[-1] == "The neural SDE is no better than OU: the interval of neural - OU includes 0."
    said = verdict_lines({**base, "ou": worse, "brownian": tie, "neural_beats_baselines": False})
    assert said[-1].startswith("The neural SDE is no better than OU or Brownian: it is worse than OU")
    one = verdict_lines({**base, "sequences": 1, "ou": {**win, "interval": None}, "brownian": {**win, "interval": None},
                         "neural_beats_baselines": False})
    assert "no interval" in one[0] and "not shown to beat" in one[-1]


# ----- 6. corpus rows ----------------------------------------------------------------------------------------------
def test_a_row_missing_a_field_is_named_by_its_line(tmp_path):
    """Before: "Template 'helpsteer' needs column 'response', but <file> has ['prompt']": no row, and as if the
    whole file lacked the column."""
    rows = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}, {"prompt": "p3"},
            {"prompt": "p4", "response": "r4"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError) as info:
        load_texts(str(path), template="helpsteer")
    msg = str(info.value)
    assert "line 3" in msg and "'response'" in msg and "elsewhere (line 1 has it)" in msg and "fix or drop" in msg
    # the first row lacks it, later ones have it: found by reading on
    path.write_text("\n".join(json.dumps(r) for r in [rows[2], *rows[:2]]) + "\n")
    with pytest.raises(ValueError, match=r"line 1: this row has no 'response' field.*elsewhere \(line 2 has it\)"):
        load_texts(str(path), template="helpsteer")
    # plain text column, blank lines count
    path.write_text('{"text": "a"}\n\n{"story": "b"}\n')
    with pytest.raises(ValueError, match=r"line 3: this row has no 'text' field.*elsewhere \(line 1 has it\)"):
        load_texts(str(path))
    # no row has it: the column is missing, as before, now with the row read
    csv = tmp_path / "rows.csv"
    csv.write_text("question,answer\nq,a\n")
    with pytest.raises(ValueError, match=r"needs column 'prompt', but no row of the file has it .*line 2"):
        load_texts(str(csv), template="helpsteer")
    # a .json list: rows counted from 1
    js = tmp_path / "rows.json"
    js.write_text(json.dumps([{"text": "a"}, {"body": "b"}]))
    with pytest.raises(ValueError, match=r"row 2: this row has no 'text' field"):
        load_texts(str(js))


# ----- 7. Ctrl-C --------------------------------------------------------------------------------------------------------
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, capsys, monkeypatch, stories_model):
    """Before: a 30-frame KeyboardInterrupt traceback."""
    from hf_sde.fitting.heads import SDEHeads as Heads

    monkeypatch.setattr("hf_sde.data.loading.load_model", lambda *args, **kwargs: stories_model)
    real_save = Heads._save_pretrained

    def save_then_interrupt(self, save_directory):
        real_save(self, save_directory)
        raise KeyboardInterrupt  # Ctrl-C after the weights were written into the partial folder

    monkeypatch.setattr(Heads, "_save_pretrained", save_then_interrupt)
    out = tmp_path / "out"
    assert main(["fit", "--model", STORIES_REPO, "--data", str(TINYSTORIES), "--proj-dim", "4", "--epochs", "1",
                 "-q", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"hf-sde fit: interrupted (Ctrl-C) before the heads were saved; nothing was written "
                   f"(--out {out} is as it was)."]
    assert os.listdir(tmp_path) == []  # true: no heads, no partial folder

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("hf_sde.data.loading.load_model", interrupt)
    assert main(SCORE) == 130
    assert capsys.readouterr().err.strip() == "hf-sde score: interrupted (Ctrl-C); nothing was written."


# ----- 8. score's OU columns ------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*diffusion is \\(nearly\\) constant")  # a 1-epoch fit may keep the OU start
def test_score_says_why_the_ou_columns_are_empty(tmp_path, capsys, stories_loader, stories_trajectories):
    """Before: '-' in the OU columns, no word why."""
    from hf_sde.fitting.fit import fit_heads

    folder = tmp_path / "heads"
    fit_heads(stories_trajectories, proj_dim=4, epochs=1, width=8, progress=False).heads.save_pretrained(folder)
    base = ["score", "--heads", str(folder), "--model", STORIES_REPO, "--text", "Once upon a time there was a cat."]
    assert main(base) == 0
    lines = capsys.readouterr().out.splitlines()
    assert " - " in lines[1]
    assert lines[-1] == ("Note: the OU NLL and SDE-OU columns are '-' because the heads store no OU fit; pass "
                         "--ou-data FILE (e.g. the heads' training corpus, with --ou-template) to fit one and fill them.")
    assert main([*base, "--ou-data", str(TINYSTORIES)]) == 0
    out = capsys.readouterr().out
    assert "--ou-data" not in out and " - " not in out.splitlines()[1]


# ----- 9. the Space --------------------------------------------------------------------------------------------------
def test_the_space_handler_takes_the_request_and_its_api_is_named(tmp_path):
    """Before: "Expected 11 arguments for function on_generate, received 10" at start and "Unexpected argument.
    Filling with None." on every request (the handler never got its gr.Request); outputs listed as value_NN."""
    pytest.importorskip("gradio")
    import typing

    import gradio as gr

    from hf_sde.data.loading import STORIES260K
    from hf_sde.demo import DemoBackend, build_demo

    for choice in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            demo = build_demo(DemoBackend(STORIES260K, cache_dir=tmp_path), preload=False, allow_model_choice=choice)
        said = [str(w.message) for w in caught]
        assert not [m for m in said if "arguments for function" in m or "Filling with None" in m], said
        fn = next(f for f in demo.fns.values() if f.api_name == "generate")
        assert typing.get_type_hints(fn.fn)["request"] is gr.Request
        info = demo.get_api_info()
        endpoint = info["named_endpoints"]["/generate"]
        labels = [r["label"] for r in endpoint["returns"]]
        assert labels == ["plain sample", "SDE-controlled sample", "Per-step SDE statistics", "Phase plane", "summary",
                          "model and heads"], labels
        assert endpoint["description"].startswith("Sample the prompt plainly and under SDE control")
        names = [p["parameter_name"] for p in endpoint["parameters"]]
        assert names[-10:] == ["prompt", "mode", "beta", "base_temperature", "min_temperature", "max_temperature",
                               "alpha", "direction", "seed", "max_new_tokens"]
        assert [p["parameter_name"] for p in endpoint["parameters"]][:1] == (["model"] if choice else ["prompt"])
        assert set(info["named_endpoints"]) == {"/generate"}


# ----- 10. the report -----------------------------------------------------------------------------------------------
def test_every_theory_check_says_how_to_read_it_and_the_tokens_have_a_legend():
    from hf_sde.analysis import report

    rows = report._theory_rows(_fake_metrics())
    cells = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td></tr>", rows)
    assert len(cells) >= 12 and all(len(how.split()) >= 4 for _, _, how in cells), cells
    legend = report._zscore_legend()
    for z in (-3, 0, 3):
        assert report._zscore_color(z) in legend
    assert "Blue" in legend and "red" in legend and "|z| = 3" in legend


def _fake_metrics() -> dict:
    one = 0.5
    lip = {k: {"jacobian_max": one, "jacobian_p95": one, "pair_ratio_max": one, "growth_max": one}
           for k in ("drift", "diffusion")}
    att = {"residual_drift": one, "data_drift_norm": one, "distance_from_data_mean": one, "linear_eig_real_max": one,
           "reversion_per_step_min": one, "reversion_per_step_max": one}
    ly = {"radius": one, "share_negative_outside": one, "share_negative_all": one, "critical_radius": one}
    ito = {"real": {"mean_rmse": one, "mean_noise_floor": one, "mean_scale": one, "second_ratio": one,
                    "second_em_ratio": one, "second_em_gap_over_noise": one},
           "simulated": {"mean_gap_over_noise": one, "second_em_gap_over_noise": one}}
    return {"theory": {"lipschitz_growth": lip, "attractor": att, "lyapunov": ly, "ito_moments": ito}}


# ----- 11. the transformers pin ---------------------------------------------------------------------------------------
def test_transformers_is_pinned_to_5_17_or_later_and_installed_so():
    """Earlier 5.x versions write a Hub repo's custom_generate code to disk before checking trust_remote_code."""
    import transformers
    from packaging.requirements import Requirement
    from packaging.version import Version

    text = (REPO / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    req = next(Requirement(d) for d in re.findall(r'"([^"]+)"', deps) if Requirement(d).name == "transformers")
    assert not req.specifier.contains("5.16.99") and req.specifier.contains("5.17.0")
    assert Version(transformers.__version__) in req.specifier


@pytest.mark.parametrize("name", ["beta", "alpha", "temperature"])
def test_sde_control_names_the_argument_that_is_not_finite(name):
    from control_fixtures import tiny_bundle

    from hf_sde import SDEControl

    value = float("inf") if name == "temperature" else float("nan")
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number, got"):
        SDEControl(tiny_bundle(layer=1).heads, **{name: value})


# ----- threads ------------------------------------------------------------------------------------------------
def test_every_command_takes_threads(tmp_path, capsys):
    """Before: no thread option; on shared cores torch's default (one thread per core) ran several times slower."""
    import hf_sde.commands as commands

    parser = commands.build_parser()
    for name in commands.COMMANDS:
        assert "--threads" in parser._subparsers._group_actions[0].choices[name].format_help(), name
    before = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit, match="needs --data"):  # the thread count is set before the command runs
            main(["fit", "--threads", "1", "--out", str(tmp_path / "h")])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["fit", "--threads", "0", "--out", str(tmp_path / "h")])
    assert "argument --threads: must be a positive integer (1 or more), got '0'" in capsys.readouterr().err
