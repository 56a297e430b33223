"""Training throughput and peak memory: qdylora against peft + bitsandbytes QLoRA, measured in one run.

Both arms train the same NF4 base (same weights), r = 64 adapters on the same linears, the same
Alpaca batches, steps, optimizer (paged AdamW 32-bit on CUDA, torch AdamW on CPU) and gradient
checkpointing. Each measurement is a fresh
subprocess (clean peak-memory counters); arms alternate (peft, qdylora, peft, ...) so drift in the
machine's speed hits both; the medians over rounds are compared as a ratio.

  CPU:  python benchmarks/train_throughput.py                       (SmolLM2-135M, fp32)
  GPU:  python benchmarks/train_throughput.py --config llama-1b     (1.1B Llama, random weights, bf16)
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _base(args, device):
    """The NF4 base and tokenizer: SmolLM2 (real weights) or a Llama from a config (seeded random weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qdylora.load.model import load_model_and_tokenizer
    from qdylora.load.model import load_quantized_model

    if args.config == "smollm2":
        return load_model_and_tokenizer(None, device=device)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        m = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(dtype)
    return load_quantized_model(m, device=device), None  # byte-level ids: no tokenizer package needed on a GPU box


def _batches(tok, args, vocab, device):
    import torch

    from qdylora.data import format_example, load_records

    recs = load_records(ALPACA)[: args.batch_size * (args.steps + args.warmup)]
    out = []
    for i in range(args.steps + args.warmup):
        chunk = recs[i * args.batch_size:(i + 1) * args.batch_size]
        if tok is not None:
            ids = [tok("".join(format_example(r, tok)), add_special_tokens=False)["input_ids"] for r in chunk]
        else:
            ids = [list((r["instruction"] + " " + r["input"] + " " + r["output"]).encode()) for r in chunk]
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
    if args.arm == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=64, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                                                task_type="CAUSAL_LM"))
    else:
        from qdylora.adapters.config import QDyLoRAConfig
        from qdylora.adapters.attach import attach_adapters, set_rank

        model = attach_adapters(base, QDyLoRAConfig(r_min=1, r_max=64, alpha=16, target_modules=TARGETS,
                                                    # r = 64 against LoRA r = 64: all 64 components train (nested);
                                                    # the sampled-rank arm is the real DyLoRA workload (frozen)
                                                    update="frozen" if args.sampled else "nested"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # the optimizer `qdylora train --optim auto` uses, the same for both arms: bnb paged AdamW on CUDA;
    # torch's multi-tensor AdamW on CPU (bnb's CPU optimizer makes one call per tensor, which costs
    # qdylora's per-component tensors far more than peft's two per layer: ratio 0.67 measured with it)
    opt = (bnb.optim.PagedAdamW32bit(params, lr=1e-4) if device == "cuda"
           else torch.optim.AdamW(params, lr=1e-4, foreach=True))
    batches = _batches(tok, args, model.get_input_embeddings().num_embeddings, device)
    from qdylora.adapters.rank_sampler import RankSampler
    from qdylora.adapters.config import QDyLoRAConfig

    sampler = RankSampler(QDyLoRAConfig(r_min=1, r_max=64, seed=0))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        static = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = None
    for i, batch in enumerate(batches):
        if i == args.warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        if args.arm != "peft":
            set_rank(model, sampler.sample(i) if args.sampled else 64)
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = args.steps * args.batch_size * args.seq_len
    res = {"arm": args.arm + ("-sampled" if args.sampled else ""), "tokens_per_s": tokens / dt, "seconds": dt,
           "final_loss": float(loss)}
    if device == "cuda":
        res["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
        res["peak_minus_static_bytes"] = torch.cuda.max_memory_allocated() - static
    else:
        res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        res["rss_growth_during_steps_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="smollm2", choices=["smollm2", "llama-1b"], help="model to train")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="measurements per arm (alternating)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--arm", choices=["peft", "qdylora"], help=argparse.SUPPRESS)
    p.add_argument("--sampled", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        print("RESULT " + json.dumps(run_arm(args)), flush=True)
        return

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    runs: dict[str, list[dict]] = {}
    plan = [("peft", False), ("qdylora", False), ("qdylora", True)]
    for rnd in range(args.rounds):
        for arm, sampled in plan:
            cmd = [sys.executable, __file__, "--arm", arm, "--config", args.config, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
            cmd += ["--sampled"] if sampled else []
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not line:
                raise SystemExit(f"arm {arm} failed:\n{out.stderr[-3000:]}")
            r = json.loads(line[0][7:])
            runs.setdefault(r["arm"], []).append(r)
            print(f"round {rnd}: {r['arm']:16s} {r['tokens_per_s']:10.1f} tok/s", flush=True)
    med = {arm: {k: statistics.median(x[k] for x in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
           for arm, rs in runs.items()}
    mem_key = "peak_mem_bytes" if torch.cuda.is_available() else "peak_rss_bytes"
    summary = {
        "device": device, "config": args.config, "steps": args.steps, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "rounds": args.rounds, "torch": torch.__version__,
        "optimizer": "bnb PagedAdamW32bit" if torch.cuda.is_available() else "torch AdamW (foreach)",
        "backend": "triton" if torch.cuda.is_available() else "reference",
        "median": med, "runs": runs,
        "ratio_tokens_per_s_qdylora_r64_vs_peft": med["qdylora"]["tokens_per_s"] / med["peft"]["tokens_per_s"],
        "ratio_tokens_per_s_qdylora_sampled_vs_peft": med["qdylora-sampled"]["tokens_per_s"] / med["peft"]["tokens_per_s"],
        "ratio_peak_memory_qdylora_r64_vs_peft": med["qdylora"][mem_key] / med["peft"][mem_key],
    }
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "gpu-" + device.replace(" ", "_") if torch.cuda.is_available() else "cpu"
    path = out_dir / f"train_throughput_{tag}_{args.config}.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"\n{'arm':18s} {'tok/s':>10s} {'peak mem MiB':>13s}")
    for arm, m in med.items():
        print(f"{arm:18s} {m['tokens_per_s']:10.1f} {m[mem_key] / 2**20:13.0f}")
    print(f"ratio tokens/s qdylora(r=64)/peft = {summary['ratio_tokens_per_s_qdylora_r64_vs_peft']:.3f}; "
          f"sampled ranks/peft = {summary['ratio_tokens_per_s_qdylora_sampled_vs_peft']:.3f}; "
          f"peak memory ratio = {summary['ratio_peak_memory_qdylora_r64_vs_peft']:.3f}")
    print(f"device: {device}; wrote {path}")


if __name__ == "__main__":
    main()
