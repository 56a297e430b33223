"""The run folder: what it holds (config, log, checkpoints, adapter), refusing to clobber it, reading the log."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint

from ..errors import TrainingError

LOG_NAME = "train_log.jsonl"
RUN_NAME = "run_config.json"
ADAPTER_SUBDIR = "adapter"


def _holds_run(output_dir: Path) -> bool:
    return output_dir.is_dir() and (
        (output_dir / LOG_NAME).exists() or any(output_dir.glob("checkpoint-*")) or (output_dir / ADAPTER_SUBDIR).exists()
    )


def prepare_output_dir(output_dir: str | os.PathLike, resume: bool, overwrite: bool) -> str | None:
    """Check the output folder; returns the checkpoint to resume from (or None)."""
    out = Path(output_dir)
    if resume and overwrite:
        raise TrainingError("--resume and --overwrite contradict each other; pass one")
    if resume:
        last = get_last_checkpoint(str(out)) if out.is_dir() else None
        if last is None:
            raise TrainingError(f"--resume: {out} holds no checkpoint-N folder to resume from; "
                                "run without --resume to start a new run")
        return last
    if _holds_run(out):
        if not overwrite:
            raise TrainingError(f"{out} already holds a training run; pass --resume to continue it, "
                                "--overwrite to replace it, or choose another --output")
        for p in list(out.glob("checkpoint-*")) + [out / ADAPTER_SUBDIR]:
            shutil.rmtree(p, ignore_errors=True)
        for p in (out / LOG_NAME, out / RUN_NAME):
            p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return None


def tokens_at(log_path: Path, step: int) -> int:
    """Tokens seen up to `step`, from the JSONL log (so tokens/s stays right across a resume)."""
    if not log_path.exists():
        return 0
    tokens = 0
    for line in log_path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("step", 0) <= step:
            tokens = rec.get("tokens_seen", tokens)
    return tokens


def read_log(output_dir: str | os.PathLike) -> list[dict]:
    """The JSONL training log as a list of dicts (one per logged step)."""
    path = Path(output_dir) / LOG_NAME
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
