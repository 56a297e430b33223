"""FSDP-QLoRA on the CPU (FSDP2 fully_shard, gloo, 2 processes through torchrun) on a tiny Llama: each process
holds half of the model (4-bit weights included), training equals one process with the global batch (loss,
adapter, optimizer state), the ranks run are the documented draws, frozen components stay untouched, its
checkpoints resume with FSDP and with one plain process; refused set-ups exit 2 with one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from launch import check_frozen_untouched, check_one_writer, log, needs_torchrun, run, settings
from safetensors.torch import load_file

from qdylora.adapters.config import QDyLoRAConfig
from qdylora.adapters.rank_sampler import RankSampler

RANKS = {"rank_sampler": "list", "rank_list": [2, 5]}
CUDA = torch.cuda.is_available()
# 2 processes on the CPU (gloo); a one-GPU machine runs the world-size-1 test on CUDA instead
cpu_only = pytest.mark.skipif(CUDA, reason="the CPU gloo runs; with CUDA test_fsdp_on_one_gpu runs")


def _fsdp(s: dict) -> dict:
    return {**s, "train": {**s["train"], "fsdp": True}}


def _adapter(out):
    return load_file(str(out / "adapter" / "qdylora_adapter.safetensors"))


@pytest.fixture(scope="module")
def runs(tiny_model_dir, data_file, tmp_path_factory):
    """(one process, batch 4) and (FSDP over 2 processes, batch 2 each): 4 steps, checkpoints every 2."""
    root = tmp_path_factory.mktemp("fsdp")
    one, two = root / "one" / "run", root / "two" / "run"
    run(one, settings(tiny_model_dir, data_file, batch=4, **RANKS), procs=1)
    run(two, _fsdp(settings(tiny_model_dir, data_file, batch=2, **RANKS)), procs=2)
    return one, two


@needs_torchrun
@cpu_only
def test_fsdp_equals_one_process_with_the_global_batch(runs, tiny_model_dir):
    one, two = runs
    for a, b in zip(log(one), log(two), strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    w1, w2 = _adapter(one), _adapter(two)
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=0)
    # the optimizer state, gathered from the shards, is the one-process state
    o1, o2 = (torch.load(d / "checkpoint-4" / "optimizer.pt", weights_only=True) for d in (one, two))
    assert o1["state"].keys() == o2["state"].keys()
    for i, st in o1["state"].items():
        assert torch.equal(o2["state"][i]["step"], st["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(o2["state"][i][key], st[key], atol=1e-6, rtol=1e-4)
    # each process held about half of every parameter's bytes (the NF4 weights too), not all of them
    for rank in (0, 1):
        held = json.loads((two.parent / f"held_{rank}.json").read_text())
        assert held["bytes"] <= 0.55 * held["full_bytes"]
    # the ranks each process ran (seen in the forward) are the documented draws of its own rows
    r0, r1 = (json.loads((two.parent / f"ranks_{i}.json").read_text()) for i in (0, 1))
    n_layers = len(r0) // 4
    s = RankSampler(QDyLoRAConfig(r_max=8, seed=3, max_rows=0, update="frozen", **RANKS))
    for t in range(4):
        assert r0[t * n_layers] == s.rows(t, 0, 2, first_row=0) and r1[t * n_layers] == s.rows(t, 0, 2, first_row=2)
    check_frozen_untouched(tiny_model_dir, w2)
    check_one_writer(two)


def _cut_back_to_checkpoint_2(src, dst):
    """A copy of a finished 4-step run as a run killed after its step-2 checkpoint."""
    shutil.copytree(src, dst)
    for name in ("checkpoint-4", "adapter"):
        shutil.rmtree(dst / name)
    lines = (dst / "train_log.jsonl").read_text().splitlines()
    (dst / "train_log.jsonl").write_text("\n".join(lines[:2]) + "\n")


@needs_torchrun
@cpu_only
def test_an_fsdp_checkpoint_resumes_with_fsdp_and_with_one_process(runs, tmp_path):
    one, two = runs
    again, plain = tmp_path / "again" / "run", tmp_path / "plain" / "run"
    _cut_back_to_checkpoint_2(two, again)
    _cut_back_to_checkpoint_2(two, plain)
    # FSDP again from the gathered checkpoint: the shards of adapters and moments are cut from it exactly
    run(again, {"train": {"fsdp": True}, "resume": True}, procs=2)
    w1 = _adapter(one)
    for name, value in _adapter(again).items():
        torch.testing.assert_close(value, w1[name], atol=1e-5, rtol=0)
    assert [r["step"] for r in log(again)] == [1, 2, 3, 4]
    # one plain process (no --fsdp, no launcher) continues the same checkpoint
    run(plain, {"resume": True}, procs=1)
    assert [r["step"] for r in log(plain)] == [1, 2, 3, 4]
    assert json.loads((plain / "adapter" / "qdylora_config.json").read_text())["global_step"] == 4


@pytest.mark.parametrize("extra,env,message", [
    ([], {}, "--fsdp runs under a launcher"),
    (["--quant-storage", "uint8"], {"WORLD_SIZE": "1"}, "--fsdp with --quant-storage uint8"),
    (["--optim", "adamw_8bit"], {"WORLD_SIZE": "1"}, "--fsdp with --optim adamw_8bit"),
])
def test_refused_fsdp_set_ups(tiny_model_dir, data_file, tmp_path, capsys, monkeypatch, extra, env, message):
    from qdylora.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(out), "--fsdp",
                 "--max-steps", "1", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_quant_storage_is_bitsandbytes_own(storage):
    """set_quant_storage gives what bnb's Params4bit(quant_storage=...) stores: the same bytes, dtype and shape."""
    import bitsandbytes as bnb
    from torch import nn

    from qdylora.load.quantize import quantize_linear, set_quant_storage

    torch.manual_seed(0)
    lin = nn.Linear(128, 48)
    ours = nn.Module()
    ours.q = quantize_linear(lin, "cpu", torch.float32)
    set_quant_storage(ours, storage)
    ref = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, compress_statistics=True,
                            quant_type="nf4", blocksize=64, quant_storage=storage)._quantize("cpu")
    w = ours.q.weight
    assert w.dtype == ref.dtype == storage and w.shape == ref.shape
    assert torch.equal(w.data.view(torch.uint8), ref.data.view(torch.uint8))


@pytest.mark.gpu
@needs_torchrun
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_fsdp_on_one_gpu_equals_a_plain_run(tiny_model_dir, data_file, tmp_path):
    """World size 1 under torchrun on CUDA (NCCL, bf16 storage of the NF4 bytes) against one plain process."""
    plain, fsdp = tmp_path / "plain" / "run", tmp_path / "fsdp" / "run"
    s = settings(tiny_model_dir, data_file, batch=4, **RANKS)
    run(plain, s, procs=1)
    run(fsdp, _fsdp(s), procs=1, launcher=True)
    for a, b in zip(log(plain), log(fsdp), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
    w1, w2 = _adapter(plain), _adapter(fsdp)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-3, rtol=1e-2)
