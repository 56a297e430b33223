#!/usr/bin/env bash
# Every GPU claim in one call (see benchmarks/gpu_check.py):
#   bash scripts/gpu_check.sh [--budget-s 540] [--stages env,tests,kernels,falcon-40b,throughput]   (GPU machine)
#   bash scripts/gpu_check.sh --fetch-wheels        fill .whl/ (bitsandbytes, transformers, peft) from the registry
#   bash scripts/gpu_check.sh --rehearse [--fast]   the CPU rehearsal (--fast: what CI runs)
# On the GPU machine python3 is the image's (torch, triton); elsewhere .venv/bin/python when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  PY=python3
  case " $* " in
    *" --rehearse "*|*" --fetch-wheels "*|*" --dry-run "*) [ -x .venv/bin/python ] && PY=.venv/bin/python ;;
  esac
fi
exec "$PY" benchmarks/gpu_check.py "$@"
