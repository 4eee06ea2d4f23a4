"""Every example runs offline, as a user would run it, with small settings."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_HUB = os.path.join(os.path.dirname(REPO), "shared", "hf-cache", "hub")


def run_example(name, *args, env=None, expect=0):
    full_env = {**os.environ, "HF_HUB_CACHE": SHARED_HUB, "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", name), *args], cwd=REPO,
                          capture_output=True, text=True, env=full_env, timeout=900)
    assert proc.returncode == expect, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def helpsteer_heads(tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "helpsteer"
    stdout = run_example("fit_helpsteer.py", "--out", str(out), "--limit", "40", "--epochs", "2",
                         "--max-length", "64", "--push", "user/stories260k-sde", expect=1)
    assert "Held-out transition NLL" in stdout
    assert "pushing needs a Hugging Face token" in stdout
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    return out


def test_end_to_end(tmp_path):
    out = run_example("end_to_end.py", "--epochs", "3", "--max-new-tokens", "6", "--cache", str(tmp_path / "h"))
    assert "Held-out transition NLL" in out
    assert "=== plain sampling (observed) ===" in out and "SDE temperature control" in out
    assert out.count("diff z") == 2
    # Second run reuses the cached heads.
    again = run_example("end_to_end.py", "--max-new-tokens", "4", "--cache", str(tmp_path / "h"))
    assert "Reusing heads" in again


def test_controlled_generation(helpsteer_heads):
    out = run_example("controlled_generation.py", "--heads", str(helpsteer_heads), "--max-new-tokens", "6")
    for name in ("observe", "temperature beta=+1", "steer along the drift", "temperature+steer"):
        assert f"=== {name}" in out
    assert out.count("[1] ") == 6


def test_streaming(helpsteer_heads):
    out = run_example("streaming.py", "--heads", str(helpsteer_heads), "--max-new-tokens", "6")
    assert "6 steps streamed with live statistics." in out
    assert "T=" in out


def test_load_from_repo_id(helpsteer_heads, tmp_path):
    # Lay the heads out as a cached hub repo (what a previous download leaves), beside the shared model.
    cache = tmp_path / "hub"
    cache.mkdir()
    for entry in os.listdir(SHARED_HUB):
        os.symlink(os.path.join(SHARED_HUB, entry), cache / entry)
    commit = "0" * 40
    repo = cache / "models--user--stories260k-sde"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(helpsteer_heads, repo / "snapshots" / commit)
    out = run_example("load_from_repo.py", "user/stories260k-sde", env={"HF_HUB_CACHE": str(cache)})
    assert "Heads for ggml-org/models-moved layer 4" in out
    assert "diffusion z per step" in out
