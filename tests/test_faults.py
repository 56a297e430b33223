"""Faults: kill -9 at random moments and in the middle of checkpoint writes, then --resume; a full disk during
a checkpoint, the final adapter and an export. No checkpoint may be torn and no earlier one lost."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import error_line

from qdylora.adapters.files import read_adapter
from qdylora.cli import main
from qdylora.train.run_folder import checkpoint_problem, checkpoints

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
ARGS = ["--max-steps", str(STEPS), "--r-max", "8", "--lr", "5e-3", "--batch-size", "2", "--save-steps", "2",
        "--max-seq-len", "64", "--optim", "adamw_torch", "--sweep-ranks", ""]

# The child trains through the CLI; QDYLORA_TEST_KILL makes it kill itself inside a checkpoint write
# ("adapter:N": after the N-th adapter weights file, "optimizer:N": half-way through the N-th optimizer.pt).
CHILD = r'''
import os, signal, sys
spec = os.environ.get("QDYLORA_TEST_KILL")
if spec:
    what, n = spec.split(":")
    calls = {"n": 0}
    def hit():
        calls["n"] += 1
        return calls["n"] == int(n)
    if what == "adapter":
        import qdylora.adapters.files as files
        real = files.save_file
        def save_file(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            if hit():
                os.kill(os.getpid(), signal.SIGKILL)
        files.save_file = save_file
    else:
        import torch
        real = torch.save
        def save(obj, f, *a, **k):
            if str(f).endswith("optimizer.pt") and hit():
                with open(f, "wb") as fh:
                    fh.write(b"PK\x03\x04 half an optimizer")
                os.kill(os.getpid(), signal.SIGKILL)
            return real(obj, f, *a, **k)
        torch.save = save
from qdylora.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "d.jsonl"
    p.write_text("\n".join(json.dumps({"instruction": f"Repeat {i}.", "output": f"{i} {i}"}) for i in range(16)))
    return p


def _child(args, kill=None, timeout=None):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'kernels'}", HF_HUB_OFFLINE="1")
    if kill:
        env["QDYLORA_TEST_KILL"] = kill
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _check_intact(out: Path) -> list[int]:
    """Every checkpoint usable, no leftovers; returns the checkpoint steps."""
    for _, folder in checkpoints(out):
        assert checkpoint_problem(folder) is None, folder
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    return [s for s, _ in checkpoints(out)]


def _finish(out: Path, model_dir, data, capsys) -> None:
    """--resume (or, when no checkpoint was written, start again) until the run is finished and whole."""
    rc = main(["train", "--output", str(out), "--resume"])
    if rc == 2:
        err = error_line(capsys.readouterr().err)
        assert "no usable checkpoint" in err or "holds no checkpoint-N folder" in err, err
        rc = main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--overwrite", *ARGS])
    assert rc == 0
    _check_intact(out)
    meta, _ = read_adapter(out / "adapter")
    assert meta["global_step"] == STEPS
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


@pytest.mark.parametrize("kill", ["adapter:2", "optimizer:2", "adapter:4"])
def test_kill_inside_a_checkpoint_write_then_resume(tiny_model_dir, data_file, tmp_path, capsys, kill):
    out = tmp_path / "run"
    proc = _child(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(out), *ARGS],
                  kill=kill)
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    assert (out / "run_config.json").is_file()
    staged = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert staged  # the kill left a half-written staging folder (never a half checkpoint-N)
    assert _check_intact_except_stale(out)
    _finish(out, tiny_model_dir, data_file, capsys)


def _check_intact_except_stale(out: Path) -> bool:
    return all(checkpoint_problem(f) is None for _, f in checkpoints(out))


def test_kill_at_random_moments_then_resume(tiny_model_dir, data_file, tmp_path, capsys):
    rng = random.Random(1234)
    out = tmp_path / "run"
    start = time.monotonic()
    proc = _child(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(out), *ARGS])
    proc.wait(timeout=300)  # an undisturbed run first: how long it takes
    assert proc.returncode == 0
    undisturbed = time.monotonic() - start
    shutil.rmtree(out)
    for trial in range(2):
        out = tmp_path / f"run{trial}"
        start = time.monotonic()
        proc = _child(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(out), *ARGS])
        time.sleep(rng.uniform(0.5, 1.2) * undisturbed)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        elapsed = time.monotonic() - start
        if out.exists():
            assert _check_intact_except_stale(out), (trial, elapsed)
            _finish(out, tiny_model_dir, data_file, capsys)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tiny_model_dir, data_file, tmp_path, capsys, monkeypatch):
    import qdylora.adapters.files as files

    real, calls = files.save_file, {"n": 0}

    def save_file(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # checkpoint-4's adapter
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(files, "save_file", save_file)
    out = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(out), *ARGS])
    err = error_line(capsys.readouterr().err)
    assert rc == 2 and "saving checkpoint-4 failed (No space left on device)" in err
    assert "last good checkpoint:" in err and "checkpoint-2" in err and err.rstrip().endswith("continue with --resume")
    assert _check_intact(out) == [2]
    monkeypatch.setattr(files, "save_file", real)
    _finish(out, tiny_model_dir, data_file, capsys)


def test_disk_full_writing_the_final_adapter_and_an_export(tiny_model_dir, data_file, tmp_path, capsys, monkeypatch):
    import qdylora.adapters.export as export
    import qdylora.adapters.files as files

    real = files.save_file

    def full_for_the_adapter(tensors, path, metadata=None):
        if ".adapter.tmp-" in str(path) and ".staging-" not in str(path):  # the final adapter, not a checkpoint's
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(files, "save_file", full_for_the_adapter)
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(out), *ARGS]) == 2
    err = error_line(capsys.readouterr().err)
    assert "could not write" in err and "No space left on device" in err and f"checkpoint-{STEPS}" in err
    assert not (out / "adapter").exists() and _check_intact(out)[-1] == STEPS
    monkeypatch.setattr(files, "save_file", real)
    _finish(out, tiny_model_dir, data_file, capsys)  # the resume writes the adapter from checkpoint-8

    exp = tmp_path / "exp"
    assert main(["export", str(out), "--rank", "4", "--output", str(exp)]) == 0
    before = (exp / "adapter_model.safetensors").read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_file", full)
    assert main(["export", str(out), "--rank", "2", "--output", str(exp), "--overwrite"]) == 2
    assert "No space left on device" in error_line(capsys.readouterr().err)
    assert (exp / "adapter_model.safetensors").read_bytes() == before  # the earlier export is intact
    assert json.loads((exp / "adapter_config.json").read_text())["r"] == 4
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def _mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                        capture_output=True).returncode == 0
    return ok


def test_a_really_full_disk_during_training(tiny_model_dir, data_file, tmp_path, capsys):
    probe = tmp_path / "probe"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(probe),
                 *ARGS, "--max-steps", "2"]) == 0
    capsys.readouterr()
    one = sum(p.stat().st_size for p in (probe / "checkpoint-2").rglob("*") if p.is_file())
    rest = sum(p.stat().st_size for p in probe.iterdir() if p.is_file())
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, int(one * 1.6 + rest * 3 + 64 * 1024)):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = mnt / "run"
        rc = main(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(out), *ARGS])
        err = error_line(capsys.readouterr().err)
        assert rc == 2 and "No space left on device" in err or "short write" in err, err
        kept = _check_intact(out)
        assert kept and kept[0] == 2
        saved = tmp_path / "moved"
        shutil.copytree(out, saved)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    _finish(saved, tiny_model_dir, data_file, capsys)
