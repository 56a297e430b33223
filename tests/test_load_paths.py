"""Loading for training reads safetensors layer by layer; the model equals transformers' from_pretrained + quantize_model."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from qdylora.load.model import load_model_and_tokenizer, load_quantized_model
from load_checks import assert_same_model, no_from_pretrained, old_path
from qdylora.load.quantize import quantize_model, quantized_linears


def _llama(tied: bool, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, tie_word_embeddings=tied, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


@pytest.mark.parametrize("shards,tied,dtype", [(True, True, torch.float32), (False, False, torch.float32),
                                               (True, False, torch.bfloat16), (False, True, torch.bfloat16)])
def test_layer_by_layer_equals_from_pretrained(tmp_path, monkeypatch, shards, tied, dtype):
    # fp32 is what the CPU path uses (and used before); bf16 is the CUDA dtype, checked here on the CPU
    _llama(tied).save_pretrained(tmp_path, max_shard_size="100KB" if shards else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == shards
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.7, "do_sample": True}))
    with monkeypatch.context() as mp:
        no_from_pretrained(mp)
        got = load_quantized_model(tmp_path, device="cpu", compute_dtype=dtype)
    ref = old_path(tmp_path, dtype, dtype)
    assert got.generation_config.temperature == 0.7
    assert got.config._name_or_path == str(tmp_path)
    assert_same_model(got, ref)


def test_cpu_default_dtype_is_fp32_as_before(tmp_path):
    _llama(True).save_pretrained(tmp_path)
    got = load_quantized_model(tmp_path, device="cpu")
    assert got.model.embed_tokens.weight.dtype == torch.float32  # the bf16 checkpoint is widened, as before
    assert all(m.compute_dtype == torch.float32 and m.weight.quant_state.dtype == torch.float32
               for m in quantized_linears(got).values())
    assert_same_model(got, old_path(tmp_path))


def test_model_and_tokenizer_source_and_name(tmp_path, tokenizer, monkeypatch):
    model = _llama(False)
    model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    tokenizer.save_pretrained(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as mp:
        no_from_pretrained(mp)
        got, tok = load_model_and_tokenizer("m", device="cpu")
    assert got.qdylora_source == str((tmp_path / "m").resolve())
    assert got.config._name_or_path == "m"  # as from_pretrained("m") names it
    assert tok.pad_token is not None and tok("hello")["input_ids"] == tokenizer("hello")["input_ids"]
    assert_same_model(got, old_path("m"))


@pytest.mark.parametrize("same", [True, False])
def test_tied_config_with_a_head_in_the_checkpoint(tmp_path, same):
    from safetensors.torch import load_file, save_file

    _llama(True).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in sd
    embed = sd["model.embed_tokens.weight"]
    sd["lm_head.weight"] = embed.clone() if same else torch.randn_like(embed)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    got = load_quantized_model(tmp_path, device="cpu")
    # transformers ties an equal copy and keeps a different head: the same model either way
    assert (got.lm_head.weight is got.model.embed_tokens.weight) == same
    assert_same_model(got, old_path(tmp_path))


def _fake_hub_cache(root, repo_id, files_from):
    """A Hugging Face cache holding one snapshot of `repo_id` (what `hf download` leaves behind)."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files_from, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_hub_id_loads_layer_by_layer_from_the_offline_cache(tmp_path, tokenizer, monkeypatch):
    import huggingface_hub.constants as hub

    _llama(True).save_pretrained(tmp_path / "src", max_shard_size="100KB")
    tokenizer.save_pretrained(tmp_path / "src")
    snapshot = _fake_hub_cache(tmp_path / "cache", "someone/tiny-llama", tmp_path / "src")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with monkeypatch.context() as mp:
        no_from_pretrained(mp)
        got, tok = load_model_and_tokenizer("someone/tiny-llama", device="cpu")
    assert got.qdylora_source == "someone/tiny-llama" and got.config._name_or_path == "someone/tiny-llama"
    assert tok("hello")["input_ids"] == tokenizer("hello")["input_ids"]
    ref = old_path(snapshot)
    ref.config._name_or_path = "someone/tiny-llama"  # from_pretrained("someone/tiny-llama") names it so
    assert_same_model(got, ref)


def test_bin_only_folder_goes_through_from_pretrained(tmp_path):
    model = _llama(False)
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    got = load_quantized_model(tmp_path, device="cpu")
    assert_same_model(got, old_path(tmp_path))


def test_checkpoint_transformers_converts_falls_back_to_from_pretrained(tmp_path, caplog):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, vocab_size=320)
    MixtralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="qdylora.load.model"):
        got = load_quantized_model(tmp_path, device="cpu")
    assert "loading it whole through transformers" in caplog.text
    assert_same_model(got, old_path(tmp_path))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tied", [True, False])
def test_layer_by_layer_on_cuda_equals_from_pretrained(tmp_path, monkeypatch, tied):
    from transformers import AutoModelForCausalLM

    _llama(tied).save_pretrained(tmp_path, max_shard_size="100KB")
    with monkeypatch.context() as mp:
        no_from_pretrained(mp)
        got = load_quantized_model(tmp_path, device="cuda")  # bf16, read straight onto the GPU
    ref = quantize_model(AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16), "cuda",
                         torch.bfloat16)
    assert all(p.device.type == "cuda" for p in got.parameters())
    assert got.model.embed_tokens.weight.dtype == torch.bfloat16
    assert_same_model(got, ref)
