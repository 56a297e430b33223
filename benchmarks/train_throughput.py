"""Training throughput and peak memory: qdylora against peft + bitsandbytes QLoRA, measured in one run.

Both arms train the same NF4 base (same weights), r = 64 adapters on the same linears, the same
batches, steps, optimizer (paged AdamW 32-bit on CUDA, torch AdamW on CPU) and gradient
checkpointing. Each measurement is a fresh subprocess (clean peak-memory counters); arms alternate
(peft, qdylora, qdylora sampled, peft, ...) so drift in the machine's speed hits both; the medians
over rounds are compared as a ratio, with each arm's spread over rounds beside it. The sampled-rank
arm warms up at one rank per compiled kernel variant, so no Triton compilation lands in its
timed steps. The JSON is rewritten after every measurement: a run cut off early keeps what it did.

  CPU:  python benchmarks/train_throughput.py                       (SmolLM2-135M on Alpaca, fp32)
  GPU:  python benchmarks/train_throughput.py --config llama-1b     (1.1B Llama, random weights and tokens, bf16)
  Smoke test (CPU, Triton interpreter, tiny Llama, seconds):  python benchmarks/train_throughput.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"
CONFIGS = {  # Llama shapes built from a config with seeded random weights; smollm2 is the real model
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    "llama-tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
}
LLAMA_1B = CONFIGS["llama-1b"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# ranks that select distinct compiled kernels (padded rank tile 16 / 32 / 64; Triton specialises
# an int argument equal to 1 or divisible by 16): warm-up at these, then the timed steps compile nothing
WARMUP_RANKS = (1, 9, 16, 17, 32, 33, 64)
# the GPU run: 8 x 512 tokens per step, the rows the kernel benchmark's M = 4096 uses
GPU_DEFAULTS = dict(batch_size=8, seq_len=512, steps=8)
RATIO_TARGET = 0.95  # tokens/s of qdylora at r = 64 over peft's
SAMPLED_ARMS = ("step/nested", "example/nested", "step/frozen", "example/frozen")
EXAMPLE_COST_TARGET = 0.95  # tokens/s with per-example ranks over per-step ranks (same update rule)


def _base(args, device):
    """The NF4 base and tokenizer: SmolLM2 (real weights) or a Llama from a config (seeded random weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qdylora.load.model import load_model_and_tokenizer, load_quantized_model

    if args.config == "smollm2":
        return load_model_and_tokenizer(None, device=device)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        m = LlamaForCausalLM(LlamaConfig(**CONFIGS[args.config])).to(dtype)
    return load_quantized_model(m, device=device), None


def _batches(tok, args, vocab, device, count):
    """`count` batches of fixed-length sequences: Alpaca for SmolLM2, seeded random tokens for the random models."""
    import torch

    out = []
    if tok is None:  # random weights: random tokens do the same work and need no data files
        g = torch.Generator().manual_seed(0)
        for _ in range(count):
            t = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(device)
            out.append({"input_ids": t, "labels": t, "attention_mask": torch.ones_like(t)})
        return out
    from qdylora.data import format_example, load_records

    recs = load_records(ALPACA)[: args.batch_size * count]
    for i in range(count):
        chunk = recs[i * args.batch_size:(i + 1) * args.batch_size]
        ids = [tok("".join(format_example(r, tok)), add_special_tokens=False)["input_ids"] for r in chunk]
        # fixed-length sequences: every arm and step does the same work
        ids = [(x * (args.seq_len // max(1, len(x)) + 1))[: args.seq_len] for x in ids]
        t = torch.tensor(ids, device=device) % vocab
        out.append({"input_ids": t, "labels": t, "attention_mask": torch.ones_like(t)})
    return out


def run_arm(args) -> dict:
    """Train one arm in this process; returns tokens/s and peak memory."""
    import bitsandbytes as bnb
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, tok = _base(args, device)
    from qdylora.adapters.attach import attach_adapters, qdylora_config_of, set_rank
    from qdylora.adapters.config import QDyLoRAConfig
    from qdylora.adapters.rank_sampler import RankSampler
    from qdylora.ops import selfcheck

    if args.arm == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=64, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                                                task_type="CAUSAL_LM"))
    else:
        # r = 64 against LoRA r = 64: all 64 components train (nested); the drawn-rank arms are the real workload
        rank_per, update = args.sampled.split("/") if args.sampled else ("step", "nested")
        model = attach_adapters(base, QDyLoRAConfig(r_min=1, r_max=64, alpha=16, target_modules=TARGETS,
                                                    update=update, rank_per=rank_per, seed=0,
                                                    r_max_prob=0.0 if args.sampled else None))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    schedule = None
    if args.sampled:
        # what `qdylora train` runs: draws before every micro-step, ComponentAdamW touching the trained components
        from qdylora.train.optimizer import ComponentAdamW
        from qdylora.train.rank_schedule import RankSchedule

        schedule = RankSchedule(model, qdylora_config_of(model))
        opt = ComponentAdamW(params, lr=1e-4, axes=schedule.axes, active=schedule.active)
    else:
        # the optimizer `qdylora train --optim auto` uses for peft: bnb paged AdamW on CUDA; torch's
        # multi-tensor AdamW on CPU (the r = 64 qdylora arm uses the same, so the two differ in the op only)
        opt = (bnb.optim.PagedAdamW32bit(params, lr=1e-4) if device == "cuda"
               else torch.optim.AdamW(params, lr=1e-4, foreach=True))
    sampler = RankSampler(QDyLoRAConfig(r_min=1, r_max=64, seed=0, r_max_prob=0.0))
    warm = list(WARMUP_RANKS) if args.sampled and args.warmup > 0 else [64] * args.warmup
    ranks = warm + [sampler.sample(i) if args.sampled else 64 for i in range(args.steps)]
    batches = _batches(tok, args, model.get_input_embeddings().num_embeddings, device, len(ranks))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        static = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = None
    for i, (batch, rank) in enumerate(zip(batches, ranks)):
        if i == len(warm):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        if schedule is not None:
            schedule.before_micro_step(i, batch["input_ids"].shape[0])
        if args.arm != "peft" and (schedule is None or i < len(warm)):
            set_rank(model, rank)  # warm-up: one step per compiled kernel variant
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = args.steps * args.batch_size * args.seq_len
    res = {"arm": f"qdylora {args.sampled}" if args.sampled else args.arm, "tokens_per_s": tokens / dt, "seconds": dt,
           "final_loss": float(loss), "timed_ranks": ranks[len(warm):], "kernel_checks": selfcheck.report()}
    if device == "cuda":
        res["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
        res["peak_minus_static_bytes"] = torch.cuda.max_memory_allocated() - static
    else:
        res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        res["rss_growth_during_steps_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="smollm2", choices=["smollm2", *CONFIGS], help="model to train")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per measurement (6; GPU llama-1b 8)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps first (the sampled arm: one per rank in WARMUP_RANKS instead)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (4; GPU llama-1b 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (128; GPU llama-1b 512)")
    p.add_argument("--rounds", type=int, default=2, help="measurements per arm (alternating)")
    p.add_argument("--output", default=None, help="result folder (default benchmarks/results; a temporary one for --dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke test: tiny Llama, 1 round, 1 step, Triton kernels in the interpreter")
    p.add_argument("--arm", choices=["peft", "qdylora"], help=argparse.SUPPRESS)
    p.add_argument("--sampled", default=None, metavar="RANK_PER/UPDATE", help=argparse.SUPPRESS)
    p.add_argument("--sampled-arms", default=",".join(SAMPLED_ARMS),
                   help="drawn-rank arms (rank_per/update), trained as `qdylora train` does: RankSchedule draws "
                        "before every micro-step and ComponentAdamW (32-bit) (default %(default)s)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.config, args.rounds = "llama-tiny", 1
        args.steps, args.warmup, args.batch_size, args.seq_len = 1, 1, 2, 16
    gpu_run = args.config == "llama-1b"
    for k, cpu in (("steps", 6), ("batch_size", 4), ("seq_len", 128)):
        if getattr(args, k) is None:
            setattr(args, k, GPU_DEFAULTS[k] if gpu_run else cpu)
    return args


def _env(args) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.dry_run:  # the qdylora arms take the Triton path (and its self-check) in the interpreter
        env.update(TRITON_INTERPRET="1", QDYLORA_BACKEND="triton")
    return env


def summarize(args, device: str, runs: dict, failures: list, cuda: bool, torch_version: str) -> dict:
    """The JSON: medians, spreads over rounds, ratios against peft (where both arms ran)."""
    med = {arm: {k: statistics.median(x[k] for x in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
           for arm, rs in runs.items()}
    spread = {arm: (max(x["tokens_per_s"] for x in rs) - min(x["tokens_per_s"] for x in rs)) / med[arm]["tokens_per_s"]
              for arm, rs in runs.items()}
    mem_key = "peak_mem_bytes" if cuda else "peak_rss_bytes"
    summary = {
        "device": device, "config": args.config, "steps": args.steps, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "rounds": args.rounds, "torch": torch_version, "dry_run": args.dry_run,
        "optimizer": "bnb PagedAdamW32bit" if cuda else "torch AdamW (foreach)",
        "backend": "triton" if cuda or args.dry_run else "reference",
        "ratio_target": RATIO_TARGET, "median": med, "spread_over_rounds": spread, "runs": runs,
        "failures": failures, "complete": False,
    }
    if "peft" in med:
        for arm in med:
            if arm != "peft":
                key = "r64" if arm == "qdylora" else arm.split(" ", 1)[1].replace("/", "_")
                summary[f"ratio_tokens_per_s_qdylora_{key}_vs_peft"] = med[arm]["tokens_per_s"] / med["peft"]["tokens_per_s"]
        if "qdylora" in med:
            summary["ratio_peak_memory_qdylora_r64_vs_peft"] = med["qdylora"][mem_key] / med["peft"][mem_key]
    for update in ("nested", "frozen"):  # the cost of per-example ranks, against per-step ranks
        step, example = med.get(f"qdylora step/{update}"), med.get(f"qdylora example/{update}")
        if step and example:
            summary[f"ratio_tokens_per_s_example_vs_step_{update}"] = example["tokens_per_s"] / step["tokens_per_s"]
    for per in ("step", "example"):  # frozen mode's memory against nested mode's
        nested, frozen = med.get(f"qdylora {per}/nested"), med.get(f"qdylora {per}/frozen")
        if nested and frozen:
            summary[f"ratio_peak_memory_frozen_vs_nested_{per}"] = frozen[mem_key] / nested[mem_key]
    summary["example_cost_target"] = EXAMPLE_COST_TARGET
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.arm:
        print("RESULT " + json.dumps(run_arm(args)), flush=True)
        return 0

    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    device = (torch.cuda.get_device_name(0) if cuda
              else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    out_dir = Path(args.output) if args.output else (
        Path(tempfile.mkdtemp(prefix="train_throughput_")) if args.dry_run else ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "gpu-" + device.replace(" ", "_") if cuda else "cpu"
    path = out_dir / f"train_throughput_{tag}_{args.config}.json"
    runs: dict[str, list[dict]] = {}
    failures: list[dict] = []
    for rnd in range(args.rounds):
        sampled_arms = [a.strip() for a in args.sampled_arms.split(",") if a.strip()]
        for arm, sampled in [("peft", None), ("qdylora", None)] + [("qdylora", a) for a in sampled_arms]:
            cmd = [sys.executable, __file__, "--arm", arm, "--config", args.config, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
            cmd += ["--sampled", sampled] if sampled else []
            out = subprocess.run(cmd, capture_output=True, text=True, env=_env(args))
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                name = f"qdylora {sampled}" if sampled else arm
                failures.append({"arm": name, "round": rnd, "returncode": out.returncode, "stderr": out.stderr[-3000:]})
                print(f"round {rnd}: {name:16s} FAILED (exit {out.returncode}):\n{out.stderr[-3000:]}", flush=True)
            else:
                r = json.loads(line[0][7:])
                runs.setdefault(r["arm"], []).append(r)
                print(f"round {rnd}: {r['arm']:16s} {r['tokens_per_s']:10.1f} tok/s", flush=True)
            summary = summarize(args, device, runs, failures, cuda, torch.__version__)
            path.write_text(json.dumps(summary, indent=2))
    summary["complete"] = True
    path.write_text(json.dumps(summary, indent=2))
    mem_key = "peak_mem_bytes" if cuda else "peak_rss_bytes"
    print(f"\n{'arm':18s} {'tok/s':>10s} {'spread':>7s} {'peak mem MiB':>13s}")
    for arm, m in summary["median"].items():
        print(f"{arm:18s} {m['tokens_per_s']:10.1f} {summary['spread_over_rounds'][arm]:7.1%} {m[mem_key] / 2**20:13.0f}")
    for k in sorted(k for k in summary if k.startswith("ratio_")):
        print(f"{k} = {summary[k]:.3f}")
    print(f"device: {device}; wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
