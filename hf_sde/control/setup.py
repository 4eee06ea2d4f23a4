"""The per-call setup: read the generation options the call will use, refuse what SDE control does not support,
and fix where the prompt ends (a passed cache included), the step budget, where the temperature enters and
whether the step runs inside a compiled forward."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from transformers.generation import configuration_utils as _generation_config

from ..data.layers import text_config
from .settings import SDEControl


@dataclass
class _CallSetup:
    """What one ``generate`` call fixes before the first forward (from its generation options and inputs)."""

    prompt_width: int        # positions of the prompt, cached ones included (1 for generation from BOS)
    returned_prompt: int     # prompt tokens in the returned sequences (0 for inputs_embeds only)
    capacity: int            # steps to preallocate (grown if generate runs more)
    base_temperature: float
    eos_ids: list[int]
    prefill_width: int | None = None  # prompt tokens the first forwards process (fewer with a passed cache)
    compiled: bool = False   # the step runs inside generate's compiled forward (see _compile_plan)
    batch: int | None = None  # rows generate decodes (inputs x num_return_sequences), when known up front
    last_positions: torch.Tensor | None = None  # (batch,) each row's last prompt position, from the attention mask
    scores_private: bool = False  # no output_logits: the logits processor may divide the scores in place
    head: torch.nn.Module | None = None  # the LM head whose input the temperature divides (_temperature_head)
    device: torch.device | None = None  # the model's device (looked up once per call)

    @property
    def scale_head_input(self) -> bool:
        return self.head is not None


def _model_device(model) -> torch.device:
    """Where the model's first parameter lives (what ``PreTrainedModel.device`` says, at a third of its cost)."""
    return next(model.parameters()).device


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=4)


class _GenerationOptions:
    """The generation options ``generate`` will use, each looked up when first read, by ``generate``'s own
    precedence (``GenerationMixin._prepare_generation_config``): the call's keyword arguments, then the
    ``generation_config`` passed, then the model's, then transformers' global defaults (``None`` values fall
    through). Resolving the whole config costs a deep copy (~0.3 ms) that ``generate`` pays again; the setup
    reads a dozen options.
    """

    def __init__(self, model, kwargs: dict):
        self._kwargs = kwargs
        self._sources = [c for c in (kwargs.get("generation_config"), getattr(model, "generation_config", None))
                         if c is not None]
        self._model_config = getattr(model, "generation_config", None)
        self._defaults: dict | None = None

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in self._kwargs:
            value = self._kwargs[name]
        else:
            value = next((v for v in (getattr(c, name, None) for c in self._sources) if v is not None), None)
            if value is None and self._model_config is not None:
                if self._defaults is None:
                    self._defaults = self._model_config._get_default_generation_params()
                value = self._defaults.get(name)
        if name == "cache_implementation" and value == "hybrid":
            value = None  # generate's own rule: a hub default of "hybrid" means the dynamic sliding-window cache
        setattr(self, name, value)
        return value


def _refuse_unsupported(gc, kwargs: dict, ctl: SDEControl) -> None:
    if (gc.num_beams or 1) > 1:
        raise NotImplementedError("SDE control supports greedy decoding and sampling, not beam search (num_beams > 1).")
    if kwargs.get("assistant_model") is not None or kwargs.get("assistant_early_exit"):
        raise NotImplementedError("SDE control does not support assisted / speculative decoding (assistant_model).")
    if getattr(gc, "prompt_lookup_num_tokens", None):
        raise NotImplementedError(
            "SDE control does not support prompt-lookup decoding (prompt_lookup_num_tokens): it verifies several "
            "tokens per forward, while the heads read one state per token. Drop prompt_lookup_num_tokens."
        )
    if ctl.steers and gc.use_cache is False:
        raise NotImplementedError(
            "Steering with use_cache=False would re-run and un-steer past positions; generate with the KV cache."
        )


def _temperature_kwargs(gc, kwargs: dict, ctl: SDEControl) -> float:
    """Switch the stock temperature off under SDE temperature control; return the temperature to record."""
    if not ctl.controls_temperature:
        return float(gc.temperature) if gc.temperature is not None else 1.0
    config = kwargs.get("generation_config")
    for where, passed in (("generate(temperature=...)", kwargs.get("temperature")),
                          ("generation_config.temperature", getattr(config, "temperature", None))):
        if passed is not None and passed != 1.0:
            raise ValueError(
                f"{where} = {passed} conflicts with SDE temperature control: set the base temperature with "
                "SDEControl(temperature=...) instead."
            )
    if not gc.do_sample:
        _warn_once("greedy", "SDE temperature control under greedy decoding (do_sample=False): temperatures do not "
                   "change the argmax, so the tokens are those of plain greedy decoding; the trace records the "
                   "temperatures the law would apply. Pass do_sample=True to sample with them.")
    _set_generation_option(kwargs, "temperature", 1.0)
    return 1.0


def _set_generation_option(kwargs: dict, name: str, value) -> None:
    """Set one option for this call: as a keyword argument (they take precedence over a generation_config),
    or on the caller's generation_config (copied) if there is one and the option is not among the keywords."""
    if name not in kwargs and kwargs.get("generation_config") is not None:
        kwargs["generation_config"] = gc = copy.deepcopy(kwargs["generation_config"])
        setattr(gc, name, value)
    else:
        kwargs[name] = value


# The cache implementations generate builds as compileable (transformers' own list where it has one).
_STATIC_CACHES = getattr(_generation_config, "ALL_STATIC_CACHE_IMPLEMENTATIONS", ("static", "offloaded_static"))


def _compile_plan(model, gc, kwargs: dict, ctl: SDEControl, batch: int | None) -> bool:
    """Whether this call runs the SDE step inside generate's compiled forward (``True``), or eagerly.

    Where ``generate`` would compile its decoding forward (a compileable cache: ``cache_implementation="static"``
    or a passed static cache; on a GPU, or anywhere with ``compile_config._compile_all_devices``), the step
    becomes part of the compiled graph (:mod:`.compiled`). A step that calls back into Python every token (a
    ``callback``) cannot be compiled: that call runs the forward eagerly (``disable_compile=True``) and says so
    once. Elsewhere nothing is compiled and the step runs in hooks.
    """
    if gc.disable_compile:
        return False
    static = gc.cache_implementation in _STATIC_CACHES or getattr(_passed_cache(kwargs), "is_compileable", False)
    all_devices = bool(getattr(gc.compile_config, "_compile_all_devices", False))
    if not (static and (_model_device(model).type != "cpu" or all_devices)):
        _set_generation_option(kwargs, "disable_compile", True)
        return False
    reason = ("a callback runs Python at every step" if ctl.callback is not None else
              "the batch size is not known before the call (no input_ids / inputs_embeds)" if batch is None else None)
    if reason is None:
        return True
    _warn_once(f"compile-{reason}", f"SDE control runs generate's forward eagerly for this call "
               f"(disable_compile=True): {reason}, which a compiled graph cannot include.")
    _set_generation_option(kwargs, "disable_compile", True)
    return False


def _passed_cache(kwargs: dict):
    """The cache the caller passed (``cache=``, or the deprecated ``past_key_values=``), or ``None``."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _inputs(args, kwargs: dict) -> tuple[torch.Tensor | None, bool]:
    """The prompt tensor generate was given (``input_ids`` / ``inputs`` / the first positional argument, else
    ``inputs_embeds``), and whether it is embeddings; ``None`` for generation from BOS."""
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return ids, False
    embeds = kwargs.get("inputs_embeds")
    return embeds, embeds is not None


def _prompt_layout(args, kwargs: dict, batch: int | None) -> tuple[int, int, int]:
    """(prompt positions, prompt tokens the first forwards process, prompt tokens in the returned sequences).

    The prompt is the whole text before the first new token, whatever part of it a passed cache already holds:
    the path and its time origin are the same as without a cache. The prefill is what ``generate`` forwards of
    it, by its own rule (``GenerationMixin._prefill``): the inputs past the cache's length when they cover the
    cached tokens (their width equals the attention mask's), else all of them (only the new tokens were passed).
    No prompt means generation from BOS. ``batch``: the rows generate decodes (a passed cache must hold as many).
    """
    inputs, embeds = _inputs(args, kwargs)
    if inputs is None:
        return 1, 1, 1  # stock generate starts from the BOS token, which it returns
    width = inputs.shape[1]
    returned = 0 if embeds else width
    cache = _passed_cache(kwargs)
    past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
    if not past:
        return width, width, returned
    _check_cache_batch(cache, batch)
    mask = kwargs.get("attention_mask")
    covers_cache = embeds or mask is None or mask.shape[1] == width
    prefill = width - past if covers_cache else width
    if prefill <= 0:
        raise ValueError(
            f"The cache passed to generate already holds {past} tokens, and the inputs have {width}: nothing is left "
            "to forward before the first new token. Pass the full sequence (the cached tokens plus at least one "
            "more), or a cache cropped to fewer tokens (cache.crop(n)).")
    return past + prefill, prefill, returned


def _batch_size(args, kwargs: dict, gc) -> int | None:
    """The rows generate decodes: the inputs' rows times ``num_return_sequences`` (``None`` without inputs)."""
    inputs, _ = _inputs(args, kwargs)
    return None if inputs is None else inputs.shape[0] * int(gc.num_return_sequences or 1)


def _last_positions(kwargs: dict, gc) -> torch.Tensor | None:
    """Each decoded row's last prompt position from a 2-D attention mask (for models whose blocks get no
    position ids); ``None`` without one."""
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    return (mask.sum(-1) - 1).repeat_interleave(int(gc.num_return_sequences or 1))


def _check_cache_batch(cache, batch: int) -> None:
    """A passed cache must hold one row per decoded row (stock fails later, inside attention, with a shape
    error)."""
    layers = getattr(cache, "layers", None) or []
    keys = next((layer.keys for layer in layers if isinstance(getattr(layer, "keys", None), torch.Tensor)
                 and layer.keys.dim() == 4), None)
    rows = keys.shape[0] if keys is not None else None
    if rows is not None and rows != batch:
        raise ValueError(
            f"The cache passed to generate holds {rows} sequence(s), the call decodes {batch} (input rows x "
            "num_return_sequences): a cache continues the rows it was built on. Pass the inputs of the same rows "
            "(e.g. the previous call's sequences), or no cache.")


def _check_horizon(model, heads, prompt_width: int, capacity: int) -> None:
    cfg = heads.config
    context = getattr(text_config(model), "max_position_embeddings", None)
    if context and prompt_width + capacity - 1 > context:
        _warn_once(f"context-{id(model)}", (
            f"prompt ({prompt_width} tokens) plus new tokens reach past the model's context ({context} positions): "
            "the model's hidden states there are out of distribution, and so are the heads' statistics."))
    origin = getattr(cfg, "time_origin", "sequence")
    last = (prompt_width - 1 if origin == "sequence" else 0) + capacity - 1
    if last > 2 * cfg.horizon:
        counted = "positions in the text" if origin == "sequence" else "tokens generated after the prompt"
        _warn_once(f"horizon-{id(heads)}-{origin}", (
            f"these heads were fitted on paths of up to T={cfg.horizon:g} {counted}; this call reaches "
            f"{last}, i.e. t = k/T up to {last / cfg.horizon:.1f}. Past t = 1 drift and diffusion are "
            "extrapolated and z-scores are not calibrated there."))


def _call_setup(model, args, kwargs: dict, ctl: SDEControl) -> _CallSetup:
    """Read the call's generation options, refuse what is not supported, fix the per-call sizes."""
    gc = _GenerationOptions(model, kwargs)
    _refuse_unsupported(gc, kwargs, ctl)
    base_temperature = _temperature_kwargs(gc, kwargs, ctl)
    batch = _batch_size(args, kwargs, gc)
    prompt_width, prefill_width, returned = _prompt_layout(args, kwargs, batch)
    compiled = _compile_plan(model, gc, kwargs, ctl, batch)
    if gc.max_new_tokens is not None:
        steps = gc.max_new_tokens
    else:
        steps = max((gc.max_length or 20) - (returned or 0), 1)
    eos = gc.eos_token_id
    eos_ids = [] if eos is None else [int(e) for e in (eos.tolist() if isinstance(eos, torch.Tensor) else
                                                       eos if isinstance(eos, (list, tuple)) else [eos])]
    _check_horizon(model, ctl.heads, prompt_width, steps + 1)
    keeps_logits = bool(gc.return_dict_in_generate and gc.output_logits)
    private = not keeps_logits and not kwargs.get("logits_processor")
    head = _temperature_head(model, gc) if private and ctl.controls_temperature else None
    return _CallSetup(prompt_width, returned, steps + 1, base_temperature, eos_ids, prefill_width=prefill_width,
                      compiled=compiled, batch=batch, scores_private=private,
                      last_positions=_last_positions(kwargs, gc) if compiled else None,
                      head=head, device=_model_device(model))


# Generation options whose logits processors run before the temperature and do not commute with dividing the
# logits by it (they add to the logits, mix in another forward or read early layers through the LM head).
_SCALE_SENSITIVE = ("sequence_bias", "watermarking_config", "exponential_decay_length_penalty", "dola_layers")
# Scale the head's input only where the vocabulary is this many times the hidden size: below it (stories260K: 512
# vs 64) the logits are divided as cheaply as the hook on the head costs (~15 us per step on 2 CPU cores).
HEAD_SCALING_MIN_RATIO = 16


def _temperature_head(model, gc) -> torch.nn.Module | None:
    """The LM head whose input the SDE temperature may divide instead of the logits, or ``None``.

    ``lm_head(h / tau) = lm_head(h) / tau`` for a bias-free float32 linear head whose output the model does not
    transform further (no logit soft-capping), and the processors that run before the temperature in ``generate``
    (repetition penalty, bad words, min length, ...) commute with dividing by a positive number; the ones that
    do not are refused by ``_SCALE_SENSITIVE`` and classifier-free guidance. The division then touches
    ``hidden_size`` numbers per row instead of the vocabulary: on SmolLM2, 576 instead of 49,152. Callers that
    keep the raw logits (``output_logits``) or pass their own processors get the scores divided instead.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or head.weight.dtype != torch.float32:
        return None
    if head.out_features < HEAD_SCALING_MIN_RATIO * head.in_features:
        return None  # a small vocabulary: dividing the logits is cheaper than one more module hook
    if getattr(text_config(model), "final_logit_softcapping", None) is not None:
        return None
    if any(getattr(gc, name, None) for name in _SCALE_SENSITIVE) or (gc.guidance_scale or 1) != 1:
        return None
    return head
