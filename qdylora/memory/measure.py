"""Measuring memory: live tensor bytes of a step (any device), bytes of NF4 storage, and the planner against a measured CPU step.

`measure_training_step` quantizes a random-weight model of a config to NF4, attaches r_max=64
adapters in either update mode and measures the worst step of a run in its steady state:

- every adapter tensor has optimizer state: over a run each one gets a gradient at some rank (in
  frozen mode only component b at rank b), so a first optimizer step where every tensor has a
  zero gradient builds the state a run holds after a sweep over the ranks;
- then one step at rank r_max: the largest low-rank activations (every rule gives its two tensors
  full-size gradients at any rank).

Static items are tensor bytes; the step's peak comes from TensorMemoryTracker (live tensor
storages) on top of the static bytes and the state. bitsandbytes does not page on the CPU. Its
tests and benchmark share it.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .architecture import config_from_dict, load_config_dict
from .estimate import plan_memory
from .plan import MemoryPlan

ITEMS = ("nf4_weights", "unquantized_params", "adapters", "adapter_grads", "optimizer_state")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
R_MAX = 64


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one tensor count once)."""
    seen = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def planned_items(plan: MemoryPlan) -> dict[str, int]:
    """The plan's bytes for each measured item and 'peak' (optimizer state: its paged part included)."""
    out = {name: plan.item(name).bytes for name in ITEMS if name != "optimizer_state"}
    out["optimizer_state"] = sum(it.bytes for it in plan.items if it.name.startswith("optimizer_state"))
    out["peak"] = plan.peak_allocated
    return out


def _optimizer(optim: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer training builds for `optim`: ComponentAdamW over the adapters (every component active here)."""
    from ..adapters.attach import dylora_layers
    from ..train.optimizer import ComponentAdamW, state_settings

    axes = {p: axis for layer in dylora_layers(model) for p, axis in layer.component_axes()}
    return ComponentAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0, axes=axes,
                          **state_settings(optim))


def prefill_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Give every parameter its state, as after a run in which every rank was drawn: one step on zero gradients.

    The optimizer allocates the state its real step allocates; with weight decay 0 the values do not move.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state on the training device (paged buffers and shared maps included).

    ComponentAdamW keeps its per-component step counts on the CPU: they are not device memory.
    """
    tensors = [t for st in opt.state.values() for k, t in st.items() if torch.is_tensor(t) and k != "step"]
    maps = [t for pair in getattr(opt, "_qmaps", {}).values() for t in pair]
    return storage_bytes(tensors + maps)


def measure_training_step(config: str, gradient_checkpointing: bool, dtype: str = "fp32", seq_len: int = 128,
                          layers: int | None = None, update: str = "nested", optim: str = "paged_adamw_32bit",
                          rank: int = R_MAX) -> tuple[MemoryPlan, dict[str, int]]:
    """(the planner's plan, measured bytes per item plus 'peak') of the worst step of `config` on the CPU.

    `rank` below r_max measures a lighter step (the plan is still the worst step's).
    """
    import bitsandbytes as bnb

    from ..adapters.attach import attach_adapters, set_rank
    from ..adapters.config import QDyLoRAConfig
    from ..load.sharded import quantize_random_init

    d, src = load_config_dict(config)
    if layers:
        d["num_hidden_layers"] = layers
    cfg = config_from_dict(d, src)
    cfg.use_cache = False
    model = quantize_random_init(cfg, "cpu", compute_dtype=DTYPES[dtype], dtype=DTYPES[dtype])
    model = attach_adapters(model, QDyLoRAConfig(r_max=R_MAX, update=update))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    q_ids = {id(p) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) for p in m.parameters()}
    frozen = [p for p in model.parameters() if id(p) not in q_ids and not p.requires_grad]
    measured = {"nf4_weights": quantized_bytes(model), "unquantized_params": storage_bytes(frozen),
                "adapters": storage_bytes(params)}
    opt = _optimizer(optim, model)
    prefill_optimizer_state(opt)
    measured["optimizer_state"] = optimizer_state_bytes(opt)
    set_rank(model, rank)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with TensorMemoryTracker() as tr:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        del out
        opt.step()
    measured["adapter_grads"] = storage_bytes(p.grad for p in params)
    static = measured["nf4_weights"] + measured["unquantized_params"] + measured["adapters"]
    measured["peak"] = static + measured["optimizer_state"] + tr.peak
    plan = plan_memory(config, r_max=R_MAX, seq_len=seq_len, optim=optim,
                       gradient_checkpointing=gradient_checkpointing, dtype=dtype, update=update,
                       kernel="reference", device="cpu", autocast=False, layers=layers)
    return plan, measured


class TensorMemoryTracker:
    """Live and peak bytes of tensor storages allocated inside the context (any device, incl. CPU).

    A TorchDispatchMode sees every op's outputs; a storage not shared with an input is a new
    allocation, and a weakref finalizer on the storage says when it is freed. Tensors made
    before entering are not counted, so around a training step it measures activations,
    gradients, optimizer state and transients, not the model.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0]
                          if isinstance(t, torch.Tensor) and t.device.type != "meta"}
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        tracker._see(t.untyped_storage(), inputs)
                return out

        self._mode = _Mode()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def _see(self, storage, inputs: set[int]) -> None:
        key, n = id(storage), storage.nbytes()
        if key in self.live:  # resized in place
            self.current += n - self.live[key]
            self.live[key] = n
        elif key not in inputs:  # a new allocation (views and in-place results share an input's storage)
            self.live[key] = n
            self.current += n
            weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)

    def reset_peak(self) -> None:
        """Start a new peak from the current live bytes."""
        self.peak = self.current

    def __enter__(self) -> "TensorMemoryTracker":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def quantized_bytes(module: nn.Module) -> int:
    """Bytes of every bnb 4-bit weight in `module`: packed data, absmax, nested absmax, codes, offset, bias."""
    import bitsandbytes as bnb

    total = 0
    for m in module.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            tensors = [m.weight.data, qs.absmax, qs.code]
            if qs.offset is not None:
                tensors.append(qs.offset)
            if qs.state2 is not None:
                tensors += [qs.state2.absmax, qs.state2.code]
            if m.bias is not None:
                tensors.append(m.bias)
            total += sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
    return total


def nf4_model_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and 4-bit states occupy (for checks and reports)."""
    import bitsandbytes as bnb

    q_ids = set()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            q_ids.add(id(m.weight))
            if m.bias is not None:
                q_ids.add(id(m.bias))
    seen, other = set(), 0
    for p in model.parameters():
        if id(p) in q_ids or id(p) in seen:
            continue
        seen.add(id(p))
        other += p.numel() * p.element_size()
    return quantized_bytes(model) + other
