"""`qdylora train` and `qdylora sweep` print no warnings from their dependencies (a fresh interpreter, run from
the repository root where the local kernels/ folder sits)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
# what dependency warnings look like: Python warnings, deprecations, bitsandbytes' kernels-community notice
NOISE = re.compile(r"warn|deprecat|failed to load|future ?warning|user ?warning", re.IGNORECASE)


def _cli(*args: str) -> subprocess.CompletedProcess:
    # the warning filters a user has: Python's defaults (PYTHONWARNINGS unset)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "qdylora", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def _noise(stderr: str) -> list[str]:
    """stderr's lines (tqdm redraws split on carriage returns) that look like a dependency's warning."""
    lines = [p.strip() for line in stderr.splitlines() for p in line.split("\r")]
    return [line for line in lines if line and NOISE.search(line)]


def test_train_and_sweep_print_no_dependency_warnings(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"Say {w}", "output": f"{w} {w}"}
                                                 for w in ("red", "green", "blue", "sky", "sun", "grass")])
    run = tmp_path / "run"
    train = _cli("train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(run),
                 "--max-steps", "2", "--r-max", "4", "--batch-size", "2", "--max-seq-len", "96", "--sweep-ranks", "")
    assert train.returncode == 0, train.stderr[-2000:]
    assert _noise(train.stderr) == [], train.stderr[-3000:]
    sweep = _cli("sweep", str(run), "--task", "loss", "--data", str(data), "--ranks", "1,4", "--output",
                 str(tmp_path / "sweep"))
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    assert _noise(sweep.stderr) == [] and _noise(sweep.stdout) == [], sweep.stderr[-3000:]
