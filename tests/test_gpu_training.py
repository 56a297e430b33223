"""On CUDA: the Triton path inside a real model agrees with the reference path, and training runs in bf16.

Marked `gpu`. `scripts/gpu_check.sh --rehearse` also runs this file on the CPU
(QDYLORA_GPU_TESTS_ON_CPU=1 with TRITON_INTERPRET=1: the kernels in the interpreter, fp32, a
smaller model), so the tests' own code is exercised before a GPU is ever lent.
"""

from __future__ import annotations

import os

import pytest
import torch

from helpers import tiny_llama
from qdylora.adapters.attach import attach_adapters, dylora_layers, set_backend, set_rank
from qdylora.adapters.config import QDyLoRAConfig
from qdylora.load.model import load_quantized_model
from qdylora.ops import selfcheck

CUDA = torch.cuda.is_available()
ON_CPU = not CUDA and os.environ.get("QDYLORA_GPU_TESTS_ON_CPU") == "1" and os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# the model: real sizes on the GPU; in the interpreter a smaller one (same code)
SIZE = dict(vocab_size=512, hidden=256, layers=2) if CUDA else dict(vocab_size=128, hidden=64, layers=1)
VOCAB = SIZE["vocab_size"]
TOL = 2e-2 if CUDA else 1e-4

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (CUDA or ON_CPU), reason="needs CUDA")]


def _model(update="nested", dropout=0.0):
    full = tiny_llama(0, **SIZE).to(DTYPE)
    model = attach_adapters(load_quantized_model(full, device=DEVICE),
                            QDyLoRAConfig(r_max=64, alpha=16, update=update, dropout=dropout))
    g = torch.Generator(device=DEVICE).manual_seed(1)
    for layer in dylora_layers(model):
        for p in layer.lora_dyB["default"]:
            p.data.copy_(torch.randn(p.shape, generator=g, device=DEVICE) * 0.05)
    return model


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def _kernels_were_used():
    """Every self-check verdict so far passed (else the 'triton' runs were the reference)."""
    checks = selfcheck.report()
    assert checks and all(c["ok"] for c in checks), checks


@pytest.mark.parametrize("rank", [1, 17, 64])
def test_triton_and_reference_agree_in_a_model(rank):
    model = _model().eval()
    ids = torch.randint(0, VOCAB, (3, 40), device=DEVICE)
    set_rank(model, rank)
    with torch.no_grad():
        set_backend(model, "reference")
        ref = model(ids).logits
        set_backend(model, "triton")
        out = model(ids).logits
    assert _rel(out, ref) < TOL
    _kernels_were_used()


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["plain", "dropout"])
@pytest.mark.parametrize("update", ["frozen", "nested"])
def test_triton_gradients_match_reference(update, dropout):
    """Gradients of every adapter tensor through a whole model, both update modes, with and without
    dropout (the kernels' separate low-rank input); the same dropout masks for both backends."""
    model = _model(update, dropout).train()
    ids = torch.randint(0, VOCAB, (2, 64), device=DEVICE)
    set_rank(model, 9)
    grads = {}
    for backend in ("reference", "triton"):
        set_backend(model, backend)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        model(input_ids=ids, labels=ids).loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["reference"].keys() == grads["triton"].keys() and grads["triton"]
    if update == "frozen":  # rank 9: only component 9 (index 8) of each matrix gets a gradient
        assert all(n.endswith(".8") for n in grads["triton"]), sorted(grads["triton"])[:4]
    worst = max(_rel(grads["triton"][n], grads["reference"][n]) for n in grads["reference"])
    assert worst < (5e-2 if CUDA else 1e-3), worst
    _kernels_were_used()


def test_bf16_training_on_gpu_with_paged_adamw(tmp_path):
    from qdylora.train import TrainConfig, read_log, train_model

    model = _model("frozen")
    set_backend(model, "triton")  # forced: a failed self-check raises instead of silently training the reference
    seq = 48 if CUDA else 16
    ids = torch.randint(0, VOCAB, (32, seq)).tolist()
    # a list of equal-length examples: the Trainer needs no `datasets` (absent on the GPU image)
    ds = [{"input_ids": x, "labels": x, "attention_mask": [1] * seq} for x in ids]
    steps = 6 if CUDA else 2
    cfg = TrainConfig(max_steps=steps, batch_size=4, save_steps=3 if CUDA else 2, optim="paged_adamw_32bit",
                      learning_rate=1e-3)
    train_model(model, None, ds, cfg, tmp_path / "run")
    log = read_log(tmp_path / "run")
    assert len(log) == steps and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert (tmp_path / "run" / f"checkpoint-{steps}" / "adapter" / "qdylora_adapter.safetensors").exists()
    _kernels_were_used()
