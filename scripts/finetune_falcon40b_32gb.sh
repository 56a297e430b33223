#!/usr/bin/env bash
# QDyLoRA on Falcon-40B with one 32 GB GPU (V100-32GB, RTX 5090, or any larger card):
# NF4 base (~21 GB with double-quantized absmax), adapters r_max=64 on query_key_value / dense /
# dense_h_to_4h / dense_4h_to_h, paged AdamW 32-bit, gradient checkpointing, batch 1 x 16 accumulation.
# Check the fit first: qdylora plan --model falcon-40b --seq-len 512 --gpu-memory 32GiB
# Loading quantizes layer by layer, so CPU RAM stays near the 4-bit size (qdylora/load/sharded.py).
set -euo pipefail
MODEL=${1:-tiiuae/falcon-40b}
DATA=${2:-../shared/data/alpaca/alpaca_5000.json}
OUT=${3:-runs/falcon40b-qdylora}
qdylora train --model "$MODEL" --data "$DATA" --output "$OUT" \
  --r-min 1 --r-max 64 --alpha 16 \
  --target-modules query_key_value,dense,dense_h_to_4h,dense_4h_to_h \
  --max-steps 1875 --batch-size 1 --grad-accum 16 --max-seq-len 512 \
  --lr 1e-4 --warmup-steps 60 --optim paged_adamw_32bit --save-steps 250 --seed 0 "${@:4}"
