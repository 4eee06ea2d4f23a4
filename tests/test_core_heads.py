"""SDE heads: hub round trip, strict loading, compatibility checks, positivity and unit conversion."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from control_fixtures import random_heads
from safetensors.torch import load_file, save_file

from hf_sde.fitting.heads import SDEHeads


def _heads(seed: int = 0, **overrides) -> SDEHeads:
    return random_heads(seed, **overrides)


def _inputs(seed: int = 1, n: int = 40, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 2, torch.rand(n, generator=g)


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path):
    heads = _heads()
    heads.save_pretrained(tmp_path / "heads")
    back = SDEHeads.from_pretrained(str(tmp_path / "heads"))
    assert back.config == heads.config
    z, t = _inputs()
    hidden = torch.randn(5, 32)
    for a, b in zip(heads(z, t), back(z, t), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(heads.project(hidden), back.project(hidden))
    assert torch.equal(heads.lift(z), back.lift(z))
    assert not back.training
    for name, tensor in heads.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


def test_saved_folder_holds_weights_config_and_model_card(tmp_path):
    folder = tmp_path / "heads"
    _heads().save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "tiny/llama" in card  # the base model
    assert "abc123" in card  # its revision
    assert "Held-out transition NLL" in card
    assert "| neural | 1.1000 |" in card and "| ou | 1.2000 |" in card and "| brownian | 1.5000 |" in card
    assert "library_name: hf-sde" in card
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["hidden_size"] == 32 and config["layer"] == 2 and config["base_model"] == "tiny/llama"
    assert set(load_file(str(folder / "model.safetensors"))) == set(_heads().state_dict())


def test_loading_is_strict_about_keys_and_shapes(tmp_path):
    folder = tmp_path / "heads"
    _heads().save_pretrained(folder)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))

    save_file({**state, "extra.weight": torch.zeros(2)}, str(weights))
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        SDEHeads.from_pretrained(str(folder))

    partial = dict(state)
    del partial["drift_linear.weight"]
    save_file(partial, str(weights))
    with pytest.raises(ValueError, match=r"missing keys \['drift_linear.weight'\]"):
        SDEHeads.from_pretrained(str(folder))

    save_file({**state, "proj_mean": torch.zeros(33)}, str(weights))
    with pytest.raises(ValueError, match="proj_mean has shape"):
        SDEHeads.from_pretrained(str(folder))


def test_corrupt_or_truncated_weights_raise(tmp_path):
    folder = tmp_path / "heads"
    _heads().save_pretrained(folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        SDEHeads.from_pretrained(str(folder))
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt"):
        SDEHeads.from_pretrained(str(folder))

    config = folder / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "mystery": 1}))
    with pytest.raises(ValueError, match="mystery"):
        SDEHeads.from_pretrained(str(folder))
    with pytest.raises(FileNotFoundError):
        SDEHeads.from_pretrained(str(tmp_path))  # a folder without heads


def test_check_compatible(tiny_models):
    llama = tiny_models("llama")  # hidden 32, 3 layers
    heads = _heads()
    heads.check_compatible(llama)
    heads.check_compatible(llama, layer=2)
    heads.check_compatible(llama, layer=-1)  # the same block, counted from the end
    with pytest.raises(ValueError, match=r"hidden size 64.*hidden size 32"):
        _heads(hidden_size=64).check_compatible(llama)
    with pytest.raises(ValueError, match=r"5 decoder layers.*has 3"):
        _heads(num_layers=5).check_compatible(llama)
    with pytest.raises(ValueError, match=r"read decoder layer 2, but layer 0 was requested"):
        heads.check_compatible(llama, layer=0)
    with pytest.raises(ValueError, match=r"-3\.\.2"):
        heads.check_compatible(llama, layer=3)


def test_diffusion_is_strictly_positive():
    heads = _heads()
    z, t = _inputs(n=200)
    assert (heads.diffusion(z * 100, t) > 0).all()
    with torch.no_grad():
        heads.diffusion_net[-1].bias.fill_(-1e4)  # the network asks for (far) less than nothing
    std = heads(z, t)[1]
    assert (std > 0).all()
    assert torch.allclose(std, torch.full_like(std, heads.config.sigma_floor))
    assert (heads.diffusion(z, t) > 0).all()


def test_drift_and_diffusion_convert_increment_units_to_time_units():
    heads = _heads(horizon=200.0)
    assert heads.dt == pytest.approx(1 / 200)
    z, t = _inputs()
    mean_inc, std_inc = heads(z, t)
    torch.testing.assert_close(heads.drift(z, t), mean_inc * 200)
    torch.testing.assert_close(heads.diffusion(z, t), std_inc * math.sqrt(200))
    torch.testing.assert_close(heads.f(t, z), heads.drift(z, t))
    torch.testing.assert_close(heads.g(t, z), heads.diffusion(z, t))
    # s_k = sqrt(mean_i sigma_i^2) in time units.
    torch.testing.assert_close(heads.diffusion_magnitude(std_inc), heads.diffusion(z, t).pow(2).mean(-1).sqrt())
    torch.testing.assert_close(heads.times(torch.arange(3)), torch.tensor([0.0, 1 / 200, 2 / 200]))
    # A scalar time broadcasts over the batch.
    torch.testing.assert_close(heads(z, 0.25)[0], heads(z, torch.full((len(z),), 0.25))[0])


def test_projection_and_lift_are_consistent():
    heads = _heads()
    hidden = torch.randn(7, 32)
    z = heads.project(hidden)
    expected = ((hidden - heads.proj_mean) @ heads.proj_basis) / heads.proj_scale
    torch.testing.assert_close(z, expected)
    # Lifting a displacement and projecting it back is the identity when the basis is orthonormal.
    q, _ = torch.linalg.qr(torch.randn(32, 6))
    with torch.no_grad():
        heads.proj_basis.copy_(q)
    dz = torch.randn(3, 6)
    torch.testing.assert_close(heads.project(heads.proj_mean + heads.lift(dz)), dz, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["does-not-exist/", "./nope", "some/deep/path", "/abs/missing"])
def test_a_missing_folder_is_reported_as_one(tmp_path, monkeypatch, name):
    """Before: "Repo id must use alphanumeric chars" or a Hub connection error."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="No SDE heads folder at .* it does not exist"):
        SDEHeads.from_pretrained(name)


def test_an_unknown_repo_id_offline_says_there_is_no_such_folder_either(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no local folder of that name"):
        SDEHeads.from_pretrained("someone/not-cached-heads")


@pytest.mark.parametrize("field,value", [("log_diffusion_std", float("nan")), ("nll_std", 0.0),
                                          ("nll_mean", float("inf")), ("log_diffusion_mean", float("-inf")),
                                          ("horizon", -1.0)])
def test_heads_with_a_non_finite_calibration_are_never_saved_nor_loaded(tmp_path, field, value):
    bad = _heads()
    setattr(bad.config, field, value)
    with pytest.raises(ValueError, match=f"Refusing to save.*{field}"):
        bad.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.safetensors").exists()
    # A folder written by another tool (or an older version) is refused on load.
    _heads().save_pretrained(tmp_path / "edited")
    cfg_path = tmp_path / "edited" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[field] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"Refusing to load.*{field}"):
        SDEHeads.from_pretrained(str(tmp_path / "edited"))


def test_heads_with_non_finite_weights_are_never_saved_nor_loaded(tmp_path):
    bad = _heads()
    with torch.no_grad():
        bad.drift_net[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite values in drift_net.0.weight"):
        bad.save_pretrained(tmp_path / "bad")
    _heads().save_pretrained(tmp_path / "edited")
    weights = tmp_path / "edited" / "model.safetensors"
    state = load_file(weights)
    state["proj_scale"][0] = float("inf")
    save_file(state, weights)
    with pytest.raises(ValueError, match="Refusing to load.*proj_scale"):
        SDEHeads.from_pretrained(str(tmp_path / "edited"))
