"""Exact-match accuracy on the embedded default task (qdylora.data.embedded_task), per rank."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..data.embedded_task import default_splits
from .loss import LossResult, evaluate_examples, encode_records

# The held-out answers are a few tokens; no example comes near this, so none is cut.
EXACT_MATCH_MAX_LEN = 10_000


def default_records(n: int = 64, seed: int = 0) -> list[dict]:
    """The default task's held-out records (disjoint from what `qdylora train` trains on by default)."""
    return default_splits(n_eval=n, seed=seed)[1]


def evaluate_exact_match(model: nn.Module, tokenizer, records: Sequence[dict] | None = None,
                         ranks: Sequence[int] | None = None, **kwargs) -> dict[int | None, LossResult]:
    """Exact match (greedy answer == output + EOS, checked teacher-forced) and response loss per rank."""
    records = default_records() if records is None else records
    examples = encode_records(records, tokenizer, EXACT_MATCH_MAX_LEN)
    return evaluate_examples(model, tokenizer, examples, ranks, desc="exact match", **kwargs)
