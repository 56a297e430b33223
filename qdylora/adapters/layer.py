"""DyLoRALinear: a peft LoRA layer over a frozen NF4 linear whose rank is chosen at run time.

The storage follows the update mode:
- 'nested': A is one [r_max, in] parameter and B one [out, r_max] parameter, like peft's LoRA;
  at rank b the layer uses the slices A[:b], B[:, :b] (no copies, one optimizer tensor each).
- 'frozen': A is r_max row parameters [in] and B r_max column parameters [out]; every component
  but b is detached, so its parameter gets no gradient at all and the optimizer (AdamW, paged or
  8-bit) skips it: no momentum, no weight decay, the value stays bit for bit (a zeroed gradient
  would not). Only frozen mode needs that guarantee, and only it pays for r_max small tensors.
"""

from __future__ import annotations

import math

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .config import QDyLoRAConfig
from .storage import split_factors
from ..load.quantize import packed_nf4
from ..ops import qdylora_linear


class DyLoRALinear(nn.Module, LoraLayer):
    """Dynamic-rank LoRA around a bitsandbytes Linear4bit (NF4) base."""

    adapter_layer_names = ("lora_dyA", "lora_dyB")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config=None, **kwargs) -> None:
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        qcfg = getattr(config, "qdylora", None)
        if qcfg is None:
            raise ValueError("DyLoRALinear needs a LoraConfig built by qdylora.attach_adapters")
        self.qdylora_config: QDyLoRAConfig = qcfg
        self.lora_dyA = nn.ModuleDict()
        self.lora_dyB = nn.ModuleDict()
        self.fan_in_fan_out = False
        self.backend: str | None = None
        self.rank: int | torch.Tensor = qcfg.r_max
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, qcfg)

    def update_layer(self, adapter_name: str, qcfg: QDyLoRAConfig) -> None:
        """Create the r_max components of A (LoRA's Kaiming init) and B (zeros) for `adapter_name`."""
        weight = self.get_base_layer().weight
        device = weight.device if weight.device.type != "meta" else None
        A = torch.empty(qcfg.r_max, self.in_features, device=device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # peft's default LoRA init for A
        B = torch.zeros(self.out_features, qcfg.r_max, device=device)
        a_parts, b_parts = split_factors(A, B, qcfg.update)  # the storage of this update mode
        self.lora_dyA[adapter_name] = nn.ParameterList([nn.Parameter(t) for t in a_parts])
        self.lora_dyB[adapter_name] = nn.ParameterList([nn.Parameter(t) for t in b_parts])
        self.r[adapter_name] = qcfg.r_max
        self.lora_alpha[adapter_name] = qcfg.alpha
        self.scaling[adapter_name] = qcfg.alpha / qcfg.r_max
        self.lora_dropout[adapter_name] = nn.Dropout(qcfg.dropout) if qcfg.dropout > 0 else nn.Identity()

    def _per_component(self, name: str) -> bool:
        return self.lora_dyA[name][0].dim() == 1

    def stacked(self, rank: int, adapter_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[:rank] [rank, in], B[:, :rank] [out, rank]) with gradients only where the update mode allows."""
        name = adapter_name or self.active_adapters[0]
        rows, cols = self.lora_dyA[name], self.lora_dyB[name]
        if not self._per_component(name):
            # nested: rows >= rank get a zero gradient (AdamW's momentum may still move them; only
            # frozen mode promises untouched rows)
            return rows[0][:rank], cols[0][:, :rank]
        if torch.is_grad_enabled() and self.training:
            # per-component storage is frozen mode's; per-row ranks leave the masking to the op
            keep = {rank - 1} if isinstance(self.rank, int) else None
            pick = lambda p, i: p if keep is None or i in keep else p.detach()  # noqa: E731
        else:
            pick = lambda p, i: p  # noqa: E731
        A = torch.stack([pick(rows[i], i) for i in range(rank)])
        B = torch.stack([pick(cols[i], i) for i in range(rank)], dim=1)
        return A, B

    @torch.no_grad()
    def factors(self, adapter_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All r_max components as (A [r_max, in], B [out, r_max]), detached copies."""
        name = adapter_name or self.active_adapters[0]
        r_max = self.qdylora_config.r_max
        A, B = self.stacked(r_max, name)
        return A.detach().clone(), B.detach().clone()

    @torch.no_grad()
    def set_factors(self, A: torch.Tensor, B: torch.Tensor, adapter_name: str | None = None) -> None:
        """Copy A [r_max, in] and B [out, r_max] into the adapter's storage, exactly."""
        name = adapter_name or self.active_adapters[0]
        r_max = self.qdylora_config.r_max
        if tuple(A.shape) != (r_max, self.in_features) or tuple(B.shape) != (self.out_features, r_max):
            raise ValueError(f"A{tuple(A.shape)} B{tuple(B.shape)} do not fit r_max={r_max}, "
                             f"in={self.in_features}, out={self.out_features}")
        rows, cols = self.lora_dyA[name], self.lora_dyB[name]
        if self._per_component(name):
            for i in range(r_max):
                rows[i].copy_(A[i])
                cols[i].copy_(B[:, i])
        else:
            rows[0].copy_(A)
            cols[0].copy_(B)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        name = self.active_adapters[0] if self.active_adapters else None
        ranks = 0 if self.disable_adapters or name is None else self.rank
        r_alloc = max(1, int(ranks.max()) if isinstance(ranks, torch.Tensor) else int(ranks))
        if name is None:
            name = next(iter(self.lora_dyA))
        A, B = self.stacked(r_alloc, name)
        dropout = self.lora_dropout[name]
        x_lora = dropout(x) if isinstance(dropout, nn.Dropout) and self.training else None
        weight, quant_state = packed_nf4(base)
        dtype = getattr(base, "compute_dtype", None) or x.dtype
        # bnb's Linear4bit computes in its compute dtype; do the same so both paths agree.
        # Rank 0 (adapters disabled) still runs our op, so base-only and adapter outputs share one path.
        y = qdylora_linear(
            x.to(dtype), weight, quant_state, base.bias, A, B, ranks,
            self.lora_alpha[name], self.qdylora_config.update,
            None if x_lora is None else x_lora.to(dtype), self.backend,
        )
        return y.to(x.dtype)

    def set_rank(self, rank: int | torch.Tensor) -> None:
        """Rank for the next forward passes: an int, or one per batch element / row (per-row ranks)."""
        self.rank = rank

    def merge(self, *args, **kwargs) -> None:
        raise NotImplementedError("merging into a 4-bit base is lossy; export a peft adapter instead")

    def __repr__(self) -> str:
        c = self.qdylora_config
        return f"qdylora.{super().__repr__()}[r={c.r_min}..{c.r_max}, update={c.update}]"
