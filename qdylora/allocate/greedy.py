"""Budgets and the global greedy allocation of components to modules under a parameter budget.

A score table gives, for every module m, the gain g[m, k] of keeping component k on top of components
0..k-1 (DyLoRA's components are ordered, so a module keeps a prefix) and its cost c_m = in_m + out_m
adapter values per component. The greedy starts from rank 0 everywhere (or from a floor, `min_rank`: every
module keeps at least that many components, so none is switched off) and repeatedly takes the move
(module m from rank k to an allowed rank j > k) with the largest gain per value,
(sum_{k <= i < j} g[m, i]) / ((j - k) c_m), among those that still fit the budget; a move ends at any
allowed rank, so a strong component behind weak ones is reached together with the ones before it (the
prefix order). It stops when nothing fits or no move gains anything.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ..adapters.config import QDyLoRAConfig
from ..errors import ConfigError


@dataclass
class ScoreTable:
    """Gains of every component of every module, their costs and the ranks each module may take."""

    names: list[str]
    gains: torch.Tensor  # [modules, r_max]: gain of component k given components < k
    costs: list[int]  # in + out per module
    allowed: list[list[int]]  # sorted ranks each module may take, 0 included
    score: str = ""
    info: dict = field(default_factory=dict)  # reference rank, passes, seconds ...

    def __post_init__(self) -> None:
        if self.gains.dim() != 2 or self.gains.shape[0] != len(self.names) or len(self.costs) != len(self.names):
            raise ValueError(f"score table: {len(self.names)} names, {len(self.costs)} costs, gains "
                             f"{tuple(self.gains.shape)}")


def default_allowed(config: QDyLoRAConfig) -> list[int]:
    """0 (off) and every rank in [r_min, r_max]."""
    return [0] + list(range(config.r_min, config.r_max + 1))


def total_cost(costs: Mapping[str, int] | Sequence[int]) -> int:
    """Values per unit of rank over all modules: the parameters of rank 1 everywhere."""
    return int(sum(costs.values() if isinstance(costs, Mapping) else costs))


def budget_params(costs: Mapping[str, int], config: QDyLoRAConfig, avg_rank: float | None = None,
                  params: int | None = None) -> int:
    """The budget in adapter values from --avg-rank R (R * sum(in + out)) or --params N, checked."""
    total = total_cost(costs)
    largest = config.r_max * total
    if (avg_rank is None) == (params is None):
        raise ConfigError("give the budget as --avg-rank R or --params N (one of them)")
    if avg_rank is not None:
        if isinstance(avg_rank, bool) or not isinstance(avg_rank, (int, float)) or not math.isfinite(avg_rank) \
                or not 0 < avg_rank <= config.r_max:
            raise ConfigError(f"--avg-rank {avg_rank!r} must be a number in (0, {config.r_max}] (r_max: the "
                              f"largest adapter keeps rank {config.r_max} everywhere)")
        return int(math.floor(avg_rank * total + 1e-9))
    if isinstance(params, bool) or not isinstance(params, int) or not 0 < params <= largest:
        raise ConfigError(f"--params {params!r} must be an integer in [1, {largest}] (the largest adapter, rank "
                          f"{config.r_max} on all {len(costs)} modules, has {largest} values)")
    return params


def uniform_rank(budget: int, costs: Mapping[str, int], config: QDyLoRAConfig) -> int | None:
    """The largest rank that fits the budget on every module, or None when even r_min does not."""
    r = min(config.r_max, budget // total_cost(costs))
    return r if r >= config.r_min else None


def _best_move(prefix: torch.Tensor, allowed: list[int], k: int, cost: int, remaining: int):
    """(gain per value, gain, j) of the best move of one module from rank k, or None."""
    best = None
    for j in allowed:
        if j <= k:
            continue
        spend = (j - k) * cost
        if spend > remaining:
            break
        gain = float(prefix[j] - prefix[k])
        key = (gain / spend, gain, j)
        if best is None or key[:2] > best[:2]:
            best = key
    return best


def default_min_rank(budget: int, costs: Mapping[str, int], config: QDyLoRAConfig) -> int:
    """1 (no module switched off) when every module at its smallest rank takes at most half the budget, else 0:
    the better of the two on the allocation benchmark (benchmarks/results/allocate_floor_*.md)."""
    return 1 if 2 * config.r_min * total_cost(costs) <= budget else 0


def floor_ranks(allowed: Sequence[Sequence[int]], costs: Sequence[int], budget: int, min_rank: int) -> list[int]:
    """Each module's smallest allowed rank >= min_rank, checked against the budget (one ConfigError line)."""
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 0:
        raise ConfigError(f"--min-rank {min_rank!r} must be an integer >= 0")
    if min_rank == 0:
        return [0] * len(costs)
    ranks = []
    for ok in allowed:
        above = [r for r in ok if r >= min_rank]
        if not above:
            raise ConfigError(f"--min-rank {min_rank} is above the adapter's r_max {max(ok)}; give a rank in "
                              f"[0, {max(ok)}]")
        ranks.append(above[0])
    need = sum(r * c for r, c in zip(ranks, costs))
    if need > budget:
        raise ConfigError(f"--min-rank {min_rank} needs {need:,} values on these modules, more than the budget of "
                          f"{budget:,}; lower --min-rank or raise the budget")
    return ranks


def greedy_allocate(table: ScoreTable, budget: int, min_rank: int = 0) -> dict[str, int]:
    """Ranks {module: rank} with sum(rank * cost) <= budget, each >= min_rank, chosen by the greedy of this module's
    docstring."""
    if budget < 0:
        raise ConfigError(f"budget {budget} must be >= 0")
    gains = table.gains.to(torch.float64)
    prefix = torch.cat([torch.zeros(gains.shape[0], 1, dtype=torch.float64), gains.cumsum(1)], dim=1)
    ranks = floor_ranks(table.allowed, table.costs, budget, min_rank)
    remaining = budget - sum(r * c for r, c in zip(ranks, table.costs))
    heap: list = []

    def push(m: int) -> None:
        move = _best_move(prefix[m], table.allowed[m], ranks[m], table.costs[m], remaining)
        if move is not None and move[0] > 0:
            heapq.heappush(heap, (-move[0], -move[1], m, move[2]))

    for m in range(len(ranks)):
        push(m)
    while heap:
        neg_ratio, neg_gain, m, j = heapq.heappop(heap)
        fresh = _best_move(prefix[m], table.allowed[m], ranks[m], table.costs[m], remaining)
        if fresh is None or fresh[0] <= 0:
            continue
        if (fresh[0], fresh[1], fresh[2]) != (-neg_ratio, -neg_gain, j):
            # the budget shrank since this entry was pushed: its best move changed, so queue the new one
            heapq.heappush(heap, (-fresh[0], -fresh[1], m, fresh[2]))
            continue
        remaining -= (j - ranks[m]) * table.costs[m]
        ranks[m] = j
        push(m)
    return dict(zip(table.names, ranks))
