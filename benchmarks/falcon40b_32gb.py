"""The proof: a Falcon-40B-architecture model trains at every rank 1..64 on one 32 GB GPU.

Builds falcon-40b from its shipped config (60 layers, hidden 8192, 128 heads, 8 kv heads,
vocab 65024) with random weights quantized straight to NF4 on the GPU one linear at a time
(qdylora.load.sharded.quantize_random_init), caps the process at --cap (default 32 GiB) with
torch.cuda.set_per_process_memory_fraction, attaches DyLoRA adapters r_max=64 on
query_key_value / dense / dense_h_to_4h / dense_4h_to_h, and trains --steps steps (seq 512,
batch 1, bf16 autocast, gradient checkpointing, bitsandbytes PagedAdamW32bit) at ranks sampled
over 1..64 including 64. The optimizer state of all r_max components is allocated before the
first step (--no-prefill-state to skip), so the peak is the steady state of a long run in which
every rank has been sampled, not the lighter first steps. Writes peak memory
(torch.cuda.max_memory_allocated), tokens/s and the planner's prediction per item to
benchmarks/results/falcon40b_32gb_<gpu>.json.

  GPU:  python benchmarks/falcon40b_32gb.py
  CPU smoke test (same width, 2 layers):  python benchmarks/falcon40b_32gb.py --layers 2 --seq-len 64
  Fast wiring check:  python benchmarks/falcon40b_32gb.py --config tiny-falcon --seq-len 16 --steps 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sample_ranks(steps: int, r_max: int, seed: int) -> list[int]:
    """`steps` ranks over 1..r_max, r_max first (the heaviest step), the rest uniform."""
    rng = random.Random(seed)
    return [r_max] + [rng.randint(1, r_max) for _ in range(steps - 1)]


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (gradients of row parameters share one)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def prefill_optimizer_state(opt) -> None:
    """Allocate the state of every parameter now, as after a run in which every rank was sampled."""
    import torch

    if hasattr(opt, "init_state"):  # bitsandbytes: the state step() would create lazily
        for gindex, group in enumerate(opt.param_groups):
            for pindex, p in enumerate(group["params"]):
                if len(opt.state[p]) == 0:
                    opt.init_state(group, p, gindex, pindex)
    else:  # torch AdamW
        for group in opt.param_groups:
            for p in group["params"]:
                if len(opt.state[p]) == 0:
                    opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                    "exp_avg_sq": torch.zeros_like(p)}


def optimizer_state_bytes(opt) -> int:
    """Bytes of every tensor in the optimizer state (paged buffers included)."""
    import torch

    return storage_bytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="falcon-40b", help="shipped config name or config.json (default %(default)s)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers (same width)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4, help="training steps (first one at r_max; default %(default)s)")
    ap.add_argument("--r-max", type=int, default=64)
    ap.add_argument("--update", default="frozen", choices=("frozen", "nested"))
    ap.add_argument("--cap", default="32GiB", help="GPU memory cap for this process (default %(default)s)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--no-prefill-state", action="store_true", help="let the optimizer state grow lazily")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=None, help="JSON path (default benchmarks/results/falcon40b_32gb_<gpu>.json)")
    args = ap.parse_args(argv)

    import torch
    import bitsandbytes as bnb

    from qdylora.adapters.config import QDyLoRAConfig
    from qdylora.load.sharded import quantize_random_init
    from qdylora.adapters.attach import attach_adapters, set_rank
    from qdylora.ops import resolve_backend
    from qdylora.memory import format_bytes, parse_memory_size, plan_memory
    from qdylora.memory.architecture import config_from_dict, load_config_dict
    from qdylora.memory.measure import TensorMemoryTracker, quantized_bytes

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    cap = parse_memory_size(args.cap)
    gpu = torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})"
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        frac = min(1.0, cap / total)
        torch.cuda.set_per_process_memory_fraction(frac, device)  # before anything is allocated
        log(f"{gpu}: {format_bytes(total)}, capped at {format_bytes(cap)} (fraction {frac:.4f})")
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU: fp32 (qdylora's CPU compute dtype)

    d, source = load_config_dict(args.config)
    if args.layers is not None:
        d = dict(d, num_hidden_layers=args.layers)
    cfg = config_from_dict(d, source)
    cfg.use_cache = False
    log(f"{args.config}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}; "
        f"quantizing random weights to NF4 on {device} layer by layer")

    t0 = time.time()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.time() - last[0] > 10 or done == total:
            last[0] = time.time()
            mem = f", {format_bytes(torch.cuda.memory_allocated(device))} allocated" if cuda else ""
            log(f"  quantized {done}/{total} linears ({time.time() - t0:.0f} s{mem})")

    model = quantize_random_init(cfg, device, compute_dtype=dtype, dtype=dtype, seed=args.seed, progress=progress)
    init_s = time.time() - t0
    measured = {"nf4_weights": quantized_bytes(model)}
    q_ids = {id(p) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) for p in m.parameters()}
    measured["unquantized_params"] = storage_bytes(p for p in model.parameters() if id(p) not in q_ids)
    static_alloc = torch.cuda.memory_allocated(device) if cuda else None
    log(f"model ready in {init_s:.0f} s: NF4 {format_bytes(measured['nf4_weights'])}, other params "
        f"{format_bytes(measured['unquantized_params'])}")

    qcfg = QDyLoRAConfig(r_min=1, r_max=args.r_max, alpha=16.0, target_modules=TARGETS, update=args.update,
                         seed=args.seed)
    model = attach_adapters(model, qcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    measured["adapters"] = storage_bytes(params)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    opt = bnb.optim.PagedAdamW32bit(params, lr=1e-4, weight_decay=0.0)
    if not args.no_prefill_state:
        prefill_optimizer_state(opt)
    measured["optimizer_state"] = optimizer_state_bytes(opt)
    backend = resolve_backend(None, device)
    log(f"adapters {format_bytes(measured['adapters'])} ({len(params)} component tensors), optimizer state "
        f"{format_bytes(measured['optimizer_state'])}, kernel backend {backend}")

    plan = plan_memory(model_arch(cfg, args), r_max=args.r_max, seq_len=args.seq_len, batch_size=args.batch_size,
                       gpu_memory=cap if cuda else None, optim="paged_adamw_32bit", gradient_checkpointing=True,
                       dtype="bf16" if cuda else "fp32", update=args.update, kernel=backend,
                       device="cuda" if cuda else "cpu")

    ranks = sample_ranks(args.steps, args.r_max, args.seed)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    steps = []
    for i, r in enumerate(ranks):
        ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=gen).to(device)
        set_rank(model, r)
        if cuda:
            torch.cuda.synchronize(device)
        t = time.time()
        # on the CPU (no allocator statistics) the first step runs under the tensor tracker instead
        tracker = TensorMemoryTracker() if not cuda and i == 0 else contextlib.nullcontext()
        with tracker:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                out = model(input_ids=ids, labels=ids)
            loss = out.loss.detach()
            out.loss.backward()
            if r == args.r_max and "adapter_grads" not in measured:
                measured["adapter_grads"] = storage_bytes(p.grad for p in params)
            del out
            opt.step()
            opt.zero_grad(set_to_none=True)
        if isinstance(tracker, TensorMemoryTracker):
            cpu_step_peak = tracker.peak
        if cuda:
            torch.cuda.synchronize(device)
        dt = time.time() - t
        tok = args.batch_size * args.seq_len
        steps.append({"step": i, "rank": r, "loss": float(loss), "seconds": dt, "tokens_per_s": tok / dt,
                      "max_allocated": torch.cuda.max_memory_allocated(device) if cuda else None})
        log(f"step {i}: rank {r:2d} loss {float(loss):.4f} {dt:.2f} s {tok / dt:.1f} tok/s"
            + (f", peak {format_bytes(torch.cuda.max_memory_allocated(device))}" if cuda else ""))
    measured["optimizer_state_after"] = optimizer_state_bytes(opt)
    timed = steps[1:] or steps  # the first step compiles the Triton kernels
    tps = sum(s["tokens_per_s"] for s in timed) / len(timed)

    result = {
        "benchmark": "falcon40b_32gb",
        "gpu": gpu, "device": str(device), "cap_bytes": cap if cuda else None,
        "config": args.config, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "r_max": args.r_max, "update": args.update,
        "targets": TARGETS, "optimizer": "bitsandbytes PagedAdamW32bit", "gradient_checkpointing": True,
        "autocast": "bf16" if cuda else None, "kernel_backend": backend,
        "optimizer_state_prefilled": not args.no_prefill_state,
        "init_seconds": init_s, "steps": steps, "tokens_per_s": tps,
        "versions": {"torch": torch.__version__, "bitsandbytes": bnb.__version__, "python": platform.python_version()},
        "measured": measured,
        "planner": plan.to_dict(),
    }
    if not cuda:  # static tensors + what the first (rank r_max) step allocated at its peak
        peak = sum(measured[k] for k in ("nf4_weights", "unquantized_params", "adapters", "optimizer_state"))
        peak += cpu_step_peak
        measured["peak_allocated"] = peak
    else:
        peak = torch.cuda.max_memory_allocated(device)
        result["peak_allocated"] = peak
        result["peak_reserved"] = torch.cuda.max_memory_reserved(device)
        result["static_allocated_after_init"] = static_alloc
        result["fits_cap"] = peak <= cap
        measured["peak_allocated"] = peak
    compare = {}
    for name in ("nf4_weights", "unquantized_params", "adapters", "adapter_grads", "optimizer_state"):
        if name in measured:
            p = plan.item(name).bytes
            compare[name] = {"planned": p, "measured": measured[name], "ratio": p / max(measured[name], 1)}
    if "peak_allocated" in measured:
        compare["peak_allocated"] = {"planned": plan.peak_allocated, "measured": peak,
                                     "ratio": plan.peak_allocated / peak}
    result["planned_vs_measured"] = compare
    for k, v in compare.items():
        log(f"  {k:<20} planned {format_bytes(v['planned']):>12}  measured {format_bytes(v['measured']):>12}  "
            f"ratio {v['ratio']:.3f}")
    log(f"tokens/s (steps 2..): {tps:.1f}")

    out_path = Path(args.output) if args.output else (
        ROOT / "benchmarks" / "results" / f"falcon40b_32gb_{re.sub(r'[^A-Za-z0-9]+', '_', gpu).strip('_').lower()}"
        f"{'' if args.layers is None and args.config == 'falcon-40b' else '_smoke'}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    log(f"wrote {out_path}")
    return 0


def model_arch(cfg, args):
    """The planner's view of the same config (meta device, same targets)."""
    from qdylora.memory.architecture import arch_from_config

    return arch_from_config(cfg, name=args.config, target_modules=TARGETS)


if __name__ == "__main__":
    sys.exit(main())
