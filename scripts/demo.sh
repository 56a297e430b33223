#!/usr/bin/env bash
# Set up (if needed), then the main job on its embedded default: fine-tune SmolLM2-135M-Instruct
# (4-bit NF4 base, DyLoRA ranks 1..64) on the built-in exact-answer task, then a rank sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the CLI's defaults: every row trains at r_max, and any rank is the truncation (benchmarks/results/rank_sampling.md);
# --r-max-prob 0 draws DyLoRA ranks per row, --update frozen --rank-per step is the DyLoRA paper's rule
exec .venv/bin/qdylora train --output "${1:-runs/demo}" --overwrite --max-steps 60 --lr 1e-3 "${@:2}"
