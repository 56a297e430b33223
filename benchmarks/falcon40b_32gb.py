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
benchmarks/results/falcon40b_32gb_<gpu>.json, rewritten after the set-up and after every step (a run
cut off by a time limit keeps what it did). Targets: the peak fits the cap, and every measured item
is within 15% of the planner's.

  GPU:  python benchmarks/falcon40b_32gb.py
  CPU smoke test (same width, 2 layers):  python benchmarks/falcon40b_32gb.py --layers 2 --seq-len 64
  Fast wiring check:  python benchmarks/falcon40b_32gb.py --config tiny-falcon --seq-len 16 --steps 2
  Dry run (CPU, tiny Falcon, the Triton kernels in the interpreter):  python benchmarks/falcon40b_32gb.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
PLANNER_TOLERANCE = 0.15  # each measured item within 15% of the plan
ITEMS = ("nf4_weights", "unquantized_params", "adapters", "adapter_grads", "optimizer_state")


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


def nf4_bytes(model) -> int:
    """Bytes of every bitsandbytes 4-bit weight: packed codes, its QuantState's tensors (nested too), bias."""
    import bitsandbytes as bnb
    import torch

    tensors = []
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            tensors += [m.weight.data, m.bias]
            tensors += [v for v in m.weight.quant_state.as_dict().values() if torch.is_tensor(v)]
    return storage_bytes(tensors)


def planned(plan, name: str) -> int:
    """The plan's bytes for a measured item (its parts summed, e.g. a paged and an unpaged share)."""
    return sum(it.bytes for it in plan.items if it.name == name or it.name.startswith(name + "_"))


def compare(plan, measured: dict, cap: int | None) -> tuple[dict, list[dict]]:
    """(planned vs measured per item, the targets: fits the cap, each item within PLANNER_TOLERANCE)."""
    rows = {}
    for name in ITEMS:
        if name in measured:
            p = planned(plan, name)
            rows[name] = {"planned": p, "measured": measured[name], "ratio": p / max(measured[name], 1)}
    if "peak_allocated" in measured:
        rows["peak_allocated"] = {"planned": plan.peak_allocated, "measured": measured["peak_allocated"],
                                  "ratio": plan.peak_allocated / max(measured["peak_allocated"], 1)}
    targets = []
    if cap is not None and "peak_allocated" in measured:
        targets.append({"target": f"peak allocated <= cap {cap / 2**30:.0f} GiB", "value": measured["peak_allocated"],
                        "met": measured["peak_allocated"] <= cap})
    if rows:
        worst = max(rows, key=lambda k: abs(rows[k]["ratio"] - 1))
        targets.append({"target": f"every item within {PLANNER_TOLERANCE:.0%} of the planner",
                        "value": f"worst {worst}: planned/measured {rows[worst]['ratio']:.3f}",
                        "met": all(abs(v["ratio"] - 1) <= PLANNER_TOLERANCE for v in rows.values())})
    return rows, targets


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
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny-falcon, seq 16, 2 steps, the Triton kernels in the interpreter; JSON in a temp folder")
    args = ap.parse_args(argv)
    if args.dry_run:
        # before triton is imported: the kernels then run in the CPU interpreter, and the model takes them
        os.environ.update(TRITON_INTERPRET="1", QDYLORA_BACKEND="triton")
        args.config, args.seq_len, args.steps, args.device = "tiny-falcon", 16, 2, "cpu"
        if args.output is None:
            import tempfile

            args.output = str(Path(tempfile.mkdtemp(prefix="falcon40b_")) / "falcon40b_dry_run.json")

    import torch
    import bitsandbytes as bnb

    from qdylora.adapters.attach import attach_adapters, set_rank
    from qdylora.adapters.config import QDyLoRAConfig
    from qdylora.load.sharded import quantize_random_init
    from qdylora.memory import format_bytes, parse_memory_size, plan_memory
    from qdylora.ops import resolve_backend, selfcheck

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

    cfg = hf_config(args.config, args.layers)
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
    measured = {"nf4_weights": nf4_bytes(model)}
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

    plan = plan_memory(args.config, r_max=args.r_max, seq_len=args.seq_len, batch_size=args.batch_size,
                       gpu_memory=cap if cuda else None, optim="paged_adamw_32bit", gradient_checkpointing=True,
                       dtype="bf16" if cuda else "fp32", update=args.update, kernel=backend,
                       device="cuda" if cuda else "cpu", target_modules=TARGETS, layers=args.layers)
    out_path = Path(args.output) if args.output else (
        ROOT / "benchmarks" / "results" / f"falcon40b_32gb_{re.sub(r'[^A-Za-z0-9]+', '_', gpu).strip('_').lower()}"
        f"{'' if args.layers is None and args.config == 'falcon-40b' else '_smoke'}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "falcon40b_32gb", "complete": False,
        "gpu": gpu, "device": str(device), "cap_bytes": cap if cuda else None,
        "config": args.config, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "r_max": args.r_max, "update": args.update,
        "target_modules": TARGETS, "optimizer": "bitsandbytes PagedAdamW32bit", "gradient_checkpointing": True,
        "autocast": "bf16" if cuda else None, "kernel_backend": backend,
        "optimizer_state_prefilled": not args.no_prefill_state, "init_seconds": init_s,
        "static_allocated_after_init": static_alloc, "steps": [],
        "versions": {"torch": torch.__version__, "bitsandbytes": bnb.__version__, "python": platform.python_version()},
        "measured": measured, "planner": plan.to_dict(),
    }

    def write() -> None:
        """The JSON as it stands (after set-up, after every step, at the end)."""
        result["planned_vs_measured"], result["targets"] = compare(plan, measured, cap if cuda else None)
        result["kernel_checks"] = selfcheck.report()
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out_path)

    write()

    ranks = sample_ranks(args.steps, args.r_max, args.seed)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    steps = result["steps"]
    tok = args.batch_size * args.seq_len
    for i, r in enumerate(ranks):
        ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=gen).to(device)
        set_rank(model, r)
        if cuda:
            torch.cuda.synchronize(device)
        t = time.time()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(input_ids=ids, labels=ids)
        loss = out.loss.detach()
        out.loss.backward()
        if r == args.r_max and "adapter_grads" not in measured:
            measured["adapter_grads"] = storage_bytes(p.grad for p in params)
        del out
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
            measured["peak_allocated"] = torch.cuda.max_memory_allocated(device)
            result["peak_allocated"] = measured["peak_allocated"]
            result["peak_reserved"] = torch.cuda.max_memory_reserved(device)
            result["fits_cap"] = measured["peak_allocated"] <= cap
        dt = time.time() - t
        steps.append({"step": i, "rank": r, "loss": float(loss), "seconds": dt, "tokens_per_s": tok / dt,
                      "max_allocated": torch.cuda.max_memory_allocated(device) if cuda else None})
        log(f"step {i}: rank {r:2d} loss {float(loss):.4f} {dt:.2f} s {tok / dt:.1f} tok/s"
            + (f", peak {format_bytes(torch.cuda.max_memory_allocated(device))}" if cuda else ""))
        # the first step compiles the Triton kernels: tokens/s from the second on
        timed = steps[1:] or steps
        result["tokens_per_s"] = sum(s["tokens_per_s"] for s in timed) / len(timed)
        write()
    measured["optimizer_state_after"] = optimizer_state_bytes(opt)
    result["complete"] = True
    write()
    for k, v in result["planned_vs_measured"].items():
        log(f"  {k:<20} planned {format_bytes(v['planned']):>12}  measured {format_bytes(v['measured']):>12}  "
            f"ratio {v['ratio']:.3f}")
    for t in result["targets"]:
        log(f"  target {t['target']}: {'met' if t['met'] else 'NOT met'}")
    log(f"tokens/s (steps 2..): {result['tokens_per_s']:.1f}")
    log(f"wrote {out_path}")
    return 0


def hf_config(name: str, layers: int | None):
    """The transformers config of a shipped architecture name or a config.json path, `layers` overriding the depth."""
    from importlib.resources import files

    from transformers import AutoConfig

    from qdylora.memory import shipped_configs

    path = files("qdylora.memory.arch_configs") / f"{name}.json" if name in shipped_configs() else Path(name)
    d = json.loads(path.read_text())
    if layers is not None:
        d["num_hidden_layers"] = layers
    for k in ("torch_dtype", "dtype", "transformers_version", "architectures", "_name_or_path"):
        d.pop(k, None)
    return AutoConfig.for_model(d.pop("model_type"), **d)


if __name__ == "__main__":
    sys.exit(main())
