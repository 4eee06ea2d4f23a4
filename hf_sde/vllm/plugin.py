"""hf-sde's ``vllm.logits_processors`` entry point: one class that both of vLLM's runners accept.

vLLM loads every installed ``vllm.logits_processors`` entry point into every engine, with or without SDE
requests. Its V1 model runner wants a subclass of ``vllm.v1.sample.logits_processor.LogitsProcessor``
(built as ``cls(vllm_config, device, is_pin_memory)``); Model Runner V2 (the default wherever Triton runs,
i.e. on every CUDA machine) refuses anything that is not a subclass of
``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor`` (built as ``cls(vllm_config, req_states)``).
:class:`SDELogitsProcessor` subclasses both, and its constructor returns the implementation for the runner that
builds it: :class:`hf_sde.vllm.processor.SDELogitsProcessorV1` or
:class:`hf_sde.vllm.processor_v2.SDELogitsProcessorV2`.

A plugin must never break its host. This module imports only the two interfaces (import-light, as vLLM's V2
loader asks: the frontend loads processor classes too), and the class is inert — a no-op for every request —
unless ``HF_SDE_VLLM_HEADS`` names heads: then SDE control is on, and what cannot honour it (an engine that
compiles the model, a runner hf-sde cannot read) is refused at engine start with the flag to change. If
hf-sde's SDE modules fail to import, the processor logs why and stays inert; SDE requests are then refused at
admission with that reason, and every other request runs as if hf-sde were not installed.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger("hf_sde.vllm")

ENV = "HF_SDE_VLLM_HEADS"  # = heads_registry.ENV (not imported: this module stays import-light)

_bases: list[type] = []
try:
    from vllm.v1.sample.logits_processor.interface import LogitsProcessor as V1LogitsProcessor
    _bases.append(V1LogitsProcessor)
except Exception:  # pragma: no cover - a vLLM without the V1 sampler
    V1LogitsProcessor = None  # type: ignore[assignment,misc]
try:
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor
    _bases.append(V2LogitsProcessor)
except Exception:  # pragma: no cover - a vLLM before Model Runner V2's custom processors
    V2LogitsProcessor = None  # type: ignore[assignment,misc]
if not _bases:  # pragma: no cover
    _bases.append(object)


def _has_sde_args(sampling_params) -> bool:
    extra = getattr(sampling_params, "extra_args", None)
    return bool(extra) and any(str(k).startswith("sde_") for k in extra)


def sde_enabled() -> bool:
    """Whether ``HF_SDE_VLLM_HEADS`` asks for SDE control (checked without importing anything)."""
    return bool(os.environ.get(ENV, "").strip(" ,"))


def _is_v2_call(args: tuple, kwargs: dict) -> bool:
    """V2 builds processors as ``cls(vllm_config, req_states)``, V1 as ``cls(vllm_config, device, is_pin_memory)``."""
    return "req_states" in kwargs or (len(args) + len(kwargs) == 1 and "device" not in kwargs)


class SDELogitsProcessor(*_bases):  # type: ignore[misc]
    """hf-sde's SDE control as a vLLM logits processor, for vLLM's V1 model runner and Model Runner V2.

    Load it with ``logits_processors=["hf_sde.vllm:SDELogitsProcessor"]`` (offline ``LLM``) or
    ``--logits-processors hf_sde.vllm:SDELogitsProcessor`` (server), or through the ``vllm.logits_processors``
    entry point of an installed hf-sde. It is inert unless ``HF_SDE_VLLM_HEADS`` names the served heads.
    Requests opt in with ``sde_*`` keys in ``SamplingParams.extra_args`` / ``vllm_xargs``
    (:mod:`hf_sde.vllm.args`). This base class is the inert processor; constructing it returns the
    implementation for the runner that builds it (module docstring).
    """

    def __new__(cls, *args: Any, **kwargs: Any):
        if cls is SDELogitsProcessor:
            rest = args if "vllm_config" in kwargs else args[1:]
            cls = _implementation(_is_v2_call(rest, {k: v for k, v in kwargs.items() if k != "vllm_config"}))
        return object.__new__(cls)

    def __init__(self, vllm_config=None, *args: Any, **kwargs: Any) -> None:
        pass

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Refuse, at admission, SDE arguments this server cannot honour (``ValueError``: HTTP 400)."""
        if not _has_sde_args(sampling_params):
            return
        try:
            from .args import check_sampling, parse_request
            from .engine import SDEBatch  # noqa: F401 - the SDE machinery the processors run on
        except Exception as e:
            raise ValueError(f"hf-sde cannot serve SDE requests on this server: importing its vLLM support "
                             f"failed ({type(e).__name__}: {e})") from e
        request = parse_request(sampling_params.extra_args)
        if request is not None:
            check_sampling(sampling_params, request)

    # -- the inert processor: both interfaces, touching nothing ---------------------------------------------
    def is_argmax_invariant(self) -> bool:  # V1
        return True

    def update_state(self, batch_update) -> None:  # V1
        return None

    def add_request(self, req_idx: int, sampling_params) -> bool:  # V2
        return False

    def apply_staged_writes(self) -> None:  # V2
        return None

    def apply(self, logits, ctx=None):  # V1: apply(logits); V2: apply(logits, ctx)
        return logits


def _implementation(v2: bool) -> type[SDELogitsProcessor]:
    """The class to build: inert without ``HF_SDE_VLLM_HEADS`` or when hf-sde's SDE modules cannot load."""
    if not sde_enabled():
        return SDELogitsProcessor
    try:
        if v2:
            from .processor_v2 import SDELogitsProcessorV2 as impl
        else:
            from .processor import SDELogitsProcessorV1 as impl
    except Exception:
        logger.exception("hf-sde: %s is set but hf-sde's vLLM support failed to import; its logits processor "
                         "stays inert and SDE requests will be refused", ENV)
        return SDELogitsProcessor
    return impl
