"""Training: transformers' Trainer over qdylora adapters, a run folder with safe checkpoints, exact resume.

Heavy modules (transformers' Trainer) load on first use, so `qdylora plan` and the config stay light.
"""

import importlib

from ..errors import TrainingError
from .config import OPTIMIZERS, TrainConfig

_LAZY = {"train": ".run", "train_model": ".trainer", "NonFiniteLoss": ".trainer", "QDyLoRATrainer": ".trainer",
         "read_log": ".run_folder"}

__all__ = ["OPTIMIZERS", "TrainConfig", "TrainingError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)
