"""Sort an adapter's components by the singular values of each module's update (truncation 'svd').

A run that trains every row at r_max (the default) is a rank-r_max LoRA whose components are in no order.
Re-expressing each module's B A by its singular vectors, component k = sqrt(s_k) u_k (column of B) and
sqrt(s_k) v_k (row of A), keeps the full-rank output and makes every prefix the best approximation of its
rank (Eckart-Young) at the full adapter's scale alpha/r_max. So a sorted layer runs rank b at alpha/r_max
instead of DyLoRA's alpha/b (`DyLoRALinear.svd_sorted`, QDyLoRAConfig.scale), and a saved adapter records it
("svd_sorted" in its metadata). Training with --truncation svd sorts only the final adapter (checkpoints keep
the trained components a resume needs); `qdylora sort` writes a sorted copy of a saved adapter.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError
from .attach import dylora_layers


@torch.no_grad()
def svd_sorted(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' [r, in], B' [out, r]) with B' A' = B A and component k = sqrt(s_k) (v_k, u_k), s_1 >= s_2 >= ...
    (zeros past the update's rank); computed in float64 through two thin QRs and an r x r SVD."""
    r = A.shape[0]
    qa, ra = torch.linalg.qr(A.double().t())  # A = ra^T qa^T
    qb, rb = torch.linalg.qr(B.double())  # B = qb rb
    u, s, vh = torch.linalg.svd(rb @ ra.t(), full_matrices=False)
    root = s.sqrt()
    a_new = torch.zeros(r, A.shape[1], dtype=torch.float64, device=A.device)
    b_new = torch.zeros(B.shape[0], r, dtype=torch.float64, device=B.device)
    a_new[: s.numel()] = root[:, None] * (vh @ qa.t())
    b_new[:, : s.numel()] = (qb @ u) * root[None, :]
    return a_new.to(A.dtype), b_new.to(B.dtype)


def sorted_tensors(tensors: dict[str, torch.Tensor], targets: list[str]) -> dict[str, torch.Tensor]:
    """A saved adapter's tensors ({module.lora_A, module.lora_B}) with every module's components svd-sorted."""
    out = dict(tensors)
    for t in targets:
        out[f"{t}.lora_A"], out[f"{t}.lora_B"] = svd_sorted(tensors[f"{t}.lora_A"], tensors[f"{t}.lora_B"])
    return out


def sort_components(model: nn.Module) -> nn.Module:
    """Sort every DyLoRA layer's components by svd_sorted, in place, and mark the layers svd-sorted (under FSDP
    every process must call it). The rank-r_max output is unchanged up to rounding."""
    for layer in dylora_layers(model):
        if not layer.svd_sorted:
            layer.set_factors(*svd_sorted(*layer.factors()))
            layer.svd_sorted = True
    return model


def sort_adapter(adapter_dir: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False,
                 protect: str | os.PathLike | None = None) -> Path:
    """Write a saved adapter's components svd-sorted to a new adapter folder `output` (the source is left as it is;
    `protect`: a folder the output must stay outside of, e.g. the source's run). Every input is checked first."""
    from .export import check_output
    from .files import SORTED_KEY, read_adapter, svd_sorted_meta, write_adapter

    meta, tensors = read_adapter(adapter_dir)
    if svd_sorted_meta(meta):
        raise AdapterError(f"{adapter_dir} is already svd-sorted; use it as it is")
    output = Path(output)
    check_output(Path(adapter_dir), output, overwrite, Path(protect) if protect else None)
    return write_adapter(output, {**meta, SORTED_KEY: True, "sorted_from": str(adapter_dir)},
                         sorted_tensors(tensors, list(meta["targets"])))
