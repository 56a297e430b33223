"""Per-row ranks and their masks: what every backend of the op shares (plain PyTorch, no Triton)."""

from __future__ import annotations

import torch


def row_ranks(ranks: int | torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    """Per-row rank vector (int64, shape [rows]) from an int or a tensor of shape [rows] or [batch]."""
    if isinstance(ranks, int):
        return torch.full((rows,), ranks, dtype=torch.long, device=device)
    r = ranks.to(device=device, dtype=torch.long).reshape(-1)
    if r.numel() == rows:
        return r
    if r.numel() > 0 and rows % r.numel() == 0:
        # one rank per sequence of a [batch, seq, in] input, flattened row-major
        return r.repeat_interleave(rows // r.numel())
    raise ValueError(f"got {r.numel()} ranks for {rows} rows; give one rank, one per row, or one per batch element")


def rank_masks(ranks: torch.Tensor, r_alloc: int, alpha: float, update: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward mask scaled by alpha/r, gradient mask), both [rows, r_alloc] float32.

    The gradient mask (what dA and dB see) per update rule: 'frozen' - component r-1 at alpha/r; 'nested' -
    components < r at alpha/r (the true gradient); 'even' - components < r at alpha/r_alloc, so every row
    weighs alike on the components it shares with the others (callers pass all r_max components).
    """
    k = torch.arange(r_alloc, device=ranks.device)
    # rank 0 means "base model only" (no adapter) for that row
    scale = torch.where(ranks > 0, alpha / ranks.clamp(min=1).to(torch.float32), 0.0)[:, None]
    inside = (k[None, :] < ranks[:, None]).to(torch.float32)
    fwd = inside * scale
    if update == "frozen":
        grad = (k[None, :] == (ranks[:, None] - 1)).to(torch.float32) * scale
    elif update == "nested":
        grad = fwd
    elif update == "even":
        grad = inside * (alpha / r_alloc)
    else:
        raise ValueError(f"update={update!r}; use 'frozen', 'nested' or 'even'")
    return fwd, grad
