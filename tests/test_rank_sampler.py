"""Rank sampling: distribution, reproducibility, and config validation."""

from __future__ import annotations

import collections
import math

import pytest

from qdylora.adapters.config import ConfigError, QDyLoRAConfig
from qdylora.adapters.rank_sampler import RankSampler


def test_uniform_covers_range_with_flat_frequencies():
    s = RankSampler(QDyLoRAConfig(r_min=1, r_max=64, seed=3, r_max_prob=0.0))
    n = 64 * 400
    counts = collections.Counter(s.sample(t) for t in range(n))
    assert set(counts) == set(range(1, 65))
    # chi-square with 63 degrees of freedom: the 99.9% quantile is about 103
    expected = n / 64
    chi2 = sum((counts[r] - expected) ** 2 / expected for r in range(1, 65))
    assert chi2 < 103, chi2


def test_same_seed_same_ranks_and_step_indexed():
    a = RankSampler(QDyLoRAConfig(seed=7, r_max_prob=0.0))
    b = RankSampler(QDyLoRAConfig(seed=7, r_max_prob=0.0))
    assert [a.sample(t) for t in range(50)] == [b.sample(t) for t in range(50)]
    # a resumed run asks for step t directly: same answer as the uninterrupted run
    assert a.sample(37) == [b.sample(t) for t in range(50)][37]
    c = RankSampler(QDyLoRAConfig(seed=8, r_max_prob=0.0))
    assert [a.sample(t) for t in range(50)] != [c.sample(t) for t in range(50)]


def test_geometric_prefers_small_ranks_with_expected_ratio():
    p = 0.2
    s = RankSampler(QDyLoRAConfig(r_min=1, r_max=64, rank_sampler="geometric", geometric_p=p,
                                  r_max_prob=0.0))
    counts = collections.Counter(s.sample(t) for t in range(20000))
    # P(1) / P(2) = 1 / (1 - p) = 1.25 for a (truncated) geometric
    assert counts[1] > counts[2] > counts[5]
    assert math.isclose(counts[1] / counts[2], 1 / (1 - p), rel_tol=0.1)


def test_loguniform_gives_every_octave_the_same_mass():
    """P(r) = (1/r) / H(64), H(64) = sum of 1/r: P(1) / P(2) = 2, and the octaves [2^k, 2^(k+1)) alike."""
    s = RankSampler(QDyLoRAConfig(r_min=1, r_max=64, rank_sampler="loguniform", rank_per="example", max_rows=0,
                                  r_max_prob=0.0))
    counts = collections.Counter(s.rows(t, 0, 1)[0] for t in range(40000))
    harmonic = sum(1 / r for r in range(1, 65))
    assert math.isclose(counts[1] / 40000, 1 / harmonic, rel_tol=0.05)
    assert math.isclose(counts[1] / counts[2], 2.0, rel_tol=0.1)
    assert math.isclose(counts[64] / 40000, 1 / 64 / harmonic, rel_tol=0.25)
    octaves = [sum(counts[r] for r in range(2 ** k, 2 ** (k + 1))) / 40000 for k in range(6)]
    assert all(math.isclose(o, sum(1 / r for r in range(2 ** k, 2 ** (k + 1))) / harmonic, rel_tol=0.06)
               for k, o in enumerate(octaves))


def test_list_sampler_draws_only_listed_ranks():
    s = RankSampler(QDyLoRAConfig(r_max=64, rank_sampler="list", rank_list=[1, 4, 16, 64], r_max_prob=0.0))
    assert {s.sample(t) for t in range(500)} == {1, 4, 16, 64}


@pytest.mark.parametrize("kwargs,match", [
    ({"r_min": 8, "r_max": 4}, "r_min=8 is larger than r_max=4"),
    ({"r_min": 0}, "r_min=0 must be >= 1"),
    ({"update": "partial"}, "update='partial' is unknown"),
    ({"rank_sampler": "list"}, "needs rank_list"),
    ({"rank_sampler": "list", "rank_list": [1, 99]}, r"\[99\] outside"),
])
def test_bad_config_is_refused_with_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QDyLoRAConfig(**kwargs)
