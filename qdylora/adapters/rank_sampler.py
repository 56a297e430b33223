"""Seeded rank sampling: the rank of optimizer step t is a pure function of (seed, t)."""

from __future__ import annotations

import random

from .config import QDyLoRAConfig


class RankSampler:
    """Draws one rank per optimizer step; stateless, so a resumed run draws the same ranks."""

    def __init__(self, config: QDyLoRAConfig) -> None:
        self.config = config
        c = config
        if c.rank_sampler == "uniform":
            self.ranks = list(range(c.r_min, c.r_max + 1))
            self.weights = [1.0] * len(self.ranks)
        elif c.rank_sampler == "geometric":
            self.ranks = list(range(c.r_min, c.r_max + 1))
            p = c.geometric_p
            self.weights = [p * (1 - p) ** i for i in range(len(self.ranks))]
        else:
            self.ranks = sorted({int(r) for r in c.rank_list or []})
            self.weights = [1.0] * len(self.ranks)

    def sample(self, step: int) -> int:
        """Rank for optimizer step `step` (0-based)."""
        rng = random.Random(self.config.seed * 1_000_003 + step)
        return rng.choices(self.ranks, weights=self.weights, k=1)[0]

    def probabilities(self) -> dict[int, float]:
        total = sum(self.weights)
        return {r: w / total for r, w in zip(self.ranks, self.weights)}
