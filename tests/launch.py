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
