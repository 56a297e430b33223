"""Rank sweeps: evaluate one QDyLoRA adapter at many ranks (and the base without adapter), table + files + plot."""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..errors import AdapterError, ConfigError, DataError
from .common import BASE_RANK, check_ranks
from .plots import plot_params, plot_sweep

TASKS = ("mmlu", "loss", "default", "lm-eval")
# what the "accuracy" column means for each task
ACCURACY_OF = {"mmlu": "accuracy over questions (micro)", "loss": "next-token accuracy on response tokens",
               "default": "exact match", "lm-eval": "lm-eval's own metrics, one column per task/metric"}
COLUMNS = ("rank", "label", "accuracy", "accuracy_macro", "loss", "perplexity", "n", "seconds", "params")


@dataclass
class SweepResult:
    """One sweep: a row per rank (rank 0 = base model without adapter), plus per-subject MMLU scores."""

    task: str
    adapter: str
    base_model: str
    rows: list[dict[str, Any]]
    per_subject: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    total_seconds: float = 0.0

    def row(self, rank: int) -> dict[str, Any]:
        """The row of `rank` (0 = base)."""
        return next(r for r in self.rows if r["rank"] == rank)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "accuracy_is": ACCURACY_OF[self.task], "adapter": self.adapter,
                "base_model": self.base_model, "rows": self.rows, "per_subject": self.per_subject,
                "settings": self.settings, "total_seconds": self.total_seconds}

    def metric_names(self) -> list[str]:
        """lm-eval sweeps: the 'task/metric' columns, in order; other tasks: none."""
        return sorted({k for r in self.rows for k in r if "/" in k}) if self.task == "lm-eval" else []

    def plot_metrics(self) -> list[tuple[str, str]]:
        """(row key, axis label) of each plotted metric."""
        if self.task == "lm-eval":
            return [(m, m) for m in self.metric_names()[:4]]
        return [("accuracy", ACCURACY_OF[self.task]), ("loss", "loss" if self.task != "mmlu" else "answer-letter loss")]

    def task_label(self) -> str:
        """The task as a plot names it (lm-eval: its task names)."""
        tasks = self.settings.get("lm_eval_tasks")
        return f"lm-eval {','.join(tasks)}" if self.task == "lm-eval" and tasks else self.task

    def table(self) -> str:
        """Plain-text table: rank, accuracy(ies), loss, perplexity, seconds (lm-eval: its metric columns)."""
        if self.task == "lm-eval":
            names = self.metric_names()
            width = max([9] + [len(n) for n in names])
            lines = [f"task lm-eval ({', '.join(self.settings.get('lm_eval_tasks', []))}): lm-eval's own numbers",
                     f"{'rank':>6}  " + "  ".join(f"{n:>{width}}" for n in names) + f"  {'time s':>7}"]
            for r in self.rows:
                cells = "  ".join(f"{r[n]:>{width}.4f}" if r.get(n) is not None else f"{'-':>{width}}" for n in names)
                lines.append(f"{r['label']:>6}  {cells}  {r['seconds']:>7.2f}")
            return "\n".join(lines)
        macro = self.task == "mmlu"
        head = f"{'rank':>6}  {'accuracy':>9}" + (f"  {'acc.macro':>9}" if macro else "") + \
            f"  {'loss':>8}  {'ppl':>9}  {'n':>5}  {'time s':>7}"
        lines = [f"task {self.task}: accuracy = {ACCURACY_OF[self.task]}"
                 + ("; acc.macro = mean of per-subject accuracies" if macro else ""), head]
        for r in self.rows:
            lines.append(f"{r['label']:>6}  {r['accuracy']:>9.4f}" + (f"  {r['accuracy_macro']:>9.4f}" if macro else "")
                         + f"  {r['loss']:>8.4f}  {r['perplexity']:>9.3f}  {r['n']:>5}  {r['seconds']:>7.2f}")
        return "\n".join(lines)

    def save(self, output_dir: str | Path) -> list[Path]:
        """Write sweep_<task>.json, .csv and .png into output_dir; returns the paths."""
        from ..atomic import write_json_atomic

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"sweep_{self.task}"
        write_json_atomic(stem.with_suffix(".json"), self.to_dict())
        with open(stem.with_suffix(".csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(COLUMNS) + self.metric_names(), extrasaction="ignore")
            w.writeheader()
            w.writerows(self.rows)
        (plot_params if any(r.get("pattern") for r in self.rows) else plot_sweep)(self, stem.with_suffix(".png"))
        return [stem.with_suffix(s) for s in (".json", ".csv", ".png")]


def read_sweep_patterns(meta: dict, tensors: dict, cfg, paths: Sequence[str] | None) -> list:
    """The rank-pattern files of a sweep, read and checked against the adapter (before any model loads)."""
    if not paths:
        return []
    from ..allocate.pattern import costs_from_tensors, load_patterns

    return load_patterns(list(paths), costs_from_tensors(list(meta["targets"]), tensors), cfg)


def add_pattern_rows(result: SweepResult, model: nn.Module, tokenizer, items: list, patterns: list, **kwargs) -> None:
    """Evaluate each rank pattern (rows labelled by file name) and give every row its adapter parameters."""
    from ..adapters.attach import module_layers, set_rank
    from .common import ranks_restored

    costs = {n: layer.in_features + layer.out_features for n, layer in module_layers(model).items()}
    for row in result.rows:
        row["params"] = (row["rank"] or 0) * sum(costs.values())
    t0 = time.perf_counter()
    with ranks_restored(model):
        for pattern in patterns:
            set_rank(model, pattern.ranks)
            rows, per_subject = evaluate_ranks(model, tokenizer, result.task, items, None, **kwargs)
            for row in rows:
                row.update(label=pattern.name, pattern=pattern.path, params=pattern.params, rank=None)
                result.rows.append(row)
            if per_subject:
                result.per_subject[pattern.name] = next(iter(per_subject.values()))
    result.settings["patterns"] = [p.path for p in patterns]
    result.total_seconds = round(result.total_seconds + time.perf_counter() - t0, 3)


def parse_ranks(text: str) -> list[int]:
    """'1,2,4' or '1-8' or a mix -> sorted unique ranks; a clear error for anything else."""
    ranks: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                ranks.update(range(lo, hi + 1))
            else:
                ranks.add(int(part))
        except ValueError:
            raise ConfigError(f"--ranks: {part!r} is not a rank; write ranks like 1,2,4,8 or 1-64") from None
    if not ranks:
        raise ConfigError("--ranks is empty; write ranks like 1,2,4,8")
    return sorted(ranks)


def check_task(task: str) -> str:
    """task if known, else a ConfigError listing the tasks."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    return task


def load_task_data(task: str, data: str | None, limit: int | None = None, harness: dict | None = None):
    """The task's items: MMLU questions, held-out records, default-task records, or (lm-eval) the checked
    HarnessSpec built from `harness` (lm_eval_tasks, include_path, num_fewshot); errors before any model loads."""
    check_task(task)
    if task == "lm-eval":
        from .harness import harness_spec

        return harness_spec(limit=limit, **(harness or {}))
    if task == "mmlu":
        from .mmlu import load_mmlu

        if not data:
            raise DataError("--task mmlu needs --data: QLoRA's JSONL (e.g. ../shared/data/mmlu/zero_shot_mmlu_val"
                             ".jsonl), cais/mmlu json/jsonl/parquet files, or a hub name such as cais/mmlu")
        return load_mmlu(data, limit=limit)
    from ..data.records import load_records

    if task == "loss" and not data:
        raise DataError("--task loss needs --data: a held-out .json/.jsonl file of alpaca, text or chat records")
    if task == "default" and not data:
        from .exact_match import default_records

        records = default_records()
    else:
        records = load_records(data)
    return records[:limit] if limit else records


def resolve_base(meta: dict, model: str | None = None) -> str:
    """What to load as the base: --model, else the source/name the adapter recorded (the default GGUF by file name)."""
    if model:
        return model
    from ..load.embedded import DEFAULT_GGUF, default_model_path

    info = meta.get("base_model", {})
    for cand in (info.get("source"), info.get("name")):
        if not cand:
            continue
        if Path(cand).exists():
            return str(cand)
        if Path(cand).name == DEFAULT_GGUF:
            return default_model_path()
        if "/" in cand and not Path(cand).is_absolute() and not cand.endswith(".gguf"):
            return cand  # a hub id (needs the network)
    raise AdapterError(f"cannot find the base model this adapter was trained on ({info.get('name')!r}); "
                     "pass it with --model (hub id, folder or .gguf file)")


def evaluate_ranks(model: nn.Module, tokenizer, task: str, items: list, ranks: Sequence[int] | None,
                   shots: int = 0, seed: int = 0, batch_size: int = 8, batched_ranks: bool = False,
                   max_seq_len: int = 512, padding_side: str | None = None, progress=True, shot_pool=None
                   ) -> tuple[list[dict[str, Any]], dict]:
    """(rows, per-subject) for `model` at each rank (0 = base; None = the model as it is) on loaded task items."""
    check_task(task)
    common = dict(batch_size=batch_size, batched_ranks=batched_ranks, padding_side=padding_side, progress=progress)
    rows, per_subject = [], {}
    if task == "lm-eval":
        from .harness import evaluate_harness

        res = evaluate_harness(model, tokenizer, items, ranks, batch_size=batch_size, progress=progress)
        for r, m in res.items():
            rows.append({"accuracy": None, "accuracy_macro": None, "loss": None, "perplexity": None,
                         "n": items.limit, "seconds": m["seconds"], "rank": r, **m["metrics"]})
    elif task == "mmlu":
        from .mmlu import score_questions

        res = score_questions(model, tokenizer, items, ranks, shots=shots, seed=seed, shot_pool=shot_pool,
                              **common)
        for r, m in res.items():
            rows.append({"accuracy": m.accuracy_micro, "accuracy_macro": m.accuracy_macro, "loss": m.loss,
                         "perplexity": _exp(m.loss), "n": m.n, "seconds": m.seconds, "rank": r})
            per_subject[_label(r)] = m.per_subject
    else:
        from .exact_match import evaluate_exact_match
        from .loss import evaluate_loss

        if task == "loss":
            res = evaluate_loss(model, tokenizer, items, ranks, max_seq_len=max_seq_len, **common)
        else:
            res = evaluate_exact_match(model, tokenizer, items, ranks, **common)
        for r, m in res.items():
            acc = m.token_accuracy if task == "loss" else m.exact_match
            rows.append({"accuracy": acc, "accuracy_macro": None, "loss": m.loss, "perplexity": m.perplexity,
                         "token_accuracy": m.token_accuracy, "exact_match": m.exact_match, "n": m.n,
                         "n_tokens": m.n_tokens, "seconds": m.seconds, "rank": r})
    for row in rows:
        row["label"] = _label(row["rank"])
        for k in ("accuracy", "loss", "perplexity", "seconds"):
            row[k] = round(row[k], 6) if row[k] is not None else None
    rows.sort(key=lambda x: -1 if x["rank"] is None else x["rank"])
    return rows, per_subject


def _label(rank: int | None) -> str:
    return "model" if rank is None else "base" if rank == BASE_RANK else str(rank)


def _exp(x: float) -> float:
    import math

    return math.exp(min(x, 700.0))


def sweep_model(model: nn.Module, tokenizer, ranks: Sequence[int], task: str, data: str | None = None,
                shots: int = 0, limit: int | None = None, batch_size: int = 8, batched_ranks: bool = False,
                include_base: bool = True, max_seq_len: int = 512, seed: int = 0, padding_side: str | None = None,
                progress=True, adapter: str = "", base_model: str = "", items=None, harness: dict | None = None,
                shot_pool=None) -> SweepResult:
    """Sweep an already loaded QDyLoRA model (see `sweep`); `items` skips reading `data` again."""
    check_task(task)
    ranks = sorted(set(int(r) for r in ranks) - {BASE_RANK})
    check_ranks(model, ranks)
    items = load_task_data(task, data, limit, harness) if items is None else items
    t0 = time.perf_counter()
    rows, per_subject = evaluate_ranks(model, tokenizer, task, items, ([BASE_RANK] if include_base else []) + ranks,
                                       shots, seed, batch_size, batched_ranks, max_seq_len, padding_side, progress,
                                       shot_pool)
    settings = {"ranks": ranks, "include_base": include_base, "data": data, "shots": shots, "limit": limit,
                "batch_size": batch_size, "batched_ranks": batched_ranks, "max_seq_len": max_seq_len, "seed": seed,
                "padding_side": padding_side or getattr(tokenizer, "padding_side", "right")}
    if task == "lm-eval":
        settings.update(items.describe())
    else:
        settings.update(n_items=len(items), shots_from="dev split" if shot_pool else "evaluated split")
    return SweepResult(task=task, adapter=adapter, base_model=base_model, rows=rows, per_subject=per_subject,
                       settings=settings, total_seconds=round(time.perf_counter() - t0, 3))


def sweep(adapter_dir: str | Path, ranks: Sequence[int] | None = None, task: str = "mmlu", data: str | None = None,
          shots: int = 0, limit: int | None = None, batch_size: int = 8, batched_ranks: bool = False,
          model: str | None = None, output: str | Path | None = None, include_base: bool = True,
          max_seq_len: int = 512, seed: int = 0, padding_side: str | None = None, progress=True,
          save: bool = True, patterns: Sequence[str] | None = None, harness: dict | None = None,
          shots_data: str | None = None) -> SweepResult:
    """Load base + adapter, evaluate every rank (default: powers of two and r_max) and the base, write
    sweep_<task>.json/.csv/.png to `output` (default: the adapter folder); rank-pattern files in
    `patterns` are evaluated beside the ranks (the plot then shows the metric against parameters);
    `harness` (lm_eval_tasks, include_path, num_fewshot) configures task lm-eval; MMLU k-shot prompts take
    their examples from the dev split (`shots_data`, or dev files in a `data` folder) when there is one."""
    from ..adapters.files import adapter_config, load_adapter, read_adapter
    from ..load.model import load_model_and_tokenizer
    from ..train.run_folder import find_adapter

    check_task(task)
    output = output or adapter_dir
    adapter_dir, _ = find_adapter(adapter_dir)
    meta, tensors = read_adapter(adapter_dir)
    cfg = adapter_config(meta, str(adapter_dir))
    loaded_patterns = read_sweep_patterns(meta, tensors, cfg, patterns)
    ranks = sorted(set(int(r) for r in (cfg.power_of_two_ranks() if ranks is None else ranks)) - {BASE_RANK})
    if not ranks:
        raise ConfigError("no ranks to evaluate; give at least one, e.g. --ranks 1,8,64")
    for r in ranks:  # before loading anything heavy
        cfg.check_rank(r)
    items = load_task_data(task, data, limit, harness)  # fail on bad data before the model loads
    shot_pool = None
    if task == "mmlu" and shots:
        from .mmlu import dev_pool

        shot_pool = dev_pool(data, shots_data)
    base_name = resolve_base(meta, model)
    base, tokenizer = load_model_and_tokenizer(base_name)
    peft_model = load_adapter(base, adapter_dir)
    result = sweep_model(peft_model, tokenizer, ranks, task, data, shots, limit, batch_size, batched_ranks,
                         include_base, max_seq_len, seed, padding_side, progress,
                         adapter=str(adapter_dir), base_model=base_name, items=items, shot_pool=shot_pool)
    if loaded_patterns:
        add_pattern_rows(result, peft_model, tokenizer, items, loaded_patterns, shots=shots, seed=seed,
                         batch_size=batch_size, max_seq_len=max_seq_len, padding_side=padding_side,
                         progress=progress, shot_pool=shot_pool)
    if save:
        result.settings["files"] = [str(p) for p in result.save(output)]
    return result
