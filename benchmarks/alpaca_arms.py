"""Shared parts of the Alpaca benchmarks (dylora_vs_lora, rank_sampling): the fixed split, a fresh NF4 base,
the QDyLoRA and peft LoRA arms, training one arm, and LoRA-r_max copied into QDyLoRA layers for truncation.

Every function takes the benchmark's argparse namespace (`args`), which must hold: r_max, alpha, seed, lr,
steps, batch_size, max_seq_len, warmup_steps, work_dir.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"


def add_arm_args(p: argparse.ArgumentParser) -> None:
    """The options every Alpaca benchmark shares: data, split, optimisation, ranks, evaluation batch, threads."""
    p.add_argument("--alpaca", default=str(SHARED / "alpaca" / "alpaca_5000.json"))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--max-grad-norm", type=float, default=0.3, help="gradient clipping of every arm (0: off)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha of every arm (scale alpha / r)")
    p.add_argument("--r-max", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of every arm's (first) run")
    p.add_argument("--heldout", type=int, default=64, help="held-out Alpaca examples (split off before training)")
    p.add_argument("--ranks", default="1,2,4,8,16,32,64", help="ranks every QDyLoRA / truncated arm is evaluated at")
    p.add_argument("--lora-ranks", default="1,4,16,64", help="separate peft LoRA runs (must include r_max)")
    p.add_argument("--eval-batch-size", type=int, default=4, help="items per forward (x ranks when batched)")
    # one thread: on a shared 2-core machine two OpenMP threads per process spin against other
    # processes and run 5-8x slower than one; set 2 on an idle machine
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def ints(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]."""
    return [int(x) for x in text.split(",") if x.strip()]


def split_alpaca(path: str, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Fixed train / held-out split: a seeded shuffle, the first n_heldout held out."""
    from qdylora.data import load_records

    records = load_records(path)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = [records[i] for i in order[:n_heldout]]
    train = [records[i] for i in order[n_heldout:]]
    return train, held


def fresh_base():
    """A newly loaded NF4 SmolLM2-135M-Instruct and its tokenizer (each arm starts from its own copy)."""
    from qdylora.load.model import load_model_and_tokenizer

    return load_model_and_tokenizer(None, device="cpu")


def attach_qdylora(base, args, update: str, **config):
    """QDyLoRA adapters over ranks 1..r_max (seeded init); `config` overrides QDyLoRAConfig fields (rank_per, ...)."""
    from qdylora.adapters.attach import attach_adapters
    from qdylora.adapters.config import QDyLoRAConfig

    torch.manual_seed(args.seed)
    return attach_adapters(base, QDyLoRAConfig(**{"r_min": 1, "r_max": args.r_max, "alpha": args.alpha,
                                                  "update": update, "seed": args.seed, **config}))


def attach_lora(base, args, r: int):
    """Plain peft LoRA (QLoRA) on the same NF4 linears that QDyLoRA adapts."""
    from peft import LoraConfig, get_peft_model

    from qdylora.adapters.attach import resolve_targets

    torch.manual_seed(args.seed)
    cfg = LoraConfig(r=r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=resolve_targets(base, None),
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(base, cfg)


def train_config(args, steps: int | None = None, **overrides):
    """The TrainConfig of every arm: warm-up, cosine decay, no checkpoints; `overrides` set other fields (optim, ...)."""
    from qdylora.train import TrainConfig

    steps = steps or args.steps
    # no gradient checkpointing: memory is no issue for 135M on CPU and it would cost ~30% more time
    return TrainConfig(**{"max_steps": steps, "learning_rate": args.lr, "batch_size": args.batch_size,
                          "grad_accum": 1, "max_seq_len": args.max_seq_len,
                          "warmup_steps": min(args.warmup_steps, steps // 2), "gradient_checkpointing": False,
                          "max_grad_norm": getattr(args, "max_grad_norm", 0.3),
                          "save_steps": 10 * steps, "logging_steps": 1, "seed": args.seed, **overrides})


def train_arm(name: str, model, tok, dataset, args, steps: int | None = None, **overrides) -> dict:
    """Train `model` in work_dir/name; returns seconds, loss curve summary, the (largest) rank of each step and how
    many distinct ranks each step ran at."""
    from qdylora.train import read_log, train_model

    out = Path(args.work_dir) / name
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    train_model(model, tok, dataset, train_config(args, steps, **overrides), out)
    seconds = time.perf_counter() - t0
    log = read_log(out)
    losses = [r["loss"] for r in log]
    k = max(1, len(losses) // 10)
    return {"train_seconds": round(seconds, 1), "steps": len(losses),
            "train_loss_first10pct": round(sum(losses[:k]) / k, 4), "train_loss_last10pct": round(sum(losses[-k:]) / k, 4),
            "ranks_sampled": [r.get("rank") for r in log],
            "distinct_ranks_per_step": [len(r.get("ranks") or [r.get("rank")]) for r in log]}


def lora_to_qdylora(lora_model, args):
    """Copy a trained peft LoRA (r = r_max) into QDyLoRA layers, so rank r evaluates A[:r], B[:, :r] at alpha/r."""
    from qdylora.adapters.attach import base_module_name as _base_path
    from qdylora.adapters.files import load_adapter_weights

    tensors = {}
    for name, m in lora_model.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            path = _base_path(name)
            tensors[f"{path}.lora_A"] = m.lora_A["default"].weight.detach().float().clone()
            tensors[f"{path}.lora_B"] = m.lora_B["default"].weight.detach().float().clone()
    base, _ = fresh_base()
    q = attach_qdylora(base, args, "frozen")
    load_adapter_weights(q, tensors)
    return q.eval()
