"""Held-out token loss (response tokens only) and teacher-forced exact match, per rank.

Examples are formatted and tokenized exactly as for training (qdylora.data), so the loss is the
training objective on unseen data. One forward pass yields, per example: the summed negative
log-likelihood of the response tokens, their count, how many the model's argmax predicts, and
whether it predicts all of them (= greedy decoding reproduces the answer exactly, EOS included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.examples import IGNORE_INDEX, format_example, tokenize_example
from ..errors import DataError
from .common import (check_ranks, logits_at, length_batches, model_device, pad_batch, progress_bar,
                     ranks_restored, run_ranks)


@dataclass
class LossResult:
    """Mean response-token loss (and perplexity), token accuracy and exact match of one model / rank."""

    loss: float
    perplexity: float
    token_accuracy: float
    exact_match: float
    n: int
    n_tokens: int
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"loss": self.loss, "perplexity": self.perplexity, "token_accuracy": self.token_accuracy,
                "exact_match": self.exact_match, "n": self.n, "n_tokens": self.n_tokens, "seconds": self.seconds}


def encode_records(records: Sequence[dict], tokenizer, max_seq_len: int) -> list[dict[str, list[int]]]:
    """Tokenized examples (input_ids, labels with the prompt masked) as training builds them; skips those with no response token."""
    out = [tokenize_example(*format_example(r, tokenizer), tokenizer, max_seq_len) for r in records]
    out = [e for e in out if e is not None]
    if not out:
        raise DataError(f"no held-out example has a response token within max_seq_len={max_seq_len}")
    return out


def response_sums(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[rows, 3]: per row the summed NLL of the response tokens, their count, and how many argmax predicts.

    Differentiable in the NLL column when gradients are enabled.
    """
    target = labels[:, 1:]  # token t+1 is predicted at position t
    # a label counts only if a real token predicts it: with left padding the first token's
    # label would otherwise be "predicted" from a pad position
    valid = (target != IGNORE_INDEX) & mask[:, :-1].bool()
    at = torch.cat([valid, torch.zeros_like(valid[:, :1])], dim=1)  # the positions that predict a response token
    sel = logits_at(model, ids, mask, at).float()  # [n_response_tokens, vocab], row-major like target[valid]
    tgt = target[valid]
    nll = F.cross_entropy(sel, tgt, reduction="none")
    hit = (sel.argmax(-1) == tgt).float()
    row = valid.nonzero()[:, 0]
    sums = torch.zeros(ids.shape[0], 3, device=ids.device)
    sums = sums.index_add(0, row, torch.stack([nll, torch.ones_like(nll), hit], dim=1))
    return sums


def evaluate_examples(model: nn.Module, tokenizer, examples: Sequence[dict[str, list[int]]],
                      ranks: Sequence[int] | None = None, batch_size: int = 4, batched_ranks: bool = False,
                      padding_side: str | None = None, progress=True, desc: str = "loss") -> dict[int | None, LossResult]:
    """LossResult per rank (0 = base without adapter; ranks=None: the model as it is) on tokenized examples."""
    ranks = check_ranks(model, ranks)
    side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = model_device(model)
    batches = length_batches([len(e["input_ids"]) for e in examples], batch_size)
    keys = ranks if ranks is not None else [None]
    rows: dict = {r: [None] * len(examples) for r in keys}
    seconds: dict = {}
    per_batch = 1 if batched_ranks or ranks is None else len(keys)
    bar, own_bar = progress_bar(progress, len(batches) * per_batch, desc)

    with ranks_restored(model), torch.no_grad():
        for batch in batches:
            ids, mask = pad_batch([examples[i]["input_ids"] for i in batch], pad_id, side, device)
            labels, _ = pad_batch([examples[i]["labels"] for i in batch], IGNORE_INDEX, side, device)

            def fn(ids_, mask_):
                return response_sums(model, ids_, mask_, labels.repeat(ids_.shape[0] // labels.shape[0], 1)).cpu()

            for r, out in run_ranks(model, ids, mask, ranks, batched_ranks, fn, seconds).items():
                for j, i in enumerate(batch):
                    rows[r][i] = out[j]
                if per_batch > 1 and bar is not None:
                    bar.update(1)
            if per_batch == 1 and bar is not None:
                bar.update(1)
    if own_bar:
        bar.close()
    return {r: _summarise(torch.stack(rows[r]), seconds.get(r, 0.0)) for r in keys}


def evaluate_loss(model: nn.Module, tokenizer, records: Sequence[dict], ranks: Sequence[int] | None = None,
                  max_seq_len: int = 512, **kwargs) -> dict[int | None, LossResult]:
    """Held-out loss per rank on alpaca / text / chat records (response tokens only)."""
    return evaluate_examples(model, tokenizer, encode_records(records, tokenizer, max_seq_len), ranks, **kwargs)


def _summarise(rows: torch.Tensor, seconds: float) -> LossResult:
    nll, count, hits = rows[:, 0], rows[:, 1], rows[:, 2]
    total = float(count.sum())
    loss = float(nll.sum()) / total
    return LossResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), token_accuracy=float(hits.sum()) / total,
                      exact_match=float((hits == count).float().mean()), n=rows.shape[0], n_tokens=int(total),
                      seconds=seconds)
