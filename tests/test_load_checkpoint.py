"""Reading safetensors shards one tensor at a time gives exactly what safetensors itself reads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from qdylora.errors import ModelLoadError
from qdylora.load.checkpoint import read_tensors, shard_plan


def test_read_tensors_equals_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(33, 65, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).half(),
        "f32": torch.randn(2, 3, 4, generator=g),
        "f64": torch.randn(5, generator=g).double(),
        "i64": torch.arange(-3, 9),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "f8": torch.randn(16, generator=g).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
    }
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ref = load_file(tmp_path / "model.safetensors")
    keys = shard_plan(tmp_path)["model.safetensors"]
    got = dict(read_tensors(tmp_path / "model.safetensors", keys))
    assert sorted(got) == sorted(ref)
    for k, t in ref.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape
        assert torch.equal(got[k].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else got[k],
                           t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t), k


def test_read_tensors_reads_only_what_is_asked_in_file_order(tmp_path):
    import json
    import struct

    tensors = {f"t{i}": torch.full((10 + i,), float(i)) for i in range(5)}
    save_file(tensors, tmp_path / "model.safetensors")
    raw = (tmp_path / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    got = list(read_tensors(tmp_path / "model.safetensors", ["t3", "t1", "t4"]))
    assert [k for k, _ in got] == sorted(["t3", "t1", "t4"], key=lambda k: header[k]["data_offsets"][0])
    assert {k: (t.shape[0], t[0].item()) for k, t in got} == {"t1": (11, 1.0), "t3": (13, 3.0), "t4": (14, 4.0)}


def test_file_cut_after_its_header_was_checked(tmp_path):
    save_file({"a": torch.ones(100), "b": torch.ones(100)}, tmp_path / "model.safetensors")
    keys = shard_plan(tmp_path)["model.safetensors"]
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-40])  # truncated between the check and the read
    with pytest.raises(ModelLoadError, match="truncated"):
        dict(read_tensors(tmp_path / "model.safetensors", keys))
