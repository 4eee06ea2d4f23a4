"""``python -m hf_sde.vllm.serve [vLLM server arguments]``: vLLM's OpenAI server with hf-sde switched on.

It runs ``python -m vllm.entrypoints.openai.api_server`` with what hf-sde needs added unless given:
``--enforce-eager``, ``--dtype float32``, hf-sde's logits processor, worker extension and middleware, and
``HF_SDE_VLLM_HEADS=smollm2`` (the shipped SmolLM2 heads). Without ``--model`` it serves SmolLM2-135M-Instruct
from :func:`hf_sde.vllm.model_folder` under the name ``SmolLM2-135M-Instruct``. Every other argument goes to
vLLM unchanged (``--port``, ``--max-model-len``, ...).
"""

from __future__ import annotations

import os
import runpy
import sys

from .heads_registry import ENV

MODEL_NAME = "SmolLM2-135M-Instruct"


def build_argv(argv: list[str]) -> list[str]:
    from . import MIDDLEWARE, PROCESSOR, WORKER_EXTENSION, entry_point_installed

    args = list(argv)

    def given(flag: str) -> bool:
        return any(a == flag or a.startswith(flag + "=") for a in args)

    if not given("--model"):
        from .model_folder import model_folder

        args += ["--model", str(model_folder())]
        if not given("--served-model-name"):
            args += ["--served-model-name", MODEL_NAME]
    if not given("--enforce-eager"):
        args.append("--enforce-eager")
    if not given("--dtype"):
        args += ["--dtype", "float32"]
    if not given("--logits-processors") and not entry_point_installed():
        args += ["--logits-processors", PROCESSOR]
    if not given("--worker-extension-cls"):
        args += ["--worker-extension-cls", WORKER_EXTENSION]
    args += ["--middleware", MIDDLEWARE]
    return args


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault(ENV, "smollm2")
    args = build_argv(sys.argv[1:] if argv is None else argv)
    sys.argv = ["vllm.entrypoints.openai.api_server", *args]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
