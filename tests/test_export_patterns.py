"""Exports of rank patterns (peft's rank_pattern; uniform, zero-padded) and of padded uniform ranks: peft loads them
on the same 4-bit base and computes qdylora's logits; bad inputs are one line and write nothing."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import error_line
from peft import PeftModel
from safetensors.torch import load_file

from helpers import tiny_nf4
from qdylora.adapters.attach import attach_adapters, dylora_layers, module_layers, set_rank
from qdylora.adapters.config import QDyLoRAConfig
from qdylora.adapters.export import export_pattern, export_peft
from qdylora.adapters.files import save_adapter
from qdylora.adapters.svd_sort import sort_components
from qdylora.cli import main

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
Q0, V1, D1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module", params=[False, True], ids=["trained", "svd-sorted"])
def adapter(tmp_path_factory, request):
    """A saved r_max 8, alpha 12 adapter with random components (so every truncation changes the output), as
    trained (rank b at alpha / b) or svd-sorted (every rank at alpha / r_max)."""
    model = attach_adapters(tiny_nf4(0), QDyLoRAConfig(r_min=1, r_max=8, alpha=12.0))
    g = torch.Generator().manual_seed(5)
    for layer in dylora_layers(model):
        for p in (layer.lora_dyA["default"], layer.lora_dyB["default"]):
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    if request.param:
        sort_components(model)
    d = tmp_path_factory.mktemp("ad") / "adapter"
    save_adapter(model, d)
    ranks = {n: 1 + i % 8 for i, n in enumerate(module_layers(model))} | {V1: 0, D1: 8, Q0: 3}
    return d, model.eval(), ranks


def _pattern_file(path, ranks):
    path.write_text(json.dumps({"ranks": ranks, "score": "hand"}))
    return path


def _peft_logits(folder):
    peft_model = PeftModel.from_pretrained(tiny_nf4(0), str(folder)).eval()
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q).__module__.startswith("peft.")  # peft's own 4-bit LoRA layer, not ours
    with torch.no_grad():
        return peft_model(IDS).logits, peft_model


@pytest.mark.parametrize("fmt,pad", [("peft", None), ("uniform", None), ("uniform", 16)])
def test_pattern_exports_give_qdylora_logits(adapter, tmp_path, fmt, pad):
    src, model, ranks = adapter
    out = export_pattern(src, _pattern_file(tmp_path / "p.json", ranks), tmp_path / "out", fmt=fmt, pad_to=pad)
    cfg = json.loads((out / "adapter_config.json").read_text())
    got, peft_model = _peft_logits(out)
    set_rank(model, ranks)
    with torch.no_grad():
        want = model(IDS).logits
        base = tiny_nf4(0)(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)
    layers = dict(peft_model.base_model.model.named_modules())
    if fmt == "peft":
        assert cfg["lora_alpha"] == 12.0 and not cfg.get("alpha_pattern")
        for name, b in ranks.items():  # peft built each module at its own rank with scale alpha / b
            if b:
                assert layers[name].r["default"] == b and layers[name].scaling["default"] == 12.0 / b
            else:
                assert not hasattr(layers[name], "lora_A")  # switched off: not adapted at all
    else:
        R = pad or 8
        # what a consumer reading only r and lora_alpha sees: one rank, one alpha, no patterns
        assert cfg["r"] == R and cfg["lora_alpha"] == 12.0 and not cfg["rank_pattern"] and not cfg["alpha_pattern"]
        assert {layers[n].r["default"] for n in ranks} == {R}


def test_padded_components_are_zero_and_scales_fold_into_B(adapter, tmp_path):
    src, model, ranks = adapter
    out = export_pattern(src, _pattern_file(tmp_path / "p.json", ranks), tmp_path / "out", pad_to=32)
    t = load_file(str(out / "adapter_model.safetensors"))
    saved = load_file(str(src / "qdylora_adapter.safetensors"))
    for name, b in ranks.items():
        A, B = t[f"base_model.model.{name}.lora_A.weight"], t[f"base_model.model.{name}.lora_B.weight"]
        assert A.shape[0] == 32 and B.shape[1] == 32
        assert torch.count_nonzero(A[b:]) == 0 and torch.count_nonzero(B[:, b:]) == 0
        if b:
            assert torch.equal(A[:b], saved[f"{name}.lora_A"][:b])
            # peft runs rank 32 at 12 / 32; the adapter runs b at 12 / b (sorted: 12 / 8)
            fold = 32 / (8 if dylora_layers(model)[0].svd_sorted else b)
            torch.testing.assert_close(B[:, :b], saved[f"{name}.lora_B"][:, :b] * fold, rtol=1e-6, atol=0)
    meta = json.loads((out / "qdylora_export.json").read_text())
    assert meta["format"] == "uniform" and meta["pad_to"] == 32 and meta["ranks"] == ranks


def test_uniform_rank_padded(adapter, tmp_path):
    src, model, _ = adapter
    out = export_peft(src, 3, tmp_path / "r3p8", pad_to=8)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 12.0
    t = load_file(str(out / "adapter_model.safetensors"))
    assert torch.count_nonzero(t[f"base_model.model.{Q0}.lora_A.weight"][3:]) == 0
    got, _ = _peft_logits(out)
    set_rank(model, 3)
    with torch.no_grad():
        torch.testing.assert_close(got, model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_cli_exports_patterns_and_padded_ranks(adapter, tmp_path, capsys):
    src, model, ranks = adapter
    p = _pattern_file(tmp_path / "p.json", ranks)
    assert main(["export", str(src), "--rank-pattern", str(p), "--output", str(tmp_path / "a")]) == 0
    assert "peft format" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["rank_pattern"]
    assert main(["export", str(src), "--rank-pattern", str(p), "--pad-to", "16", "--output", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["r"] == 16
    assert main(["export", str(src), "--rank", "2", "--pad-to", "64", "--output", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["r"] == 64


def _bad_patterns(ranks):
    return {
        "unknown": ({"ranks": ranks | {"model.layers.5.self_attn.q_proj": 2}},
                    "names 1 module(s) this adapter does not have (e.g. model.layers.5.self_attn.q_proj); use names "
                    "as in the base model, e.g. model.layers.0"),
        "rank-high": ({"ranks": ranks | {Q0: 9}}, "rank 9 for model.layers.0.self_attn.q_proj is outside {0} and [1, 8]"),
        "rank-negative": ({"ranks": ranks | {Q0: -1}}, "rank -1 for"),
        "not-int": ({"ranks": ranks | {Q0: 2.5}}, f"key 'ranks.{Q0}' is 2.5, not an integer rank"),
        "malformed": ("{\"ranks\": {", "is not valid JSON"),
        "no-ranks": ({"rank": {}}, "key 'rank' is not a rank-pattern key"),
        "all-off": ({"ranks": dict.fromkeys(ranks, 0)}, "switches every module off"),
    }


@pytest.mark.parametrize("case", list(_bad_patterns({})))
def test_bad_patterns_are_one_line_and_write_nothing(adapter, tmp_path, capsys, case):
    src, _, ranks = adapter
    obj, message = _bad_patterns(ranks)[case]
    p = tmp_path / "bad.json"
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    out = tmp_path / "out"
    for extra in ([], ["--format", "uniform"]):
        assert main(["export", str(src), "--rank-pattern", str(p), "--output", str(out)] + extra) == 2
        line = error_line(capsys.readouterr().err)
        assert message in line, line
        if case == "malformed":
            assert str(p) in line
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--pad-to", "4"], "--pad-to 4 is below the largest rank to export (8)"),
    (["--pad-to", "16", "--format", "peft"], "--pad-to pads every module to one rank, which is --format uniform"),
])
def test_bad_padding_is_one_line_and_writes_nothing(adapter, tmp_path, capsys, args, message):
    src, _, ranks = adapter
    p = _pattern_file(tmp_path / "p.json", ranks)
    out = tmp_path / "out"
    assert main(["export", str(src), "--rank-pattern", str(p), "--output", str(out)] + args) == 2
    assert message in error_line(capsys.readouterr().err)
    assert main(["export", str(src), "--rank", "5", "--pad-to", "3", "--output", str(out)]) == 2
    assert "--pad-to 3 is below the largest rank to export (5)" in error_line(capsys.readouterr().err)
    assert main(["export", str(src), "--rank", "5", "--rank-pattern", str(p), "--output", str(out)]) == 2
    assert "not allowed with argument" in error_line(capsys.readouterr().err)
    assert not out.exists()
