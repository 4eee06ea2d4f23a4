"""The worker extension through which callers fetch traces (``collective_rpc("hf_sde_traces", ...)``).

vLLM mixes ``worker_extension_cls`` into its worker class; offline ``LLM(..., worker_extension_cls=
"hf_sde.vllm.worker.SDEWorkerExtension")``, server ``--worker-extension-cls hf_sde.vllm.worker.SDEWorkerExtension``.
Arguments and results are plain strings / lists / dicts, so they cross vLLM's process boundary as they are.
"""

from __future__ import annotations

from . import traces


class SDEWorkerExtension:
    def hf_sde_traces(self, keys: list[str], pop: bool = True) -> dict[str, dict | None]:
        """``{key: SDETrace.to_dict() or None}`` for trace ids (``sde_trace_id``) or vLLM request ids."""
        return traces.fetch([str(k) for k in keys], pop=bool(pop))
