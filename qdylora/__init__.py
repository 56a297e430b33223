"""qdylora: dynamic-rank LoRA (DyLoRA) fine-tuning on a frozen 4-bit NF4 base.

Data path: load_model_and_tokenizer -> attach_adapters -> train_model -> set_rank / sweep -> export_peft.
"""

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
    if name in ("train", "train_model", "TrainConfig"):
        from . import train as _train

        return getattr(_train, name)
    if name == "load_model_and_tokenizer":
        from .defaults import load_model_and_tokenizer

        return load_model_and_tokenizer
    raise AttributeError(name)
