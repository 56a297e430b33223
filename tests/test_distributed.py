"""Several processes (torchrun, gloo on the CPU): DDP equals one process with the global batch, every process
runs the same ranks, frozen components stay untouched, one writer, kill + resume, refused launches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from launch import (PROBE, TORCHRUN, check_frozen_untouched, check_one_writer, env, launch, log, needs_torchrun,
                    run, settings)
from safetensors.torch import load_file

from qdylora.adapters.rank_sampler import RankSampler
from qdylora.adapters.config import QDyLoRAConfig

pytestmark = needs_torchrun


def test_ddp_equals_one_process_with_the_global_batch(tiny_model_dir, data_file, tmp_path):
    one, two = tmp_path / "one" / "run", tmp_path / "two" / "run"
    for out, batch, procs in ((one, 4, 1), (two, 2, 2)):
        s = settings(tiny_model_dir, data_file, batch=batch, rank_sampler="list", rank_list=[2, 5])
        s["train"]["fisher_steps"] = 3  # allocate's statistics: summed over the processes
        run(out, s, procs=procs)
    for a, b in zip(log(one), log(two), strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    w1, w2 = (load_file(str(d / "adapter" / "qdylora_adapter.safetensors")) for d in (one, two))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=0)
    # every process ran the documented draws of its own rows (numbered across processes)
    r0, r1 = (json.loads((tmp_path / "two" / f"ranks_{i}.json").read_text()) for i in (0, 1))
    n_layers = len(r0) // 4
    s = RankSampler(QDyLoRAConfig(r_max=8, seed=3, rank_sampler="list", rank_list=[2, 5], max_rows=0,
                                  update="frozen"))
    for t in range(4):
        assert r0[t * n_layers] == s.rows(t, 0, 2, first_row=0) and r1[t * n_layers] == s.rows(t, 0, 2, first_row=2)
    check_frozen_untouched(tiny_model_dir, w2)
    check_one_writer(two)
    assert [r["step"] for r in log(two)] == [1, 2, 3, 4]
    f1, f2 = (load_file(str(d / "adapter" / "fisher_stats.safetensors")) for d in (one, two))
    assert f2["steps"].tolist() == f1["steps"].tolist() == [1, 2, 3] and float(f2["tokens"][0]) == float(f1["tokens"][0])
    for key in ("grad", "outer", "at_config"):
        scale = float(f1[key].abs().max())
        torch.testing.assert_close(f2[key], f1[key], rtol=1e-3, atol=1e-4 * scale)


def test_step_ranks_are_the_same_in_every_process(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    run(out, settings(tiny_model_dir, data_file, batch=2, steps=3, rank_per="step"), procs=2)
    r0, r1 = (json.loads((tmp_path / f"ranks_{i}.json").read_text()) for i in (0, 1))
    assert r0 == r1 and len({tuple(r) for r in r0}) > 1


def test_kill_one_process_then_resume_with_another_process_count(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    s = settings(tiny_model_dir, data_file, batch=2, steps=40)
    proc = launch(out, s, procs=2)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-2").is_dir() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (out / "checkpoint-2").is_dir()
    workers = subprocess.run(["pgrep", "-f", PROBE], capture_output=True, text=True).stdout.split()
    os.kill(int(workers[-1]), signal.SIGKILL)  # one worker dies; torchrun stops the other
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    s["train"]["max_steps"] = 6
    run(out, {**s, "resume": True}, procs=1)
    steps = [r["step"] for r in log(out)]
    assert steps == list(range(1, 7))
    assert json.loads((out / "adapter" / "qdylora_config.json").read_text())["global_step"] == 6


def test_different_seeds_per_process_are_refused(tiny_model_dir, data_file, tmp_path):
    proc = launch(tmp_path / "run", {**settings(tiny_model_dir, data_file, batch=2), "seed_per_process": True}, 2)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "different --seed [0, 1]" in text
    assert not (tmp_path / "run").exists()


def test_more_processes_than_gpus_is_refused(monkeypatch):
    from qdylora.errors import ConfigError
    from qdylora.train.processes import training_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="4 processes were launched on a machine with 2 GPU"):
        training_device()


def test_one_main_process_and_a_real_barrier_before_the_trainer_starts(tmp_path):
    """Before any Trainer exists (where the run folder is written), exactly rank 0 is the main process and the
    barrier waits for the slowest process: rank 1 arrives 2 s late, rank 0 leaves after it arrived."""
    script = tmp_path / "who.py"
    script.write_text(
        "import json, os, sys, time\n"
        "from qdylora.train.processes import barrier, is_main\n"
        "rank = int(os.environ['RANK'])\n"
        "main = is_main()\n"
        "if rank == 1:\n"
        "    time.sleep(2)\n"
        "arrived = time.time()\n"
        "barrier()\n"
        "left = time.time()\n"
        "json.dump({'main': main, 'arrived': arrived, 'left': left}, open(sys.argv[1] + f'/who_{rank}.json', 'w'))\n")
    proc = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000 + 7),
                           str(script), str(tmp_path)], env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    who = [json.loads((tmp_path / f"who_{r}.json").read_text()) for r in (0, 1)]
    assert [w["main"] for w in who] == [True, False]
    assert who[0]["left"] >= who[1]["arrived"]
