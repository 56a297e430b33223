"""The memory planner against a measured CPU training step, item by item.

For each configuration: random weights quantized to NF4, DyLoRA adapters r_max=64 (nested
update, rank 64, so every component gets a gradient and optimizer state in one step), one
step of bitsandbytes PagedAdamW32bit (unpaged on the CPU). Static items are measured as tensor
bytes; the step's peak with qdylora.planner.TensorMemoryTracker (live tensor storages).
Writes benchmarks/results/planner_vs_measured_cpu.json.

  python benchmarks/planner_vs_measured.py                     (tiny-llama, tiny-falcon, SmolLM2-135M: ~5 min)
  python benchmarks/planner_vs_measured.py --configs smollm2-135m --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ITEMS = ("nf4_weights", "unquantized_params", "adapters", "adapter_grads", "optimizer_state")


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    seen = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure(config: str, gc: bool, dtype_name: str, seq: int) -> dict:
    """Planned and measured bytes per item, and the peak of one step, for one configuration."""
    import bitsandbytes as bnb
    import torch

    from qdylora.config import QDyLoRAConfig
    from qdylora.lowmem_load import quantize_random_init
    from qdylora.model import attach_adapters, set_rank
    from qdylora.planner import TensorMemoryTracker, config_from_dict, load_config_dict, plan_memory, quantized_bytes

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    d, src = load_config_dict(config)
    cfg = config_from_dict(d, src)
    cfg.use_cache = False
    model = quantize_random_init(cfg, "cpu", compute_dtype=dtype, dtype=dtype)
    model = attach_adapters(model, QDyLoRAConfig(r_max=64, update="nested"))
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    set_rank(model, 64)
    params = [p for p in model.parameters() if p.requires_grad]
    q_ids = {id(p) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) for p in m.parameters()}
    m = {"nf4_weights": quantized_bytes(model),
         "unquantized_params": storage_bytes(p for p in model.parameters() if id(p) not in q_ids and not p.requires_grad),
         "adapters": storage_bytes(params)}
    opt = bnb.optim.PagedAdamW32bit(params, lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    t = time.time()
    with TensorMemoryTracker() as tr:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        step_peak = tr.peak
        del out
        opt.step()
    m["adapter_grads"] = storage_bytes(p.grad for p in params)
    m["optimizer_state"] = storage_bytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    static = m["nf4_weights"] + m["unquantized_params"] + m["adapters"]
    m["peak_allocated"] = static + m["optimizer_state"] + max(step_peak, tr.peak - m["optimizer_state"])
    plan = plan_memory(config, r_max=64, seq_len=seq, optim="paged_adamw_32bit", gradient_checkpointing=gc,
                       dtype=dtype_name, update="nested", kernel="reference", device="cpu", autocast=False)
    rows = {k: {"planned": plan.item(k).bytes, "measured": m[k]} for k in ITEMS}
    rows["peak_allocated"] = {"planned": plan.peak_allocated, "measured": m["peak_allocated"]}
    for v in rows.values():
        v["ratio"] = v["planned"] / max(v["measured"], 1)
    return {"config": config, "gradient_checkpointing": gc, "dtype": dtype_name, "seq_len": seq,
            "step_seconds": time.time() - t, "items": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny-llama,tiny-falcon,smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "planner_vs_measured_cpu.json"))
    args = ap.parse_args(argv)
    results = []
    for config in args.configs.split(","):
        for gc in (True, False):
            r = measure(config, gc, "fp32", args.seq_len)
            results.append(r)
            worst = max(abs(v["ratio"] - 1) for v in r["items"].values())
            print(f"{config:<14} gc={gc!s:<5} " + " ".join(f"{k}={v['ratio']:.3f}" for k, v in r["items"].items())
                  + f"  worst {worst:.1%}", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"device": "cpu", "results": results}, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
