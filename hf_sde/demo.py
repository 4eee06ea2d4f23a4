"""The hf-sde demo: plain and SDE-controlled sampling side by side, in a Gradio app (``hf-sde demo``).

The app logic lives here so that it is tested with the package; ``spaces/app.py`` only launches it.

* :func:`generate_comparison` samples one prompt twice with the same seed: once plainly (the heads only
  observe) and once under :class:`~hf_sde.control.SDEControl`. :func:`stream_comparison` is the same as a
  generator that yields after every token (the UI streams it).
* :class:`DemoBackend` loads a model by hub id (optionally a GGUF file inside it, at a revision) and its
  heads: a saved folder / hub id when given, else heads fitted once on :data:`DEMO_STORIES` (plus
  ``../shared/data/tinystories_sample.txt`` when present) and cached on disk under ``$HF_SDE_CACHE/demo-heads``
  (default ``~/.cache/hf-sde/demo-heads``).
* :func:`build_demo` builds the Gradio page; gradio is imported only there, so ``import hf_sde.demo`` and
  ``hf-sde demo --help`` work without it (``pip install hf-sde[demo]``).

Example:
    >>> backend = DemoBackend()
    >>> loaded = backend.load()                     # stories260K + cached demo heads
    >>> result = generate_comparison(loaded, "Once upon a time", mode="temperature", beta=1.0, seed=0)
    >>> result.plain.continuation, result.controlled.continuation
    >>> result.controlled.trace.zscore.shape        # (1, new_tokens)
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .control import MODES, SDEControl, SDEStep, SDETrace, sde_generate
from .heads import CONFIG_NAME, WEIGHTS_NAME, SDEHeads

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "ggml-org/models-moved"
DEFAULT_GGUF = "tinyllamas/stories260K.gguf"
DEFAULT_REVISION = "499bc8821c6b12b4e53c5bffcb21ec206f212d81"

#: Input limits the app enforces (the functions enforce them too, for API callers).
MAX_PROMPT_CHARS = 1000
MAX_PROMPT_TOKENS = 256
MAX_NEW_TOKENS = 128
MAX_ABS_BETA = 5.0
MAX_ABS_ALPHA = 2.0
MAX_TEMPERATURE = 5.0
#: Simulated paths drawn behind the controlled path on the phase plane.
CLOUD_PATHS = 48

DIRECTIONS = ("drift", "attractor")

#: Settings of the heads fitted at start-up when none are given (part of the cache key).
DEMO_FIT = {"layer": -1, "proj_dim": 8, "width": 64, "depth": 2, "epochs": 30, "patience": 8,
            "batch_size": 256, "lr": 2e-3, "max_length": 256, "seed": 0}

#: A small built-in corpus of TinyStories-style stories (written for hf-sde, Apache-2.0), so the demo can fit
#: heads with no data set at hand. ``../shared/data/tinystories_sample.txt`` is added when it exists.
DEMO_STORIES = (
    "Once upon a time, there was a little girl named Lily. She loved to play in the park with her red ball. "
    "One day, the ball rolled into the pond. Lily was sad. A kind duck pushed the ball back to her. "
    "Lily smiled and said, \"Thank you, duck!\" They played together until the sun went down.",
    "Tom had a big blue truck. He liked to push it up and down the hill. One day the truck lost a wheel. "
    "Tom looked everywhere for it. His dad helped him find the wheel under the bed. "
    "They fixed the truck together, and Tom was happy again.",
    "There was a small cat who lived in a warm house. The cat liked to sleep in the sun. "
    "One morning, a bird sat on the window. The cat wanted to play with the bird, but the bird flew away. "
    "The cat went back to sleep and dreamed of flying.",
    "Once upon a time, a boy named Ben found a shiny stone in the garden. He showed it to his mom. "
    "\"It is very pretty,\" she said. Ben put the stone in a box under his bed. "
    "Every night he opened the box to look at it, and it made him feel brave.",
    "Sara and her friend Max wanted to build a tall tower. They used many blocks. The tower got taller and taller. "
    "Then the dog ran into the room and the tower fell down. Sara and Max laughed. "
    "They built the tower again, even taller than before.",
    "A little bunny lived in the forest. He was scared of the dark. One night, he saw a light in the trees. "
    "It was a friendly firefly. The firefly said, \"Do not be scared. I will light the way.\" "
    "The bunny walked home and was not scared anymore.",
    "Once upon a time, there was a big tree in the middle of the town. Children came to play under it every day. "
    "One day, a storm came and the wind was very strong. The tree did not fall. "
    "The next day, the children hugged the tree and said thank you.",
    "Mia wanted to bake a cake for her mom. She got flour, eggs and milk. She mixed them in a big bowl. "
    "The cake went into the oven. When it was ready, it smelled so good. "
    "Her mom came home and was very surprised. They ate the cake together.",
    "There was a happy dog named Spot. Spot liked to run and jump. One day he saw a ball in the yard. "
    "He ran to get it, but it was a big orange. Spot sniffed it and rolled it to his friend Tim. "
    "Tim laughed and gave Spot a real ball to play with.",
    "Anna had a little boat. She took it to the lake with her grandpa. The boat sailed on the water. "
    "A fish jumped out and splashed the boat. Anna clapped her hands. "
    "Grandpa said, \"The fish wants to play too.\" They stayed at the lake all afternoon.",
    "Once upon a time, a little bird could not fly. Every day she tried, and every day she fell. "
    "Her mother said, \"Be patient, and keep trying.\" One morning the wind was soft, and the bird flapped her wings. "
    "She flew up high over the trees and sang a happy song.",
    "Jack had a toy robot that could talk. One day the robot stopped talking. Jack was sad. "
    "His sister said, \"Maybe it needs new batteries.\" They put in new batteries, and the robot said, \"Hello, Jack!\" "
    "Jack gave his sister a big hug.",
)

#: Prompts offered as examples in the app.
EXAMPLE_PROMPTS = ("Once upon a time", "Lily and Ben went to the park. They", "The little dog was sad because")


def _shared_sample() -> Path | None:
    """``shared/data/tinystories_sample.txt`` beside the repository checkout, if there is one."""
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories_sample.txt",
                  Path.cwd().parent / "shared" / "data" / "tinystories_sample.txt"]
    for path in candidates:
        if path.is_file():
            return path
    return None


def demo_corpus() -> list[str]:
    """The texts the demo fits heads on: :data:`DEMO_STORIES` plus the shared TinyStories sample if present."""
    texts = list(DEMO_STORIES)
    sample = _shared_sample()
    if sample is not None:
        from .corpus import load_texts

        texts += load_texts(str(sample))
    return texts


def default_cache_dir() -> Path:
    """``$HF_SDE_CACHE/demo-heads``, else ``~/.cache/hf-sde/demo-heads``."""
    root = os.environ.get("HF_SDE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf-sde")
    return Path(root) / "demo-heads"


# ----- model + heads -------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model, its tokenizer and the heads the demo uses for it."""

    model: torch.nn.Module
    tokenizer: object
    heads: SDEHeads
    model_id: str
    gguf_file: str | None
    revision: str | None
    heads_source: str
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def max_positions(self) -> int:
        n = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        return int(n) if n else 2048

    def describe(self) -> str:
        cfg = self.heads.config
        name = self.model_id + (f" / {self.gguf_file}" if self.gguf_file else "")
        rev = f" @ {self.revision[:10]}" if self.revision else ""
        lines = [f"**Model** `{name}`{rev}", f"**Heads** {self.heads_source}: layer {cfg.layer} of {cfg.num_layers}, "
                 f"PCA {cfg.proj_dim} of {cfg.hidden_size} dims, horizon T = {cfg.horizon:g} tokens"]
        nll = cfg.heldout_nll or {}
        if {"neural", "ou", "brownian"} <= set(nll):
            lines.append("Held-out transition NLL (nats/dim): neural " + f"{nll['neural']:.3f}, OU {nll['ou']:.3f}, "
                         f"Brownian {nll['brownian']:.3f}")
        return "  \n".join(lines)


def _cache_key(model, texts: list[str], fit: dict) -> str:
    source = getattr(model, "hf_sde_source", None) or {}
    from .layers import hidden_size, num_decoder_layers

    payload = {"source": source, "hidden": hidden_size(model), "layers": num_decoder_layers(model), "fit": fit,
               "corpus": hashlib.sha256("\x00".join(texts).encode()).hexdigest(), "version": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def demo_heads(model, tokenizer, *, cache_dir: str | os.PathLike | None = None, epochs: int | None = None,
               texts: list[str] | None = None, progress: bool = True) -> tuple[SDEHeads, str]:
    """Heads for ``model`` fitted on the demo corpus, cached on disk. Returns ``(heads, description)``.

    The first call extracts the corpus' hidden paths and fits (tqdm progress); later calls, in this process
    or another one, load the cached folder. The cache key covers the model source, the corpus and the fit
    settings, so changing any of them fits anew.
    """
    from .fitting import fit_heads
    from .trajectories import extract_trajectories

    fit = dict(DEMO_FIT)
    if epochs is not None:
        fit["epochs"] = int(epochs)
    texts = list(texts) if texts is not None else demo_corpus()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = getattr(model, "hf_sde_source", None) or {}
    name = str(source.get("gguf_file") or source.get("name_or_path") or "model").replace("/", "--")
    folder = root / f"{name}-{_cache_key(model, texts, fit)}"
    if (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
        try:
            heads = SDEHeads.from_pretrained(str(folder))
            heads.check_compatible(model)
            return heads, f"demo heads (cached in `{folder}`)"
        except (ValueError, FileNotFoundError, OSError) as e:
            logger.warning("Cached demo heads in %s are unusable (%s); fitting again.", folder, e)
    traj = extract_trajectories(model, tokenizer, texts, fit["layer"], max_length=fit["max_length"], progress=progress)
    from .layers import hidden_size

    result = fit_heads(
        traj, proj_dim=min(fit["proj_dim"], hidden_size(model)), width=fit["width"], depth=fit["depth"],
        epochs=fit["epochs"], patience=fit["patience"], batch_size=fit["batch_size"], lr=fit["lr"], seed=fit["seed"],
        progress=progress, base_model=source.get("name_or_path"), base_model_revision=source.get("revision"),
        gguf_file=source.get("gguf_file"), model_type=getattr(model.config, "model_type", None),
        data_description={"corpus": f"hf-sde demo corpus ({len(texts)} short stories)", "sequences": len(traj)},
    )
    heads = result.heads
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        heads.save_pretrained(str(tmp))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process saved the same heads first
            shutil.rmtree(tmp, ignore_errors=True)
        where = f"fitted at start-up on the demo corpus, cached in `{folder}`"
    except OSError as e:
        logger.warning("Could not cache the demo heads in %s: %s", root, e)
        where = "fitted at start-up on the demo corpus (not cached)"
    return heads, f"demo heads ({where})"


class DemoBackend:
    """Loads models and heads by id on demand and keeps the last few loaded (thread-safe).

    Args:
        cache_dir: where fitted demo heads are cached (default :func:`default_cache_dir`).
        fit_epochs: epochs for the demo heads (default ``DEMO_FIT["epochs"]``).
        device: torch device for the models (default CPU).
        max_loaded: how many (model, heads) pairs stay in memory.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None, fit_epochs: int | None = None,
                 device: str | None = None, max_loaded: int = 2):
        self.cache_dir = cache_dir
        self.fit_epochs = fit_epochs
        self.device = device
        self.max_loaded = max(1, int(max_loaded))
        self._loaded: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def normalize(model_id: str | None, gguf_file: str | None, revision: str | None,
                  heads: str | None) -> tuple[str, str | None, str | None, str | None]:
        model_id = (model_id or "").strip() or DEFAULT_MODEL
        gguf_file = (gguf_file or "").strip() or None
        revision = (revision or "").strip() or None
        heads = (heads or "").strip() or None
        return model_id, gguf_file, revision, heads

    def load(self, model_id: str | None = DEFAULT_MODEL, gguf_file: str | None = DEFAULT_GGUF,
             revision: str | None = DEFAULT_REVISION, heads: str | None = None, *, progress: bool = True) -> LoadedModel:
        """The model and heads for these ids, loading (and fitting demo heads) if needed.

        Raises ``ValueError`` with a readable message when the model or heads cannot be loaded or do not match.
        """
        key = self.normalize(model_id, gguf_file, revision, heads)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            loaded = self._load(*key, progress=progress)
            self._loaded[key] = loaded
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)
            return loaded

    def _load(self, model_id, gguf_file, revision, heads_id, *, progress: bool) -> LoadedModel:
        from .loading import load_model

        what = model_id + (f" (GGUF file {gguf_file})" if gguf_file else "") + (f" at revision {revision}" if revision else "")
        try:
            model, tokenizer = load_model(model_id, gguf_file=gguf_file, revision=revision, device=self.device)
        except Exception as e:  # noqa: BLE001 - any loading failure becomes one readable message
            offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
            hint = " (HF_HUB_OFFLINE is set: only models already in the hub cache can load)" if offline else ""
            raise ValueError(f"Could not load the model {what}{hint}: {type(e).__name__}: {e}") from e
        if heads_id:
            try:
                heads = SDEHeads.from_pretrained(heads_id)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"Could not load SDE heads from {heads_id!r}: {type(e).__name__}: {e}") from e
            heads.check_compatible(model)
            source = f"`{heads_id}`"
        else:
            heads, source = demo_heads(model, tokenizer, cache_dir=self.cache_dir, epochs=self.fit_epochs,
                                       progress=progress)
        device = next(model.parameters()).device
        heads.to(device).eval()
        return LoadedModel(model, tokenizer, heads, model_id, gguf_file, revision, source)


# ----- generation ---------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """One sampled continuation, filled in as it streams.

    ``steps`` holds the per-step statistics as they arrive (``diffusion``, ``zscore``, ``temperature``,
    ``steer_norm``); ``trace`` (``(1, new_tokens)``) and ``path`` (SDE states of the whole sequence, prompt
    included, ``(prompt_tokens + new_tokens, d)``) are set when the run finishes.
    """

    label: str
    mode: str
    token_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    steps: dict[str, list[float]] = field(
        default_factory=lambda: {"diffusion": [], "zscore": [], "temperature": [], "steer_norm": []})
    text: str = ""
    continuation: str = ""
    trace: SDETrace | None = None
    path: torch.Tensor | None = None
    seconds: float = 0.0
    done: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Comparison:
    """Plain and controlled runs of one prompt with the same seed, plus simulated paths for the phase plane."""

    prompt: str
    prompt_ids: list[int]
    params: dict
    plain: RunResult
    controlled: RunResult
    warnings: list[str] = field(default_factory=list)
    cloud: torch.Tensor | None = None
    done: bool = False


def _number(name: str, value, *, integer: bool = False) -> float:
    if value is None or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if integer and x != int(x):
        raise ValueError(f"{name} must be a whole number, got {value!r}.")
    return int(x) if integer else x


def validate_params(prompt, mode, beta, temperature, min_temperature, max_temperature, alpha, direction, seed,
                    max_new_tokens) -> tuple[dict, list[str]]:
    """Check the user's parameters; returns ``(params, warnings)`` or raises ``ValueError`` saying what to fix."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("Type a prompt to continue (it is empty).")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"The prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}.")
    if mode not in MODES:
        raise ValueError(f"Mode must be one of {', '.join(MODES)}; got {mode!r}.")
    if direction not in DIRECTIONS:
        raise ValueError(f"Steering direction must be 'drift' or 'attractor'; got {direction!r}.")
    beta = _number("beta", beta)
    temperature = _number("Base temperature", temperature)
    tmin = _number("Minimum temperature", min_temperature)
    tmax = _number("Maximum temperature", max_temperature)
    alpha = _number("Steering strength alpha", alpha)
    seed = _number("Seed", seed, integer=True)
    max_new = _number("Max new tokens", max_new_tokens, integer=True)
    if abs(beta) > MAX_ABS_BETA:
        raise ValueError(f"beta must lie in [-{MAX_ABS_BETA:g}, {MAX_ABS_BETA:g}]; got {beta:g}.")
    for name, t in (("Base temperature", temperature), ("Minimum temperature", tmin), ("Maximum temperature", tmax)):
        if not 0 < t <= MAX_TEMPERATURE:
            raise ValueError(f"{name} must lie in (0, {MAX_TEMPERATURE:g}]; got {t:g}.")
    if tmin > tmax:
        raise ValueError(f"Minimum temperature ({tmin:g}) is above the maximum temperature ({tmax:g}): "
                         "swap them or widen the range.")
    if abs(alpha) > MAX_ABS_ALPHA:
        raise ValueError(f"Steering strength alpha must lie in [-{MAX_ABS_ALPHA:g}, {MAX_ABS_ALPHA:g}]; got {alpha:g}.")
    if not 0 <= seed < 2**31:
        raise ValueError(f"Seed must lie in [0, 2^31); got {seed}.")
    if not 1 <= max_new <= MAX_NEW_TOKENS:
        raise ValueError(f"Max new tokens must lie in [1, {MAX_NEW_TOKENS}]; got {max_new}.")
    warnings = []
    if mode == "observe":
        warnings.append("Observe mode: the heads only watch, so both columns are the same sample.")
    if "temperature" in mode:
        if beta == 0:
            warnings.append("beta = 0: the SDE temperature is the constant base temperature (plain sampling).")
        if not tmin <= temperature <= tmax:
            warnings.append(f"The base temperature {temperature:g} lies outside [{tmin:g}, {tmax:g}] and is clipped.")
    if "steer" in mode and alpha == 0:
        warnings.append("alpha = 0: steering adds nothing (plain generation).")
    if "steer" not in mode and alpha != 0:
        warnings.append(f"alpha = {alpha:g} is ignored: only the steer modes steer.")
    params = {"mode": mode, "beta": beta, "temperature": temperature, "min_temperature": tmin,
              "max_temperature": tmax, "alpha": alpha, "direction": direction, "seed": seed,
              "max_new_tokens": max_new}
    return params, warnings


class _QueueStreamer:
    """A transformers streamer that forwards new token ids to a queue (the first ``put`` is the prompt)."""

    def __init__(self, q: queue.Queue):
        self.q = q
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.q.put(("token", [int(x) for x in value.reshape(-1).tolist()]))

    def end(self) -> None:
        pass


def _pieces(tokenizer, prompt_ids: list[int], new_ids: list[int], start: int, pieces: list[str]) -> None:
    """Append the display text of ``new_ids[start:]`` to ``pieces`` (decoding prefixes keeps the spacing right)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    prev = tokenizer.decode(prompt_ids + new_ids[:start], skip_special_tokens=True)
    for k in range(start, len(new_ids)):
        tok = new_ids[k]
        if tok in special:
            pieces.append(f"[{tokenizer.convert_ids_to_tokens(tok)}]")
            continue
        cur = tokenizer.decode(prompt_ids + new_ids[: k + 1], skip_special_tokens=True)
        if cur.startswith(prev):
            pieces.append(cur[len(prev):])
        else:
            pieces.append(str(tokenizer.convert_ids_to_tokens(tok)).replace("\u2581", " "))
        prev = cur


def _simulate_cloud(heads: SDEHeads, z0: torch.Tensor, steps: int, n_paths: int, t0: float, seed: int) -> torch.Tensor:
    """Euler-Maruyama paths of the fitted SDE from ``z0`` (``hf_sde.simulate.simulate`` when available)."""
    try:
        from .simulate import simulate
    except ImportError:
        simulate = None
    if simulate is not None:
        return simulate(heads, z0, steps=steps, n_paths=n_paths, t0=t0, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    z = z0.reshape(1, -1).float().repeat(n_paths, 1)
    out = [z]
    with torch.no_grad():
        for k in range(steps):
            mean, std = heads(z, torch.tensor(t0 + k * heads.dt))
            z = z + mean + std * torch.randn(z.shape, generator=gen)
            out.append(z)
    return torch.stack(out, dim=1)


def _run(loaded: LoadedModel, prompt_ids: list[int], control: SDEControl, params: dict, result: RunResult,
         temperature_kwarg: float | None) -> Iterator[RunResult]:
    """Sample once in a worker thread (holding the model's lock), yielding ``result`` after each token."""
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    q: queue.Queue = queue.Queue()
    control.callback = lambda step: q.put(("step", step))
    kwargs = dict(max_new_tokens=params["max_new_tokens"], do_sample=True, top_k=0, return_dict_in_generate=True,
                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if temperature_kwarg is not None:
        kwargs["temperature"] = temperature_kwarg

    def work():
        try:
            ids = torch.tensor([prompt_ids], device=device)
            with loaded.lock, torch.no_grad():
                torch.manual_seed(params["seed"])
                out = sde_generate(model, input_ids=ids, attention_mask=torch.ones_like(ids), sde_control=control,
                                   streamer=_QueueStreamer(q), **kwargs)
            q.put(("done", out))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            q.put(("error", e))

    start = time.perf_counter()
    threading.Thread(target=work, name="hf-sde-demo-generate", daemon=True).start()
    while True:
        kind, value = q.get()
        if kind == "error":
            raise value
        if kind == "step":
            step: SDEStep = value
            for name in result.steps:
                result.steps[name].append(float(getattr(step, name)[0]))
            continue
        if kind == "token":
            n = len(result.token_ids)
            result.token_ids.extend(value)
            _pieces(tok, prompt_ids, result.token_ids, n, result.pieces)
            result.seconds = time.perf_counter() - start
            yield result
            continue
        out = value
        break
    new = out.sequences[0, len(prompt_ids):].tolist()
    if new != result.token_ids:  # the streamer is only a preview; the returned sequence is the truth
        result.token_ids, result.pieces = new, []
        _pieces(tok, prompt_ids, new, 0, result.pieces)
    result.trace = out.sde_trace
    result.text = tok.decode(prompt_ids + new, skip_special_tokens=True)
    result.continuation = tok.decode(new, skip_special_tokens=True)
    # The SDE path: hidden states of the generated sequence at the heads' layer, projected. Steering acts on the
    # output of its layer, which is at or after the heads' layer, so these are exactly the states the heads saw.
    from .trajectories import extract_from_ids

    eos = tok.eos_token_id
    seq = prompt_ids + (new[: new.index(eos) + 1] if eos is not None and eos in new else new)
    if len(seq) >= 2:
        with loaded.lock:
            traj = extract_from_ids(model, [seq], layer=loaded.heads.config.layer, progress=False)
        with torch.no_grad():
            result.path = loaded.heads.project(traj.states[0].to(loaded.heads.proj_basis.device)).cpu()
    result.seconds = time.perf_counter() - start
    result.done = True
    yield result


def stream_comparison(loaded: LoadedModel, prompt: str, mode: str = "temperature", beta: float = 1.0,
                      temperature: float = 1.0, min_temperature: float = 0.3, max_temperature: float = 1.5,
                      alpha: float = 0.1, direction: str = "drift", seed: int = 0, max_new_tokens: int = 48,
                      cloud_paths: int = CLOUD_PATHS) -> Iterator[Comparison]:
    """Like :func:`generate_comparison`, as a generator: yields the same :class:`Comparison`, updated in place,
    after every token of the plain run and then of the controlled run, and once more when all is done.

    Raises ``ValueError`` (before the first yield) for bad parameters.
    """
    params, warnings = validate_params(prompt, mode, beta, temperature, min_temperature, max_temperature, alpha,
                                       direction, seed, max_new_tokens)
    tok, heads = loaded.tokenizer, loaded.heads
    prompt_ids = [int(x) for x in tok(prompt, add_special_tokens=True)["input_ids"]]
    if len(prompt_ids) > MAX_PROMPT_TOKENS:
        raise ValueError(f"The prompt is {len(prompt_ids)} tokens long; the limit is {MAX_PROMPT_TOKENS}.")
    limit = loaded.max_positions
    if len(prompt_ids) + params["max_new_tokens"] > limit:
        raise ValueError(f"Prompt ({len(prompt_ids)} tokens) plus {params['max_new_tokens']} new tokens exceed the "
                         f"model's {limit} positions; shorten the prompt or ask for fewer tokens.")
    if len(prompt_ids) + params["max_new_tokens"] > heads.config.horizon:
        warnings.append(f"The sequence runs past the heads' horizon T = {heads.config.horizon:g} tokens: the SDE "
                        "extrapolates in time there.")
    plain = RunResult("Plain sampling", "observe")
    controlled = RunResult("SDE-controlled", mode)
    cmp = Comparison(prompt, prompt_ids, params, plain, controlled, warnings)
    observe = SDEControl(heads, mode="observe")
    yield from (cmp for _ in _run(loaded, prompt_ids, observe, params, plain, params["temperature"]))
    control = SDEControl(heads, mode=mode, beta=params["beta"], temperature=params["temperature"],
                         min_temperature=params["min_temperature"], max_temperature=params["max_temperature"],
                         alpha=params["alpha"], direction=direction)
    temp_kwarg = None if control.controls_temperature else params["temperature"]
    yield from (cmp for _ in _run(loaded, prompt_ids, control, params, controlled, temp_kwarg))
    # Simulated paths of the fitted SDE from the last prompt state, as long as the longer run.
    steps = max(plain.num_tokens, controlled.num_tokens)
    if cloud_paths > 0 and controlled.path is not None and steps > 0:
        p = len(prompt_ids) - 1
        cmp.cloud = _simulate_cloud(heads, controlled.path[p].to(heads.proj_basis.device), steps, cloud_paths,
                                    p / heads.config.horizon, params["seed"]).cpu()
    cmp.done = True
    yield cmp


def generate_comparison(loaded: LoadedModel, prompt: str, **params) -> Comparison:
    """Sample ``prompt`` plainly and under SDE control with the same seed; return both runs and their traces.

    Keyword arguments: ``mode`` (one of :data:`hf_sde.control.MODES`), ``beta``, ``temperature`` (the base
    temperature ``tau_0``, also the plain run's temperature), ``min_temperature``, ``max_temperature``,
    ``alpha``, ``direction`` (``"drift"`` / ``"attractor"``), ``seed``, ``max_new_tokens``, ``cloud_paths``.
    With ``beta=0`` in a temperature mode (and ``tau_0`` inside the bounds) or ``alpha=0`` when steering, the
    two continuations are identical. Raises ``ValueError`` for bad parameters.
    """
    last = None
    for snapshot in stream_comparison(loaded, prompt, **params):
        last = snapshot
    return last


# ----- rendering ----------------------------------------------------------------------------------------
_CALM, _NOISY = (38, 110, 210), (214, 50, 40)


def _z_color(z: float) -> str:
    if not math.isfinite(z):
        return "transparent"
    rgb = _NOISY if z > 0 else _CALM
    a = min(abs(z) / 2.5, 1.0) * 0.75
    return f"rgba({rgb[0]}, {rgb[1]}, {rgb[2]}, {a:.2f})"


def render_tokens(run: RunResult, prompt: str) -> str:
    """HTML of the continuation with each token's background coloured by its diffusion z-score."""
    z = run.steps["zscore"]
    temp, steer = run.steps["temperature"], run.steps["steer_norm"]
    if run.trace is not None:
        z = run.trace.zscore[0].tolist()
        temp, steer = run.trace.temperature[0].tolist(), run.trace.steer_norm[0].tolist()
    spans = []
    for k, piece in enumerate(run.pieces):
        zk = z[k] if k < len(z) else float("nan")
        tip = f"step {k}: diffusion z {zk:+.2f}"
        if k < len(temp):
            tip += f", temperature {temp[k]:.2f}, steering {steer[k]:.3f}"
        spans.append(f'<span class="sde-tok" title="{html.escape(tip)}" style="background:{_z_color(zk)};'
                     f'border-radius:3px">{html.escape(piece)}</span>')
    status = "" if run.done else ' <span class="sde-cursor">&#9612;</span>'
    stats = ""
    if run.num_tokens:
        finite = [x for x in z if math.isfinite(x)]
        mean_z = sum(finite) / len(finite) if finite else float("nan")
        stats = f"{run.num_tokens} tokens, mean z {mean_z:+.2f}"
        if temp:
            stats += f", mean temperature {sum(t for t in temp if math.isfinite(t)) / max(len(temp), 1):.2f}"
        if any(s for s in steer if math.isfinite(s)):
            stats += f", mean steering {sum(s for s in steer if math.isfinite(s)) / max(len(steer), 1):.3f}"
        stats += f", {run.seconds:.1f} s"
    return (f'<div class="sde-run" data-done="{str(run.done).lower()}">'
            f'<div style="font-weight:600;margin-bottom:4px">{html.escape(run.label)} '
            f'<span style="font-weight:400;opacity:.7">({html.escape(run.mode)})</span></div>'
            f'<div style="line-height:1.9;white-space:pre-wrap;font-size:1.05em">'
            f'<span class="sde-prompt" style="opacity:.6">{html.escape(prompt)}</span>{"".join(spans)}{status}</div>'
            f'<div style="opacity:.7;font-size:.85em;margin-top:4px">{html.escape(stats)}</div></div>')


LEGEND_HTML = (
    '<div style="font-size:.85em;opacity:.85">Token background: diffusion z-score of the state that produced it '
    '(calibrated on the training transitions) &nbsp; '
    f'<span style="background:{_z_color(-2.5)};padding:0 6px;border-radius:3px">calm z &le; -2.5</span> '
    f'<span style="background:{_z_color(-1)};padding:0 6px;border-radius:3px">-1</span> '
    '<span style="padding:0 6px">0</span> '
    f'<span style="background:{_z_color(1)};padding:0 6px;border-radius:3px">+1</span> '
    f'<span style="background:{_z_color(2.5)};padding:0 6px;border-radius:3px">noisy z &ge; +2.5</span>'
    ' &nbsp; (hover a token for its numbers)</div>'
)


def _series(run: RunResult, name: str) -> list[float]:
    if run.trace is not None:
        return getattr(run.trace, name)[0].tolist()
    return list(run.steps[name])


def trace_figure(cmp: Comparison):
    """Matplotlib figure: diffusion z-score, applied temperature and steering norm per step, both runs."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5.6), dpi=100, layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    runs = ((cmp.plain, "#7f7f7f", "plain"), (cmp.controlled, "#d62728", f"controlled ({cmp.controlled.mode})"))
    for name, ax, ylabel in (("zscore", axes[0], "diffusion z"), ("temperature", axes[1], "temperature"),
                             ("steer_norm", axes[2], "steering ||Δh||")):
        for run, color, label in runs:
            ys = _series(run, name)
            if ys:
                ax.plot(range(len(ys)), ys, color=color, lw=1.6 if run is cmp.controlled else 1.2,
                        marker="o", ms=2.5, label=label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].axhline(0, color="k", lw=0.6, alpha=0.5)
    p = cmp.params
    if "temperature" in cmp.controlled.mode:
        for bound in (p["min_temperature"], p["max_temperature"]):
            axes[1].axhline(bound, color="#1f77b4", lw=0.8, ls="--", alpha=0.6)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[2].set_xlabel("generation step")
    fig.suptitle("Per-step SDE statistics", fontsize=11)
    return fig


def phase_figure(cmp: Comparison):
    """Matplotlib figure: both paths on the first two SDE (PCA) coordinates over simulated paths of the SDE."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()

    def xy(path: torch.Tensor) -> tuple[list[float], list[float]]:
        x = path[..., 0]
        y = path[..., 1] if path.shape[-1] > 1 else torch.zeros_like(x)
        return x.tolist(), y.tolist()

    if cmp.cloud is not None:
        # The states of all simulated paths as a faint cloud, and two of the paths as lines.
        x, y = xy(cmp.cloud[:, 1:].reshape(-1, cmp.cloud.shape[-1]))
        ax.scatter(x, y, s=6, color="#6f94c8", alpha=0.18, linewidths=0,
                   label=f"{cmp.cloud.shape[0]} simulated SDE paths (states)")
        for i, path in enumerate(cmp.cloud[:2]):
            x, y = xy(path)
            ax.plot(x, y, color="#3b6db3", lw=0.7, alpha=0.5, label="two simulated paths" if i == 0 else None)
    p = len(cmp.prompt_ids) - 1
    for run, color, label in ((cmp.plain, "#555555", "plain"), (cmp.controlled, "#d62728", "controlled")):
        if run.path is None:
            continue
        x, y = xy(run.path)
        if run is cmp.controlled and p > 0:
            ax.plot(x[: p + 1], y[: p + 1], color="k", lw=1.0, ls=":", alpha=0.7, label="prompt")
        ax.plot(x[p:], y[p:], color=color, lw=1.8 if run is cmp.controlled else 1.2, marker="o", ms=2.5,
                alpha=0.95 if run is cmp.controlled else 0.7, label=label)
        ax.plot(x[-1], y[-1], marker="s", ms=6, color=color)
    if cmp.controlled.path is not None:
        x, y = xy(cmp.controlled.path)
        ax.plot(x[p], y[p], marker="*", ms=13, color="#ff9900", markeredgecolor="k", label="start (last prompt token)",
                linestyle="none")
    # Frame the generated paths and the bulk of the cloud (a few far-flung simulated states would shrink the rest).
    frame = [run.path[len(cmp.prompt_ids) - 1:] for run in (cmp.plain, cmp.controlled) if run.path is not None]
    if cmp.cloud is not None:
        pts = cmp.cloud.reshape(-1, cmp.cloud.shape[-1])
        pts = pts[torch.isfinite(pts).all(-1)]
        if len(pts):
            lo, hi = torch.quantile(pts[:, :2].float(), torch.tensor([0.03, 0.97]), dim=0)
            frame.append(torch.stack([lo, hi]))
    if frame:
        both = torch.cat([f[:, :2] if f.shape[-1] > 1 else torch.cat([f, torch.zeros_like(f)], -1) for f in frame])
        both = both[torch.isfinite(both).all(-1)]
        if len(both):
            lo, hi = both.min(0).values, both.max(0).values
            pad = (hi - lo).clamp_min(1e-3) * 0.08
            ax.set_xlim(float(lo[0] - pad[0]), float(hi[0] + pad[0]))
            ax.set_ylim(float(lo[1] - pad[1]), float(hi[1] + pad[1]))
    ax.set_xlabel("Z1 (first SDE / PCA coordinate)")
    ax.set_ylabel("Z2 (second SDE / PCA coordinate)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title("Phase plane: generated paths over simulated SDE paths", fontsize=11)
    return fig


def summary_markdown(cmp: Comparison) -> str:
    if not cmp.done:
        which = "controlled" if cmp.plain.done else "plain"
        return f"Generating ({which} run)..."
    same = cmp.plain.token_ids == cmp.controlled.token_ids
    return (f"**finished**: plain {cmp.plain.num_tokens} tokens in {cmp.plain.seconds:.1f} s, controlled "
            f"{cmp.controlled.num_tokens} tokens in {cmp.controlled.seconds:.1f} s, seed {cmp.params['seed']}"
            + (" (identical continuations)" if same else ""))


# ----- the Gradio app -----------------------------------------------------------------------------------
DESCRIPTION = """# hf-sde: decoding controlled by an SDE on the hidden-state path
Generation is modelled as `dZ = mu(Z, t) dt + sigma(Z, t) dW` on the projected hidden state of the newest token
([arXiv 2408.11863](https://arxiv.org/abs/2408.11863), made precise in hf-sde). The same prompt is sampled twice
with the same seed: **plainly** (the heads only watch) and **under SDE control**: the temperature follows
`tau = clip(tau_0 exp(-beta z), tau_min, tau_max)` of the calibrated diffusion z-score, and/or the hidden state is
steered along the drift (or towards the attractor) with strength alpha."""


def build_demo(model_id: str = DEFAULT_MODEL, gguf_file: str | None = DEFAULT_GGUF,
               revision: str | None = DEFAULT_REVISION, heads: str | None = None, *,
               backend: DemoBackend | None = None, cache_dir: str | os.PathLike | None = None,
               fit_epochs: int | None = None, device: str | None = None, preload: bool = True,
               concurrency_limit: int = 1, max_queue: int = 16, allow_model_choice: bool = True):
    """Build the Gradio app (a ``gr.Blocks``, queued). ``demo.launch()`` serves it.

    With ``preload`` the default model and heads are loaded (and the heads fitted, with a progress bar, if
    not cached) before the page exists, so the first click is fast. Other ids typed into the page load on
    their first Generate. ``concurrency_limit`` bounds simultaneous generations (the model is shared, so
    generation is serialised by a lock anyway) and ``max_queue`` the waiting requests.
    """
    import gradio as gr

    backend = backend or DemoBackend(cache_dir=cache_dir, fit_epochs=fit_epochs, device=device)
    initial = "Nothing loaded yet: the first Generate loads the model."
    if preload:
        initial = backend.load(model_id, gguf_file, revision, heads, progress=True).describe()

    def on_generate(model_in, gguf_in, revision_in, heads_in, prompt, mode, beta, tau0, tmin, tmax, alpha,
                    direction, seed, max_new, progress=gr.Progress(track_tqdm=True)):
        try:
            progress(0, desc="Loading the model and heads")
            loaded = backend.load(model_in, gguf_in, revision_in, heads_in, progress=True)
        except ValueError as e:
            raise gr.Error(str(e), title="Model or heads") from None
        info = loaded.describe()
        shown: set[str] = set()
        plots = (gr.skip(), gr.skip())
        try:
            for cmp in stream_comparison(loaded, prompt, mode=mode, beta=beta, temperature=tau0,
                                         min_temperature=tmin, max_temperature=tmax, alpha=alpha,
                                         direction=direction, seed=seed, max_new_tokens=max_new):
                for w in cmp.warnings:
                    if w not in shown:
                        shown.add(w)
                        gr.Warning(w)
                if cmp.done:
                    plots = (trace_figure(cmp), phase_figure(cmp))
                elif cmp.plain.done and not cmp.controlled.pieces:
                    plots = (trace_figure(cmp), gr.skip())
                else:
                    plots = (gr.skip(), gr.skip())
                yield (render_tokens(cmp.plain, prompt), render_tokens(cmp.controlled, prompt), *plots,
                       summary_markdown(cmp), info)
        except ValueError as e:
            raise gr.Error(str(e), title="Check the parameters") from None
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - shown to the user, logged, and the server carries on
            logger.exception("hf-sde demo: generation failed")
            raise gr.Error(f"Generation failed: {type(e).__name__}: {e}") from None

    with gr.Blocks(title="hf-sde: SDE-controlled decoding", analytics_enabled=False) as demo:
        gr.Markdown(DESCRIPTION)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=320):
                prompt = gr.Textbox(value=EXAMPLE_PROMPTS[0], label="Prompt", lines=2, max_length=MAX_PROMPT_CHARS,
                                    elem_id="sde-prompt", placeholder="Once upon a time")
                mode = gr.Radio(list(MODES), value="temperature+steer", label="Mode", elem_id="sde-mode")
                with gr.Row():
                    beta = gr.Slider(-3, 3, value=1.0, step=0.1, label="beta (temperature sensitivity)")
                    tau0 = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="base temperature tau_0")
                with gr.Row():
                    tmin = gr.Slider(0.05, 3.0, value=0.3, step=0.05, label="min temperature", elem_id="sde-tmin")
                    tmax = gr.Slider(0.05, 3.0, value=1.5, step=0.05, label="max temperature", elem_id="sde-tmax")
                with gr.Row():
                    alpha = gr.Slider(-1, 1, value=0.1, step=0.01, label="steering strength alpha")
                    direction = gr.Radio(list(DIRECTIONS), value="drift", label="steering direction")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, maximum=2**31 - 1, label="seed")
                    max_new = gr.Slider(1, MAX_NEW_TOKENS, value=48, step=1, label="max new tokens")
                button = gr.Button("Generate", variant="primary", elem_id="sde-generate")
                gr.Examples([[p] for p in EXAMPLE_PROMPTS], inputs=[prompt], label="Example prompts")
                with gr.Accordion("Model and heads", open=False):
                    model_box = gr.Textbox(value=model_id, label="model (hub id or folder)",
                                           interactive=allow_model_choice)
                    gguf_box = gr.Textbox(value=gguf_file or "", label="GGUF file in the repo (blank: none)",
                                          interactive=allow_model_choice)
                    revision_box = gr.Textbox(value=revision or "", label="revision (blank: default branch)",
                                              interactive=allow_model_choice)
                    heads_box = gr.Textbox(value=heads or "", label="SDE heads (hub id or folder; blank: fit demo heads)",
                                           interactive=allow_model_choice)
                    info = gr.Markdown(initial, elem_id="sde-info")
            with gr.Column(scale=2):
                summary = gr.Markdown("Press **Generate**.", elem_id="sde-summary")
                with gr.Row(equal_height=True):
                    plain_out = gr.HTML(label="plain", elem_id="sde-plain")
                    controlled_out = gr.HTML(label="controlled", elem_id="sde-controlled")
                gr.HTML(LEGEND_HTML)
                with gr.Row():
                    trace_plot = gr.Plot(label="Per-step SDE statistics", show_label=False, format="png", elem_id="sde-trace-plot")
                    phase_plot = gr.Plot(label="Phase plane", show_label=False, format="png", elem_id="sde-phase-plot")
        inputs = [model_box, gguf_box, revision_box, heads_box, prompt, mode, beta, tau0, tmin, tmax, alpha,
                  direction, seed, max_new]
        outputs = [plain_out, controlled_out, trace_plot, phase_plot, summary, info]
        button.click(on_generate, inputs, outputs, concurrency_limit=concurrency_limit, api_name="generate")
        prompt.submit(on_generate, inputs, outputs, concurrency_limit=concurrency_limit, api_name=False)
    demo.queue(default_concurrency_limit=concurrency_limit, max_size=max_queue)
    demo.hf_sde_backend = backend
    return demo


def launch(demo, **kwargs):
    """``demo.launch`` with the demo's defaults (errors shown in the page; ``kwargs`` win)."""
    kwargs.setdefault("show_error", True)
    return demo.launch(**kwargs)


# ----- hf-sde demo --------------------------------------------------------------------------------------
def _demo(args) -> int:
    gguf, revision = args.gguf_file, args.revision
    if args.model == DEFAULT_MODEL:
        gguf = gguf if gguf is not None else DEFAULT_GGUF
        revision = revision if revision is not None else DEFAULT_REVISION
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit("hf-sde demo needs gradio: pip install 'hf-sde[demo]' (or: pip install gradio).") from None
    demo = build_demo(args.model, gguf, revision, args.heads, cache_dir=args.cache_dir, fit_epochs=args.fit_epochs,
                      device=args.device, concurrency_limit=args.concurrency, max_queue=args.max_queue,
                      allow_model_choice=not args.lock_model)
    launch(demo, server_name=args.host, server_port=args.port, share=args.share)
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``hf-sde demo``: serve the comparison app locally."""
    from .cli import add_model_args

    p = sub.add_parser("demo", help="serve the Gradio demo: plain vs SDE-controlled sampling side by side")
    add_model_args(p)
    p.add_argument("--heads", default=None, help="heads folder or hub id (default: fit demo heads, cached)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    p.add_argument("--cache-dir", default=None, help="where demo heads are cached (default: $HF_SDE_CACHE/demo-heads "
                                                    "or ~/.cache/hf-sde/demo-heads)")
    p.add_argument("--fit-epochs", type=int, default=None, help=f"epochs for demo heads (default {DEMO_FIT['epochs']})")
    p.add_argument("--concurrency", type=int, default=1, help="generations served at once")
    p.add_argument("--max-queue", type=int, default=16, help="requests allowed to wait")
    p.add_argument("--lock-model", action="store_true", help="make the model / heads boxes read-only")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (needs the network)")
    p.set_defaults(func=_demo)


__all__ = [
    "DEMO_STORIES", "Comparison", "DemoBackend", "LoadedModel", "RunResult", "build_demo", "demo_corpus",
    "demo_heads", "generate_comparison", "launch", "phase_figure", "register_cli", "render_tokens",
    "stream_comparison", "trace_figure", "validate_params",
]
