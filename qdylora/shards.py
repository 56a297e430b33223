"""Tensors FSDP holds as shards (DTensors): this process's part, the whole, and gathering shards of other tensors.

Plain tensors pass through unchanged, so code that uses these works the same with and without FSDP.
"""

from __future__ import annotations

import torch
from torch import nn


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    """True for a parameter or tensor FSDP holds as shards (a DTensor)."""
    return isinstance(t, _dtensor()) or isinstance(getattr(t, "data", None), _dtensor())


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of `t` (a view: writing it writes the parameter), or `t` itself."""
    data = t.data if isinstance(t, nn.Parameter) else t
    return data.to_local() if isinstance(data, _dtensor()) else data


def full(t: torch.Tensor) -> torch.Tensor:
    """`t` whole: its shards gathered from every process (a collective: call it in all of them), or `t` itself."""
    data = t.data if isinstance(t, nn.Parameter) else t
    return data.full_tensor() if isinstance(data, _dtensor()) else data


def row_offset(p: torch.Tensor) -> int:
    """First row (dim 0) of the parameter held by this process (0 when it is not sharded)."""
    data = p.data if isinstance(p, nn.Parameter) else p
    if not isinstance(data, _dtensor()):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(data.shape, data.device_mesh, data.placements)
    return int(offset[0]) if offset else 0


def gather_dim(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Every process's `t` concatenated along `dim` in process order (sizes may differ); a collective."""
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    n = torch.tensor([t.shape[dim]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = list(t.shape)
    pad[dim] = max(sizes) - t.shape[dim]
    mine = torch.cat([t.to(dev), torch.zeros(pad, dtype=t.dtype, device=dev)], dim).contiguous()
    parts = [torch.empty_like(mine) for _ in sizes]
    dist.all_gather(parts, mine)
    return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim).to(t.device)
