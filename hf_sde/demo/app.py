"""The Gradio page of the demo, and the ``hf-sde demo`` arguments (wired by ``hf_sde.commands``).

Public-service rules live here: the served model and heads come from the server's configuration; only a local
run started with ``--allow-model-choice`` shows a model dropdown (allowlisted hub ids). Input components pass
values through unchanged (Gradio's own checks would round a seed of 1.5 or answer with its internal text), so
every check is :func:`~hf_sde.demo.settings.validate_params`, whose messages are shown as they are and logged in
one line. Streaming is throttled and a client whose unread messages pile up is treated as gone: its runs are
cancelled, so visitors who submit and never read cost neither compute nor memory.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from ..control import MODES
from ..data.loading import DEFAULT_MODEL, KNOWN_MODELS, resolve_model_spec
from .backend import DemoBackend
from .comparison import stream_comparison
from .demo_heads import DEMO_FIT
from .rendering import LEGEND_HTML, phase_figure, render_tokens, summary_markdown, trace_figure
from .settings import DIRECTIONS, EXAMPLE_PROMPTS, MAX_NEW_TOKENS, MAX_PROMPT_CHARS, InputError

logger = logging.getLogger(__name__)

#: Seconds between streamed updates (each update is a message held until the client reads it).
STREAM_INTERVAL_S = 0.3
#: Unread messages after which a client counts as gone and its runs are cancelled.
MAX_UNREAD = 12

DESCRIPTION = """# hf-sde: decoding controlled by an SDE on the hidden-state path
Generation is modelled as `dZ = mu(Z, t) dt + sigma(Z, t) dW` on the projected hidden state of the newest token
([arXiv 2408.11863](https://arxiv.org/abs/2408.11863), made precise in hf-sde). The same prompt is sampled twice
with the same seed: **plainly** (the heads only watch) and **under SDE control**: the temperature follows
`tau = clip(tau_0 exp(-beta z), tau_min, tau_max)` of the calibrated diffusion z-score, and/or the hidden state is
steered along the drift (or towards the attractor) with strength alpha."""


def _unread(demo, request) -> int:
    """Messages queued for this client that it has not read (0 when Gradio does not tell)."""
    try:
        pending = demo._queue.pending_messages_per_session.get(request.session_hash)
        return pending.qsize() if pending is not None else 0
    except AttributeError:
        return 0


def _lenient(cls):
    """A constructor for ``cls`` components whose preprocessing is off: values reach our checks as sent.

    (An instance attribute, not a subclass: Gradio writes a ``.pyi`` file beside every component subclass.)
    """
    def make(*args, **kwargs):
        component = cls(*args, **kwargs)
        component.preprocess = lambda payload: payload
        return component

    return make


def _stream(gr, demo, backend, model_choice, values, request):
    """The generator behind the Generate button: one comparison, throttled updates, errors as messages."""
    prompt, mode, beta, tau0, tmin, tmax, alpha, direction, seed, max_new = values
    try:
        loaded = backend.load(model_choice)
        stream = stream_comparison(loaded, prompt, mode=mode, beta=beta, temperature=tau0, min_temperature=tmin,
                                   max_temperature=tmax, alpha=alpha, direction=direction, seed=seed,
                                   max_new_tokens=max_new)
        first = next(stream)
    except (InputError, ValueError, TypeError) as e:
        logger.info("hf-sde demo: rejected input: %s", str(e)[:300])
        raise gr.Error(str(e), title="Check the input", print_exception=False) from None
    info, last, shown = loaded.describe(), 0.0, set()
    try:
        for cmp in _chain(first, stream):
            for w in cmp.warnings:
                if w not in shown:
                    shown.add(w)
                    gr.Warning(w)
            now = time.monotonic()
            if not cmp.done and now - last < STREAM_INTERVAL_S:
                continue
            if request is not None and _unread(demo, request) > MAX_UNREAD:
                logger.info("hf-sde demo: client %s stopped reading; its runs are cancelled", request.session_hash)
                return
            last = now
            figs = (trace_figure(cmp), phase_figure(cmp)) if cmp.done else (gr.skip(), gr.skip())
            yield (render_tokens(cmp.plain, cmp.prompt, chat=cmp.chat),
                   render_tokens(cmp.controlled, cmp.prompt, chat=cmp.chat), *figs, summary_markdown(cmp), info)
    except Exception as e:  # noqa: BLE001 - one log line with the type; the visitor gets a message without paths
        logger.warning("hf-sde demo: generation failed: %s: %s", type(e).__name__, e)
        raise gr.Error(f"Generation failed ({type(e).__name__}); please try again.", print_exception=False) from None
    finally:
        stream.close()  # cancels both runs when the client left early


def _takes_request(gr, fn):
    """Mark ``fn``'s ``request`` parameter as Gradio's ``gr.Request``, so that Gradio fills it in.

    Gradio finds that parameter with ``typing.get_type_hints``; this module's annotations are strings (``from
    __future__ import annotations``) naming the local ``gr``, which it cannot resolve, so it took ``request`` for
    one more input ("Expected 11 arguments for function on_generate, received 10" at start, "Unexpected
    argument. Filling with None." on every call) and the handler never saw the request.
    """
    fn.__annotations__["request"] = gr.Request
    return fn


def _chain(first, rest):
    """``first`` then the rest of ``rest`` (the first item was taken to surface input errors early)."""
    yield first
    yield from rest


def _controls(gr):
    """The input components (lenient copies of Gradio's), in the order the handler takes them."""
    Number, Slider, Radio = _lenient(gr.Number), _lenient(gr.Slider), _lenient(gr.Radio)
    prompt = gr.Textbox(value=EXAMPLE_PROMPTS[0], label="Prompt", lines=2, max_length=MAX_PROMPT_CHARS,
                        elem_id="sde-prompt", placeholder=EXAMPLE_PROMPTS[0])
    mode = Radio(list(MODES), value="temperature+steer", label="Mode", elem_id="sde-mode")
    with gr.Row():
        beta = Slider(-3, 3, value=1.0, step=0.1, label="beta (temperature sensitivity)")
        tau0 = Slider(0.1, 2.0, value=1.0, step=0.05, label="base temperature tau_0")
    with gr.Row():
        tmin = Slider(0.05, 3.0, value=0.3, step=0.05, label="min temperature", elem_id="sde-tmin")
        tmax = Slider(0.05, 3.0, value=1.5, step=0.05, label="max temperature", elem_id="sde-tmax")
    with gr.Row():
        alpha = Slider(-1, 1, value=0.1, step=0.01, label="steering strength alpha")
        direction = Radio(list(DIRECTIONS), value="drift", label="steering direction")
    with gr.Row():
        seed = Number(value=0, minimum=0, maximum=2**31 - 1, label="seed (a whole number)", elem_id="sde-seed")
        max_new = Slider(1, MAX_NEW_TOKENS, value=48, step=1, label="max new tokens")
    return [prompt, mode, beta, tau0, tmin, tmax, alpha, direction, seed, max_new]


def _outputs(gr, initial: str):
    # Labels name the outputs in the API docs (gradio_client's view_api), where unlabelled ones read "value_NN".
    summary = gr.Markdown("Press **Generate**.", label="summary", show_label=False, elem_id="sde-summary")
    with gr.Row(equal_height=True):
        plain_out = gr.HTML(label="plain sample", elem_id="sde-plain")
        controlled_out = gr.HTML(label="SDE-controlled sample", elem_id="sde-controlled")
    gr.HTML(LEGEND_HTML)
    with gr.Row():
        trace_plot = gr.Plot(label="Per-step SDE statistics", show_label=False, format="png", elem_id="sde-trace-plot")
        phase_plot = gr.Plot(label="Phase plane", show_label=False, format="png", elem_id="sde-phase-plot")
    return plain_out, controlled_out, trace_plot, phase_plot, summary


def build_demo(backend: DemoBackend | None = None, *, allow_model_choice: bool = False, preload: bool = True,
               concurrency_limit: int = 16, max_queue: int = 32, **backend_kwargs):
    """Build the Gradio app (a queued ``gr.Blocks``); :func:`launch` serves it.

    ``backend`` (or a :class:`DemoBackend` built from ``backend_kwargs``) fixes the model and heads; with
    ``allow_model_choice`` a dropdown offers ``backend.choices`` (a local-run feature). ``concurrency_limit``
    requests are in flight at once (their rows are batched by the worker) and ``max_queue`` more may wait.
    """
    import gradio as gr

    backend = backend or DemoBackend(**backend_kwargs)
    initial = backend.load(progress=True).describe() if preload else "The model loads on the first Generate."
    with gr.Blocks(title="hf-sde: SDE-controlled decoding", analytics_enabled=False) as demo:
        gr.Markdown(DESCRIPTION)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=320):
                controls = _controls(gr)
                button = gr.Button("Generate", variant="primary", elem_id="sde-generate")
                gr.Examples([[p] for p in EXAMPLE_PROMPTS], inputs=[controls[0]], label="Example prompts")
                with gr.Accordion("Model and heads", open=False):
                    choice = None
                    if allow_model_choice:
                        choice = _lenient(gr.Dropdown)(backend.choices, value=backend.spec.name_or_path,
                                                       label="model (allowlisted hub ids)", elem_id="sde-model")
                    info = gr.Markdown(initial, label="model and heads", show_label=False, elem_id="sde-info")
            with gr.Column(scale=2):
                plain_out, controlled_out, trace_plot, phase_plot, summary = _outputs(gr, initial)
        outputs = [plain_out, controlled_out, trace_plot, phase_plot, summary, info]
        if allow_model_choice:
            def on_generate(model, prompt, mode, beta, base_temperature, min_temperature, max_temperature, alpha,
                            direction, seed, max_new_tokens, request: gr.Request):
                values = (prompt, mode, beta, base_temperature, min_temperature, max_temperature, alpha, direction,
                          seed, max_new_tokens)
                yield from _stream(gr, demo, backend, model, values, request)
            inputs = [choice, *controls]
        else:  # the served model only: the API takes no model argument at all
            def on_generate(prompt, mode, beta, base_temperature, min_temperature, max_temperature, alpha, direction,
                            seed, max_new_tokens, request: gr.Request):
                values = (prompt, mode, beta, base_temperature, min_temperature, max_temperature, alpha, direction,
                          seed, max_new_tokens)
                yield from _stream(gr, demo, backend, None, values, request)
            inputs = controls
        _takes_request(gr, on_generate)
        button.click(on_generate, inputs, outputs, concurrency_limit=concurrency_limit, api_name="generate",
                     api_description="Sample the prompt plainly and under SDE control with the same seed; returns "
                                     "both texts (HTML), the per-step trace and phase-plane figures, a summary and "
                                     "the model / heads description.")
        controls[0].submit(on_generate, inputs, outputs, concurrency_limit=concurrency_limit, api_name=False)
    demo.queue(default_concurrency_limit=concurrency_limit, max_size=max_queue)
    demo.hf_sde_backend = backend
    return demo


def _log_to_stderr() -> None:
    """One INFO line per rejected input or abandoned client on stderr, unless the host configured logging."""
    demo_log = logging.getLogger("hf_sde.demo")
    if not demo_log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        demo_log.addHandler(handler)
        demo_log.setLevel(logging.INFO)


def launch(demo, **kwargs):
    """``demo.launch`` with the demo's defaults (readable errors in the page; ``kwargs`` win)."""
    _log_to_stderr()
    kwargs.setdefault("show_error", True)
    return demo.launch(**kwargs)


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (the demo does not import ``hf_sde.commands``, which has its own)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``hf-sde demo`` options (``hf_sde.commands`` only wires them)."""
    p.add_argument("--model", default=DEFAULT_MODEL.name_or_path,
                   help=f"hub id or local folder of the served causal LM (default {DEFAULT_MODEL.name_or_path}; "
                        f"known ids: {', '.join(KNOWN_MODELS)})")
    p.add_argument("--gguf-file", default=None,
                   help="GGUF file inside --model (default: the pinned file of a known id, else none)")
    p.add_argument("--revision", default=None,
                   help="hub revision (default: the pinned commit of a known id, else main)")
    p.add_argument("--device", default=None, help="torch device for the model (default: CPU)")
    p.add_argument("--heads", default=None, help="heads folder or hub id (default: the shipped heads for the default "
                                                 "model, else demo heads fitted once and cached)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=_positive_int, default=None,
                   help="port (default: Gradio's, 7860 or the next free one)")
    p.add_argument("--cache-dir", default=None, help="where demo heads are cached (default: $HF_SDE_CACHE/demo-heads "
                                                    "or ~/.cache/hf-sde/demo-heads)")
    p.add_argument("--fit-epochs", type=_positive_int, default=None,
                   help=f"epochs for demo heads (default {DEMO_FIT['epochs']})")
    p.add_argument("--concurrency", type=_positive_int, default=16,
                   help="requests in flight at once (their rows are batched)")
    p.add_argument("--max-batch", type=_positive_int, default=16,
                   help="rows per batched generate call (a request is 2 rows)")
    p.add_argument("--max-queue", type=_positive_int, default=32, help="requests allowed to wait")
    p.add_argument("--allow-model-choice", action="store_true",
                   help="local runs only: offer a model dropdown (the served model and --allowed-model ids)")
    p.add_argument("--allowed-model", action="append", default=None, metavar="HUB_ID",
                   help="a hub id the dropdown offers (repeatable; default: the known models)")
    p.add_argument("--lock-model", action="store_true", help="kept for compatibility: the model is locked by default")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (needs the network)")


def run_from_args(args) -> int:
    """Serve the demo as ``hf-sde demo`` was asked to."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit("hf-sde demo needs gradio: pip install 'hf-sde[demo]' (or: pip install gradio).") from None
    spec = resolve_model_spec(args.model, args.gguf_file, args.revision)
    choice = bool(args.allow_model_choice) and not args.lock_model
    allowed = (args.allowed_model or list(KNOWN_MODELS)) if choice else []
    backend = DemoBackend(spec, args.heads, allowed_models=allowed, cache_dir=args.cache_dir,
                          fit_epochs=args.fit_epochs, device=args.device, max_batch=args.max_batch)
    demo = build_demo(backend, allow_model_choice=choice, concurrency_limit=args.concurrency,
                      max_queue=args.max_queue)
    launch(demo, server_name=args.host, server_port=args.port or int(os.environ.get("GRADIO_SERVER_PORT", 0)) or None,
           share=args.share)
    return 0
