"""QDyLoRAConfig: what a dynamic-rank adapter is (ranks, scale, targets, update rule)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, check_float, check_int

# Every linear of attention and MLP in the common decoder families (Llama, Mistral, Qwen,
# Gemma, Falcon, GPT-NeoX, GPT-2, OPT, Phi). Names that a model lacks are ignored as long
# as at least one matches.
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj",
    "gate_proj", "up_proj", "down_proj",
    "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h",
    "c_attn", "c_proj", "c_fc",
    "fc1", "fc2", "out_proj", "qkv_proj", "gate_up_proj", "Wqkv",
)

UPDATE_MODES = ("frozen", "nested", "matryoshka", "even")
RANK_PER = ("step", "example", "module", "example+module")
SAMPLERS = ("uniform", "loguniform", "geometric", "list")
TRUNCATIONS = ("prefix", "svd")



@dataclass
class QDyLoRAConfig:
    """Dynamic-rank LoRA settings: ranks in [r_min, r_max] drawn per step, sequence or module (`rank_per`)."""

    r_min: int = 1
    r_max: int = 64
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    rank_sampler: str = "uniform"
    # geometric: P(b) proportional to geometric_p * (1 - geometric_p) ** (b - r_min)
    geometric_p: float = 0.1
    # list: ranks drawn uniformly from this list
    rank_list: list[int] | None = None
    # the defaults are the rule and granularity benchmarks/rank_sampling.py found best (README, "Rank sampling")
    update: str = "nested"
    seed: int = 0
    # what one rank draw covers: an optimizer step, a sequence, a module, or a (sequence, module) pair
    rank_per: str = "example"
    # rank_per example / example+module: the first max_rows rows of every micro-step run at r_max, so the
    # top components train every step (slimmable networks' "sandwich" rule, its largest-width half);
    # None: 1 with per-row ranks, else 0
    max_rows: int | None = None
    # every draw (per step, row or module) is r_max with this probability, else from rank_sampler. None: 1 with
    # rank_per 'example' and update nested / even (the defaults: every row at r_max won at every rank in
    # benchmarks/rank_sampling.py and the demo), else 0 (the rank draws as chosen)
    r_max_prob: float | None = None
    # how the final adapter is cut to rank b: 'prefix' keeps the trained components (rank b = the first b at
    # alpha/b, DyLoRA); 'svd' re-expresses each module's full update by its singular vectors (rank b = its best
    # rank-b approximation, scale alpha/r_max): better at low ranks after long runs, worse after short ones
    # (README, "Rank sampling")
    truncation: str = "prefix"

    def __post_init__(self) -> None:
        if self.max_rows is None:
            self.max_rows = 1 if self.rank_per in ("example", "example+module") else 0
        if self.r_max_prob is None:
            self.r_max_prob = 1.0 if self.rank_per == "example" and self.update in ("nested", "even") else 0.0
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the bad field and how to fix it."""
        if any(isinstance(r, bool) or not isinstance(r, int) for r in (self.r_min, self.r_max)):
            raise ConfigError(f"r_min and r_max must be integers, got r_min={self.r_min!r}, r_max={self.r_max!r}.")
        if self.r_min < 1:
            raise ConfigError(f"r_min={self.r_min} must be >= 1; use --r-min 1 or larger.")
        if self.r_min > self.r_max:
            raise ConfigError(
                f"r_min={self.r_min} is larger than r_max={self.r_max}; choose r_min <= r_max "
                f"(for example --r-min 1 --r-max {max(self.r_min, 64)})."
            )
        if self.update not in UPDATE_MODES:
            raise ConfigError(f"update={self.update!r} is unknown; use one of {', '.join(UPDATE_MODES)}.")
        if self.rank_per not in RANK_PER:
            raise ConfigError(f"rank_per={self.rank_per!r} is unknown; use one of {', '.join(RANK_PER)} (--rank-per).")
        if isinstance(self.max_rows, bool) or not isinstance(self.max_rows, int) or self.max_rows < 0:
            raise ConfigError(f"max_rows={self.max_rows!r} must be an integer >= 0 (--max-rows).")
        if self.max_rows and self.rank_per not in ("example", "example+module"):
            raise ConfigError(f"max_rows (--max-rows) needs ranks drawn per row: --rank-per example or "
                              f"example+module, not {self.rank_per!r}.")
        if isinstance(self.r_max_prob, bool) or not isinstance(self.r_max_prob, (int, float)) or not (
                0.0 <= self.r_max_prob <= 1.0):
            raise ConfigError(f"r_max_prob={self.r_max_prob!r} must be a probability in [0, 1] (--r-max-prob).")
        if self.truncation not in TRUNCATIONS:
            raise ConfigError(f"truncation={self.truncation!r} is unknown; use one of {', '.join(TRUNCATIONS)} "
                              "(--truncation).")
        if self.rank_sampler not in SAMPLERS:
            raise ConfigError(f"rank_sampler={self.rank_sampler!r} is unknown; use one of {', '.join(SAMPLERS)}.")
        if self.rank_list is not None and self.rank_sampler != "list":
            raise ConfigError(f"rank_list is used only with rank_sampler='list' (--rank-sampler list), not "
                              f"{self.rank_sampler!r}; drop --rank-list or pass --rank-sampler list.")
        if self.rank_sampler == "list":
            if not self.rank_list:
                raise ConfigError("rank_sampler='list' needs rank_list, e.g. rank_list=[1, 4, 16, 64].")
            if any(isinstance(r, bool) or not isinstance(r, int) for r in self.rank_list):
                raise ConfigError(f"rank_list {self.rank_list!r} must hold integers, e.g. [1, 4, 16, 64].")
            bad = [r for r in self.rank_list if not (self.r_min <= int(r) <= self.r_max)]
            if bad:
                raise ConfigError(f"rank_list has ranks {bad} outside [r_min, r_max] = [{self.r_min}, {self.r_max}].")
        if self.rank_sampler == "geometric" and not (0.0 < self.geometric_p <= 1.0):
            raise ConfigError(f"geometric_p={self.geometric_p} must be in (0, 1].")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1) (--dropout).")
        check_float("alpha", self.alpha, 0.0, strict=True, flag="--alpha")
        check_int("seed", self.seed, 0, "--seed")
        if self.target_modules is not None and (isinstance(self.target_modules, str) or not self.target_modules or not all(
                isinstance(t, str) and t for t in self.target_modules)):
            raise ConfigError(f"target_modules {self.target_modules!r} must be a non-empty list of module names, "
                              "e.g. ['q_proj', 'v_proj'] (--target-modules q_proj,v_proj)")

    def check_rank(self, rank: int) -> int:
        """Return rank if it lies in [r_min, r_max], else raise a ConfigError that says the range."""
        if isinstance(rank, bool) or int(rank) != rank or not (self.r_min <= int(rank) <= self.r_max):
            raise ConfigError(
                f"rank {rank} is outside this adapter's range [{self.r_min}, {self.r_max}]; "
                f"pick a rank between {self.r_min} and {self.r_max}."
            )
        return int(rank)

    def power_of_two_ranks(self) -> list[int]:
        """r_min, every power of two in between, and r_max: 1, 2, 4, ..., 64 for ranks 1..64."""
        return sorted({self.r_min, self.r_max} | {2 ** k for k in range(20) if self.r_min <= 2 ** k <= self.r_max})

    def scale(self, rank: int, svd_sorted: bool = False) -> float:
        """The scale of the first b components: DyLoRA's alpha / b, or alpha / r_max for components sorted by svd_sort
        (each keeps its share of the full update, so rank b is its best rank-b approximation)."""
        return self.alpha / (self.r_max if svd_sorted else rank)

    def component_scales(self, svd_sorted: bool = False) -> torch.Tensor:
        """[r_max + 1, r_max] float64: row b holds the scale of each component at rank b (scale(b) for k < b, else 0;
        row 0, the adapter off, zeros)."""
        k = torch.arange(self.r_max)
        return torch.stack([torch.zeros(self.r_max, dtype=torch.float64)]
                           + [(k < b).double() * self.scale(b, svd_sorted) for b in range(1, self.r_max + 1)])

    @property
    def targets(self) -> list[str]:
        return list(self.target_modules) if self.target_modules else list(DEFAULT_TARGET_MODULES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], strict: bool = False, saved: bool = True) -> "QDyLoRAConfig":
        """The config from a dict; unknown keys are ignored, or refused with strict=True. saved=True: d was
        written by a run or adapter (fields it lacks take what that version did), False: new settings."""
        names = {f.name for f in dataclasses.fields(cls)}
        if strict and set(d) - names:
            raise ConfigError(f"unknown adapter setting(s) {', '.join(sorted(set(d) - names))}")
        # settings saved before max_rows / r_max_prob / truncation existed: no rows at r_max, trained components kept
        legacy = {"max_rows": 0, "r_max_prob": 0.0, "truncation": "prefix"} if saved else {}
        return cls(**{**legacy, **{k: v for k, v in d.items() if k in names}})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))
