"""qdylora: dynamic-rank LoRA (DyLoRA) fine-tuning on a frozen 4-bit NF4 base.

Data path: load_model_and_tokenizer -> attach_adapters -> train_model -> set_rank / sweep -> export_peft.
"""

import importlib

from .adapter_io import export_peft, load_adapter, save_adapter
from .config import ConfigError, QDyLoRAConfig
from .model import attach_adapters, dylora_layers, set_backend, set_rank
from .quantize import load_quantized_model, quantize_model
from .rank_sampler import RankSampler

__all__ = [
    "QDyLoRAConfig", "ConfigError", "RankSampler", "load_quantized_model", "quantize_model", "attach_adapters",
    "set_rank", "set_backend", "dylora_layers", "save_adapter", "load_adapter", "export_peft",
    "load_model_and_tokenizer", "train", "train_model", "TrainConfig",
]


def __getattr__(name):
    # heavy modules (transformers' Trainer, datasets) load only when asked for
    # import_module, not `from . import`: the latter asks this __getattr__ for the name again (recursion)
    if name in ("train", "train_model", "TrainConfig"):
        module = importlib.import_module(".train", __name__)
        return module if name == "train" else getattr(module, name)
    if name == "load_model_and_tokenizer":
        return importlib.import_module(".defaults", __name__).load_model_and_tokenizer
    raise AttributeError(name)
