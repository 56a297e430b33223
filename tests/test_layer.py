"""DyLoRA layer: outputs against a hand computation, gradients per update mode, frozen really freezes."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from conftest import tiny_nf4
from qdylora.adapters.config import QDyLoRAConfig
from qdylora.adapters.attach import attach_adapters, dylora_layers, set_rank
from qdylora.ops.reference import dequantize_nf4


def _model(update="frozen", r_max=64, alpha=16.0, seed=0, **kw):
    model = attach_adapters(tiny_nf4(seed), QDyLoRAConfig(r_max=r_max, alpha=alpha, update=update, **kw))
    g = torch.Generator().manual_seed(seed + 1)
    for layer in dylora_layers(model):  # LoRA starts with B = 0; give B values so every term shows
        for p in layer.lora_dyB["default"]:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _hand(layer, x, b):
    """base(x) + (alpha/b) * B[:, :b] @ A[:b] @ x, with W dequantized by bitsandbytes."""
    base = layer.get_base_layer()
    W = dequantize_nf4(base.weight.data, base.weight.quant_state).float()
    A, B = layer.factors()
    A, B = A[:b], B[:, :b]
    y = x @ W.t() + (layer.qdylora_config.alpha / b) * (x @ A.t()) @ B.t()
    return y + base.bias if base.bias is not None else y


@pytest.mark.parametrize("rank", [1, 2, 17, 63, 64])
def test_layer_matches_hand_computation(rank):
    model = _model()
    set_rank(model, rank)
    layer = dylora_layers(model)[0]
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _hand(layer, x, rank), rtol=1e-5, atol=1e-5)


def test_lora_init_b_zero_gives_base_output():
    model = attach_adapters(tiny_nf4(), QDyLoRAConfig(r_max=8))
    layer = dylora_layers(model)[0]
    x = torch.randn(4, layer.in_features)
    for r in (1, 8):
        set_rank(model, r)
        torch.testing.assert_close(layer(x), layer.get_base_layer()(x))


def test_per_row_ranks_match_separate_ranks():
    model = _model()
    layer = dylora_layers(model)[0]
    x = torch.randn(3, 4, layer.in_features)
    ranks = torch.tensor([1, 17, 64])
    layer.set_rank(ranks)
    with torch.no_grad():
        y = layer(x)
        for i, r in enumerate(ranks.tolist()):
            torch.testing.assert_close(y[i], _hand(layer, x[i], r), rtol=1e-5, atol=1e-5)


def _grads(model, rank):
    set_rank(model, rank)
    model.train()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids).loss.backward()
    layer = dylora_layers(model)[0]
    rows, cols = layer.lora_dyA["default"], layer.lora_dyB["default"]
    if len(rows) > 1:  # frozen: one parameter per component
        return [p.grad for p in rows], [p.grad for p in cols]
    # nested: one [r_max, in] / [out, r_max] parameter per matrix
    return list(rows[0].grad), list(cols[0].grad.t())


@pytest.mark.parametrize("rank", [1, 5, 64])
def test_frozen_mode_only_component_b_gets_gradient(rank):
    ga, gb = _grads(_model("frozen"), rank)
    for i in range(64):
        if i == rank - 1:
            assert ga[i] is not None and ga[i].abs().sum() > 0
            assert gb[i] is not None and gb[i].abs().sum() > 0
        else:
            assert ga[i] is None and gb[i] is None, f"component {i} got a gradient at rank {rank}"


@pytest.mark.parametrize("rank", [1, 5, 64])
def test_nested_mode_gradients_stop_at_rank(rank):
    ga, gb = _grads(_model("nested"), rank)
    for i in range(64):
        if i < rank:
            assert ga[i] is not None and ga[i].abs().sum() > 0
            assert gb[i] is not None and gb[i].abs().sum() > 0
        else:
            assert not ga[i].any() and not gb[i].any(), f"component {i} got a gradient at rank {rank}"


def test_nested_mode_stores_one_tensor_per_matrix():
    """Nested mode needs no per-component exactness, so each matrix is one optimizer tensor (like peft)."""
    layer = dylora_layers(_model("nested", r_max=16))[0]
    (a,), (b,) = layer.lora_dyA["default"], layer.lora_dyB["default"]
    assert a.shape == (16, layer.in_features) and b.shape == (layer.out_features, 16)
    A, B = layer.factors()
    assert torch.equal(A, a) and torch.equal(B, b)


def test_frozen_gradient_equals_autograd_of_hand_formula():
    """The gradient that component b receives equals plain autograd through the hand formula."""
    model = _model("frozen", r_max=8)
    rank = 5
    set_rank(model, rank)
    model.train()
    layer = dylora_layers(model)[0]
    x = torch.randn(6, layer.in_features)
    g = torch.randn(6, layer.out_features)
    (layer(x) * g).sum().backward()
    A, B = (t.requires_grad_(True) for t in layer.factors())
    base = layer.get_base_layer()
    W = dequantize_nf4(base.weight.data, base.weight.quant_state)
    y = x @ W.t() + (16.0 / rank) * (x @ A[:rank].t()) @ B[:, :rank].t()
    (y * g).sum().backward()
    torch.testing.assert_close(layer.lora_dyA["default"][rank - 1].grad, A.grad[rank - 1])
    torch.testing.assert_close(layer.lora_dyB["default"][rank - 1].grad, B.grad[:, rank - 1])


@pytest.mark.parametrize("optim", ["torch_adamw", "bnb_paged_adamw32", "bnb_adamw8"])
def test_frozen_rows_unchanged_bit_for_bit_after_optimizer_steps(optim):
    model = _model("frozen", r_max=16)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = {
        "torch_adamw": lambda: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
        "bnb_paged_adamw32": lambda: bnb.optim.PagedAdamW32bit(params, lr=1e-2, weight_decay=0.1),
        "bnb_adamw8": lambda: bnb.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.1, min_8bit_size=1),
    }[optim]()
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    model.train()
    for step, rank in enumerate([3, 7, 3, 12]):
        layers = dylora_layers(model)
        before = [([p.detach().clone() for p in l.lora_dyA["default"]],
                   [p.detach().clone() for p in l.lora_dyB["default"]]) for l in layers]
        set_rank(model, rank)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for l, (A0, B0) in zip(layers, before):
            for i in range(16):
                a, b = l.lora_dyA["default"][i], l.lora_dyB["default"][i]
                if i == rank - 1:
                    assert not torch.equal(a, A0[i]), f"step {step}: sampled component {i} did not move"
                else:
                    assert torch.equal(a, A0[i]) and torch.equal(b, B0[i]), \
                        f"step {step}: component {i} moved at rank {rank} ({optim})"


def test_set_rank_rejects_out_of_range():
    from qdylora.adapters.config import ConfigError

    model = attach_adapters(tiny_nf4(), QDyLoRAConfig(r_min=2, r_max=8))
    for bad in (0, 1, 9, -3):
        with pytest.raises(ConfigError, match=r"outside this adapter's range \[2, 8\]"):
            set_rank(model, bad)


def test_dropout_applies_only_in_training():
    model = _model("nested", r_max=8, dropout=0.5)
    layer = dylora_layers(model)[0]
    set_rank(model, 8)
    x = torch.randn(4, layer.in_features)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _hand(layer, x, 8), rtol=1e-5, atol=1e-5)
    model.train()
    torch.manual_seed(0)
    y = layer(x)
    assert not torch.allclose(y, _hand(layer, x, 8), atol=1e-4)
    y.sum().backward()  # gradients flow through the dropout branch
    assert layer.lora_dyA["default"][0].grad is not None
