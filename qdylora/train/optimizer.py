"""Optimizer choice: the transformers optimizer name for `--optim`."""

from __future__ import annotations

import torch


def resolve_optim(optim: str) -> str:
    """The transformers optimizer name for `optim` ('auto': paged AdamW 32-bit on CUDA, torch AdamW on CPU)."""
    if optim != "auto":
        return optim
    return "paged_adamw_32bit" if torch.cuda.is_available() else "adamw_torch"
