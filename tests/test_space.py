"""The Gradio demo (``hf_sde.demo``, served by ``spaces/app.py`` and ``hf-sde demo``).

Functional tests call the app's generation function directly; the ``browser`` test serves the real app on
127.0.0.1 and drives it in headless Chromium (Debian's ``chromium`` package and the ``playwright`` Python
package: ``apt-get install -y chromium && pip install playwright``; no ``playwright install``). It fails,
never skips, when either is missing. Set ``HF_SDE_SCREENSHOT=path.png`` to keep the screenshot.
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
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_sde.demo import (  # noqa: E402
    MAX_NEW_TOKENS,
    DemoBackend,
    generate_comparison,
    phase_figure,
    render_tokens,
    stream_comparison,
    trace_figure,
    validate_params,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NEW = 24


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 260K-parameter model: one thread is faster on a busy 2-core box
    # A private heads cache, so the test exercises the start-up fit; few epochs keep it quick.
    yield DemoBackend(cache_dir=tmp_path_factory.mktemp("demo-heads"), fit_epochs=4)
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
    again = DemoBackend(cache_dir=backend.cache_dir, fit_epochs=4).load(progress=False)
    assert "cached in" in again.heads_source
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
    assert sizes[0][:2] == (1, 0)  # the first yield already shows a token
    assert len(sizes) >= 8  # one yield per token at least
    assert sizes[-1][2] and not any(done for *_, done in sizes[:-1])
    assert [p for p, _, _ in sizes] == sorted(p for p, _, _ in sizes)


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


def test_bad_model_id_is_a_readable_error(backend):
    with pytest.raises(ValueError, match="Could not load the model"):
        backend.load("nobody/no-such-model-hf-sde-test", "", "", progress=False)


def test_cli_registers_demo():
    from hf_sde.cli import build_parser

    args = build_parser().parse_args(["demo", "--port", "7999", "--heads", "h/", "--lock-model"])
    assert args.command == "demo" and args.port == 7999 and args.heads == "h/" and args.lock_model
    assert args.func.__module__ == "hf_sde.demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.browser
def test_app_in_a_real_browser(backend, loaded, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: the browser test needs Debian's chromium (apt-get install -y chromium).")
    try:
        import gradio  # noqa: F401
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"The browser test needs gradio and playwright (pip install gradio playwright): {e}")
    from hf_sde.demo import build_demo

    demo = build_demo(backend=backend)  # the module's backend: model and heads are already loaded
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
