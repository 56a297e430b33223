"""Seeded rank draws: every rank is a pure function of (seed, step, micro-step, row or module).

So a resumed run, gradient accumulation and several processes (one seed, different data shards:
rows are numbered globally) all draw the same ranks as one uninterrupted run.

- `rank_per='step'`: one rank per optimizer step for every module and row.
- `rank_per='example'`: one rank per sequence of every micro-batch, the same in every module.
- `rank_per='module'`: one rank per adapted module per optimizer step (the same for every row).
- `rank_per='example+module'`: one rank per (sequence, module).
- `max_rows=k` (with the two above): rows 0..k-1 of every micro-step (numbered globally) run at r_max.
- `r_max_prob=p`: every draw is r_max with probability p, else from the sampler's distribution.
"""

from __future__ import annotations

import random

from .config import QDyLoRAConfig


class RankSampler:
    """Draws ranks from the config's distribution; stateless, so any draw can be asked for again."""

    def __init__(self, config: QDyLoRAConfig) -> None:
        self.config = config
        c = config
        if c.rank_sampler == "uniform":
            self.ranks = list(range(c.r_min, c.r_max + 1))
            self.weights = [1.0] * len(self.ranks)
        elif c.rank_sampler == "loguniform":  # P(r) proportional to 1/r: every octave 1-2, 2-4, ... alike
            self.ranks = list(range(c.r_min, c.r_max + 1))
            self.weights = [1.0 / r for r in self.ranks]
        elif c.rank_sampler == "geometric":
            self.ranks = list(range(c.r_min, c.r_max + 1))
            p = c.geometric_p
            self.weights = [p * (1 - p) ** i for i in range(len(self.ranks))]
        else:
            self.ranks = sorted({int(r) for r in c.rank_list or []})
            self.weights = [1.0] * len(self.ranks)
        if c.r_max_prob > 0:  # the mixture (1 - p) * distribution + p * [r_max]; p = 0 keeps the draws as they were
            total = sum(self.weights)
            self.weights = [(1 - c.r_max_prob) * w / total for w in self.weights]
            if c.r_max not in self.ranks:
                self.ranks.append(c.r_max)
                self.weights.append(0.0)
            self.weights[self.ranks.index(c.r_max)] += c.r_max_prob

    def _draw(self, key: str) -> int:
        # str seeds are hashed with sha512: stable across processes and Python versions
        return random.Random(f"{self.config.seed}:{key}").choices(self.ranks, weights=self.weights, k=1)[0]

    def sample(self, step: int) -> int:
        """Rank of optimizer step `step` (0-based) for rank_per='step'."""
        rng = random.Random(self.config.seed * 1_000_003 + step)
        return rng.choices(self.ranks, weights=self.weights, k=1)[0]

    def rows(self, step: int, micro: int, n: int, first_row: int = 0, module: int | None = None) -> list[int]:
        """Ranks of rows first_row .. first_row+n-1 of micro-step `micro` of step `step` (per module if given);
        rows numbered below config.max_rows run at r_max."""
        tag = "" if module is None else f":m{module}"
        top = self.config.max_rows
        return [self.config.r_max if first_row + i < top else self._draw(f"{step}:{micro}:{first_row + i}{tag}")
                for i in range(n)]

    def module(self, step: int, module: int) -> int:
        """Rank of adapted module number `module` in step `step` for rank_per='module'."""
        return self._draw(f"{step}:module:{module}")

    def probabilities(self) -> dict[int, float]:
        """P(rank) of one draw."""
        total = sum(self.weights)
        return {r: w / total for r, w in zip(self.ranks, self.weights)}
