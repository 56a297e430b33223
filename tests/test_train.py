"""Training: rank per step, exact resume, Ctrl-C, non-finite loss, refusing to clobber a run."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from qdylora.train import trainer as trainer_mod
from qdylora.train.rank_schedule import RankSchedule
from qdylora.adapters.config import QDyLoRAConfig
from qdylora.adapters.rank_sampler import RankSampler
from qdylora.train import TrainConfig, TrainingError, read_log, train


@pytest.fixture()
def data_file(tmp_path):
    recs = [{"instruction": f"Say the number {i} twice.", "input": "", "output": f"{i} {i}"} for i in range(40)]
    p = tmp_path / "data.json"
    p.write_text(json.dumps(recs))
    return str(p)


def _cfgs(steps=6, **kw):
    q = QDyLoRAConfig(r_min=1, r_max=8, alpha=16, seed=11, rank_per="step", update="frozen")
    t = TrainConfig(max_steps=steps, batch_size=4, grad_accum=2, max_seq_len=48, save_steps=2,
                    warmup_steps=1, learning_rate=5e-3, optim="paged_adamw_32bit", **kw)
    return q, t


def _run(tiny_model_dir, data_file, out, steps=6, **kw):
    q, t = _cfgs(steps)
    return train(str(tiny_model_dir), data_file, str(out), q, t, **kw)


def test_every_micro_step_runs_the_step_rank_and_the_adapter_is_saved(tiny_model_dir, data_file, tmp_path, monkeypatch):
    from qdylora.adapters.layer import DyLoRALinear

    seen: list = []  # per micro-step: the ranks the DyLoRA layers' forwards ran at (checkpointing recomputes them)
    orig_step, orig_forward = trainer_mod.QDyLoRATrainer.training_step, DyLoRALinear.forward

    def training_step(self, *a, **k):
        seen.append(set())
        return orig_step(self, *a, **k)

    def forward(layer, *a, **k):
        if layer.training:
            seen[-1].add(layer.rank)
        return orig_forward(layer, *a, **k)

    monkeypatch.setattr(trainer_mod.QDyLoRATrainer, "training_step", training_step)
    monkeypatch.setattr(DyLoRALinear, "forward", forward)
    res = _run(tiny_model_dir, data_file, tmp_path / "run")
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    sampler = RankSampler(QDyLoRAConfig(r_min=1, r_max=8, seed=11, rank_per="step"))
    # grad_accum 2: both micro-steps of step t ran at the step's documented draw, in every layer
    assert seen == [{sampler.sample(t)} for t in range(6) for _ in range(2)]
    assert [r["rank"] for r in log] == [sampler.sample(t) for t in range(6)]
    assert all(r["tokens_per_s"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert res["global_step"] == 6
    for ck in ("checkpoint-2", "checkpoint-4", "checkpoint-6"):
        d = tmp_path / "run" / ck
        assert (d / "adapter" / "qdylora_adapter.safetensors").exists()
        assert (d / "optimizer.pt").exists() and (d / "scheduler.pt").exists() and (d / "rng_state.pth").exists()
    assert (tmp_path / "run" / "adapter" / "qdylora_config.json").exists()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no staging left behind


def test_interrupt_then_resume_gives_the_same_losses(tiny_model_dir, data_file, tmp_path, monkeypatch):
    _run(tiny_model_dir, data_file, tmp_path / "full")
    full = read_log(tmp_path / "full")

    orig = RankSchedule.before_micro_step

    def ctrl_c_at_step_3(self, step, rows):
        if step == 3 and self.step != 3:  # the first micro-step of step 4
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does; the handler lets the step finish
        return orig(self, step, rows)

    monkeypatch.setattr(RankSchedule, "before_micro_step", ctrl_c_at_step_3)
    res = _run(tiny_model_dir, data_file, tmp_path / "cut")
    monkeypatch.setattr(RankSchedule, "before_micro_step", orig)
    assert res["interrupted"] and res["global_step"] == 4
    assert (tmp_path / "cut" / "checkpoint-4").is_dir() and not (tmp_path / "cut" / "adapter").exists()

    with pytest.raises(TrainingError, match="already holds a training run; pass --resume"):
        _run(tiny_model_dir, data_file, tmp_path / "cut")
    _run(tiny_model_dir, data_file, tmp_path / "cut", resume=True)
    cut = read_log(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4, 5, 6]
    assert [r["rank"] for r in cut] == [r["rank"] for r in full]
    for a, b in zip(cut, full):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dir, data_file, tmp_path, monkeypatch):
    orig = trainer_mod.QDyLoRATrainer.compute_loss

    def nan_at_step_5(self, model, inputs, *a, **kw):
        loss = orig(self, model, inputs, *a, **kw)
        return loss * float("nan") if self.state.global_step == 4 else loss

    monkeypatch.setattr(trainer_mod.QDyLoRATrainer, "compute_loss", nan_at_step_5)
    with pytest.raises(trainer_mod.NonFiniteLoss, match=r"loss became nan at step 5.*checkpoint-4"):
        _run(tiny_model_dir, data_file, tmp_path / "run")
    ck = tmp_path / "run" / "checkpoint-4" / "adapter" / "qdylora_adapter.safetensors"
    assert ck.exists()
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(ck)).values())


def test_overwrite_replaces_and_resume_needs_a_checkpoint(tiny_model_dir, data_file, tmp_path):
    with pytest.raises(TrainingError, match="holds no checkpoint-N folder"):
        _run(tiny_model_dir, data_file, tmp_path / "new", steps=2, resume=True)
    _run(tiny_model_dir, data_file, tmp_path / "r", steps=2)
    _run(tiny_model_dir, data_file, tmp_path / "r", steps=2, overwrite=True)
    assert [r["step"] for r in read_log(tmp_path / "r")] == [1, 2]
