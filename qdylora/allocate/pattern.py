"""Rank patterns: one rank per adapted module, as a JSON file that allocate writes and export / sweep read.

    {"ranks": {"model.layers.0.self_attn.q_proj": 8, ...},   every adapted module, 0 = adapter off
     "params": 123456,                                        sum over modules of rank * (in + out)
     "budget": {"params": 130000, "avg_rank": 4.0},           what the allocation was asked for
     "score": "taylor",                                       how components were scored
     "source": {...}}                                         adapter, calibration data, settings

Only "ranks" is required; a "params" that does not match the ranks on the adapter is refused (the
file was edited by hand and is no longer what it says).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..adapters.attach import check_module_ranks
from ..adapters.config import QDyLoRAConfig
from ..errors import ConfigError

KEYS = ("ranks", "params", "budget", "score", "source")


@dataclass
class RankPattern:
    """Per-module ranks with the budget and score that chose them."""

    ranks: dict[str, int]
    params: int | None = None
    budget: dict[str, Any] = field(default_factory=dict)
    score: str | None = None
    source: Any = None
    path: str | None = None  # where it was read from (not written)

    @property
    def name(self) -> str:
        """A short label: the file's stem, else the score."""
        return Path(self.path).stem if self.path else (self.score or "pattern")

    def to_dict(self) -> dict[str, Any]:
        return {"ranks": dict(self.ranks), "params": self.params, "budget": self.budget, "score": self.score,
                "source": self.source}


def pattern_params(ranks: Mapping[str, int], costs: Mapping[str, int]) -> int:
    """Adapter values a pattern keeps: sum of rank * (in + out) over its modules."""
    return int(sum(int(r) * int(costs[m]) for m, r in ranks.items()))


def costs_from_tensors(targets: list[str], tensors: Mapping) -> dict[str, int]:
    """in + out of every adapted module, from a saved adapter's A [r_max, in] and B [out, r_max]."""
    return {t: int(tensors[f"{t}.lora_A"].shape[1] + tensors[f"{t}.lora_B"].shape[0]) for t in targets}


def _bad(path: str, key: str, what: str) -> ConfigError:
    return ConfigError(f"rank pattern {path}: key '{key}' {what}; write it as "
                       '{"ranks": {"model.layers.0.self_attn.q_proj": 8, ...}} (from `qdylora allocate`)')


def parse_pattern(obj: Any, path: str = "<pattern>") -> RankPattern:
    """A RankPattern from the decoded JSON, refusing a wrong type for any key (the message names file and key)."""
    if not isinstance(obj, dict):
        raise ConfigError(f"rank pattern {path} holds a {type(obj).__name__}, not an object with key 'ranks'")
    unknown = sorted(set(obj) - set(KEYS))
    if unknown:
        raise _bad(path, unknown[0], f"is not a rank-pattern key (keys: {', '.join(KEYS)})")
    ranks = obj.get("ranks")
    if ranks is None:
        raise _bad(path, "ranks", "is missing")
    if not isinstance(ranks, dict) or not ranks:
        raise _bad(path, "ranks", "must be a non-empty object {module name: rank}")
    for name, r in ranks.items():
        if isinstance(r, bool) or not isinstance(r, int):
            raise _bad(path, f"ranks.{name}", f"is {r!r}, not an integer rank")
    params = obj.get("params")
    if params is not None and (isinstance(params, bool) or not isinstance(params, int) or params < 0):
        raise _bad(path, "params", f"is {params!r}, not a non-negative integer")
    budget = obj.get("budget") or {}
    if not isinstance(budget, dict):
        raise _bad(path, "budget", "must be an object such as {\"params\": N}")
    score = obj.get("score")
    if score is not None and not isinstance(score, str):
        raise _bad(path, "score", "must be a string")
    return RankPattern(ranks=dict(ranks), params=params, budget=budget, score=score, source=obj.get("source"),
                       path=path)


def read_pattern(path: str | os.PathLike) -> RankPattern:
    """Read and type-check a rank-pattern JSON file (ConfigError naming the file and the key)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"rank pattern {p} does not exist" + (" (it is a folder)" if p.is_dir() else "")
                          + "; write one with `qdylora allocate RUN --avg-rank R --data CALIB --output P.json`")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"rank pattern {p} is not valid JSON ({e})") from None
    return parse_pattern(obj, str(p))


def check_pattern(pattern: RankPattern, costs: Mapping[str, int], config: QDyLoRAConfig) -> RankPattern:
    """The pattern checked against an adapter: every adapted module named once, valid ranks, a true 'params'."""
    where = f"rank pattern {pattern.path or pattern.name}"
    check_module_ranks(pattern.ranks, list(costs), config, where, complete=True)
    have = pattern_params(pattern.ranks, costs)
    if pattern.params is not None and pattern.params != have:
        raise ConfigError(f"{where}: key 'params' says {pattern.params} but its ranks keep {have} values on this "
                          "adapter; correct 'params' or remove it")
    pattern.params = have
    return pattern


def load_patterns(paths: list[str], costs: Mapping[str, int], config: QDyLoRAConfig) -> list[RankPattern]:
    """Read and check several pattern files (all before anything heavy runs)."""
    return [check_pattern(read_pattern(p), costs, config) for p in paths]


def split_paths(text: str | None) -> list[str]:
    """'a.json,b.json' -> ['a.json', 'b.json'] (empty: none)."""
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def write_pattern(pattern: RankPattern, path: str | os.PathLike) -> Path:
    """Write the pattern's JSON atomically."""
    from ..atomic import write_json_atomic

    write_json_atomic(path, pattern.to_dict())
    return Path(path)
