"""Launching training runs in subprocesses (torchrun for several processes) through ddp_probe.py, for the
distributed tests (DDP and FSDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = str(Path(__file__).with_name("ddp_probe.py"))
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
needs_torchrun = pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun is not installed beside python")


def settings(model_dir, data, batch, steps=4, **q):
    return {"model": str(model_dir), "data": str(data),
            "qdylora": {"r_max": 8, "seed": 3, "update": "frozen", "rank_per": "example", "max_rows": 0, **q},
            "train": {"max_steps": steps, "batch_size": batch, "max_seq_len": 64, "optim": "adamw_torch",
                      "learning_rate": 5e-3, "warmup_steps": 0, "seed": 3, "save_steps": 2, "weight_decay": 0.1}}


def env():
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'kernels'}", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def launch(out: Path, settings: dict, procs: int, launcher: bool = False) -> subprocess.Popen:
    """The probe in `procs` processes: under torchrun when more than one (or `launcher`), else plain Python."""
    cmd = ([TORCHRUN, "--nproc_per_node", str(procs), "--master_port", str(29500 + os.getpid() % 1000)]
           if procs > 1 or launcher else [sys.executable])
    return subprocess.Popen(cmd + [PROBE, str(out), json.dumps(settings)], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(out: Path, settings: dict, procs: int, launcher: bool = False) -> str:
    proc = launch(out, settings, procs, launcher)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, failure(text)
    return text


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def failure(text: str) -> str:
    """Each process's last own lines (torchrun's summary names the first that failed; the peers' errors follow)."""
    parts = []
    for rank in range(8):
        mine = [line for line in text.splitlines() if line.startswith(f"[rank{rank}]")]
        if mine:
            parts.append("\n".join(mine[-25:]))
    return "\n...\n".join(parts) + "\n...\n" + text[-1500:]


def check_frozen_untouched(model_dir, adapter: dict, drawn=(2, 5), r_max: int = 8, seed: int = 3) -> None:
    """Frozen mode with only `drawn` ranks: every other component of `adapter` kept its initial value exactly
    (weight decay would have moved any component the optimizer stepped), and a drawn one moved."""
    import torch

    from qdylora.adapters.attach import adapter_parameters, attach_adapters
    from qdylora.adapters.config import QDyLoRAConfig
    from qdylora.load.model import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(str(model_dir), device="cpu")
    torch.manual_seed(seed)  # what training does before attaching
    init = adapter_parameters(attach_adapters(base, QDyLoRAConfig(r_max=r_max, rank_sampler="list",
                                                                  rank_list=list(drawn))))
    trained = {r - 1 for r in drawn}
    for path, (A0, B0) in init.items():
        A, B = adapter[f"{path}.lora_A"], adapter[f"{path}.lora_B"]
        for k in set(range(r_max)) - trained:
            assert torch.equal(A[k], A0[k]) and torch.equal(B[:, k], B0[:, k]), (path, k)
        assert not torch.equal(A[min(trained)], A0[min(trained)])


def check_one_writer(run_dir: Path, writes: int = 3) -> None:
    """Every process's RNG state in the last checkpoint, all adapters written by the main process (the probe
    counts them), no staging folder left."""
    assert {p.name for p in (run_dir / "checkpoint-4").iterdir()} >= {"rng_state_0.pth", "rng_state_1.pth",
                                                                       "adapter"}
    assert len(json.loads((run_dir.parent / "writes_0.json").read_text())) == writes
    assert json.loads((run_dir.parent / "writes_1.json").read_text()) == []
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]
