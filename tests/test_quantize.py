"""The quantized base is exactly bitsandbytes' QLoRA storage: NF4, blocksize 64, nested absmax (256)."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as BF
import pytest
import torch
from torch import nn

from helpers import tiny_llama
from qdylora.load.model import load_quantized_model
from qdylora.load.quantize import check_nf4_storage, quantize_linear, quantized_linears


def test_every_linear_but_head_is_nf4_double_quantized():
    full = tiny_llama()
    weights = {n: m.weight.detach().clone() for n, m in full.named_modules() if type(m) is nn.Linear}
    q = load_quantized_model(full, device="cpu")
    layers = quantized_linears(q)
    assert set(layers) == {n for n in weights if n != "lm_head"}
    for name, layer in layers.items():
        qs = layer.weight.quant_state
        assert qs.quant_type == "nf4" and qs.blocksize == 64
        assert qs.nested and qs.state2.blocksize == 256
        assert layer.weight.dtype == torch.uint8 and layer.weight.numel() * 2 == weights[name].numel()
        assert qs.absmax.dtype == torch.uint8 and qs.absmax.numel() == weights[name].numel() // 64
        # the same bytes bitsandbytes' own quantizer produces for this weight
        ref_q, ref_qs = BF.quantize_4bit(weights[name], blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(layer.weight.data.view(-1), ref_q.view(-1))
        assert torch.equal(qs.absmax, ref_qs.absmax)
        check_nf4_storage(layer)
    assert type(q.lm_head) is nn.Linear and q.lm_head.weight.dtype == torch.float32
    assert isinstance(q.model.embed_tokens, nn.Embedding)
    assert all(not p.requires_grad for p in q.parameters())


def test_quantized_output_close_to_full_precision():
    full = tiny_llama()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = full(ids).logits
        out = load_quantized_model(tiny_llama(), device="cpu")(ids).logits
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.2  # NF4 error: present, but small


def test_already_4bit_model_is_accepted_as_is():
    q = load_quantized_model(tiny_llama(), device="cpu")
    before = {n: m.weight.data.clone() for n, m in quantized_linears(q).items()}
    again = load_quantized_model(q, device="cpu")
    assert again is q
    assert all(torch.equal(m.weight.data, before[n]) for n, m in quantized_linears(again).items())


def test_non_qlora_4bit_storage_is_rejected():
    lin = nn.Linear(128, 64)
    fp4 = bnb.nn.Linear4bit(128, 64, quant_type="fp4", compress_statistics=False)
    fp4.weight = bnb.nn.Params4bit(lin.weight.detach(), requires_grad=False, quant_type="fp4",
                                   compress_statistics=False)
    fp4 = fp4.to("cpu")
    with pytest.raises(ValueError, match="quant_type=fp4.*not double-quantized"):
        check_nf4_storage(fp4)
    check_nf4_storage(quantize_linear(lin, "cpu"))
