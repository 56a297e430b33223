"""qdylora: dynamic-rank LoRA (DyLoRA) fine-tuning on a frozen 4-bit NF4 base.

Data path, one folder each: load (model + NF4) -> data -> adapters -> train -> eval (sweeps) ->
memory (planning); export lives with the adapters. `qdylora.cli` is the command line.
"""

import importlib
import logging

# bitsandbytes announces at import that an optional CPU fast path (the hub package `kernels`) is missing;
# qdylora never uses that path (it keeps bitsandbytes' standard NF4 layout on the CPU), so the line is noise
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .adapters.attach import attach_adapters, dylora_layers, set_backend, set_rank
from .adapters.config import QDyLoRAConfig
from .adapters.export import export_peft
from .adapters.files import load_adapter, save_adapter
from .adapters.rank_sampler import RankSampler
from .adapters.svd_sort import sort_adapter, sort_components
from .errors import AdapterError, ConfigError, DataError, QDyLoRAError, TrainingError
from .load.model import load_model_and_tokenizer, load_quantized_model
from .load.quantize import quantize_model

__all__ = [
    "QDyLoRAConfig", "ConfigError", "DataError", "AdapterError", "TrainingError", "QDyLoRAError", "RankSampler",
    "load_quantized_model", "quantize_model", "attach_adapters", "set_rank", "set_backend", "dylora_layers",
    "save_adapter", "load_adapter", "export_peft", "sort_components", "sort_adapter", "load_model_and_tokenizer",
    "train", "train_model", "TrainConfig",
]


def __getattr__(name):
    # the Trainer (transformers, datasets) loads only when asked for
    if name in ("train_model", "TrainConfig"):
        return getattr(importlib.import_module(".train", __name__), name)
    raise AttributeError(name)
