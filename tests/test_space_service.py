"""The Space as a public service: ``spaces/app.py`` started as deployed (configuration in environment variables),
driven over loopback through ``gradio_client`` and raw HTTP like visitors.

Model: stories260K with heads fitted in the test (quick); the deployed default is SmolLM2 with the shipped heads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import HUB_CACHE, REPO, load_stories

pytest.importorskip("gradio_client")

#: Soak: bursts of 8 visitors (4 read, 2 cancel, 2 never read); the later bursts may add at most PLATEAU_MB of RSS.
BURSTS, PLATEAU_MB = 6, 40
PATH_PROBES = ("/etc", "/etc/passwd", "/nonexistent/hf-sde-probe")
GOOD = dict(prompt="Once upon a time", mode="temperature+steer", beta=1.0, tau0=1.0, tmin=0.3, tmax=1.5, alpha=0.1,
            direction="drift", seed=3, max_new=12)


def _args(**change):
    values = {**GOOD, **change}
    return [values[k] for k in GOOD]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    from hf_sde.demo import demo_heads

    cache = tmp_path_factory.mktemp("space-heads")
    model, tok = load_stories()
    demo_heads(model, tok, cache_dir=cache, epochs=3, progress=False)
    return str(next(p for p in cache.iterdir() if not p.name.startswith(".")))


@pytest.fixture(scope="module")
def space(heads_dir, tmp_path_factory):
    """``python spaces/app.py`` on 127.0.0.1, configured like a deployed Space; yields (url, process, log path)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("space-log") / "server.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(HUB_CACHE), "HF_HUB_OFFLINE": "1",
           "HF_SDE_DEMO_MODEL": "ggml-org/models-moved", "HF_SDE_DEMO_HEADS": heads_dir,
           "HF_SDE_CACHE": str(tmp_path_factory.mktemp("space-cache")), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1",
           "HF_SDE_DEMO_MAX_QUEUE": "64"}
    proc = subprocess.Popen([sys.executable, str(REPO / "spaces" / "app.py")], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(300):
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(url + "config", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        yield url, proc, log
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def client(space):
    from gradio_client import Client

    return Client(space[0], verbose=False)


def _config(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "config", timeout=10).read())


def _error_text(client, args) -> str:
    with pytest.raises(Exception) as info:  # noqa: PT011 - gradio_client raises AppError / ValueError
        client.predict(*args, api_name="/generate")
    return str(info.value)


def _assert_no_paths(text: str, heads_dir: str, sent=()) -> None:
    """No server path, file-system verdict or traceback in ``text`` (the visitor's own values may be echoed)."""
    for value in sent:
        text = text.replace(str(value), "")
    for secret in ("No such file", "exist", "Permission", "Is a directory", "OSError", "FileNotFound"):
        assert secret.lower() not in text.lower(), (secret, text)
    for secret in (heads_dir, str(HUB_CACHE), str(REPO), "/etc", "site-packages", "Traceback", "/tmp"):
        assert secret not in text, (secret, text)


def test_model_and_heads_cannot_be_changed(space, client, heads_dir):
    url = space[0]
    params = [p["parameter_name"] for p in client.view_api(return_format="dict", print_info=False)
              ["named_endpoints"]["/generate"]["parameters"]]
    assert params[0] == "prompt" and len(params) == 10
    assert not any(word in name for name in params for word in ("model", "heads", "gguf", "revision"))
    components = _config(url)["components"]
    labels = " ".join(str(c.get("props", {}).get("label", "")) for c in components).lower()
    assert "heads (hub id" not in labels and "model (" not in labels
    assert [c for c in components if c["type"] == "textbox"] == \
        [c for c in components if c.get("props", {}).get("elem_id") == "sde-prompt"]
    assert not [c for c in components if c["type"] == "dropdown"]
    # The old API shape (model, GGUF, revision, heads first) is refused, and says nothing about the paths.
    for probe in PATH_PROBES:
        text = _error_text(client, [probe, "", "", probe, *_args()])
        _assert_no_paths(text, heads_dir)
    # A path typed as a prompt is only text to continue: the served model answers and the info stays path-free.
    out = client.predict(*_args(prompt="/etc/passwd"), api_name="/generate")
    assert "stories260K" in out[5] and "seed 3" in out[4]
    _assert_no_paths(out[5], heads_dir)


@pytest.mark.parametrize("change, message", [
    (dict(seed=1.5), "whole number"),
    (dict(seed="abc"), "Seed must be a number"),
    (dict(beta="x"), "beta must be a number"),
    (dict(mode="/etc/passwd"), "Mode must be one of"),
    (dict(direction="/etc"), "Steering direction"),
    (dict(prompt=None), "prompt must be text"),
    (dict(tmin=2.0, tmax=0.5), "above the maximum"),
    (dict(max_new=10_000), "Max new tokens"),
])
def test_rejected_inputs_are_readable_and_logged_in_one_line(space, client, heads_dir, change, message):
    before = space[2].read_text().count("rejected input")
    text = _error_text(client, _args(**change))
    assert message in text
    _assert_no_paths(text, heads_dir, sent=change.values())
    time.sleep(0.3)
    log = space[2].read_text()
    assert log.count("rejected input") == before + 1 and "Traceback" not in log


def _call_raw(url: str, data: list) -> str:
    """POST to the REST API with JSON escapes (gradio_client cannot even send a lone surrogate); the SSE text."""
    req = urllib.request.Request(url + "gradio_api/call/generate", data=json.dumps({"data": data}).encode(),
                                 headers={"Content-Type": "application/json"})
    event = json.loads(urllib.request.urlopen(req, timeout=30).read())["event_id"]
    return urllib.request.urlopen(f"{url}gradio_api/call/generate/{event}", timeout=120).read().decode()


def test_lone_surrogate_is_replaced_not_a_type_error(space):
    text = _call_raw(space[0], _args(prompt="Once \ud800 upon"))
    assert "event: complete" in text and "seed 3" in text and "TextEncodeInput" not in text


def _join_and_never_read(url: str, fn_index: int, seed: int) -> None:
    """A visitor who submits through the queue and never opens the result stream."""
    body = {"data": _args(seed=seed, max_new=48), "fn_index": fn_index, "session_hash": uuid.uuid4().hex[:11],
            "event_data": None, "trigger_id": None}
    req = urllib.request.Request(url + "gradio_api/queue/join", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()


def _burst(url: str, fn_index: int, burst: int, readers: int, cancellers: int, silent: int) -> list[str]:
    """One burst of concurrent visitors; returns what went wrong (lost or mixed-up results)."""
    from gradio_client import Client

    problems: list[str] = []

    def reader(i: int) -> None:
        seed, prompt = 1000 * burst + i, f"Tom and cat number {burst}-{i}"
        out = Client(url, verbose=False).predict(*_args(prompt=prompt, seed=seed), api_name="/generate")
        if not str(out[4]).endswith(f"seed {seed}") or prompt not in out[0] or prompt not in out[1]:
            problems.append(f"burst {burst} client {i}: got {out[4]!r}")

    def canceller(i: int) -> None:
        job = Client(url, verbose=False).submit(*_args(seed=i, max_new=64), api_name="/generate")
        time.sleep(0.3)
        job.cancel()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(readers)]
    threads += [threading.Thread(target=canceller, args=(i,)) for i in range(cancellers)]
    threads += [threading.Thread(target=_join_and_never_read, args=(url, fn_index, i)) for i in range(silent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return problems


@pytest.mark.slow
def test_soak_memory_plateaus_and_no_request_is_lost_or_mixed(space):
    url, proc, _ = space
    fn_index = next(i for i, d in enumerate(_config(url)["dependencies"]) if d.get("api_name") == "generate")
    rss, problems = [], []
    for burst in range(BURSTS):
        problems += _burst(url, fn_index, burst, readers=4, cancellers=2, silent=2)
        time.sleep(1.0)
        rss.append(_rss_mb(proc.pid))
    print("server RSS after each burst (MB):", [round(x) for x in rss])
    assert not problems, problems
    # Bursts 1-2 warm up allocators and caches; after that resident memory must stop growing.
    assert max(rss[3:]) - max(rss[:3]) < PLATEAU_MB, rss
