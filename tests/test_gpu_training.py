"""On CUDA: the Triton path inside a real model agrees with the reference path, and training runs in bf16."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from qdylora.adapters.config import QDyLoRAConfig
from qdylora.adapters.attach import attach_adapters, dylora_layers, set_backend, set_rank
from qdylora.load.model import load_quantized_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model(update="nested"):
    full = tiny_llama(0, vocab_size=512, hidden=256, layers=2).to(torch.bfloat16)
    model = attach_adapters(load_quantized_model(full, device="cuda"), QDyLoRAConfig(r_max=64, alpha=16, update=update))
    g = torch.Generator(device="cuda").manual_seed(1)
    for layer in dylora_layers(model):
        for p in layer.lora_dyB["default"]:
            p.data.copy_(torch.randn(p.shape, generator=g, device="cuda") * 0.05)
    return model


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("rank", [1, 17, 64])
def test_triton_and_reference_agree_in_a_model(rank):
    model = _model().eval()
    ids = torch.randint(0, 512, (3, 40), device="cuda")
    set_rank(model, rank)
    with torch.no_grad():
        set_backend(model, "reference")
        ref = model(ids).logits
        set_backend(model, "triton")
        out = model(ids).logits
    assert _rel(out, ref) < 2e-2


@pytest.mark.parametrize("update", ["frozen", "nested"])
def test_triton_gradients_match_reference(update):
    model = _model(update).train()
    ids = torch.randint(0, 512, (2, 64), device="cuda")
    set_rank(model, 9)
    grads = {}
    for backend in ("reference", "triton"):
        set_backend(model, backend)
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["reference"].keys() == grads["triton"].keys() and grads["triton"]
    worst = max(_rel(grads["triton"][n], grads["reference"][n]) for n in grads["reference"])
    assert worst < 5e-2, worst


def test_bf16_training_on_gpu_with_paged_adamw(tmp_path):
    from datasets import Dataset

    from qdylora.train import TrainConfig, read_log, train_model

    model = _model("frozen")
    ids = torch.randint(0, 512, (32, 48)).tolist()
    ds = Dataset.from_list([{"input_ids": x, "labels": x, "attention_mask": [1] * 48} for x in ids])
    cfg = TrainConfig(max_steps=6, batch_size=4, save_steps=3, optim="paged_adamw_32bit", learning_rate=1e-3)
    train_model(model, None, ds, cfg, tmp_path / "run")
    log = read_log(tmp_path / "run")
    assert len(log) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert (tmp_path / "run" / "checkpoint-6" / "adapter" / "qdylora_adapter.safetensors").exists()
