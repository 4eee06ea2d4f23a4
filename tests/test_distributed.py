"""Scale-out: lazy corpus reading, sharded extraction, and a 2-process data-parallel fit
(torchrun via ``accelerate launch``, gloo on CPU) that equals the single-process ``fit_heads``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import HELPSTEER, HUB_CACHE, REPO, TINYSTORIES, load_stories

import hf_sde
from hf_sde.data.corpus import iter_documents, load_texts
from hf_sde.fitting.fit import fit_heads_distributed
from hf_sde.trajectories.shards import ShardedCorpus, extract_to_shards, load_shards

CORPUS = dict(template="helpsteer-response", limit=24)
MAX_LENGTH = 48
FIT = dict(proj_dim=8, width=32, epochs=3, batch_size=64, seed=0, progress=False)
# 60 HelpSteer rows share ~17 prompts: >= 10 training groups, so early stopping watches held-back sequences.
GROUPED = dict(template="helpsteer-response", limit=60)


@pytest.fixture(scope="module")
def model():
    return load_stories()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def test_iter_documents_matches_load_texts(tmp_path):
    texts, groups = load_texts(str(HELPSTEER), return_groups=True, **CORPUS)
    streamed = list(iter_documents(str(HELPSTEER), **CORPUS))
    assert [t for t, _ in streamed] == texts and [g for _, g in streamed] == groups
    assert [t for t, _ in iter_documents(str(TINYSTORIES))] == load_texts(str(TINYSTORIES))
    # A folder of files is one corpus, read file after file in sorted order.
    lines = ["first doc", "", "second doc", "third doc"]
    (tmp_path / "a.txt").write_text("\n".join(lines[:2]))
    (tmp_path / "b.txt").write_text("\n".join(lines[2:]))
    assert [t for t, _ in iter_documents(str(tmp_path))] == ["first doc", "second doc", "third doc"]
    assert [t for t, _ in iter_documents(str(tmp_path / "*.txt"), limit=2)] == ["first doc", "second doc"]


def test_shards_reassemble_and_stream_fit(model, tmp_path):
    m, tok = model
    ref = hf_sde.extract_trajectories(m, tok, str(HELPSTEER), max_length=MAX_LENGTH, progress=False, **CORPUS)
    for rank in range(3):  # three "ranks" written one after the other, shards of 3 documents
        extract_to_shards(m, tok, str(HELPSTEER), tmp_path, shard_size=3, max_length=MAX_LENGTH, rank=rank,
                          world_size=3, progress=False, **CORPUS)
    corpus = ShardedCorpus(str(tmp_path))
    assert corpus.num_shards == 9 and len(corpus) == len(ref)
    merged = load_shards(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(merged.states, ref.states, strict=True))
    assert merged.meta["groups"] == ref.meta["groups"]
    assert all(s.dtype == torch.float32 for s in merged.states)

    single = hf_sde.fit_heads(ref, **FIT)
    assert single.best_epoch >= 0  # the trained weights are compared, not just the OU starting point
    exact = fit_heads_distributed(str(tmp_path), mode="exact", **FIT)
    assert _max_diff(single.heads, exact.heads) < 1e-4
    for k, v in single.heldout_nll.items():
        assert exact.heldout_nll[k] == pytest.approx(v, abs=1e-5)
    # bf16 (mixed precision) reaches the distributed fit as it does fit_heads: the same one-process fit.
    mixed, mixed_exact = hf_sde.fit_heads(ref, bf16=True, **FIT), fit_heads_distributed(str(tmp_path), bf16=True, **FIT)
    assert mixed_exact.heads.config.data["bf16"] is True and mixed.history["train_total"] != single.history["train_total"]
    assert mixed_exact.history["train_total"] == pytest.approx(mixed.history["train_total"], abs=1e-5)
    # Streaming: the same projection, split and baselines; its own batch order, so only close in NLL.
    stream = fit_heads_distributed(str(tmp_path), mode="stream", **FIT)
    for name in ("proj_basis", "proj_mean", "proj_scale"):
        assert torch.allclose(getattr(stream.heads, name), getattr(single.heads, name), atol=1e-4)
    for k in ("ou", "brownian"):
        assert stream.heldout_nll[k] == pytest.approx(single.heldout_nll[k], abs=1e-5)
    assert stream.heldout_nll["neural"] == pytest.approx(single.heldout_nll["neural"], abs=0.05)
    # Shards of two extractions in one folder are refused, not silently double counted.
    extract_to_shards(m, tok, str(HELPSTEER), tmp_path, shard_size=50, max_length=MAX_LENGTH, rank=0,
                      world_size=1, progress=False, **CORPUS)
    with pytest.raises(ValueError, match="two extractions"):
        ShardedCorpus(str(tmp_path))


def test_device_map_auto_bf16_extraction(tmp_path):
    m, tok = hf_sde.load_model("ggml-org/models-moved", gguf_file="tinyllamas/stories260K.gguf",
                               revision="499bc8821c6b12b4e53c5bffcb21ec206f212d81", device_map="auto",
                               dtype=torch.bfloat16)
    assert next(m.parameters()).dtype == torch.bfloat16
    paths = extract_to_shards(m, tok, str(TINYSTORIES), tmp_path, layer=2, max_length=32, progress=False)
    traj = hf_sde.Trajectories.load(paths[0])
    assert traj.layer == 2 and all(s.dtype == torch.float32 for s in traj.states)
    ids = tok(load_texts(str(TINYSTORIES))[0], return_tensors="pt", truncation=True, max_length=32).input_ids
    with torch.no_grad():
        hs = m(input_ids=ids, output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is the output of block i: the hook read block 2.
    assert torch.equal(traj.states[0], hs[3][0].float())


def test_two_process_fit_equals_single_process(model, tmp_path):
    """The 2-process exact fit (gloo) equals fit_heads on a corpus with >= 10 prompt groups: the same plan,
    PCA, baselines, batches and sequence-level early stopping."""
    out = tmp_path / "heads"
    env = {**os.environ, "HF_HUB_CACHE": str(HUB_CACHE), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "hf_sde.commands", "fit-distributed", "--model", "ggml-org/models-moved", "--cpu", "--data", str(HELPSTEER),
           "--template", GROUPED["template"], "--limit", str(GROUPED["limit"]), "--max-length", str(MAX_LENGTH),
           "--shard-size", "5", "--proj-dim", str(FIT["proj_dim"]), "--width", str(FIT["width"]),
           "--epochs", str(FIT["epochs"]), "--fit-batch-size", str(FIT["batch_size"]), "--seed", "0",
           "--matmul-precision", "highest",  # torch's default: the same numbers, and the option reaches the fit
           "--out", str(out), "--json", "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["processes"] == 2
    shard_files = sorted(os.listdir(out / "trajectories"))
    assert any("rank00000-of-00002" in f for f in shard_files) and any("rank00001-of-00002" in f for f in shard_files)

    m, tok = model
    traj = hf_sde.extract_trajectories(m, tok, str(HELPSTEER), max_length=MAX_LENGTH, progress=False, **GROUPED)
    single = hf_sde.fit_heads(traj, **FIT)
    assert single.best_epoch >= 0 and summary["best_epoch"] == single.best_epoch
    dist_heads = hf_sde.SDEHeads.from_pretrained(str(out))
    assert single.heads.config.data["early_stopping"] == dist_heads.config.data["early_stopping"] == "sequences"
    assert dist_heads.config.data["matmul_precision"] == "highest"
    assert single.history["early_stopping"] == pytest.approx(json.loads((out / "fit_history.json").read_text())
                                                              ["history"]["early_stopping"], abs=1e-5)
    assert _max_diff(single.heads, dist_heads) < 1e-4
    for k, v in single.heldout_nll.items():
        assert summary["heldout_nll"][k] == pytest.approx(v, abs=1e-5)
    assert summary["calibration"]["nll_mean"] == pytest.approx(single.heads.config.nll_mean, abs=1e-4)


_CLOSE_SCRIPT = """
import json, sys, torch, torch.distributed as td
from hf_sde.fitting.process_group import DistEnv
with DistEnv.init(cpu=True) as env:
    total = env.all_reduce_(torch.tensor([float(env.rank + 1)]))
    inside = td.is_initialized()
row = {"rank": env.rank, "total": float(total), "inside": inside, "after": td.is_initialized()}
open(f"{sys.argv[1]}/rank{env.rank}.json", "w").write(json.dumps(row))
"""


def test_dist_env_destroys_the_group_it_started(tmp_path):
    """``with DistEnv.init()`` tears down the gloo group it started: a process that exits with a live group
    can abort at interpreter shutdown (SIGABRT, "terminate called without an active exception")."""
    script = tmp_path / "close.py"
    script.write_text(_CLOSE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["total"] == 3.0 and r["inside"] and not r["after"] for r in rows)
