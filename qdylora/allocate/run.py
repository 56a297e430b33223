"""`allocate`: score components on calibration data, choose per-module ranks under a budget, write the pattern."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters.attach import module_layers, qdylora_config_of
from ..errors import ConfigError, DataError
from ..eval.common import model_device
from .calib import CalibBatch, config_losses
from .greedy import (ScoreTable, budget_params, default_allowed, default_min_rank, floor_ranks, greedy_allocate,
                     uniform_rank)
from .pattern import RankPattern, costs_from_tensors, pattern_params, write_pattern
from .report import low_budget_note, rank_table
from .scores import SCORES, compute_scores, fisher_train_scores


@dataclass
class Allocation:
    """The chosen pattern, its scores and how it compares with the uniform rank of the same budget."""

    pattern: RankPattern
    table: ScoreTable
    budget: int
    uniform_rank: int | None
    pattern_loss: float | None  # None: no calibration data (fisher-train without --data)
    uniform_loss: float | None
    seconds: dict[str, float] = field(default_factory=dict)
    note: str | None = None  # measured advice for this kind of budget and adapter

    def summary(self) -> str:
        """The report `qdylora allocate` prints: table, parameters against budget, calibration losses."""
        p = self.pattern
        info = self.table.info
        where = "data-free" if p.score == "norm" else f"at reference rank {info.get('reference')}"
        if info.get("stats_steps"):
            first, last = info["stats_steps"]
            where += f", from training steps {first}-{last} ({info['stats_tokens']:,} loss tokens)"
        lines = [f"score {p.score} ({where}): {self.seconds['scores']:.1f} s (greedy {self.seconds['greedy']:.2f} s)",
                 "ranks per module type x layer ('.' = off):", rank_table(p.ranks),
                 f"parameters: {p.params:,} of a budget of {self.budget:,} ({100 * p.params / self.budget:.1f}%)"
                 + (f", every module at rank >= {p.budget['min_rank']}" if p.budget.get("min_rank") else "")]
        if self.uniform_rank is not None:
            lines.append(f"uniform rank {self.uniform_rank} everywhere: {p.source['uniform_params']:,} parameters")
        if self.pattern_loss is None:
            lines.append("calibration loss: not measured (pass --data to compare the pattern with the uniform rank)")
        elif self.uniform_rank is not None:
            lines.append(f"calibration loss: pattern {self.pattern_loss:.4f}, uniform rank {self.uniform_rank} "
                         f"{self.uniform_loss:.4f} (difference {self.pattern_loss - self.uniform_loss:+.4f})")
        else:
            lines.append(f"calibration loss: pattern {self.pattern_loss:.4f} (no uniform rank fits this budget)")
        return "\n".join(lines + ([self.note] if self.note else []))


def allocate_model(model: nn.Module | None, batches: Sequence[CalibBatch], budget: int, score: str = "taylor",
                   avg_rank: float | None = None, grid: Sequence[int] | None = None, progress: bool = True,
                   source: dict[str, Any] | None = None, min_rank: int = 0,
                   stats: dict[str, torch.Tensor] | None = None, costs: dict[str, int] | None = None,
                   config=None) -> Allocation:
    """Scores, greedy allocation (every module at min_rank or more) and calibration losses (pattern, uniform rank)
    for a loaded qdylora model; fisher-train scores the training statistics `stats` (with the adapter's `costs` and
    `config`, and without a model or batches when no calibration loss is wanted)."""
    cfg = config or qdylora_config_of(model)
    if costs is None:
        costs = {n: layer.in_features + layer.out_features for n, layer in module_layers(model).items()}
    uniform = uniform_rank(budget, costs, cfg)
    reference = uniform or cfg.r_min
    if score == "fisher-train":
        t0 = time.perf_counter()
        table = fisher_train_scores(stats, costs, cfg, reference)
        table.info["seconds"] = time.perf_counter() - t0
    else:
        table = compute_scores(score, model, batches, reference, grid=grid, progress=progress)
    t0 = time.perf_counter()
    ranks = greedy_allocate(table, budget, min_rank)
    greedy_s = time.perf_counter() - t0
    if model is None or not batches:
        return _allocation(ranks, table, budget, uniform, costs, score, avg_rank, min_rank, source, None, None,
                           {"scores": table.info["seconds"], "greedy": greedy_s, "evaluation": 0.0}, reference, 0, 0)
    layers = module_layers(model)
    t0 = time.perf_counter()
    # the scores' reference pass ran at the uniform rank on these batches: its loss is the uniform rank's
    known = table.info.get("reference_loss") if uniform is not None and reference == uniform else None
    configs = [[ranks[n] for n in layers]] + ([[uniform] * len(layers)] if uniform is not None and known is None
                                              else [])
    bar = tqdm(total=len(batches) * len(configs), desc="calibration loss", dynamic_ncols=True) if progress else None
    try:
        losses = config_losses(model, batches, torch.tensor(configs, dtype=torch.long), bar).tolist()
    finally:
        if bar is not None:
            bar.close()
    if known is not None:
        losses.append(known)
    seconds = {"scores": table.info["seconds"], "greedy": greedy_s, "evaluation": time.perf_counter() - t0}
    return _allocation(ranks, table, budget, uniform, costs, score, avg_rank, min_rank, source, losses[0],
                       losses[1] if uniform is not None else None, seconds, reference,
                       sum(b.ids.shape[0] for b in batches), sum(b.tokens for b in batches))


def _allocation(ranks, table, budget, uniform, costs, score, avg_rank, min_rank, source, pattern_loss, uniform_loss,
                seconds, reference, examples, tokens) -> Allocation:
    """The Allocation and its pattern's source record (what was scored, on what, how long it took)."""
    src = {**(source or {}), "reference_rank": reference, "calibration_examples": examples,
           "calibration_tokens": tokens, "uniform_rank": uniform,
           "uniform_params": None if uniform is None else uniform * sum(costs.values()),
           "calibration_loss": {"pattern": pattern_loss, "uniform": uniform_loss},
           "seconds": {k: round(v, 3) for k, v in seconds.items()}}
    for key in ("grid", "on_rank", "stats_steps", "stats_tokens"):
        if key in table.info:
            src[key] = table.info[key]
    pattern = RankPattern(ranks=ranks, params=pattern_params(ranks, costs),
                          budget={"params": budget, "avg_rank": avg_rank, "min_rank": min_rank}, score=score,
                          source=src)
    return Allocation(pattern, table, budget, uniform, pattern_loss, uniform_loss, seconds)


def check_pattern_output(output: Path, adapter_dir: Path, overwrite: bool) -> None:
    """Refuse an --output that is a folder, exists (without --overwrite) or lies inside the adapter folder."""
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a file path such as pattern.json")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; choose another --output or pass --overwrite")
    if adapter_dir.resolve() in output.resolve().parents:
        raise ConfigError(f"--output {output} lies inside the adapter folder {adapter_dir}; write it elsewhere "
                          "(the run folder itself is fine)")
    parent = next((p for p in output.resolve().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"--output {output}: {parent} is a file, so the pattern cannot be written there")


def load_calibration(data: str, limit: int | None) -> list[dict]:
    """The calibration records: the first `limit` of the file (all when None)."""
    from ..data.records import load_records

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"--limit {limit!r} must be an integer >= 1 (calibration examples)")
    if not data:
        raise DataError("allocate needs --data: calibration records (.json/.jsonl, alpaca / text / chat), e.g. a "
                        "part of the training data")
    records = load_records(data)
    return records[:limit] if limit else records


def allocate(run: str | os.PathLike, output: str | os.PathLike, data: str | None, avg_rank: float | None = None,
             params: int | None = None, score: str = "taylor", limit: int | None = 16, model: str | None = None,
             max_seq_len: int | None = None, batch_size: int = 4, grid: Sequence[int] | None = None,
             overwrite: bool = False, progress: bool = True, min_rank: int | None = None) -> Allocation:
    """Load the run's adapter, allocate ranks under the budget and write the pattern JSON to `output`
    (min_rank None: default_min_rank, or 0 for gradnorm). fisher-train reads the statistics training saved beside
    the adapter; without `data` it loads no model and reports no calibration loss.

    Every input is checked before the model loads; nothing is written before the pattern is ready.
    """
    from ..adapters.files import adapter_config, load_adapter, read_adapter, svd_sorted_meta
    from ..eval.sweep import resolve_base
    from ..load.model import load_model_and_tokenizer
    from ..train.fisher_stats import read_stats
    from ..train.run_folder import find_adapter, read_run_config
    from .calib import calibration_batches

    if score not in SCORES:
        raise ConfigError(f"--score {score!r} is unknown; use one of {', '.join(SCORES)}")
    adapter_dir, run_dir = find_adapter(run)
    meta, tensors = read_adapter(adapter_dir)
    cfg = adapter_config(meta, str(adapter_dir))
    costs = costs_from_tensors(list(meta["targets"]), tensors)
    budget = budget_params(costs, cfg, avg_rank=avg_rank, params=params)
    if min_rank is None:
        min_rank = 0 if score == "gradnorm" else default_min_rank(budget, costs, cfg)
    if min_rank and score == "gradnorm":
        raise ConfigError("--min-rank does not apply to --score gradnorm (it switches whole modules on or off); "
                          "use taylor, loss or norm")
    floor_ranks([default_allowed(cfg)] * len(costs), list(costs.values()), budget, min_rank)
    stats = read_stats(adapter_dir) if score == "fisher-train" else None
    if score == "fisher-train" and (stats is None or svd_sorted_meta(meta)):
        raise ConfigError(f"{adapter_dir} has no training statistics for --score fisher-train; train with "
                          "--fisher-steps N (not with --truncation svd), or use --score fisher --data CALIB")
    output = Path(output)
    check_pattern_output(output, adapter_dir, overwrite)
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")
    if max_seq_len is None:
        max_seq_len = int(read_run_config(run_dir)["train"].get("max_seq_len", 256)) if run_dir else 256
    source = {"adapter": str(adapter_dir.resolve()), "data": data and str(data), "limit": limit if data else None}
    if score == "fisher-train" and not data:
        result = allocate_model(None, [], budget, score, avg_rank, min_rank=min_rank, stats=stats, costs=costs,
                                config=cfg, source=source)
    else:
        records = load_calibration(data, limit)
        base_name = resolve_base(meta, model)
        base, tokenizer = load_model_and_tokenizer(base_name)
        peft_model = load_adapter(base, adapter_dir)
        batches = calibration_batches(records, tokenizer, max_seq_len, batch_size, model_device(peft_model))
        source.update(base_model=base_name, max_seq_len=max_seq_len)
        result = allocate_model(peft_model, batches, budget, score, avg_rank, grid, progress, source, min_rank,
                                stats=stats, costs=costs, config=cfg)
    result.note = low_budget_note(budget / sum(costs.values()), cfg.r_max_prob, svd_sorted_meta(meta))
    output.parent.mkdir(parents=True, exist_ok=True)
    write_pattern(result.pattern, output)
    return result
