"""A --model that cannot be loaded: one line naming the problem and the fix, exit code 2, nothing written."""

from __future__ import annotations

import os

import pytest
import torch

from qdylora.cli import main


def _llama(tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                        tie_word_embeddings=tied)).to(torch.bfloat16)


@pytest.fixture()
def sharded(tmp_path, tokenizer):
    """A complete sharded model folder (bf16 weights in several safetensors shards + tokenizer)."""
    d = tmp_path / "sharded"
    _llama().save_pretrained(d, max_shard_size="50KB")
    tokenizer.save_pretrained(d)
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) >= 3
    return d, shards


def _train_fails(model: str, tmp_path, capsys) -> str:
    out = tmp_path / "run"
    rc = main(["train", "--model", model, "--output", str(out), "--max-steps", "1"])
    captured = capsys.readouterr()
    assert rc == 2, captured
    lines = [l for l in captured.err.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in captured.err, captured.err
    # nothing written (the run folder may exist, created empty before the model is loaded)
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    return errors[0]


def test_missing_folder(tmp_path, capsys):
    msg = _train_fails(str(tmp_path / "no" / "such" / "model"), tmp_path, capsys)
    assert "does not exist" in msg and "config.json" in msg


def test_hub_id_offline_and_not_cached(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    msg = _train_fails("someone/not-downloaded", tmp_path, capsys)
    assert "could not be downloaded" in msg and "--local-dir" in msg and "--model DIR" in msg


def test_hub_id_cached_without_its_shards(tmp_path, capsys, monkeypatch, sharded):
    import shutil

    import huggingface_hub.constants as hub

    folder, shards = sharded
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--partial"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "snapshots" / commit / shards[1].name).unlink()  # an interrupted download
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    msg = _train_fails("someone/partial", tmp_path, capsys)
    assert "not all in the local cache" in msg and "--model DIR" in msg


def test_folder_without_weights(tmp_path, capsys, sharded):
    folder, shards = sharded
    for f in list(shards) + [folder / "model.safetensors.index.json"]:
        f.unlink()
    msg = _train_fails(str(folder), tmp_path, capsys)
    assert "no weights" in msg and "model.safetensors" in msg and "pytorch_model" in msg


def test_folder_without_config(tmp_path, capsys, sharded):
    folder, _ = sharded
    (folder / "config.json").unlink()
    msg = _train_fails(str(folder), tmp_path, capsys)
    assert "no config.json" in msg


def test_config_not_json(tmp_path, capsys, sharded):
    folder, _ = sharded
    (folder / "config.json").write_text('{"model_type": "llama", ')
    msg = _train_fails(str(folder), tmp_path, capsys)
    assert "config.json is not valid JSON" in msg


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing"])
def test_damaged_shard(tmp_path, capsys, sharded, damage):
    folder, shards = sharded
    shard = shards[1]
    data = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        shard.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        shard.write_bytes(b"")
    else:
        shard.unlink()
    msg = _train_fails(str(folder), tmp_path, capsys)
    assert shard.name in msg
    assert ("missing" if damage == "missing" else "corrupt or truncated") in msg


def test_truncated_single_file(tmp_path, capsys, tokenizer):
    folder = tmp_path / "single"
    _llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    msg = _train_fails(str(folder), tmp_path, capsys)
    assert "model.safetensors" in msg and "corrupt or truncated" in msg


def test_index_listing_absent_tensor(tmp_path, capsys, sharded):
    import json

    folder, _ = sharded
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = first
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = _train_fails(str(folder), tmp_path, capsys)
    assert "lacks model.layers.9.mlp.up_proj.weight" in msg


def test_missing_gguf_file(tmp_path, capsys):
    msg = _train_fails(str(tmp_path / "model.Q4_K_M.gguf"), tmp_path, capsys)
    assert "GGUF file" in msg and "does not exist" in msg


def test_folder_of_a_gguf_file(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.Q4_0.gguf").write_bytes(b"GGUF")
    msg = _train_fails(str(tmp_path / "m"), tmp_path, capsys)
    assert "pass the .gguf file itself" in msg and "x.Q4_0.gguf" in msg


def test_adapter_folder_instead_of_a_model(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    msg = _train_fails(str(tmp_path / "a"), tmp_path, capsys)
    assert "adapter folder" in msg


def test_folder_without_tokenizer(tmp_path, capsys):
    folder = tmp_path / "notok"
    _llama().save_pretrained(folder)
    msg = _train_fails(str(folder), tmp_path, capsys)
    assert "no tokenizer" in msg and "save_pretrained" in msg


def test_weights_that_do_not_match_the_config(tmp_path, capsys, sharded):
    import json

    folder, _ = sharded
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    msg = _train_fails(str(folder), tmp_path, capsys)
    assert "model.layers.2" in msg and "not in the checkpoint" in msg
