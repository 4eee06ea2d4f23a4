"""hf-sde inside vLLM: the same SDE heads observe, cool / heat and steer decoding per request.

Offline (``vllm.LLM``; in a script, under ``if __name__ == "__main__":`` since vLLM spawns its engine)::

    import os; os.environ["HF_SDE_VLLM_HEADS"] = "smollm2"      # the heads this engine may use
    from vllm import LLM, SamplingParams
    from hf_sde.vllm import llm_kwargs, model_folder, sde_args, get_traces
    llm = LLM(str(model_folder()), **llm_kwargs())
    args = sde_args(mode="temperature", beta=1.0)               # extra_args, with a fresh sde_trace_id
    out = llm.generate(["Hi"], SamplingParams(max_tokens=32, extra_args=args))
    trace = get_traces(llm, [args["sde_trace_id"]])[0]          # an hf_sde.SDETrace of shape (1, 32)

Server: ``python -m hf_sde.vllm.serve --model FOLDER`` (vLLM's OpenAI server with hf-sde's processor, worker
extension and middleware; requests pass ``vllm_xargs``; the response carries ``sde_trace``). See the README
section "Serving with vLLM" and :mod:`hf_sde.vllm.args` for the per-request keys.

vLLM's V1 model runner and Model Runner V2 (the default on CUDA) are both served: ``SDELogitsProcessor``
subclasses both runners' processor interfaces and builds the implementation for the runner that loads it
(:mod:`hf_sde.vllm.plugin`). Importing this package stays light (it is vLLM's entry point); the helpers below
load on first use.
"""

from __future__ import annotations

from importlib import import_module

from .plugin import SDELogitsProcessor

try:  # eager: the submodule of the same name would otherwise shadow the function once imported
    from .model_folder import model_folder  # noqa: F401 - re-exported
except Exception:  # pragma: no cover - reported when used
    pass

PROCESSOR = "hf_sde.vllm:SDELogitsProcessor"
WORKER_EXTENSION = "hf_sde.vllm.worker.SDEWorkerExtension"
MIDDLEWARE = "hf_sde.vllm.middleware.SDETraceMiddleware"

#: name -> (module, attribute) of what this package re-exports lazily.
_LAZY = {
    "HEADS_ENV": (".heads_registry", "ENV"),
    "KEYS": (".args", "KEYS"),
    "SUPPORTED_ARCHITECTURES": (".engine", "SUPPORTED_ARCHITECTURES"),
    "SDERequest": (".args", "SDERequest"),
    "SDEWorkerExtension": (".worker", "SDEWorkerExtension"),
    "allowlist": (".heads_registry", "allowlist"),
    "entry_point_installed": (".api", "entry_point_installed"),
    "get_traces": (".api", "get_traces"),
    "llm_kwargs": (".api", "llm_kwargs"),
    "model_folder": (".model_folder", "model_folder"),
    "parse_request": (".args", "parse_request"),
    "sde_args": (".api", "sde_args"),
    "sde_prompt": (".api", "sde_prompt"),
    "trace_from_dict": (".api", "trace_from_dict"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(import_module(module, __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = ["MIDDLEWARE", "PROCESSOR", "WORKER_EXTENSION", "SDELogitsProcessor", *sorted(_LAZY)]
