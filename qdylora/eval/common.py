"""Evaluation plumbing shared by the tasks: ranks (0 = base model only), per-row rank batching, padding."""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from tqdm.auto import tqdm

from ..adapters.attach import dylora_layers, qdylora_config_of
from ..errors import ConfigError

BASE_RANK = 0  # rank 0 runs the base model without adapter (the sweep's reference line)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless stub)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def check_ranks(model: nn.Module, ranks: Sequence[int] | None) -> list[int] | None:
    """Validate ranks against the model's adapters (0 = base is always allowed); None = evaluate as is."""
    if ranks is None:
        return None
    ranks = [int(r) for r in ranks]
    if not ranks:
        raise ConfigError("no ranks to evaluate; give at least one, e.g. --ranks 1,8,64")
    if len(set(ranks)) != len(ranks):
        raise ConfigError(f"ranks {ranks} contain duplicates; give each rank once")
    if any(r != BASE_RANK for r in ranks):
        cfg = qdylora_config_of(model)
        for r in ranks:
            if r != BASE_RANK:
                cfg.check_rank(r)
    return ranks


def apply_rank(model: nn.Module, rank: int | torch.Tensor) -> None:
    """Like model.set_rank, but rank 0 (base only, per row or for all) is allowed too."""
    # set_rank() validates through check_rank, which (rightly, for users) refuses 0; the sweep
    # needs rank-0 rows for the base-model reference inside one batched pass, so set layers directly.
    layers = dylora_layers(model)
    if not layers:
        if isinstance(rank, torch.Tensor) or rank != BASE_RANK:
            raise ValueError("this model has no qdylora adapters, so it has no ranks to switch")
        return
    for layer in layers:
        layer.set_rank(rank)


@contextlib.contextmanager
def ranks_restored(model: nn.Module) -> Iterator[None]:
    """Put back each layer's rank (and the train/eval mode) after an evaluation."""
    layers = dylora_layers(model)
    saved = [layer.rank for layer in layers]
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        for layer, r in zip(layers, saved):
            layer.set_rank(r)
        model.train(was_training)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right",
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token lists padded to the longest, on the `side` given."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side {side!r}; use 'left' or 'right'")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids.to(device), mask.to(device)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded row sees the same positions as a right-padded one."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (works for left and right padding)."""
    idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, -1).max(dim=1).values


def accepts(model: nn.Module, name: str) -> bool:
    """Whether the underlying model's forward takes keyword `name` (e.g. logits_to_keep)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return name in params


def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, keep: int | None) -> torch.Tensor:
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask), "use_cache": False}
    if keep is not None:
        kwargs["logits_to_keep"] = keep
    return model(**kwargs).logits


def forward_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                   keep: int | None = None) -> torch.Tensor:
    """Logits [rows, positions, vocab]; with `keep`, only the last `keep` positions (cheaper LM head)."""
    if keep is not None and not accepts(model, "logits_to_keep"):
        keep = None
    logits = _logits(model, ids, mask, keep)
    if keep is None and logits.shape[1] != ids.shape[1]:
        raise RuntimeError(f"model returned logits for {logits.shape[1]} positions, expected {ids.shape[1]}")
    return logits


def logits_at(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Logits [n, vocab] of the positions marked in `at` (bool [rows, positions]), in row-major order.

    The LM head runs on those positions alone (a pre-hook picks them from its input): on a 50k-token vocabulary
    the head is a fifth of a small model's work, and a loss needs it at the response tokens only.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    picked = []

    def pick(_module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].shape[:2] == at.shape:
            picked.append(True)
            return (args[0][at],) + tuple(args[1:])
        return None

    handle = head.register_forward_pre_hook(pick) if isinstance(head, nn.Module) else None
    if handle is None:
        first = int(at.any(0).float().argmax()) if bool(at.any()) else at.shape[1] - 1
        logits = forward_logits(model, ids, mask, keep=at.shape[1] - first)
    else:
        try:
            logits = _logits(model, ids, mask, None)
        finally:
            handle.remove()
        if picked:
            return logits.reshape(-1, logits.shape[-1])
    # no head found, or it was not called on [rows, positions, hidden]: select from the (trimmed) logits
    return logits[at[:, at.shape[1] - logits.shape[1]:]]


def length_batches(lengths: Sequence[int], batch_size: int, pass_cost: int = 0) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (memory trouble shows at once).

    pass_cost 0: batches of batch_size in that order. pass_cost > 0: the same order cut into batches of at most
    batch_size that minimise the padded tokens (rows x longest) plus pass_cost tokens per batch, a forward pass's
    fixed work (dequantizing every weight) in tokens.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if pass_cost <= 0:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    # best[j]: the cheapest cut of order[:j]; a batch order[i:j] pads to lengths[order[i]], its longest
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(max(0, j - batch_size), j):
            cost = best[i] + (j - i) * lengths[order[i]] + pass_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], len(order)
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    return [order[i:j] for i, j in reversed(bounds)]


def run_ranks(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, ranks: list[int] | None,
              batched: bool, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              seconds: dict) -> dict:
    """fn(ids, mask) -> per-row results, once per rank; batched: all ranks in one pass with per-row ranks.

    Returns {rank: rows}; `seconds[rank]` accumulates wall time (a batched pass is shared evenly).
    ranks=None evaluates the model as it is (key None), e.g. a plain peft LoRA model.
    """
    if ranks is None:
        t = time.perf_counter()
        out = {None: fn(ids, mask)}
        seconds[None] = seconds.get(None, 0.0) + time.perf_counter() - t
        return out
    if batched and len(ranks) > 1:
        n = ids.shape[0]
        t = time.perf_counter()
        # one rank per batch element: copy i of the batch runs at ranks[i]
        apply_rank(model, torch.tensor(ranks, device=ids.device).repeat_interleave(n))
        rows = fn(ids.repeat(len(ranks), 1), mask.repeat(len(ranks), 1))
        dt = (time.perf_counter() - t) / len(ranks)
        for r in ranks:
            seconds[r] = seconds.get(r, 0.0) + dt
        return {r: rows[i * n:(i + 1) * n] for i, r in enumerate(ranks)}
    out = {}
    for r in ranks:
        t = time.perf_counter()
        apply_rank(model, r)
        out[r] = fn(ids, mask)
        seconds[r] = seconds.get(r, 0.0) + time.perf_counter() - t
    return out


def progress_bar(progress, total: int, desc: str):
    """(bar or None, whether we own it): progress=True makes a bar, a tqdm instance is reused."""
    if isinstance(progress, tqdm):
        progress.total = (progress.total or 0) + total
        progress.refresh()
        return progress, False
    if progress:
        return tqdm(total=total, desc=desc, dynamic_ncols=True), True
    return None, False
