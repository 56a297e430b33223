"""GPT-2's Conv1D linears (weight stored [in, out]) are quantized as the linear of the transposed weight."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import bitsandbytes.functional as BF
import pytest
import torch
from torch import nn

from qdylora.adapters.attach import attach_adapters, dylora_layers, set_rank
from qdylora.adapters.config import QDyLoRAConfig
from qdylora.load.model import load_quantized_model
from qdylora.load.quantize import nf4_linear_names, packed_nf4, quantized_linears
from load_checks import assert_same_model, no_from_pretrained, old_path

VOCAB = 320


def _gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def _conv1d_names(model):
    from transformers.pytorch_utils import Conv1D

    return sorted(n for n, m in model.named_modules() if isinstance(m, Conv1D))


def test_conv1d_layers_become_nf4_of_the_transposed_weight():
    full = _gpt2()
    names = _conv1d_names(full)
    assert len(names) == 4 * 2 and nf4_linear_names(full) == names  # c_attn, c_proj, c_fc, mlp.c_proj per block
    # the hand reference: every Conv1D's weight replaced by bitsandbytes' own NF4 round trip of weight^T,
    # applied as the plain linear it is (x @ W^T + b)
    ref = copy.deepcopy(full)
    expected = {}
    for name in names:
        conv = ref.get_submodule(name)
        wt = conv.weight.detach().t().contiguous()  # [out, in]
        qw, qs = BF.quantize_4bit(wt, blocksize=64, compress_statistics=True, quant_type="nf4")
        expected[name] = (qw, qs)
        lin = nn.Linear(conv.nx, conv.nf)
        lin.weight.data = BF.dequantize_4bit(qw, qs)
        lin.bias.data = conv.bias.detach().clone()
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent), child, lin)
    q = load_quantized_model(full, device="cpu")
    layers = quantized_linears(q)
    assert sorted(layers) == names and type(q.lm_head) is nn.Linear
    for name, layer in layers.items():
        w, qs = packed_nf4(layer)
        assert (layer.in_features, layer.out_features) == tuple(expected[name][1].shape)[::-1]
        assert torch.equal(w.view(-1), expected[name][0].view(-1))
        assert torch.equal(qs.absmax, expected[name][1].absmax)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, exact = q(ids).logits, ref(ids).logits, _gpt2()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    rel = (got - exact).norm() / exact.norm()
    assert 0 < rel < 0.2  # NF4's error, not a transposed weight


def test_default_targets_attach_to_gpt2_and_a_step_trains():
    model = attach_adapters(load_quantized_model(_gpt2(), device="cpu"), QDyLoRAConfig(r_max=4, alpha=8, seed=0))
    layers = dylora_layers(model)
    assert len(layers) == 8
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    set_rank(model, 4)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in layers)
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss0 = model(input_ids=ids, labels=ids).loss
    loss0.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    opt.step()
    with torch.no_grad():
        loss1 = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss1) and abs(loss1.item() - loss0.item()) > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt2_checkpoint_loads_layer_by_layer(tmp_path, monkeypatch, dtype):

    _gpt2().save_pretrained(tmp_path, max_shard_size="200KB")
    with monkeypatch.context() as mp:
        no_from_pretrained(mp)
        got = load_quantized_model(tmp_path, device="cpu", compute_dtype=dtype)
    assert got.lm_head.weight is got.transformer.wte.weight
    assert_same_model(got, old_path(tmp_path, dtype, dtype), vocab=VOCAB)
