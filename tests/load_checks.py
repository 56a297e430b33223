"""Checks shared by the loading tests: the old loading path, no from_pretrained, two loaded models are the same."""

from __future__ import annotations

import torch

from qdylora.load.quantize import packed_nf4, quantize_model, quantized_linears

def old_path(path, dtype=torch.float32, compute_dtype=torch.float32):
    """What training loaded before: from_pretrained in the compute dtype, then quantize_model (CPU)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, low_cpu_mem_usage=True)
    return quantize_model(m, "cpu", compute_dtype)


def no_from_pretrained(monkeypatch):
    """Make from_pretrained fail, so a test sees that loading went layer by layer."""
    from transformers import AutoModelForCausalLM

    def boom(*a, **k):
        raise AssertionError("from_pretrained was called: the model did not load layer by layer")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", boom)


def assert_same_model(got, ref, vocab=320):
    """Same NF4 bytes and quant states, same other tensors (dtype and values), same config, same logits."""
    qg, qr = quantized_linears(got), quantized_linears(ref)
    assert sorted(qg) == sorted(qr) and qg
    for name in qr:
        (wg, sg), (wr, sr) = packed_nf4(qg[name]), packed_nf4(qr[name])
        assert torch.equal(wg, wr), name
        for a, b in ((sg.absmax, sr.absmax), (sg.offset, sr.offset), (sg.code, sr.code),
                     (sg.state2.absmax, sr.state2.absmax), (sg.state2.code, sr.state2.code)):
            assert torch.equal(a, b), name
        assert (sg.dtype, tuple(sg.shape), sg.blocksize) == (sr.dtype, tuple(sr.shape), sr.blocksize), name
        assert qg[name].compute_dtype == qr[name].compute_dtype, name
        assert (qg[name].bias is None) == (qr[name].bias is None)
    pg = {n: p for n, p in got.named_parameters() if n.rpartition(".")[0] not in qg}
    pr = {n: p for n, p in ref.named_parameters() if n.rpartition(".")[0] not in qr}
    assert sorted(pg) == sorted(pr)
    for n in pr:
        assert pg[n].dtype == pr[n].dtype and torch.equal(pg[n], pr[n]), n
        assert not pg[n].requires_grad
    bg, br = dict(got.named_buffers()), dict(ref.named_buffers())
    assert sorted(bg) == sorted(br) and all(torch.equal(bg[n], br[n]) and bg[n].dtype == br[n].dtype for n in br)
    head_g, head_r = got.get_output_embeddings().weight, ref.get_output_embeddings().weight
    assert (head_g is got.get_input_embeddings().weight) == (head_r is ref.get_input_embeddings().weight)
    assert got.config.to_dict() == ref.config.to_dict()  # includes dtype and _name_or_path
    assert got.generation_config.to_dict() == ref.generation_config.to_dict()
    assert got.training == ref.training and got.is_loaded_in_4bit and ref.is_loaded_in_4bit
    ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(1)).to(head_g.device)
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)
