"""Rank sweeps on lm-evaluation-harness tasks: the in-memory model (loaded and quantized once) at each rank.

lm-eval's Python API wraps the PeftModel (`HFLM(pretrained=model)`) once, and `simple_evaluate` runs at
every rank (rank 0: the base model) with lm-eval's own seeds, so each number is what lm-eval reports
for that rank's export. A local task is a
folder of lm-eval YAML files (`include_path`); relative `data_files` in them resolve against that
folder. lm-eval is an optional extra: `pip install qdylora[eval]`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..errors import ConfigError, DataError
from .common import apply_rank, check_ranks, model_device, progress_bar, ranks_restored

INSTALL = "lm-evaluation-harness is not installed; `pip install qdylora[eval]` (or `pip install lm-eval`)"


def _lm_eval():
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(INSTALL) from None
    return simple_evaluate, HFLM, TaskManager


@contextlib.contextmanager
def _quiet_and_in(folder: str | None):
    """lm-eval logs a warning per call for an in-memory model; run in `folder` so relative data_files resolve."""
    names = ("lm_eval", "lm-eval", "datasets")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    cwd = os.getcwd()
    try:
        if folder:
            os.chdir(folder)
        yield
    finally:
        os.chdir(cwd)
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def metric_columns(results: dict) -> dict[str, float]:
    """{'task/metric': value} from lm-eval's results dict (filters other than 'none' keep their name)."""
    out = {}
    for task, metrics in sorted(results.items()):
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "_stderr" in key or "," not in key:
                continue  # lm-eval's metrics are 'metric,filter'; 'sample_len' and friends are bookkeeping
            metric, _, filt = key.partition(",")
            out[f"{task}/{metric}" + ("" if filt in ("", "none") else f"[{filt}]")] = float(value)
    return out


@dataclass
class HarnessSpec:
    """What an lm-eval sweep runs: task names, the folder of local task YAMLs, shots, items per task."""

    tasks: list[str]
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    manager: Any = None  # lm-eval's TaskManager, built once

    def describe(self) -> dict[str, Any]:
        return {"lm_eval_tasks": self.tasks, "include_path": self.include_path, "num_fewshot": self.num_fewshot,
                "limit": self.limit}


def harness_spec(tasks: Sequence[str] | None, include_path: str | None = None, num_fewshot: int | None = None,
                 limit: int | None = None) -> HarnessSpec:
    """Check that lm-eval is installed, the include path is a folder and every task exists (before a model loads)."""
    _, _, TaskManager = _lm_eval()
    tasks = [t.strip() for t in (tasks or []) if t.strip()]
    if not tasks:
        raise ConfigError("--task lm-eval needs --lm-eval-tasks NAME[,NAME...], e.g. arc_easy or a task of "
                          "--include-path DIR")
    if include_path is not None and not Path(include_path).is_dir():
        raise DataError(f"--include-path {include_path} is not a folder of lm-eval task YAML files")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot {num_fewshot} must be >= 0")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} must be >= 1")
    folder = str(Path(include_path).resolve()) if include_path else None
    with _quiet_and_in(None):
        manager = TaskManager(include_path=folder, include_defaults=True, verbosity="ERROR")
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise DataError(f"lm-eval knows no task {', '.join(unknown)}; pass --include-path with its YAML, or see "
                        "`lm-eval ls tasks`")
    return HarnessSpec(tasks, folder, num_fewshot, limit, manager)


def evaluate_harness(model: nn.Module, tokenizer, tasks: Sequence[str] | HarnessSpec, ranks: Sequence[int] | None,
                     include_path: str | None = None, num_fewshot: int | None = None, limit: int | None = None,
                     batch_size: int = 8, progress=True) -> dict[int | None, dict]:
    """{rank: {'metrics': {'task/metric': value}, 'seconds': s}} with rank 0 the base model (None: as it is)."""
    simple_evaluate, HFLM, _ = _lm_eval()
    ranks = check_ranks(model, ranks)
    spec = tasks if isinstance(tasks, HarnessSpec) else harness_spec(tasks, include_path, num_fewshot, limit)
    keys = ranks if ranks is not None else [None]
    bar, own_bar = progress_bar(progress, len(keys), "lm-eval")
    out: dict = {}
    with _quiet_and_in(spec.include_path), ranks_restored(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model_device(model)))
        for rank in keys:
            t0 = time.perf_counter()
            if rank is not None:
                apply_rank(model, rank)
            try:
                res = simple_evaluate(model=lm, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot,
                                      limit=spec.limit, task_manager=spec.manager, bootstrap_iters=0,
                                      log_samples=False, verbosity="ERROR")
            except (FileNotFoundError, ValueError, KeyError) as e:  # a broken YAML or a missing data file
                raise DataError(f"lm-eval cannot run {', '.join(spec.tasks)}: {str(e).splitlines()[0]}") from None
            out[rank] = {"metrics": metric_columns(res["results"]), "seconds": time.perf_counter() - t0}
            if bar is not None:
                bar.update(1)
    if own_bar:
        bar.close()
    return out
