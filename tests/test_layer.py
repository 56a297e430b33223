"""DyLoRA layer: outputs against a hand computation, gradients per update mode, frozen really freezes."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_nf4
from qdylora.adapters.config import QDyLoRAConfig
from qdylora.adapters.attach import attach_adapters, dylora_layers, set_rank
from qdylora.ops.reference import dequantize_nf4


def _model(update="frozen", r_max=64, alpha=16.0, seed=0, **kw):
    model = attach_adapters(tiny_nf4(seed), QDyLoRAConfig(r_max=r_max, alpha=alpha, update=update, **kw))
    g = torch.Generator().manual_seed(seed + 1)
    for layer in dylora_layers(model):  # LoRA starts with B = 0; give B values so every term shows
        B = layer.lora_dyB["default"]
        B.data.copy_(torch.randn(B.shape, generator=g) * 0.05)
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
    """Per-component gradients (rows of A's gradient, columns of B's) of one training step at `rank`."""
    set_rank(model, rank)
    model.train()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids).loss.backward()
    layer = dylora_layers(model)[0]
    return list(layer.lora_dyA["default"].grad), list(layer.lora_dyB["default"].grad.t())


@pytest.mark.parametrize("rank", [1, 5, 64])
def test_frozen_mode_only_component_b_gets_gradient(rank):
    ga, gb = _grads(_model("frozen"), rank)
    for i in range(64):
        if i == rank - 1:
            assert ga[i].abs().sum() > 0 and gb[i].abs().sum() > 0
        else:
            assert not ga[i].any() and not gb[i].any(), f"component {i} got a gradient at rank {rank}"


@pytest.mark.parametrize("rank", [1, 5, 64])
def test_nested_mode_gradients_stop_at_rank(rank):
    ga, gb = _grads(_model("nested"), rank)
    for i in range(64):
        if i < rank:
            assert ga[i].abs().sum() > 0 and gb[i].abs().sum() > 0
        else:
            assert not ga[i].any() and not gb[i].any(), f"component {i} got a gradient at rank {rank}"


@pytest.mark.parametrize("update", ["frozen", "nested", "matryoshka"])
def test_every_mode_stores_one_tensor_per_matrix(update):
    """One [r_max, in] A and one [out, r_max] B per linear, like peft; factors() reads them exactly."""
    layer = dylora_layers(_model(update, r_max=16))[0]
    a, b = layer.lora_dyA["default"], layer.lora_dyB["default"]
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
    torch.testing.assert_close(layer.lora_dyA["default"].grad[rank - 1], A.grad[rank - 1])
    torch.testing.assert_close(layer.lora_dyB["default"].grad[:, rank - 1], B.grad[:, rank - 1])


def test_even_mode_gives_every_row_the_r_max_gradient_scale_and_the_usual_output():
    """Rows at ranks 2 and 5 of r_max 8: output and dx at alpha/b; A and B get the gradient of the hand
    formula taken at alpha/r_max, for every row and even though no row runs at r_max."""
    model = _model("even", r_max=8)
    layer = dylora_layers(model)[0]
    ranks = torch.tensor([2, 5])
    set_rank(model, ranks)
    model.train()
    x = torch.randn(2, layer.in_features, requires_grad=True)
    g = torch.randn(2, layer.out_features)
    y = layer(x)
    (y * g).sum().backward()
    rows = [_hand(layer, x[m:m + 1], int(b)) for m, b in enumerate(ranks)]
    torch.testing.assert_close(y, torch.cat(rows), rtol=1e-5, atol=1e-5)
    A, B = (t.requires_grad_(True) for t in layer.factors())
    base = layer.get_base_layer()
    W = dequantize_nf4(base.weight.data, base.weight.quant_state)
    x2 = x.detach().clone().requires_grad_(True)
    y_flat = torch.cat([x2[m:m + 1] @ W.t() + (16.0 / 8) * (x2[m:m + 1] @ A[:b].t()) @ B[:, :b].t()
                        for m, b in enumerate(ranks.tolist())])
    (y_flat * g).sum().backward()
    torch.testing.assert_close(layer.lora_dyA["default"].grad, A.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_dyB["default"].grad, B.grad, rtol=1e-5, atol=1e-6)
    # dx is the true gradient of the output (alpha / b), not the flat one
    x3 = x.detach().clone().requires_grad_(True)
    (torch.cat([_hand(layer, x3[m:m + 1], int(b)) for m, b in enumerate(ranks)]) * g).sum().backward()
    torch.testing.assert_close(x.grad, x3.grad, rtol=1e-5, atol=1e-6)


def test_matryoshka_trains_every_component_weighted_by_the_ranks_above():
    """Training forward = base + sum_i P_i (x A_i) B_i, P_i = sum of alpha/r over training ranks r > i."""
    model = _model("matryoshka", r_max=8, rank_sampler="list", rank_list=[2, 8])
    layer = dylora_layers(model)[0]
    x = torch.randn(3, layer.in_features)
    A, B = layer.factors()
    base = layer.get_base_layer()
    W = dequantize_nf4(base.weight.data, base.weight.quant_state)
    P = torch.tensor([16 / 2 + 16 / 8] * 2 + [16 / 8] * 6)  # ranks 2 and 8 cover components 0-1, 8 covers 2-7
    model.train()
    torch.testing.assert_close(layer(x), x @ W.t() + ((x @ A.t()) * P) @ B.t(), rtol=1e-5, atol=1e-5)
    model.eval()
    set_rank(model, 2)
    with torch.no_grad():  # inference is the plain truncation
        torch.testing.assert_close(layer(x), _hand(layer, x, 2), rtol=1e-5, atol=1e-5)


def test_peft_set_scale_scales_the_adapter():
    model = _model("nested", r_max=8)
    layer = dylora_layers(model)[0]
    set_rank(model, 4)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        base, full = layer.get_base_layer()(x), layer(x)
        layer.set_scale("default", 0.5)
        torch.testing.assert_close(layer(x), base + 0.5 * (full - base), rtol=1e-5, atol=1e-5)


def test_a_second_adapter_through_peft():
    """peft's add_adapter / set_adapter work on qdylora layers (peft's update_layer signature)."""
    from qdylora.adapters.attach import adapted_module_names, lora_config

    model = _model("nested", r_max=8)
    layer = dylora_layers(model)[0]
    x = torch.randn(2, layer.in_features)
    set_rank(model, 8)
    with torch.no_grad():
        first = layer(x)
    cfg2 = QDyLoRAConfig(r_max=4, alpha=4.0)
    model.add_adapter("second", lora_config(cfg2, adapted_module_names(model)))
    model.set_adapter("second")
    set_rank(model, 4)
    assert layer.qdylora_config is cfg2
    with torch.no_grad():  # B starts at zero: the second adapter adds nothing yet
        torch.testing.assert_close(layer(x), layer.get_base_layer()(x))
    model.set_adapter("default")
    set_rank(model, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), first)


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
    assert layer.lora_dyA["default"].grad[0].abs().sum() > 0
