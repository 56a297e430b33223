"""Trainer callbacks: the progress bar and JSONL log, Ctrl-C handling."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback



class LogCallback(TrainerCallback):
    """tqdm bar (loss, rank, tokens/s) and one JSON line per log event."""

    def __init__(self, log_path: Path, trainer_ref) -> None:
        self.log_path, self.trainer_ref = log_path, trainer_ref
        self.bar = None
        self.t0 = self.tok0 = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)
        self.t0, self.tok0 = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if "loss" not in logs or not state.is_world_process_zero:
            return
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = (state.num_input_tokens_seen - self.tok0) / dt
        schedule = self.trainer_ref.rank_schedule
        ranks = schedule.step_ranks() if schedule is not None else []
        rec = {"step": state.global_step, "loss": logs["loss"], "rank": max(ranks) if ranks else None,
               **({"ranks": ranks} if schedule is not None and schedule.config.rank_per != "step" else {}),
               "learning_rate": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
               "tokens_per_s": round(tps, 2), "tokens_seen": state.num_input_tokens_seen,
               "elapsed_s": round(dt, 3)}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", rank=rec["rank"], tok_s=f"{tps:.0f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


class InterruptCallback(TrainerCallback):
    """First Ctrl-C: finish the current step, save a checkpoint, stop. Second Ctrl-C: stop at once."""

    def __init__(self) -> None:
        self.requested = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True


class SyncCallback(TrainerCallback):
    """Before each optimizer step, every process learns which components any process trained."""

    def __init__(self, schedule) -> None:
        self.schedule = schedule

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.schedule.synchronize()
