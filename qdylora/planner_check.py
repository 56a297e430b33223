"""The planner against a measured CPU training step, item by item (used by its tests and benchmark).

A random-weight model of the config is quantized to NF4 and gets r_max=64 adapters in nested mode
at rank 64, so one step gives every component a gradient and optimizer state; one step of
bitsandbytes PagedAdamW32bit (unpaged on the CPU). Static items are tensor bytes; the step's peak
comes from TensorMemoryTracker (live tensor storages).
"""

from __future__ import annotations

import torch

from .planner import MemoryPlan, TensorMemoryTracker, config_from_dict, load_config_dict, plan_memory, quantized_bytes

ITEMS = ("nf4_weights", "unquantized_params", "adapters", "adapter_grads", "optimizer_state")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one tensor count once)."""
    seen = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def measure_training_step(config: str, gradient_checkpointing: bool, dtype: str = "fp32", seq_len: int = 128,
                          layers: int | None = None) -> tuple[MemoryPlan, dict[str, int]]:
    """(the planner's plan, measured bytes per item plus 'peak') for one rank-64 step of `config` on the CPU."""
    import bitsandbytes as bnb

    from .config import QDyLoRAConfig
    from .lowmem_load import quantize_random_init
    from .model import attach_adapters, set_rank

    d, src = load_config_dict(config)
    if layers:
        d["num_hidden_layers"] = layers
    cfg = config_from_dict(d, src)
    cfg.use_cache = False
    model = quantize_random_init(cfg, "cpu", compute_dtype=DTYPES[dtype], dtype=DTYPES[dtype])
    model = attach_adapters(model, QDyLoRAConfig(r_max=64, update="nested"))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    set_rank(model, 64)
    params = [p for p in model.parameters() if p.requires_grad]
    q_ids = {id(p) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) for p in m.parameters()}
    frozen = [p for p in model.parameters() if id(p) not in q_ids and not p.requires_grad]
    measured = {"nf4_weights": quantized_bytes(model), "unquantized_params": storage_bytes(frozen),
                "adapters": storage_bytes(params)}
    opt = bnb.optim.PagedAdamW32bit(params, lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with TensorMemoryTracker() as tr:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        step_peak = tr.peak  # activations, logits, transients and gradients
        del out
        opt.step()
    measured["adapter_grads"] = storage_bytes(p.grad for p in params)
    measured["optimizer_state"] = storage_bytes(t for st in opt.state.values() for t in st.values()
                                                if torch.is_tensor(t))
    static = measured["nf4_weights"] + measured["unquantized_params"] + measured["adapters"]
    # the state exists from the first step on, so a steady-state step peaks at static + state + step peak
    measured["peak"] = static + measured["optimizer_state"] + max(step_peak, tr.peak - measured["optimizer_state"])
    plan = plan_memory(config, r_max=64, seq_len=seq_len, optim="paged_adamw_32bit",
                       gradient_checkpointing=gradient_checkpointing, dtype=dtype, update="nested",
                       kernel="reference", device="cpu", autocast=False, layers=layers)
    return plan, measured
