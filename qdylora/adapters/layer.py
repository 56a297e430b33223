"""DyLoRALinear: a peft LoRA layer over a frozen NF4 linear whose rank is chosen at run time.

Storage, whatever the update rule: A is one [r_max, in] parameter and B one [out, r_max], like peft's
LoRA; at rank b the layer uses the views A[:b], B[:, :b]. The rule decides which components get a
gradient (the op's masks: 'frozen' - component b-1 of each row; 'nested' - all components < b) and,
in training, which ones the optimizer steps (ComponentAdamW, told by the RankSchedule), so frozen
mode's untrained components keep value and optimizer state bit for bit. 'matryoshka' trains every
component in each forward, component i weighted by the summed scales of the training ranks above it
(MatryoshkaLoRA); 'even' is nested with every row's A/B gradient at alpha/r_max instead of alpha/b, so
the rows of a batch weigh alike on the components they share. At inference every rule is the same
truncation to rank b with scale alpha/b; a layer whose components were sorted by svd_sort (`svd_sorted`)
runs rank b at alpha/r_max instead.
"""

from __future__ import annotations

import functools
import math

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ..load.quantize import packed_nf4
from ..ops import qdylora_linear, row_ranks
from ..shards import full, local, row_offset
from .config import QDyLoRAConfig
from .storage import adapter_tensor_shapes


def matryoshka_weights(cfg: QDyLoRAConfig) -> torch.Tensor:
    """P [r_max]: P_i = sum of alpha/r over the training ranks r >= i+1 (the list, else powers of two)."""
    train = sorted(set(cfg.rank_list)) if cfg.rank_sampler == "list" else cfg.power_of_two_ranks()
    return torch.tensor([sum(cfg.alpha / r for r in train if r >= i + 1) for i in range(cfg.r_max)])


class DyLoRALinear(nn.Module, LoraLayer):
    """Dynamic-rank LoRA around a bitsandbytes Linear4bit (NF4) base."""

    adapter_layer_names = ("lora_dyA", "lora_dyB")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config=None, **kwargs) -> None:
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        self.lora_dyA = nn.ParameterDict()
        self.lora_dyB = nn.ParameterDict()
        self.qdylora_configs: dict[str, QDyLoRAConfig] = {}
        self.fan_in_fan_out = False
        self.backend: str | None = None
        # components sorted by the singular values of the full update (svd_sort): rank b runs at alpha/r_max
        self.svd_sorted = False
        # None, or observe(rank, x_lora, dy, h, dyB) called in each training backward (FisherCollector)
        self.observe = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config=config)
        self.rank: int | torch.Tensor = self.qdylora_config.r_max

    def update_layer(self, adapter_name: str, r: int | None = None, lora_alpha: float | None = None,
                     config=None, **kwargs) -> None:
        """Create adapter `adapter_name` (A: LoRA's Kaiming init, B: zeros); peft calls this to add adapters."""
        qcfg = getattr(config, "qdylora", None)
        if qcfg is None:
            raise ValueError("a qdylora layer holds qdylora adapters only: build the LoraConfig with "
                             "qdylora.adapters.attach.lora_config(QDyLoRAConfig(...), targets)")
        weight = self.get_base_layer().weight
        device = weight.device if weight.device.type != "meta" else None
        (shape_a,), (shape_b,) = adapter_tensor_shapes(self.in_features, self.out_features, qcfg.r_max,
                                                       qcfg.update).values()
        A = torch.empty(shape_a, device=device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # peft's default LoRA init for A
        self.lora_dyA[adapter_name] = nn.Parameter(A)
        self.lora_dyB[adapter_name] = nn.Parameter(torch.zeros(shape_b, device=device))
        self.qdylora_configs[adapter_name] = qcfg
        self.r[adapter_name] = qcfg.r_max
        self.lora_alpha[adapter_name] = qcfg.alpha
        # peft's set_scale multiplies this; the forward reads the scale back as scaling * r_max
        self.scaling[adapter_name] = qcfg.alpha / qcfg.r_max
        self.lora_dropout[adapter_name] = nn.Dropout(qcfg.dropout) if qcfg.dropout > 0 else nn.Identity()
        if adapter_name == self._active_adapter or not self.active_adapters:
            self.set_adapter(adapter_name)

    @property
    def qdylora_config(self) -> QDyLoRAConfig:
        """The config of the active adapter."""
        return self.qdylora_configs[self._name()]

    def _name(self) -> str:
        return self.active_adapters[0] if self.active_adapters else next(iter(self.lora_dyA))

    def component_axes(self) -> list[tuple[nn.Parameter, int]]:
        """Each adapter tensor with the axis its rank components lie along (rows of A, columns of B)."""
        return [(p, 0) for p in self.lora_dyA.values()] + [(p, 1) for p in self.lora_dyB.values()]

    @torch.no_grad()
    def factors(self, adapter_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All r_max components as (A [r_max, in], B [out, r_max]), detached copies (gathered whole under FSDP:
        then every process must call it)."""
        name = adapter_name or self._name()
        return full(self.lora_dyA[name]).detach().clone(), full(self.lora_dyB[name]).detach().clone()

    @torch.no_grad()
    def set_factors(self, A: torch.Tensor, B: torch.Tensor, adapter_name: str | None = None) -> None:
        """Copy A [r_max, in] and B [out, r_max] into the adapter's storage, exactly."""
        name = adapter_name or self._name()
        want_a, want_b = tuple(self.lora_dyA[name].shape), tuple(self.lora_dyB[name].shape)
        if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
            raise ValueError(f"A{tuple(A.shape)} B{tuple(B.shape)} do not fit A{want_a} B{want_b} "
                             f"(r_max={self.qdylora_configs[name].r_max}, in={self.in_features}, "
                             f"out={self.out_features})")
        for param, value in ((self.lora_dyA[name], A), (self.lora_dyB[name], B)):
            mine = local(param)  # under FSDP: the rows this process holds
            mine.copy_(value.narrow(0, row_offset(param), mine.shape[0]))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        name = self._name()
        cfg = self.qdylora_configs[name]
        ranks = 0 if self.disable_adapters or not self.active_adapters else self.rank
        alpha = self.scaling[name] * self.r[name]
        A, update = self.lora_dyA[name], cfg.update
        training = self.training and torch.is_grad_enabled()
        if update == "matryoshka":
            if training and not (isinstance(ranks, int) and ranks == 0):
                # every component, weighted by P_i; with the op's nested masks at rank r_max (scale alpha/r_max)
                weights = matryoshka_weights(cfg).to(A.device, A.dtype) / (cfg.alpha / cfg.r_max)
                A, ranks = A * weights[:, None], cfg.r_max
            update = "nested"
        r_alloc = max(1, int(ranks.max()) if isinstance(ranks, torch.Tensor) else int(ranks))
        if update == "even":
            if training:
                r_alloc = cfg.r_max  # the op's 'even' gradient scale is alpha / (the components it is given)
            else:
                update = "nested"
        dropout = self.lora_dropout[name]
        x_lora = dropout(x) if isinstance(dropout, nn.Dropout) and self.training else None
        if self.svd_sorted:
            alpha, x_lora = self._sorted_scale(x, x_lora, ranks, alpha, cfg.r_max)
        weight, quant_state = packed_nf4(base)
        dtype = getattr(base, "compute_dtype", None) or x.dtype
        observe = None
        if training and self.observe is not None:
            observe = functools.partial(self.observe, ranks)  # the ranks of this forward, whatever runs next
        # bnb's Linear4bit computes in its compute dtype; do the same so both paths agree.
        # Rank 0 (adapters disabled) still runs our op, so base-only and adapter outputs share one path.
        y = qdylora_linear(
            x.to(dtype), weight, quant_state, base.bias, A[:r_alloc], self.lora_dyB[name][:, :r_alloc], ranks,
            alpha, update, None if x_lora is None else x_lora.to(dtype), self.backend, observe,
        )
        return y.to(x.dtype)

    @staticmethod
    def _sorted_scale(x, x_lora, ranks, alpha: float, r_max: int):
        """(alpha, x_lora) that make the op's per-row scale alpha/b come out as alpha/r_max (svd-sorted components):
        one rank folds b/r_max into alpha, per-row ranks into each row of the low-rank path's input."""
        if isinstance(ranks, int):
            return alpha * ranks / r_max, x_lora
        xl = x if x_lora is None else x_lora
        rows = xl.reshape(-1, xl.shape[-1])
        r = row_ranks(ranks, rows.shape[0], xl.device).to(rows.dtype)
        return alpha, (rows * (r / r_max)[:, None]).reshape(xl.shape)

    def set_rank(self, rank: int | torch.Tensor) -> None:
        """Rank for the next forward passes: an int, or one per batch element / row (per-row ranks)."""
        self.rank = rank

    def merge(self, *args, **kwargs) -> None:
        raise NotImplementedError("merging into a 4-bit base is lossy; export a peft adapter instead")

    def __repr__(self) -> str:
        c = self.qdylora_config
        return f"qdylora.{super().__repr__()}[r={c.r_min}..{c.r_max}, update={c.update}]"
