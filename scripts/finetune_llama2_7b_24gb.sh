#!/usr/bin/env bash
# QDyLoRA on a 7B Llama-style model with one 24 GB GPU (RTX 3090/4090, A10, L4):
# NF4 base (~3.9 GB), adapters r_max=64 on every attention and MLP linear, paged AdamW 32-bit,
# gradient checkpointing, bf16. Check the fit first: qdylora plan --model llama-2-7b --gpu-memory 24GiB
# Usage: scripts/finetune_llama2_7b_24gb.sh MODEL DATA OUTPUT   (MODEL: hub id or local folder)
set -euo pipefail
MODEL=${1:-meta-llama/Llama-2-7b-hf}
DATA=${2:-../shared/data/alpaca/alpaca_5000.json}
OUT=${3:-runs/llama2-7b-qdylora}
qdylora train --model "$MODEL" --data "$DATA" --output "$OUT" \
  --r-min 1 --r-max 64 --alpha 16 \
  --max-steps 1875 --batch-size 4 --grad-accum 4 --max-seq-len 512 \
  --lr 2e-4 --warmup-steps 60 --optim paged_adamw_32bit --save-steps 250 --seed 0 "${@:4}"
