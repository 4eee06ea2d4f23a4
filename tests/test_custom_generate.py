"""The exported custom_generate folder works through transformers' own custom_generate loading."""

from pathlib import Path

import torch

from hf_sde.commands import main
from hf_sde.fitting.fit import fit_heads

REPO = Path(__file__).resolve().parents[1]


def test_exported_custom_generate_runs_sde_control(stories_model, stories_trajectories, tmp_path, capsys):
    model, tok = stories_model
    heads_dir = tmp_path / "heads"
    fit_heads(stories_trajectories, proj_dim=8, epochs=2, progress=False).heads.save_pretrained(heads_dir)
    assert main(["export-generate", str(tmp_path / "repo")]) == 0
    files = sorted(p.name for p in (tmp_path / "repo" / "custom_generate").iterdir())
    # every module generate.py reaches, flattened; not the control modules it never imports (the baseline
    # processors, the GGUF control-vector reader), so the folder needs nothing beyond its requirements.txt
    unreached = {"processors.py", "vectors.py"}
    control_files = ["control.py"] + sorted(f"control_{p.name}" for p in (REPO / "hf_sde" / "control").glob("*.py")
                                            if p.name != "__init__.py" and p.name not in unreached)
    assert files == sorted(control_files + ["generate.py", "fitting_heads.py", "data_layers.py", "requirements.txt",
                                            "version.py"])
    for name in files:
        if name.endswith(".py"):
            source = (tmp_path / "repo" / "custom_generate" / name).read_text()
            assert "from .." not in source and "import gguf" not in source, name

    enc = tok(["Once upon a time"], return_tensors="pt")
    torch.manual_seed(0)
    plain = model.generate(**enc, do_sample=True, max_new_tokens=8)
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, max_new_tokens=8, custom_generate=str(tmp_path / "repo"),
                         trust_remote_code=True, return_dict_in_generate=True,
                         sde_control={"heads": str(heads_dir), "mode": "observe"})
    assert torch.equal(out.sequences, plain)  # observe: the stock tokens, plus the trace
    assert out.sde_trace.zscore.shape == (1, 8)
    assert torch.isfinite(out.sde_trace.diffusion).all()
    torch.manual_seed(0)
    hot = model.generate(**enc, do_sample=True, max_new_tokens=8, custom_generate=str(tmp_path / "repo"),
                         trust_remote_code=True, return_dict_in_generate=True,
                         sde_control={"heads": str(heads_dir), "mode": "temperature", "beta": 2.0})
    tau = hot.sde_trace.temperature
    assert ((tau >= 0.3) & (tau <= 1.5)).all() and not torch.allclose(tau, torch.ones_like(tau))


def test_export_refuses_a_heads_folder_unless_overwrite(stories_trajectories, tmp_path, capsys):
    heads_dir = tmp_path / "heads"
    fit_heads(stories_trajectories, proj_dim=4, epochs=1, progress=False).heads.save_pretrained(heads_dir)
    before = sorted(p.name for p in heads_dir.iterdir())
    assert main(["export-generate", str(heads_dir)]) == 2
    assert "holds saved SDE heads" in capsys.readouterr().err
    assert sorted(p.name for p in heads_dir.iterdir()) == before
    assert main(["export-generate", str(heads_dir), "--overwrite"]) == 0
    assert sorted(p.name for p in heads_dir.iterdir()) == ["README.md", "custom_generate"]
