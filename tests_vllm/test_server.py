"""The OpenAI-compatible server with hf-sde (``python -m hf_sde.vllm.serve``), driven by the ``openai`` client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings

import httpx
import openai
import pytest
import torch

from hf_sde import SDEControl, sde_generate

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "Give three short tips for staying healthy during a busy week at work."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    port = _free_port()
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as users run it: engine in its own process
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "hf_sde.vllm.serve", "--model", folder,
                                 "--served-model-name", MODEL, "--port", str(port), "--max-model-len", "512"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        # Wait until it answers or dies (a generous liveness bound, not a speed check).
        for _ in range(1200):
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"the server did not come up:\n{log.read_text()[-3000:]}")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


def test_chat_with_sde_temperature_returns_trace_matching_sde_generate(client, hf, heads):
    model, tokenizer = hf
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0,
        extra_body={"vllm_xargs": {"sde_mode": "temperature", "sde_beta": 1.0}})
    completion = raw.parse()
    trace = completion.sde_trace
    n = completion.usage.completion_tokens
    assert raw.headers["x-sde-trace-id"].startswith("sde-")
    assert set(trace) == {"diffusion", "zscore", "drift_norm", "temperature", "steer_norm", "surprise", "positions"}
    assert len(trace["zscore"][0]) == n == 12
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    input_ids = torch.tensor([list(ids)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = sde_generate(model, input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=12,
                           do_sample=False, eos_token_id=None, return_dict_in_generate=True,
                           sde_control=SDEControl(heads, mode="temperature", beta=1.0))
    assert completion.choices[0].message.content == tokenizer.decode(ref.sequences[0, input_ids.shape[1]:],
                                                                     skip_special_tokens=True)
    assert torch.allclose(torch.tensor(trace["zscore"]), ref.sde_trace.zscore, atol=1e-4)
    assert torch.allclose(torch.tensor(trace["temperature"]), ref.sde_trace.temperature, atol=1e-4)
    assert trace["positions"] == ref.sde_trace.positions.tolist()
    assert trace["surprise"][0][-1] is None  # NaN travels as null


def test_completion_steer_with_own_trace_id(client):
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
        extra_body={"vllm_xargs": {"sde_mode": "steer", "sde_alpha": 0.3, "sde_trace_id": "my-trace-1"}})
    completion = raw.parse()
    assert raw.headers["x-sde-trace-id"] == "my-trace-1"
    assert all(v > 0 for v in completion.sde_trace["steer_norm"][0])
    plain = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert plain.model_extra.get("sde_trace") is None
    assert plain.choices[0].text != completion.choices[0].text


def test_streaming_trace_is_fetched_once_from_the_endpoint(client, server):
    stream = client.completions.create(model=MODEL, prompt="The sea", max_tokens=5, temperature=0, stream=True,
                                       extra_body={"vllm_xargs": {"sde_mode": "observe", "sde_trace_id": "s-1"}})
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text
    got = httpx.get(f"{server}/v1/sde/traces/s-1", timeout=30)
    assert got.status_code == 200
    assert len(got.json()["sde_trace"]["zscore"][0]) == 5
    again = httpx.get(f"{server}/v1/sde/traces/s-1", timeout=30)
    assert again.status_code == 404
    assert "no SDE trace 's-1'" in again.json()["error"]["message"]


@pytest.mark.parametrize("xargs, extra, message", [
    ({"sde_mode": "warp"}, {}, "mode='warp' is not one of"),
    ({"sde_beta": "high"}, {}, "sde_beta must be a number, got str"),
    ({"sde_heads": "../../etc"}, {}, "is not served here"),
    ({"sde_mode": "temperature"}, {"temperature": 0.5}, "conflicts with SDE temperature control"),
    ({"sde_mode": "observe"}, {"n": 2}, "one sequence per request"),
])
def test_bad_arguments_give_http_400(client, xargs, extra, message):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       extra_body={"vllm_xargs": xargs}, **extra)
    assert info.value.status_code == 400
    assert message in str(info.value)


def test_several_prompts_in_one_sde_request_give_http_400(client):
    with pytest.raises(openai.BadRequestError, match="an SDE request takes one prompt"):
        client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=2,
                                  extra_body={"vllm_xargs": {"sde_mode": "observe"}})
