"""Calibration data and the loss of many rank configurations in few forward passes.

A configuration is one rank per adapted module (0 = off). Several configurations run in one pass:
the calibration batch is repeated once per configuration and every layer gets per-row ranks (copy i
of the batch runs at configuration i). `PrefixCache` lets a configuration that differs from a
reference only in decoder block l and later start at block l: the earlier blocks return the outputs
recorded in a pass at the reference.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from ..adapters.attach import module_layers
from ..data.examples import IGNORE_INDEX
from ..eval.common import length_batches, pad_batch
from ..eval.loss import encode_records, response_sums

# rows of one forward pass = configurations x examples; logits of this many tokens stay in memory
MAX_TOKENS_PER_PASS = 2048
# a forward and backward pass's fixed work (dequantizing every weight, per-module calls) in tokens: measured on
# SmolLM2-135M on one CPU thread, a batch split off saves time when it saves more padded tokens than this
PASS_COST_TOKENS = 64


@dataclass
class CalibBatch:
    """One padded batch of calibration examples (response tokens labelled, the rest IGNORE_INDEX)."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor

    @property
    def tokens(self) -> int:
        """Response tokens that count in the loss."""
        return int(((self.labels[:, 1:] != IGNORE_INDEX) & self.mask[:, :-1].bool()).sum())

    def repeated(self, copies: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, mask, labels) with the batch repeated `copies` times, configuration-major."""
        return self.ids.repeat(copies, 1), self.mask.repeat(copies, 1), self.labels.repeat(copies, 1)


def calibration_batches(records: Sequence[dict], tokenizer, max_seq_len: int, batch_size: int,
                        device: torch.device | None = None) -> list[CalibBatch]:
    """Calibration records tokenized as training does, in batches of at most batch_size examples cut to waste
    the fewest padded tokens."""
    examples = encode_records(records, tokenizer, max_seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    side = getattr(tokenizer, "padding_side", "right") or "right"
    out = []
    for idx in length_batches([len(e["input_ids"]) for e in examples], batch_size, PASS_COST_TOKENS):
        ids, mask = pad_batch([examples[i]["input_ids"] for i in idx], pad_id, side, device)
        labels, _ = pad_batch([examples[i]["labels"] for i in idx], IGNORE_INDEX, side, device)
        out.append(CalibBatch(ids, mask, labels))
    return out


def set_row_ranks(layers: Sequence[nn.Module], configs: torch.Tensor, rows_per_config: int) -> None:
    """Layer j runs copy i of the batch at configs[i, j] (configs: [configurations, modules])."""
    for j, layer in enumerate(layers):
        layer.set_rank(configs[:, j].repeat_interleave(rows_per_config))


def batch_losses(model: nn.Module, batch: CalibBatch, configs: torch.Tensor,
                 layers: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL [P], response tokens [P]) of P configurations on one batch, in one forward pass."""
    n = batch.ids.shape[0]
    set_row_ranks(layers, configs, n)
    ids, mask, labels = batch.repeated(configs.shape[0])
    sums = response_sums(model, ids, mask, labels).double()
    per = sums[:, :2].reshape(configs.shape[0], n, 2).sum(1)
    return per[:, 0], per[:, 1]


def configs_per_pass(batch: CalibBatch) -> int:
    """How many configurations of this batch fit one pass (MAX_TOKENS_PER_PASS tokens)."""
    return max(1, MAX_TOKENS_PER_PASS // max(1, batch.ids.numel()))


@torch.no_grad()
def config_losses(model: nn.Module, batches: Sequence[CalibBatch], configs: torch.Tensor,
                  bar=None) -> torch.Tensor:
    """Mean response-token loss [P] of each configuration (row: a rank per module, in module order)."""
    layers = list(module_layers(model).values())
    nll = torch.zeros(configs.shape[0], dtype=torch.float64)
    count = torch.zeros_like(nll)
    for batch in batches:
        step = configs_per_pass(batch)
        for s in range(0, configs.shape[0], step):
            a, b = batch_losses(model, batch, configs[s:s + step], layers)
            nll[s:s + step] += a
            count[s:s + step] += b
            if bar is not None:
                bar.update(min(step, configs.shape[0] - s))
    return nll / count.clamp(min=1)


class _Cached(nn.Module):
    """Stands in for a decoder block: returns the output recorded at the reference, once per configuration."""

    def __init__(self, output, copies: int) -> None:
        super().__init__()
        self.output, self.copies = output, copies

    def forward(self, *args, **kwargs):
        return _repeat(self.output, self.copies)


def _repeat(obj, copies: int):
    if isinstance(obj, torch.Tensor):
        return obj.repeat(copies, *([1] * (obj.dim() - 1)))
    if isinstance(obj, tuple):
        return tuple(_repeat(o, copies) for o in obj)
    return obj


class PrefixCache:
    """The decoder blocks' outputs at a reference configuration, to start later passes at block l.

    Works when every adapted module lies in one nn.ModuleList of blocks (`model.layers.3.self_attn.q_proj`);
    otherwise `block_of` is 0 for every module and every pass runs from the start.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        found = [re.match(r"^(.*?)\.(\d+)\.", n) for n in names]
        prefixes = {m.group(1) for m in found if m}
        self.blocks: nn.ModuleList | None = None
        if all(found) and len(prefixes) == 1:
            container = base.get_submodule(prefixes.pop())
            if isinstance(container, nn.ModuleList):
                self.blocks = container
        self._block = [int(m.group(2)) if m and self.blocks is not None else 0 for m in found]
        self.outputs: list = []

    def block_of(self, module_index: int) -> int:
        """The decoder block module number `module_index` lies in (0 without a cache)."""
        return self._block[module_index]

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        """Record every block's output during the forward pass run inside."""
        self.outputs = []
        if self.blocks is None:
            yield
            return
        self.outputs = [None] * len(self.blocks)

        def hook(i):
            def save(_module, _args, output):
                self.outputs[i] = output
            return save

        handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(self.blocks)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def start_at(self, block: int, copies: int) -> Iterator[None]:
        """Inside, blocks < `block` return their recorded outputs (repeated `copies` times) instead of running."""
        if self.blocks is None or block == 0:
            yield
            return
        saved = [self.blocks[i] for i in range(block)]
        try:
            for i in range(block):
                self.blocks[i] = _Cached(self.outputs[i], copies)
            yield
        finally:
            for i, b in enumerate(saved):
                self.blocks[i] = b
