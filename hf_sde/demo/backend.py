"""The demo's model and heads: loaded once from the server's configuration, shared by every request.

The model a visitor sees is fixed by configuration (a :class:`~hf_sde.loading.ModelSpec` and a heads folder or
hub id). Choosing another model is a local-run feature, limited to an allowlist of hub ids, so a visitor can
neither make the server load arbitrary repositories nor probe its file system. Error texts and the info panel
never carry server paths: the details go to the log.

Example:
    >>> backend = DemoBackend(STORIES260K)
    >>> loaded = backend.load()                 # the configured model + its heads (shipped, given or fitted)
    >>> loaded.encode_prompt("Once upon a time")  # chat template applied when the tokenizer has one
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.loading import DEFAULT_MODEL, KNOWN_MODELS, ModelSpec, resolve_model_spec
from ..fitting.heads import SDEHeads
from .demo_heads import demo_heads
from .settings import InputError

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def shipped_heads(spec: ModelSpec) -> str | None:
    """The heads shipped with hf-sde for ``spec`` (``hf_sde.pretrained.DEFAULT_HEADS``), if installed."""
    if (spec.name_or_path, spec.gguf_file) != (DEFAULT_MODEL.name_or_path, DEFAULT_MODEL.gguf_file):
        return None
    try:
        from ..pretrained import DEFAULT_HEADS
    except ImportError:
        return None
    path = Path(str(DEFAULT_HEADS))
    return str(path) if path.is_dir() else None


def public_name(source: str) -> str:
    """How a heads source is shown to visitors: a hub id as is, a local folder by its last name only."""
    if _HUB_ID.match(source) and not os.path.isabs(source):
        return source
    return Path(source).name or "configured heads"


def check_allowlist(ids: Sequence[str]) -> tuple[str, ...]:
    """Validate the model ids a local run may offer: hub ids only, never file-system paths."""
    out = []
    for model_id in ids:
        model_id = model_id.strip()
        if not _HUB_ID.match(model_id) or ".." in model_id:
            raise ValueError(f"--allowed-model takes hub ids (owner/name), not paths: {model_id!r}")
        out.append(model_id)
    return tuple(dict.fromkeys(out))


@dataclass
class LoadedModel:
    """A model, its tokenizer and the heads the demo uses for it, with the batching worker that owns them."""

    model: torch.nn.Module
    tokenizer: object
    heads: SDEHeads
    spec: ModelSpec
    heads_source: str
    max_batch: int = 16
    _scheduler: object = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def max_positions(self) -> int:
        n = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        return int(n) if n else 2048

    @property
    def chat(self) -> bool:
        """Whether prompts are formatted as a user turn with the tokenizer's chat template."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def scheduler(self):
        """The one worker thread that runs this model (created on first use)."""
        with self._lock:
            if self._scheduler is None:
                from .batching import BatchScheduler

                self._scheduler = BatchScheduler(self.model, self.tokenizer, self.heads, max_batch=self.max_batch)
            return self._scheduler

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of ``prompt``: a user turn plus the assistant's generation prompt when there is a chat template."""
        tok = self.tokenizer
        if self.chat:
            out = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=True)
            ids = out["input_ids"] if hasattr(out, "keys") else out
        else:
            ids = tok(prompt, add_special_tokens=True)["input_ids"]
        return [int(x) for x in ids]

    def describe(self) -> str:
        """Markdown for the info panel (model id, revision, heads and their fit; no server paths)."""
        cfg = self.heads.config
        spec = self.spec
        name = spec.name_or_path + (f" / {spec.gguf_file}" if spec.gguf_file else "")
        rev = f" @ {spec.revision[:10]}" if spec.revision else ""
        lines = [f"**Model** `{name}`{rev}" + (" (prompts formatted as a chat user turn)" if self.chat else ""),
                 f"**Heads** {self.heads_source}: layer {cfg.layer} of {cfg.num_layers}, PCA {cfg.proj_dim} of "
                 f"{cfg.hidden_size} dims, horizon T = {cfg.horizon:g} tokens"]
        nll = cfg.heldout_nll or {}
        if {"neural", "ou", "brownian"} <= set(nll):
            lines.append(f"Held-out transition NLL (nats/dim): neural {nll['neural']:.3f}, OU {nll['ou']:.3f}, "
                         f"Brownian {nll['brownian']:.3f}")
        return "  \n".join(lines)

    def close(self) -> None:
        """Stop the worker thread (requests still queued get an error)."""
        if self._scheduler is not None:
            self._scheduler.close()


class DemoBackend:
    """The configured model and heads, plus (locally, when allowed) a few other allowlisted hub models.

    Args:
        model: the served model (a spec or hub id; default :data:`hf_sde.loading.DEFAULT_MODEL`).
        heads: heads folder or hub id for it (default: the shipped heads for the default model, else demo heads
            fitted once and cached).
        allowed_models: other hub ids a local run may switch to (``hf-sde demo --allow-model-choice``).
        cache_dir, fit_epochs: where demo heads are cached and how long they are fitted.
        device: torch device (default CPU). max_batch: rows generated together. max_loaded: models kept.
    """

    def __init__(self, model: ModelSpec | str | None = None, heads: str | None = None, *,
                 allowed_models: Sequence[str] = (), cache_dir: str | os.PathLike | None = None,
                 fit_epochs: int | None = None, device: str | None = None, max_batch: int = 16, max_loaded: int = 2):
        self.spec = model if isinstance(model, ModelSpec) else resolve_model_spec(model)
        self.heads = (heads or "").strip() or None
        self.allowed_models = check_allowlist(allowed_models)
        self.cache_dir, self.fit_epochs, self.device = cache_dir, fit_epochs, device
        self.max_batch, self.max_loaded = max(2, int(max_batch)), max(1, int(max_loaded))
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def choices(self) -> list[str]:
        """Model ids a visitor may pick: the served one first, then the allowlist."""
        return list(dict.fromkeys([self.spec.name_or_path, *self.allowed_models]))

    def load(self, model_id: str | None = None, *, progress: bool = True) -> LoadedModel:
        """The served model (``model_id`` None or its id) or an allowlisted one, loading it on first use.

        Raises :class:`InputError` (no paths in the text) for a model that is not offered or does not load.
        """
        if model_id is not None and not isinstance(model_id, str):
            raise InputError(f"The model must be given by its id (text), got {type(model_id).__name__}.")
        model_id = (model_id or "").strip() if model_id is not None else self.spec.name_or_path
        if not model_id:
            raise InputError("Choose a model: the model box is empty.")
        if model_id not in self.choices:
            offered = ", ".join(self.choices)
            raise InputError(f"This demo does not offer the model {model_id[:100]!r}; choose one of: {offered}.")
        with self._lock:
            if model_id not in self._loaded:
                self._loaded[model_id] = self._load(model_id, progress=progress)
                while len(self._loaded) > self.max_loaded:
                    oldest = next(k for k in self._loaded if k != self.spec.name_or_path)
                    self._loaded.pop(oldest).close()
            self._loaded.move_to_end(model_id)
            return self._loaded[model_id]

    def _load(self, model_id: str, *, progress: bool) -> LoadedModel:
        served = model_id == self.spec.name_or_path
        spec = self.spec if served else KNOWN_MODELS.get(model_id) or resolve_model_spec(model_id)
        try:
            model, tokenizer = spec.load(device=self.device)
        except Exception as e:  # noqa: BLE001 - the details (maybe paths) go to the log, a plain message to users
            if served:
                raise  # the operator's configuration: show the whole error at start-up
            logger.warning("hf-sde demo: could not load %s: %s: %s", model_id, type(e).__name__, e)
            raise InputError(f"Could not load the model {model_id}; the server log has the details.") from None
        heads_id = self.heads if served else None
        heads_id = heads_id or shipped_heads(spec)
        if heads_id:
            heads = SDEHeads.from_pretrained(heads_id)
            heads.check_compatible(model)
            source = "heads shipped with hf-sde" if heads_id == shipped_heads(spec) else public_name(heads_id)
            source = f"`{source}`"
        else:
            heads, source = demo_heads(model, tokenizer, cache_dir=self.cache_dir, epochs=self.fit_epochs,
                                       progress=progress)
            if spec == DEFAULT_MODEL:
                source += " (the shipped heads are not installed)"
        heads.to(next(model.parameters()).device).eval()
        return LoadedModel(model, tokenizer, heads, spec, source, max_batch=self.max_batch)

    def close(self) -> None:
        """Stop every worker thread."""
        with self._lock:
            for loaded in self._loaded.values():
                loaded.close()
            self._loaded.clear()
