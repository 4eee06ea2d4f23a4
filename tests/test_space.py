"""The Gradio demo (``hf_sde.demo``, served by ``spaces/app.py`` and ``hf-sde demo``).

Functional tests call the app's generation function directly; the ``browser`` test serves the real app on
127.0.0.1 and drives it in headless Chromium (Debian's ``chromium`` package and the ``playwright`` Python
package: ``apt-get install -y chromium && pip install playwright``; no ``playwright install``). When either is
missing it skips and says why, except under ``CI`` (set), where it fails. Set ``HF_SDE_SCREENSHOT=path.png`` to
keep the screenshot. The deployed Space and its load behaviour: ``test_space_service.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# Must be set before huggingface_hub / transformers are imported (they read them at import time).
if (SHARED / "hf-cache" / "hub").is_dir():
    os.environ.setdefault("HF_HUB_CACHE", str((SHARED / "hf-cache" / "hub").resolve()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_sde.data.loading import STORIES260K  # noqa: E402
from hf_sde.demo import (  # noqa: E402
    MAX_NEW_TOKENS,
    DemoBackend,
    InputError,
    LoadedModel,
    generate_comparison,
    phase_figure,
    render_tokens,
    stream_comparison,
    trace_figure,
    validate_params,
)
from hf_sde.demo.backend import check_allowlist  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NEW = 24


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 260K-parameter model: one thread is faster on a busy 2-core box
    # A private heads cache, so the test exercises the start-up fit; few epochs keep it quick.
    backend = DemoBackend(STORIES260K, cache_dir=tmp_path_factory.mktemp("demo-heads"), fit_epochs=4)
    yield backend
    backend.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded(backend):
    return backend.load(progress=False)


def test_heads_are_fitted_once_and_cached(backend, loaded, tmp_path):
    folders = [p for p in Path(backend.cache_dir).iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1 and (folders[0] / "config.json").is_file() and (folders[0] / "model.safetensors").is_file()
    assert "fitted at start-up" in loaded.heads_source
    assert backend.load(progress=False) is loaded  # same ids: kept in memory
    # A second backend (another process, in effect) loads the cached folder instead of fitting again.
    other = DemoBackend(STORIES260K, cache_dir=backend.cache_dir, fit_epochs=4)
    again = other.load(progress=False)
    other.close()
    assert "cached" in again.heads_source and "fitted at start-up" not in again.heads_source
    # The info panel names the model and heads, never a server path.
    assert "stories260K" in loaded.describe() and str(backend.cache_dir) not in loaded.describe() + again.describe()
    for name, value in loaded.heads.state_dict().items():
        assert torch.equal(value.cpu(), again.heads.state_dict()[name].cpu()), name


def test_generate_comparison_returns_both_texts_and_traces(loaded):
    result = generate_comparison(loaded, "Once upon a time", mode="temperature+steer", beta=1.0, alpha=0.1,
                                 direction="drift", seed=1, max_new_tokens=NEW)
    assert result.done and result.plain.done and result.controlled.done
    for run in (result.plain, result.controlled):
        n = run.num_tokens
        assert 1 <= n <= NEW
        assert run.continuation.strip() and run.text.startswith("Once upon a time")
        assert len(run.pieces) == n
        for name in ("diffusion", "zscore", "temperature", "steer_norm", "surprise"):
            assert getattr(run.trace, name).shape == (1, n), name
        assert torch.isfinite(run.trace.zscore[0, :1]).all()
        assert run.path.shape == (len(result.prompt_ids) + n, loaded.heads.config.proj_dim)
        assert len(run.steps["zscore"]) == n  # the streamed statistics agree in length with the trace
    assert (result.plain.trace.steer_norm == 0).all()
    steer = result.controlled.trace.steer_norm[0]
    assert (steer[torch.isfinite(steer)] > 0).all()
    temp = result.controlled.trace.temperature[0]
    temp = temp[torch.isfinite(temp)]
    assert ((temp >= 0.3 - 1e-6) & (temp <= 1.5 + 1e-6)).all()
    steps = max(result.plain.num_tokens, result.controlled.num_tokens)
    assert result.cloud.shape == (48, steps + 1, loaded.heads.config.proj_dim)
    # The pieces and figures render.
    html = render_tokens(result.controlled, result.prompt)
    assert html.count('class="sde-tok"') == result.controlled.num_tokens
    assert len(trace_figure(result).axes) == 3 and len(phase_figure(result).axes) == 1


def test_controls_that_change_nothing_give_the_plain_sample(loaded):
    a = generate_comparison(loaded, "The little dog", mode="temperature", beta=0.0, seed=5, max_new_tokens=16,
                            cloud_paths=0)
    b = generate_comparison(loaded, "The little dog", mode="steer", alpha=0.0, seed=5, max_new_tokens=16,
                            cloud_paths=0)
    assert a.plain.token_ids == a.controlled.token_ids == b.plain.token_ids == b.controlled.token_ids
    assert any("beta = 0" in w for w in a.warnings) and any("alpha = 0" in w for w in b.warnings)
    assert a.cloud is None


def test_streaming_yields_token_by_token(loaded):
    sizes = []
    for cmp in stream_comparison(loaded, "Once upon a time", mode="temperature", seed=2, max_new_tokens=8,
                                 cloud_paths=4):
        sizes.append((cmp.plain.num_tokens, cmp.controlled.num_tokens, cmp.done))
    assert sum(sizes[0][:2]) == 1  # the first yield already shows a token (both runs stream at once)
    assert len(sizes) >= 16  # one yield per token of each run at least
    assert sizes[-1][2] and not any(done for *_, done in sizes[:-1])
    for k in (0, 1):
        assert [s[k] for s in sizes] == sorted(s[k] for s in sizes)


def test_batched_requests_match_solo_runs(backend, loaded):
    """Concurrent requests share generate calls, yet each gets exactly what it would get alone (per-row seeds)."""
    asks = [("Once upon a time", 11, "temperature+steer"), ("The little dog was sad because", 12, "temperature"),
            ("Lily and Ben went to the park. They", 13, "temperature+steer")]
    solo = [generate_comparison(loaded, p, mode=m, seed=s, max_new_tokens=12, cloud_paths=0) for p, s, m in asks]
    before = len(loaded.scheduler.batches)
    together: list = [None] * len(asks)

    def run(i):
        p, s, m = asks[i]
        together[i] = generate_comparison(loaded, p, mode=m, seed=s, max_new_tokens=12, cloud_paths=0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(loaded.scheduler.batches[before:]) > 2  # rows of different requests did share a call
    for a, b in zip(solo, together, strict=True):
        assert a.plain.token_ids == b.plain.token_ids and a.controlled.token_ids == b.controlled.token_ids
        assert torch.allclose(a.controlled.trace.temperature, b.controlled.trace.temperature, atol=1e-4,
                              equal_nan=True)


def test_abandoned_stream_cancels_its_runs(loaded):
    stream = stream_comparison(loaded, "Once upon a time", mode="temperature", seed=4, max_new_tokens=MAX_NEW_TOKENS,
                               cloud_paths=0)
    first = next(stream)
    stream.close()  # the visitor left: both rows are cancelled and stop early
    done = generate_comparison(loaded, "Once", seed=4, max_new_tokens=2, cloud_paths=0)  # the worker is free again
    assert first.plain.num_tokens + first.controlled.num_tokens >= 1 and done.done


def test_chat_template_prompts_are_a_user_turn(loaded):
    from conftest import load_stories

    model, tok = load_stories()
    tok.chat_template = "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    chat = LoadedModel(model, tok, loaded.heads, STORIES260K, "test heads")
    try:
        ids = chat.encode_prompt("Tell a story")
        assert tok.decode(ids).startswith("<s>[user] Tell a story") and chat.chat
        result = generate_comparison(chat, "Tell a story", seed=0, max_new_tokens=4, cloud_paths=0)
        html = render_tokens(result.controlled, result.prompt, chat=True)
        assert result.chat and "[user]" not in html and "Tell a story" in html
        assert result.controlled.text.startswith("Tell a story\n")
    finally:
        chat.close()


@pytest.mark.parametrize("change, message", [
    (dict(min_temperature=1.2, max_temperature=0.5), "above the maximum temperature"),
    (dict(prompt="   "), "Type a prompt"),
    (dict(prompt="x" * 1001), "limit is 1000"),
    (dict(max_new_tokens=MAX_NEW_TOKENS + 1), "Max new tokens"),
    (dict(max_new_tokens=0), "Max new tokens"),
    (dict(mode="louder"), "Mode must be one of"),
    (dict(direction="up"), "drift' or 'attractor"),
    (dict(beta=float("nan")), "finite"),
    (dict(seed=None), "Seed must be a number"),
    (dict(seed=1.5), "whole number"),
    (dict(seed="7"), "Seed must be a number"),
    (dict(beta=[1]), "beta must be a number"),
    (dict(prompt=None), "prompt must be text"),
    (dict(alpha=7), "alpha must lie"),
    (dict(temperature=0), "Base temperature"),
])
def test_bad_parameters_are_refused_with_a_message(change, message):
    params = dict(prompt="Once upon a time", mode="temperature", beta=1.0, temperature=1.0, min_temperature=0.3,
                  max_temperature=1.5, alpha=0.0, direction="drift", seed=0, max_new_tokens=8)
    params.update(change)
    with pytest.raises(ValueError, match=message):
        validate_params(**params)


def test_prompt_token_limit(loaded):
    long_prompt = " ".join(["cat"] * 300)[:999]
    with pytest.raises(ValueError, match="tokens long; the limit is 256"):
        generate_comparison(loaded, long_prompt, max_new_tokens=4)


def test_lone_surrogate_is_replaced():
    params, warnings = validate_params("Once \ud800 upon", "temperature", 1, 1, 0.3, 1.5, 0, "drift", 0, 4)
    assert params["prompt"] == "Once \ufffd upon" and any("surrogate" in w for w in warnings)


def test_model_choice_is_an_allowlist_of_hub_ids(backend, tmp_path):
    with pytest.raises(InputError, match="does not offer the model"):
        backend.load("/etc/passwd", progress=False)
    with pytest.raises(InputError, match="Choose a model"):
        backend.load("  ", progress=False)
    for bad in ("/etc", "../x/y", "./models", "~/m", "a/b/c"):
        with pytest.raises(ValueError, match="hub ids"):
            check_allowlist([bad])
    local = DemoBackend(STORIES260K, allowed_models=["nobody/no-such-model-hf-sde-test"], cache_dir=tmp_path)
    with pytest.raises(InputError) as info:
        local.load("nobody/no-such-model-hf-sde-test", progress=False)
    assert "Could not load the model nobody/no-such-model-hf-sde-test" in str(info.value)
    assert str(tmp_path) not in str(info.value) and "/" not in str(info.value).replace("nobody/no-such", "")


def test_cli_arguments_and_no_cli_import():
    import argparse

    from hf_sde.demo import add_arguments, run_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--port", "7999", "--heads", "h/", "--lock-model", "--allow-model-choice",
                              "--allowed-model", "ggml-org/models-moved", "--max-batch", "8"])
    assert args.port == 7999 and args.heads == "h/" and args.lock_model and args.allow_model_choice
    assert args.allowed_model == ["ggml-org/models-moved"] and args.max_batch == 8 and callable(run_from_args)
    code = "import sys, hf_sde.demo; assert not any(m in sys.modules for m in ('hf_sde.cli', 'hf_sde.commands'))"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing(reason: str):
    """Skip with the reason, except in CI (``CI`` set), where a missing browser is a failure."""
    (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)


@pytest.mark.browser
def test_app_in_a_real_browser(backend, loaded, tmp_path):
    if not os.path.exists(CHROMIUM):
        _missing(f"{CHROMIUM} is missing: the browser test needs Debian's chromium (apt-get install -y chromium).")
    try:
        import gradio  # noqa: F401
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        _missing(f"The browser test needs gradio and playwright (pip install gradio playwright): {e}")
    from hf_sde.demo import build_demo

    demo = build_demo(backend)  # the module's backend: model and heads are already loaded
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=True)
    shot = tmp_path / "space.png"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1500, "height": 1000})
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded", timeout=60_000)
                prompt = page.locator("#sde-prompt textarea")
                prompt.wait_for(timeout=60_000)
                prompt.fill("Once upon a time, a little cat")
                page.locator("#sde-generate").click()
                # Streaming: the highlighted tokens appear, then the run finishes and both plots are drawn.
                page.locator("#sde-controlled .sde-tok").first.wait_for(timeout=60_000)
                page.locator("#sde-summary", has_text="finished").wait_for(timeout=60_000)
                page.locator("#sde-phase-plot img").wait_for(timeout=30_000)
                page.locator("#sde-trace-plot img").wait_for(timeout=30_000)
                assert page.locator("#sde-plain .sde-tok").count() >= 1
                assert page.locator("#sde-controlled .sde-tok").count() >= 1
                assert "Once upon a time, a little cat" in page.locator("#sde-controlled").inner_text()
                assert page.locator("#sde-model").count() == 0  # the served model cannot be changed here
                time.sleep(0.5)  # let the plots finish painting
                page.screenshot(path=str(shot), full_page=True)

                # A bad parameter gives a readable error in the page, and the server keeps serving.
                page.locator("#sde-tmin input[type=number]").fill("2")
                page.locator("#sde-tmin input[type=number]").press("Enter")
                page.locator("#sde-tmax input[type=number]").fill("0.5")
                page.locator("#sde-tmax input[type=number]").press("Enter")
                page.locator("#sde-generate").click()
                page.get_by_text("above the maximum temperature").first.wait_for(timeout=30_000)
                page.reload(wait_until="domcontentloaded")
                page.locator("#sde-prompt textarea").wait_for(timeout=60_000)
            finally:
                browser.close()
    finally:
        demo.close()
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("HF_SDE_SCREENSHOT")
    if keep:
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, keep)
