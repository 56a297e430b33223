"""The run folder: its config, log, checkpoints and final adapter; which checkpoint a resume can use; rotation.

RUN/
  run_config.json      model, data and every setting (what --resume continues with)
  train_log.jsonl      one JSON object per logged step
  checkpoint-N/        adapter/, optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json
  adapter/             the finished adapter (written once training reached max_steps)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from ..atomic import remove_stale, write_json_atomic
from ..errors import AdapterError, TrainingError

LOG_NAME = "train_log.jsonl"
RUN_NAME = "run_config.json"
ADAPTER_SUBDIR = "adapter"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# what an exact resume reads besides the adapter
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-N folder, oldest first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from exactly (a missing or damaged file), or None."""
    from ..adapters.files import read_adapter

    missing = [n for n in CHECKPOINT_FILES if not (folder / n).is_file()]
    if missing:
        return f"it lacks {', '.join(missing)}"
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        int(state["global_step"])
    except (ValueError, KeyError, TypeError, OSError):
        return "its trainer_state.json is damaged"
    try:
        read_adapter(folder / ADAPTER_SUBDIR)
    except AdapterError as e:
        return str(e)
    return None


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint a resume can use; damaged newer ones are reported on stderr and skipped."""
    for step, folder in reversed(checkpoints(out)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        print(f"warning: skipping {folder.name}: {problem}", file=sys.stderr)
    return None


def rotate_checkpoints(out: Path, keep: int, protect: Path | None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints, never `protect` (the one a resume would use); returns those deleted."""
    found = [p for _, p in checkpoints(out)]
    doomed = [p for p in found[:-keep] if protect is None or p.resolve() != protect.resolve()]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def holds_run(out: Path) -> bool:
    """True when `out` holds (part of) a qdylora training run."""
    return out.is_dir() and ((out / LOG_NAME).exists() or (out / RUN_NAME).exists() or bool(checkpoints(out))
                             or (out / ADAPTER_SUBDIR).exists())


def remove_run(out: Path) -> None:
    """Delete what a run wrote into `out` (its config, log, checkpoints, adapter, leftovers); other files stay."""
    for _, p in checkpoints(out):
        shutil.rmtree(p, ignore_errors=True)
    shutil.rmtree(out / ADAPTER_SUBDIR, ignore_errors=True)
    for name in (LOG_NAME, RUN_NAME):
        (out / name).unlink(missing_ok=True)
    remove_stale(out)


def check_writable(out: Path) -> None:
    """TrainingError unless `out` (or the folder that would hold it) can be written."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--output {out} is a file; give a folder path")
    probe_dir = out if out.is_dir() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe_dir.is_dir():
        raise TrainingError(f"--output {out}: {probe_dir} is a file, so the folder cannot be created")
    try:
        fd, name = tempfile.mkstemp(prefix=".write-probe.tmp-", dir=probe_dir)
        os.close(fd)
    except OSError as e:
        raise TrainingError(f"cannot write to {probe_dir} ({e.strerror}); choose another --output") from None
    try:
        # the probe may be gone already: another process of the same run removes temporary leftovers (remove_stale)
        Path(name).unlink(missing_ok=True)
    except OSError as e:
        raise TrainingError(f"cannot write to {probe_dir} ({e.strerror}); choose another --output") from None


def read_run_config(out: Path) -> dict:
    """run_config.json as a dict, or a TrainingError saying why it cannot be used."""
    path = out / RUN_NAME
    if not path.is_file():
        raise TrainingError(f"{out} has no {RUN_NAME}, so its settings are unknown and it cannot be resumed; "
                            "start a new run (--overwrite replaces this one)")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainingError(f"{path} is damaged ({e}); the run cannot be resumed with its settings. Start it again "
                            "with --overwrite") from None
    if not isinstance(run, dict) or not isinstance(run.get("qdylora"), dict) or not isinstance(run.get("train"), dict):
        raise TrainingError(f"{path} lacks its 'qdylora' / 'train' settings; start the run again with --overwrite")
    return run


def write_run_config(out: Path, run: dict) -> None:
    """Write run_config.json atomically."""
    write_json_atomic(out / RUN_NAME, run)


def read_log(output_dir: str | os.PathLike) -> list[dict]:
    """The JSONL training log as a list of dicts (one per logged step); a torn line from a kill is skipped."""
    path = Path(output_dir) / LOG_NAME
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            records.append(rec)
    return records


def truncate_log(out: Path, step: int) -> None:
    """Keep the log's records up to `step` (a resume from checkpoint-`step` logs the later steps again)."""
    path = out / LOG_NAME
    if not path.exists():
        return
    kept = [rec for rec in read_log(out) if rec["step"] <= step]
    tmp = path.with_name(f".{LOG_NAME}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(rec) + "\n" for rec in kept))
    os.replace(tmp, path)


def find_adapter(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(adapter folder, the run folder it belongs to or None) for a run folder, RUN/adapter, a checkpoint or an adapter."""
    from ..adapters.files import CONFIG_NAME

    p = Path(path)
    if not p.exists():
        raise AdapterError(f"{p} does not exist; pass a run folder (from `qdylora train`) or its adapter/ folder")
    if (p / "adapter_config.json").is_file() and not (p / CONFIG_NAME).is_file():
        raise AdapterError(f"{p} is a peft LoRA export (one rank), not a qdylora adapter; pass the run folder it "
                           "was exported from (or its adapter/ folder)")
    adapter = p if (p / CONFIG_NAME).is_file() else p / ADAPTER_SUBDIR
    if not (adapter / CONFIG_NAME).is_file() and checkpoints(p):
        raise AdapterError(f"{p} holds checkpoints but no finished adapter/; pass one of its checkpoint folders "
                           f"(e.g. {checkpoints(p)[-1][1]}) or finish the run with --resume")
    run = next((d for d in (adapter.parent, adapter.parent.parent) if (d / RUN_NAME).is_file()), None)
    return adapter, run
