"""FSDP-QLoRA: a quantized PeftModel sharded with FSDP2 (`fully_shard`), one unit per decoder layer and one for
the rest (embeddings, norms, head), and the full tensors of its adapters and optimizer state for the run folder.

The NF4 weights are parameters like any other here: stored as the model's dtype (bnb's quant_storage, the
same bytes viewed), FSDP shards them with the adapters and gathers a layer's bytes for its forward; the
quantization state (absmax, codes) is small and stays whole in every process, kept on the layer. FSDP2
takes frozen and trainable parameters in one unit, so the adapters need no units of their own. Checkpoints
hold full tensors, written by the main process: any number of processes, with or without FSDP, resumes them.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from ..errors import ConfigError
from ..load.quantize import QUANT_STORAGE, quantized_linears, set_quant_storage


def fsdp_storage(compute_dtype: torch.dtype, quant_storage: str) -> torch.dtype:
    """The packed weights' storage under FSDP: the compute dtype ('auto'), or the one named, which must match it."""
    if quant_storage == "auto":
        return compute_dtype
    dtype = QUANT_STORAGE[quant_storage]
    if dtype != compute_dtype:
        name = str(compute_dtype).removeprefix("torch.")
        raise ConfigError(f"--fsdp with --quant-storage {quant_storage}: FSDP shards the 4-bit weights only when their "
                          f"storage is the model's dtype ({name} here); pass --quant-storage {name} or leave it auto")
    return dtype


def check_fsdp_launch(optim: str) -> None:
    """ConfigError unless FSDP can run here: under a launcher (torchrun / accelerate launch), 32-bit optimizer state."""
    if "WORLD_SIZE" not in os.environ:
        raise ConfigError("--fsdp runs under a launcher: torchrun --nproc_per_node N -m qdylora train ... --fsdp "
                          "(or accelerate launch --num_processes N -m qdylora train ... --fsdp)")
    if optim.endswith("8bit"):
        raise ConfigError(f"--fsdp with --optim {optim}: 8-bit optimizer state is kept per component block and is "
                          "not sharded; use --optim paged_adamw_32bit or adamw_torch")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (transformers' _no_split_modules classes, else the largest ModuleList)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    found = [m for m in inner.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in inner.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_model(model: nn.Module, storage: torch.dtype, device: torch.device) -> None:
    """Shard `model` in place with FSDP2 over every process: one unit per decoder layer, then the root.

    The model may sit in CPU RAM: fully_shard moves each process's shards to `device`, and the (small, whole)
    quantization states are moved here.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .processes import start_processes

    start_processes()
    set_quant_storage(model, storage)
    for layer in quantized_linears(model).values():
        qs = layer.weight.quant_state
        qs.to(device)  # in place
        layer.qdylora_quant_state = qs  # the weight becomes a DTensor without its quant_state
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in decoder_layers(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model.get_base_model() if hasattr(model, "get_base_model") else model, mesh=mesh)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 manages in `model`."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


class ShardedRun(nn.Module):
    """What the Trainer runs for a sharded model: the model itself (FSDP reduces the gradients, so no DDP), with a
    `no_sync` that holds the gradient reduce-scatter until the last micro-step of an accumulation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        units = fsdp_units(self.module)
        for u in units:
            u.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for u in units:
                u.set_requires_gradient_sync(True, recurse=False)
