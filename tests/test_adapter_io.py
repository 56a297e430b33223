"""Adapters on disk: exact round trip, base check, and export to a plain peft LoRA adapter."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from helpers import tiny_nf4
from qdylora.adapters.export import export_peft
from qdylora.adapters.files import AdapterError, load_adapter, save_adapter
from qdylora.adapters.config import ConfigError, QDyLoRAConfig
from qdylora.adapters.attach import attach_adapters, dylora_layers, set_rank


def _trained_like(r_max=16, alpha=32.0, seed=0, update="frozen"):
    model = attach_adapters(tiny_nf4(seed), QDyLoRAConfig(r_min=1, r_max=r_max, alpha=alpha, update=update))
    g = torch.Generator().manual_seed(5)
    for layer in dylora_layers(model):
        for p in list(layer.lora_dyA["default"]) + list(layer.lora_dyB["default"]):
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("update", ["frozen", "nested"])
def test_save_load_round_trip_is_exact(tmp_path, update):
    model = _trained_like(update=update)
    save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "qdylora_config.json").read_text())
    assert meta["qdylora"]["r_max"] == 16 and meta["qdylora"]["alpha"] == 32.0
    assert meta["base_model"]["num_4bit_linears"] == 14 and len(meta["targets"]) == 14
    loaded = load_adapter(tiny_nf4(0), tmp_path / "ad").eval()
    assert dylora_layers(loaded)[0].qdylora_config.update == update
    for a, b in zip(dylora_layers(model), dylora_layers(loaded)):
        for p, q in zip(a.factors(), b.factors()):
            assert torch.equal(p, q)
    for r in (1, 9, 16):
        set_rank(model, r)
        set_rank(loaded, r)
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, loaded(IDS).logits)


def test_saved_tensors_hold_all_components(tmp_path):
    model = _trained_like(r_max=16)
    save_adapter(model, tmp_path / "ad")
    t = load_file(str(tmp_path / "ad" / "qdylora_adapter.safetensors"))
    a = t["model.layers.0.self_attn.q_proj.lora_A"]
    b = t["model.layers.0.self_attn.q_proj.lora_B"]
    assert a.shape == (16, 64) and b.shape == (64, 16)
    layer = dylora_layers(model)[0]
    assert torch.equal(a[3], layer.lora_dyA["default"][3].detach())
    assert torch.equal(b[:, 3], layer.lora_dyB["default"][:, 3].detach())


def test_mismatched_base_is_refused(tmp_path):
    save_adapter(_trained_like(), tmp_path / "ad")
    other = tiny_nf4(0, hidden=32)
    with pytest.raises(AdapterError, match="trained on base .* load the adapter on the base model it was trained with"):
        load_adapter(other, tmp_path / "ad")


def test_missing_adapter_folder_says_what_is_expected(tmp_path):
    with pytest.raises(AdapterError, match="not a qdylora adapter folder: expected qdylora_config.json"):
        load_adapter(tiny_nf4(), tmp_path)


@pytest.mark.parametrize("rank", [1, 7, 16])
def test_export_to_peft_gives_same_logits(tmp_path, rank):
    model = _trained_like(r_max=16, alpha=32.0)
    save_adapter(model, tmp_path / "ad")
    out = export_peft(tmp_path / "ad", rank, tmp_path / f"peft{rank}")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == rank and cfg["lora_alpha"] == 32.0 and cfg["peft_type"] == "LORA"
    peft_model = PeftModel.from_pretrained(tiny_nf4(0), str(out)).eval()
    # peft used its own 4-bit LoRA layer, not ours
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q).__module__.startswith("peft.") and q.scaling["default"] == 32.0 / rank
    set_rank(model, rank)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
        base = tiny_nf4(0)(IDS).logits
    assert not torch.allclose(model(IDS).logits, base, atol=1e-3)  # the adapter really changes the output


def test_export_refuses_bad_rank_and_existing_output(tmp_path):
    save_adapter(_trained_like(r_max=16), tmp_path / "ad")
    with pytest.raises(ConfigError, match=r"rank 17 is outside this adapter's range \[1, 16\]"):
        export_peft(tmp_path / "ad", 17, tmp_path / "x")
    export_peft(tmp_path / "ad", 4, tmp_path / "x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_peft(tmp_path / "ad", 4, tmp_path / "x")
    export_peft(tmp_path / "ad", 5, tmp_path / "x", overwrite=True)
    assert json.loads((tmp_path / "x" / "adapter_config.json").read_text())["r"] == 5


def test_target_names_that_match_nothing_list_existing_linears():
    with pytest.raises(ConfigError, match="match no linear layer.*Linears that exist: .*down_proj.*q_proj"):
        attach_adapters(tiny_nf4(), QDyLoRAConfig(target_modules=["q_proj", "query_key_value"]))
    model = attach_adapters(tiny_nf4(), QDyLoRAConfig(r_max=4, target_modules=["q_proj", "v_proj"]))
    assert len(dylora_layers(model)) == 4
