"""Per-component learning-rate factors: against draws simulated from the sampler, a hand case, and AdamW's step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qdylora.adapters.config import QDyLoRAConfig
from qdylora.train.config import ConfigError, TrainConfig
from qdylora.train.optimizer import ComponentAdamW
from qdylora.train.rank_schedule import RankSchedule


def schedule(**config) -> RankSchedule:
    """A RankSchedule over no layers with one stand-in adapter tensor, so its factors can be read."""
    s = RankSchedule(nn.Linear(1, 1), QDyLoRAConfig(r_min=1, alpha=16.0, **{"r_max_prob": 0.0, **config}))
    s.axes = {"A": 0}
    return s


def simulated_factor(cfg: QDyLoRAConfig, rows: int, steps: int = 4000) -> torch.Tensor:
    """rms / mean of component k's per-step gradient scale over the steps that train it, from real draws."""
    s = schedule(**{k: getattr(cfg, k) for k in ("r_max", "rank_per", "max_rows", "rank_sampler", "update",
                                                 "r_max_prob")})
    k = torch.arange(cfg.r_max)
    total, square, hits = (torch.zeros(cfg.r_max, dtype=torch.float64) for _ in range(3))
    for step in range(steps):
        if cfg.rank_per == "step":
            ranks = [s.sampler.sample(step)]
        else:
            ranks = s.sampler.rows(step, 0, rows)
        scale = torch.zeros(cfg.r_max, dtype=torch.float64)
        for b in ranks:
            trains = (k == b - 1) if cfg.update == "frozen" else (k < b)
            scale += trains.double() / b
        total += scale
        square += scale ** 2
        hits += scale > 0
    mean, sq = total / hits.clamp(min=1), square / hits.clamp(min=1)
    return torch.where(hits > 0, sq.sqrt() / mean.clamp(min=1e-300), torch.zeros(()))


def test_scale_factor_by_hand_for_two_ranks():
    # ranks 1 and 2 at 1/2 each, one per step: component 0 sees scale 1 or 1/2 (mean 3/4, mean square 5/8),
    # component 1 only 1/2, in the half of the steps that train it
    f = schedule(r_max=2, rank_per="step").scale_lr_scales(1)["A"]
    assert f[0].item() == pytest.approx(math.sqrt(5 / 8) / (3 / 4), rel=1e-6)
    assert f[1].item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("config, rows", [
    (dict(rank_per="step"), 2),
    (dict(rank_per="example", max_rows=0), 2),
    (dict(rank_per="example", max_rows=1), 2),
    (dict(rank_per="example", max_rows=1, rank_sampler="loguniform"), 4),
    (dict(rank_per="example", max_rows=0, update="frozen"), 3),
    (dict(rank_per="example", max_rows=1, r_max_prob=0.5), 3),
])
def test_scale_factor_matches_simulated_draws(config, rows):
    cfg = QDyLoRAConfig(r_min=1, r_max=16, alpha=16.0, **{"r_max_prob": 0.0, **config})
    want = simulated_factor(cfg, rows)
    got = schedule(r_max=16, **config).scale_lr_scales(rows)["A"].double()
    assert torch.allclose(got, want, rtol=0.03), (got, want)


def test_scale_factor_is_one_when_the_scale_never_varies():
    # every row at r_max: every component trained at alpha / r_max in every step, as in plain LoRA
    f = schedule(r_max=8, rank_per="example", max_rows=4).scale_lr_scales(4)["A"]
    assert torch.allclose(f, torch.ones(8))


def test_adamw_first_step_moves_each_component_by_its_factor_times_lr():
    # Adam's bias-corrected first step is lr * g / (|g| + eps): +-lr per entry, times the factor
    A = nn.Parameter(torch.zeros(3, 4))
    factor = torch.tensor([2.0, 1.0, 0.5])
    opt = ComponentAdamW([A], lr=1e-2, eps=1e-12, axes={A: 0}, lr_scale={A: factor})
    A.grad = torch.randn(3, 4)
    opt.step()
    assert torch.allclose(A.detach().abs(), (1e-2 * factor)[:, None].expand(3, 4), rtol=1e-5)


def test_scale_lr_must_be_a_bool():
    with pytest.raises(ConfigError, match="scale_lr"):
        TrainConfig(scale_lr="yes")


def test_training_with_scale_lr_scales_each_components_first_step(tiny_model_dir, tmp_path):
    # B starts at zero, so the first step's gradients are the same with and without the factors, and Adam's
    # first step is +-lr per entry: B's components must differ by exactly the factors
    import json

    from safetensors.torch import load_file

    from qdylora.train import train

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i)))})
                              for i in range(1, 9)))
    q = dict(r_min=1, r_max=8, alpha=8.0, seed=3, rank_per="example", max_rows=1, r_max_prob=0.0)
    weights = {}
    for on in (False, True):
        t = TrainConfig(max_steps=1, batch_size=4, max_seq_len=64, learning_rate=1e-3, optim="adamw_torch",
                        warmup_steps=0, gradient_checkpointing=False, seed=3, scale_lr=on)
        train(str(tiny_model_dir), str(data), str(tmp_path / f"run{on}"), QDyLoRAConfig(**q), t)
        weights[on] = load_file(str(tmp_path / f"run{on}" / "adapter" / "qdylora_adapter.safetensors"))
    factor = schedule(r_max=8, rank_per="example", max_rows=1).scale_lr_scales(4)["A"]
    assert factor[0] > 1.05  # the factors differ from 1 by far more than the tolerance below
    b_keys = [k for k in weights[True] if "lora_B" in k]
    assert b_keys
    for k in b_keys:
        on, off = weights[True][k].double(), weights[False][k].double()
        moved = off.abs() > 0
        assert moved.any()
        ratio = (on[moved] / off[moved])
        cols = moved.nonzero()[:, 1]
        assert torch.allclose(ratio, factor.double()[cols], rtol=1e-4), k
