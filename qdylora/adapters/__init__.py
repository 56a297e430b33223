"""Dynamic-rank adapters: the config, the peft layer, attaching them to a 4-bit model, rank draws, files and export."""

from .attach import attach_adapters, dylora_layers, set_backend, set_rank
from .config import QDyLoRAConfig
from .export import export_peft
from .files import load_adapter, save_adapter
from .layer import DyLoRALinear
from .rank_sampler import RankSampler
from .svd_sort import sort_adapter, sort_components

__all__ = ["DyLoRALinear", "QDyLoRAConfig", "RankSampler", "attach_adapters", "dylora_layers", "export_peft",
           "load_adapter", "save_adapter", "set_backend", "set_rank", "sort_adapter", "sort_components"]
