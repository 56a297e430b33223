"""The ranks of training: before each micro-step, set every DyLoRA layer's rank(s) from the seeded draws, and
record which components each optimizer step trains (what ComponentAdamW steps).

Which components a step trains, per update rule: 'frozen' - component b-1 for every rank b a row or
module ran at; 'nested' and 'even' - components 0..b-1 for the largest such b; 'matryoshka' - all of them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters.attach import dylora_layers
from ..adapters.config import QDyLoRAConfig
from ..adapters.rank_sampler import RankSampler


class RankSchedule:
    """Rank draws of one training run; stateless apart from the step it is in (so a resume draws the same)."""

    def __init__(self, model: nn.Module, config: QDyLoRAConfig, process_index: int = 0) -> None:
        self.config, self.process_index = config, process_index
        self.layers = dylora_layers(model)
        self.sampler = RankSampler(config)
        self.step: int | None = None
        self.micro = 0
        self.trained: list[set[int]] = [set() for _ in self.layers]
        self.last_ranks: list[list[int]] = [[] for _ in self.layers]
        self.seen: set[int] = set()
        # every adapter parameter -> (its layer, its component axis): what ComponentAdamW needs
        self.axes: dict[torch.Tensor, int] = {}
        self._layer_of: dict[torch.Tensor, int] = {}
        for i, layer in enumerate(self.layers):
            for p, axis in layer.component_axes():
                self.axes[p] = axis
                self._layer_of[p] = i

    def _components(self, ranks: list[int]) -> set[int]:
        update = self.config.update
        if update == "frozen":
            return {r - 1 for r in ranks}
        top = self.config.r_max if update == "matryoshka" else max(ranks)
        return set(range(top))

    def before_micro_step(self, step: int, rows: int) -> None:
        """Set the layers' ranks for the next micro-batch of `rows` sequences of optimizer step `step`."""
        if step != self.step:
            self.step, self.micro = step, 0
            self.trained = [set() for _ in self.layers]
            self.seen = set()
        per, s, first = self.config.rank_per, self.sampler, self.process_index * rows
        for i, layer in enumerate(self.layers):
            if per == "step":
                ranks = [s.sample(step)]
            elif per == "module":
                ranks = [s.module(step, i)]
            elif per == "example":
                ranks = s.rows(step, self.micro, rows, first) if i == 0 else self.last_ranks[0]
            else:  # example+module
                ranks = s.rows(step, self.micro, rows, first, module=i)
            layer.set_rank(ranks[0] if len(ranks) == 1 and per in ("step", "module") else torch.tensor(ranks))
            self.last_ranks[i] = ranks
            self.seen.update(ranks)
            self.trained[i] |= self._components(ranks)
        self.micro += 1

    def _draws(self, rows_per_step: int) -> tuple[int, int]:
        """(rank draws per step and module, how many of them are rows at r_max rather than drawn)."""
        if self.config.rank_per not in ("example", "example+module"):
            return 1, 0
        return rows_per_step, min(self.config.max_rows, rows_per_step)

    def train_probabilities(self, rows_per_step: int) -> torch.Tensor:
        """[r_max]: the probability that a step trains component k, from the draw distribution."""
        probs = self.sampler.probabilities()
        per_draw = torch.zeros(self.config.r_max, dtype=torch.float64)
        for r, p in probs.items():
            if self.config.update == "frozen":
                per_draw[r - 1] += p
            elif self.config.update in ("nested", "even"):
                per_draw[:r] += p
        if self.config.update == "matryoshka":
            per_draw[:] = 1.0
        draws, top = self._draws(rows_per_step)
        if self.config.update in ("nested", "even"):  # a step trains components < the largest of its draws
            below = torch.tensor([sum(p for r, p in probs.items() if r <= k) for k in range(self.config.r_max)],
                                 dtype=torch.float64)
            return torch.ones_like(below) if top else 1 - below ** draws
        trained = 1 - (1 - per_draw) ** (draws - top)
        if top and self.config.update == "frozen":
            trained[self.config.r_max - 1] = 1.0
        return trained

    def lr_scales(self, rows_per_step: int, power: float) -> dict[torch.Tensor, torch.Tensor]:
        """Per-component learning-rate factors (max_p / p_k) ** power for every adapter tensor (0: none)."""
        p = self.train_probabilities(rows_per_step)
        scale = (p.max() / p.clamp(min=1e-12)) ** power
        scale[p == 0] = 0.0
        return {param: scale for param in self.axes}

    def scale_lr_scales(self, rows_per_step: int) -> dict[torch.Tensor, torch.Tensor]:
        """Per-component learning-rate factors sqrt(E[s_k^2] / P(s_k > 0)) / E[s_k] for every adapter tensor.

        s_k = sum over a step's rows m that train component k of alpha / b_m (up to alpha) is the scale
        component k's gradient has in that step. Adam divides by the root mean square of the gradient, so
        when s_k varies from step to step with the drawn ranks its mean step is E[s_k] / rms(s_k) of what a
        constant scale (plain LoRA) gets; the factor restores it (1 when the scale never varies).
        """
        cfg, probs = self.config, self.sampler.probabilities()
        draws, top = self._draws(rows_per_step)
        mean, square, none = (torch.zeros(cfg.r_max, dtype=torch.float64) for _ in range(3))
        none += 1.0
        for k in range(cfg.r_max):
            # one drawn row: its scale for component k (1/b if it trains k) and the chance it does not train k
            trains = {r: p for r, p in probs.items() if (r - 1 == k if cfg.update == "frozen" else r > k)}
            m1 = sum(p / r for r, p in trains.items())
            m2 = sum(p / r ** 2 for r, p in trains.items())
            fixed = top / cfg.r_max if (cfg.update != "frozen" or k == cfg.r_max - 1) else 0.0
            n = draws - top
            mean[k] = fixed + n * m1
            square[k] = mean[k] ** 2 + n * (m2 - m1 ** 2)
            none[k] = 0.0 if fixed else (1 - sum(trains.values())) ** n
        factor = torch.where(mean > 0, torch.sqrt(square * (1 - none).clamp(min=1e-12)) / mean.clamp(min=1e-300), 0)
        return {param: factor.to(torch.float32) for param in self.axes}

    def synchronize(self) -> None:
        """Make the trained components the union over every process (rows differ per process)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        mask = torch.zeros(len(self.layers), self.config.r_max, dtype=torch.int32)
        for i, comps in enumerate(self.trained):
            mask[i, sorted(comps)] = 1
        from .processes import collective_device

        mask = mask.to(collective_device())
        dist.all_reduce(mask, op=dist.ReduceOp.MAX)
        self.trained = [set(torch.nonzero(row).flatten().tolist()) for row in mask.cpu()]

    def active(self, param: torch.Tensor) -> torch.Tensor:
        """Indices of the components of `param`'s adapter trained in the current step."""
        return torch.tensor(sorted(self.trained[self._layer_of[param]]), dtype=torch.long)

    def step_ranks(self) -> list[int]:
        """The distinct ranks the current step ran at, over every layer and micro-step so far (for the log)."""
        return sorted(self.seen)
