"""hf_sde.analysis.report: the split logic, the HTML / JSON / PNG outputs, and `hf-sde analyze` end to end on stories260K."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import STORIES_REPO, TINYSTORIES

from hf_sde.analysis import diagnostics as an
from hf_sde.analysis.report import _jsonable, build_report, choose_split, verdicts
from hf_sde.analysis.tokens import token_pieces
from hf_sde.commands import main
from hf_sde.fitting.fit import split_sequences

FIGURES = ["loss_curves.png", "drift_vs_t.png", "drift_quiver.png", "diffusion_vs_t.png", "diffusion_plane.png",
           "sim_moments.png", "process.png", "phase_2d.png", "phase_3d.png", "theory.png"]
TOP_KEYS = {"hf_sde_version", "heads", "data", "fit", "heldout_nll", "heldout_nll_parts", "neural_beats_baselines",
            "drift_diffusion", "process", "simulation", "theory", "examples", "figures", "runtime_s"}

PRINTED: dict[str, str] = {}  # what `hf-sde analyze` printed in the fixture


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    """Heads fitted with `hf-sde fit` on the TinyStories sample, then `hf-sde analyze` without --model."""
    root = tmp_path_factory.mktemp("analyze")
    heads_dir, out = root / "heads", root / "report"
    assert main(["fit", "--model", STORIES_REPO, "--data", str(TINYSTORIES), "--max-length", "128", "--epochs", "3", "--width", "32",
                 "--depth", "1", "--heldout-fraction", "0.4", "--out", str(heads_dir), "-q"]) == 0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["analyze", "--heads", str(heads_dir), "--data", str(TINYSTORIES), "--out", str(out),
                   "--n-paths", "2", "--max-starts", "4", "--max-samples", "300", "--examples", "1", "-q"])
    assert rc == 0
    PRINTED["analyze"] = printed.getvalue()
    return heads_dir, out, json.loads((out / "metrics.json").read_text(), parse_constant=_reject)


def _reject(name):
    raise AssertionError(f"metrics.json is not strict JSON: it contains {name}")


def test_analyze_writes_html_metrics_and_figures(analyzed):
    _, out, m = analyzed
    assert TOP_KEYS <= set(m)
    assert m["figures"] == FIGURES
    for name in FIGURES:
        assert (out / name).stat().st_size > 5000, name
    page = (out / "index.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs == FIGURES  # relative paths, nothing fetched from the network
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count("<figcaption>") == len(FIGURES)
    said = verdicts(m, bold=lambda x: f"<b>{x}</b>")
    assert said["nll"] in page and said["simulation"] in page
    # The terminal says what the page says (same sentences, without the markup).
    plain = verdicts(m)
    assert plain["simulation"] in PRINTED["analyze"] and plain["nll"] in PRINTED["analyze"]
    assert re.sub("</?b>", "", said["simulation"]) == plain["simulation"]
    assert "Theory checks" in page and "metrics.json" in page
    assert page.count("<span style=\"background:") == len(m["examples"][0]["tokens"])


def test_analyze_metrics_keys_and_consistency(analyzed):
    heads_dir, _, m = analyzed
    fit = json.loads((heads_dir / "fit_history.json").read_text())
    d = m["data"]
    # the fit's own held-out split (recorded in fit_history.json) is used and verified, so the held-out NLLs
    # are the fit's
    assert d["heldout_source"] == "recorded" and d["heldout_verified"] is True
    assert d["n_heldout"] == fit["summary"]["num_heldout_sequences"] == 2
    assert d["n_train"] + d["n_heldout"] == d["n_sequences"] == 5
    assert m["fit"] == fit["summary"]
    for k in ("neural", "ou", "brownian"):
        assert m["heldout_nll"][k] == pytest.approx(fit["summary"]["heldout_nll"][k], abs=1e-4)
    assert m["neural_beats_baselines"] == fit["summary"]["neural_beats_baselines"]
    assert m["heads"]["base_model"] == "ggml-org/models-moved" and m["heads"]["proj_dim"] == 16
    assert set(m["drift_diffusion"]) == {"neural", "ou"}
    prof = m["drift_diffusion"]["neural"]
    assert {"drift_norm_mean", "diffusion_mean", "realized_diffusion", "diffusion_calibration_ratio", "bins"} <= set(prof)
    assert sum(prof["bins"]["count"]) == prof["n_transitions"] == d["n_heldout_transitions"]
    proc = m["process"]
    assert {"gaussianity", "gaussianity_ou", "acf_residuals", "acf_increments", "quadratic_variation"} == set(proc)
    assert 0 <= proc["gaussianity"]["ks_pvalue"] <= 1 and 0 < proc["gaussianity"]["ks_statistic"] < 1
    assert "curve_realized" not in proc["quadratic_variation"] and proc["quadratic_variation"]["ratio"] > 0
    sim = m["simulation"]
    assert sim["n_starts"] == 2 and sim["n_paths"] == 2 and sim["method"] == "euler"
    assert set(sim["sliced_wasserstein"]) == {"neural", "ou", "brownian", "real_vs_real"}
    assert set(sim["sliced_wasserstein_increments"]) == {"neural", "ou", "brownian", "real_vs_real"}
    assert sim["neural_closer_than_ou"] == (sim["sliced_wasserstein"]["neural"] < sim["sliced_wasserstein"]["ou"])
    assert set(sim["curve_errors"]) == {"neural", "ou", "brownian"}
    sw = sim["sliced_wasserstein"]
    assert sim["neural_ou_gap_within_noise"] == (abs(sw["neural"] - sw["ou"]) < sw["real_vs_real"])
    th = m["theory"]
    assert {"lipschitz_growth", "attractor", "lyapunov", "ito_moments"} == set(th)
    for f in ("drift", "diffusion"):
        lip = th["lipschitz_growth"][f]
        assert lip["jacobian_max"] >= lip["jacobian_p95"] >= lip["jacobian_median"] >= 0
        assert lip["growth_max"] >= 0
    assert len(th["attractor"]["z_star"]) == 16 and "linear_A" not in th["attractor"]
    assert 0 <= th["lyapunov"]["share_negative_outside"] <= 1
    assert {"mean_ratio", "second_ratio", "second_em_ratio"} <= set(th["ito_moments"]["real"])
    assert "empirical_mean" not in th["ito_moments"]["real"]
    ex = m["examples"][0]
    assert len(ex["tokens"]) == len(ex["zscore"]) == len(ex["diffusion"]) <= 128
    assert all(s > 0 for s in ex["diffusion"])


def test_report_numbers_match_the_analysis_functions(analyzed, stories_model):
    """Recompute a few report numbers from the saved heads with the analysis functions directly."""
    from hf_sde import SDEHeads, extract_trajectories
    from hf_sde.fitting.fit import make_transitions

    heads_dir, _, m = analyzed
    heads = SDEHeads.from_pretrained(str(heads_dir))
    model, tok = stories_model
    traj = extract_trajectories(model, tok, str(TINYSTORIES), layer=heads.config.layer, max_length=128, progress=False)
    _, held = split_sequences(len(traj), 0.4, 0)
    paths = [heads.project(traj.states[i]).detach() for i in held]
    tr = make_transitions(paths, heads.config.horizon)
    prof = an.drift_diffusion_profile(heads, tr)
    assert m["drift_diffusion"]["neural"]["drift_norm_mean"] == pytest.approx(prof["drift_norm_mean"], rel=1e-4)
    g = an.gaussianity(an.standardized_residuals(heads, tr))
    assert m["process"]["gaussianity"]["ks_statistic"] == pytest.approx(g["ks_statistic"], rel=1e-4)
    qv = an.quadratic_variation(heads, paths)
    assert m["process"]["quadratic_variation"]["ratio"] == pytest.approx(qv["ratio"], rel=1e-4)
    td = an.token_diffusion(heads, paths[0])
    assert m["examples"][0]["zscore"] == pytest.approx(td["zscore"], rel=1e-4, abs=1e-4)


def test_build_report_without_history_on_a_list(stories_model, tmp_path):
    """A list of texts (no recorded corpus), no fit history: a fresh split, no loss figure, a note instead."""
    from hf_sde import extract_trajectories, fit_heads

    model, tok = stories_model
    texts = (TINYSTORIES.read_text().split("<|endoftext|>"))
    texts = [t.strip() for t in texts if t.strip()]
    traj = extract_trajectories(model, tok, texts, max_length=96, progress=False)
    heads = fit_heads(traj, epochs=2, width=16, depth=1, progress=False).heads
    m = build_report(model, tok, heads, texts + texts[:3], tmp_path, max_length=96, history=None, n_paths=2,
                     max_starts=3, max_samples=200, n_examples=1, progress=False, method="milstein")
    assert m["data"]["heldout_source"] == "new-split" and m["data"]["heldout_verified"] is None
    assert m["data"]["n_sequences"] == 8 and m["fit"] is None
    assert m["simulation"]["method"] == "milstein"
    assert "loss_curves.png" not in m["figures"] and not (tmp_path / "loss_curves.png").exists()
    page = (tmp_path / "index.html").read_text()
    assert "No fit history was given" in page and "may have been trained on" in page
    assert set(m["figures"]) == set(FIGURES) - {"loss_curves.png"}


def test_choose_split_cases():
    def heads(data):
        return SimpleNamespace(config=SimpleNamespace(data=data))

    groups = ["a", "a", "b", "c", "c", "d", "e", "f", "g", "h"]
    train, held = split_sequences(10, 0.25, 3, groups)
    cfg = {"corpus": "x.jsonl", "sequences": 10, "heldout_sequences": len(held), "train_sequences": len(train)}
    # recorded indices win
    rec = choose_split(10, groups, heads(cfg), {"heldout_indices": [1, 2], "train_indices": [0, 3]}, "x.jsonl")
    assert rec == ([0, 3], [1, 2], "recorded")
    # reconstructed from counts and the recorded seed
    got = choose_split(10, groups, heads(cfg), {"seed": 3}, "x.jsonl")
    assert got == (train, held, "reconstructed")
    # other corpus: every sequence is unseen; unknown provenance: a plain new split
    other = choose_split(10, groups, heads(cfg), None, "y.txt", heldout_fraction=0.3, seed=1)
    assert other[2] == "new-split-unseen-corpus" and other[:2] == split_sequences(10, 0.3, 1, groups)
    assert choose_split(10, groups, heads({}), None, None)[2] == "new-split"
    # counts that do not match the corpus: not reconstructed
    assert choose_split(9, groups[:9], heads(cfg), {"seed": 3}, "x.jsonl")[2] == "new-split"


def test_token_pieces_and_strict_json(stories_model):
    _, tok = stories_model
    ids = tok("Once upon a time, there was a cat.\nIt sat.")["input_ids"]
    pieces = token_pieces(tok, ids, show_special=False)  # the report's token text (shared with the Space)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    out = _jsonable({"a": float("nan"), "b": [torch.tensor(1.5), math.inf], "c": {"d": 2}})
    assert out == {"a": None, "b": [1.5, None], "c": {"d": 2}}


def test_analyze_cli_errors(tmp_path, capsys):
    rc = main(["analyze", "--heads", str(tmp_path), "--data", str(TINYSTORIES), "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "not a saved SDEHeads folder" in capsys.readouterr().err
    assert not Path(tmp_path / "r" / "index.html").exists()


def _sim_metrics(neural: float, ou: float, floor: float, within: bool | None) -> dict:
    return {"heldout_nll": {"neural": 1.0, "ou": 1.1, "brownian": 1.5}, "neural_beats_baselines": True,
            "simulation": {"sliced_wasserstein": {"neural": neural, "ou": ou, "brownian": 0.3, "real_vs_real": floor},
                           "neural_closer_than_ou": neural < ou, "neural_ou_gap_within_noise": within}}


def test_a_gap_within_sampling_noise_is_a_tie_not_closer():
    """Before: `hf-sde analyze` printed "closer than OU" for a 0.00003 gap its own HTML called noise."""
    tie = verdicts(_sim_metrics(0.08698, 0.08701, 0.043, True))["simulation"]
    assert "tie within sampling noise" in tie and "closer to" not in tie and "NOT" not in tie
    real = verdicts(_sim_metrics(0.05, 0.2, 0.01, False))["simulation"]
    assert "closer to the held-out paths than simulated OU paths" in real and "larger than sampling noise" in real
    worse = verdicts(_sim_metrics(0.2, 0.05, 0.01, False))["simulation"]
    assert "NOT closer to" in worse


def test_analyze_refuses_to_write_into_a_non_empty_folder(analyzed, tmp_path, capsys):
    heads_dir, _, _ = analyzed
    before = sorted(p.name for p in heads_dir.iterdir())
    for out in (heads_dir, tmp_path):  # the heads folder itself, any non-empty folder
        (tmp_path / "keep.txt").write_text("x")
        rc = main(["analyze", "--heads", str(heads_dir), "--data", str(TINYSTORIES), "--out", str(out), "-q"])
        assert rc == 2
        err = capsys.readouterr().err
        assert "--overwrite" in err or "is the --heads folder" in err
    assert sorted(p.name for p in heads_dir.iterdir()) == before
    assert (tmp_path / "keep.txt").exists() and not (tmp_path / "index.html").exists()


def test_a_template_other_than_the_fits_is_warned_about():
    """Before: analysing helpsteer-chat heads on helpsteer-response texts gave neural NLL 2e7 without a word."""
    import warnings

    from hf_sde import SDEHeads, SDEHeadsConfig
    from hf_sde.analysis.report import _check_template

    heads = SDEHeads(SDEHeadsConfig(hidden_size=8, proj_dim=4, layer=1, num_layers=2, horizon=16.0,
                                   data={"template": "helpsteer-chat"}))
    with pytest.warns(UserWarning, match=r"fitted on texts made with template 'helpsteer-chat', these with "
                                         r"'helpsteer-response'.*--template helpsteer-chat"):
        _check_template(heads, "helpsteer-response", None)
    with pytest.warns(UserWarning, match="these with None"):
        _check_template(heads, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_template(heads, "helpsteer-chat", None)  # the fit's own template: silent
        unrecorded = SDEHeads(SDEHeadsConfig(hidden_size=8, proj_dim=4, layer=1, num_layers=2, horizon=16.0))
        _check_template(unrecorded, "helpsteer-response", None)
