"""Fisher statistics gathered while training (train.fisher_stats) against per-position autograd, and the
fisher-train score against the averaged second-order model computed by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import allocation_model, calibration_batches
from qdylora.adapters.attach import module_layers, qdylora_config_of, set_rank
from qdylora.adapters.rank_sampler import RankSampler
from qdylora.allocate.scores import fisher_train_scores
from qdylora.data.examples import IGNORE_INDEX
from qdylora.train import fisher_stats
from qdylora.train.fisher_stats import STATS_NAME, FisherCollector, read_stats

ALPHA, R_MAX = 16.0, 8


def _scales(rank: int) -> torch.Tensor:
    return torch.tensor([ALPHA / rank if k < rank else 0.0 for k in range(R_MAX)])


def per_position(ids, mask, labels, ranks: dict[str, torch.Tensor]) -> tuple[dict, dict, int]:
    """({module: g [positions, r_max]}, {module: c_t [positions, r_max]}, loss tokens): the gradient of the summed
    token losses in the component scales, one leaf c per position holding its row's rank, by plain autograd on a
    model whose own adapters are off (ranks: {module: per-row ranks})."""
    model = allocation_model()
    layers = module_layers(model)
    set_rank(model, dict.fromkeys(layers, 0))
    gates = {}

    def hook(name):
        def add(module, args, output):
            A, B = module.lora_dyA["default"].detach(), module.lora_dyB["default"].detach()
            c = torch.stack([_scales(int(r)) for r in ranks[name]])[:, None, :].expand(*output.shape[:-1], R_MAX)
            gates[name] = c.clone().requires_grad_(True)
            return output + ((args[0] @ A.t()) * gates[name]) @ B.t()
        return add

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        F.cross_entropy(logits[keep], target[keep], reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
    real = mask.bool()
    grads = {n: c.grad[real].double() for n, c in gates.items()}
    configs = {n: c.detach()[real].double() for n, c in gates.items()}
    return grads, configs, int(keep.sum())


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 rounding of the model's forward: relative to the largest entry."""
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5 * float(want.abs().max()))


def _sums(parts):
    """The collector's sums from per-position (grads, configs, tokens) of several micro-steps."""
    names = list(parts[0][0])
    grad = torch.stack([sum(p[0][n].sum(0) for p in parts) for n in names])
    outer = torch.stack([sum(p[0][n].t() @ p[0][n] for p in parts) for n in names])
    at_config = torch.stack([sum(p[0][n].t() @ (p[0][n] * p[1][n]).sum(1) for p in parts) for n in names])
    return {"grad": grad, "outer": outer, "at_config": at_config, "tokens": sum(p[2] for p in parts)}


@pytest.mark.parametrize("per_row,kappa_positions", [(False, 64), (True, 64), (True, 2)])
def test_collected_sums_match_per_position_autograd(per_row, kappa_positions, monkeypatch):
    """Whatever multiple of the summed loss is backpropagated (here 0.37 / tokens), the sums are those of the
    per-position gradients of the summed token losses, with each row at its own rank when ranks are per row;
    the multiple is read from a few target positions as well as from all of them."""
    monkeypatch.setattr(fisher_stats, "_KAPPA_POSITIONS", kappa_positions)
    model = allocation_model().train()
    names = list(module_layers(model))
    collector = FisherCollector(model, first_step=1).attach()
    g = torch.Generator().manual_seed(11)
    parts = []
    for step, b in enumerate(calibration_batches(n=6) + calibration_batches(n=4, seed=4)):
        rows = b.ids.shape[0]
        ranks = {n: (torch.randint(0, R_MAX + 1, (rows,), generator=g) if per_row
                     else torch.full((rows,), int(torch.randint(1, R_MAX + 1, (1,), generator=g))))
                 for n in names}
        for n, layer in module_layers(model).items():
            layer.set_rank(ranks[n] if per_row else int(ranks[n][0]))
        collector.begin_micro_step(step, b.labels)
        logits = model(input_ids=b.ids, attention_mask=b.mask).logits[:, :-1]
        target = b.labels[:, 1:]
        keep = target != IGNORE_INDEX
        (0.37 * F.cross_entropy(logits[keep], target[keep], reduction="sum") / int(keep.sum())).backward()
        if step >= 1:  # step 0 lies before the collected steps
            parts.append(per_position(b.ids, b.mask, b.labels, ranks))
    collector.detach()
    got, want = collector.state(), _sums(parts)
    assert float(got["tokens"][0]) == want["tokens"]
    assert got["steps"].tolist() == [1, 2, 3]
    for key in ("grad", "outer", "at_config"):
        _close(got[key], want[key])


def test_collecting_leaves_the_gradients_unchanged():
    """The op hands its activations to the collector: the adapters' gradients are bit for bit those of a backward
    without it, at ranks below and at r_max (the collector computes the missing components itself)."""
    model = allocation_model().train()
    b = calibration_batches(n=4)[0]
    for i, layer in enumerate(module_layers(model).values()):
        layer.set_rank(1 + (7 * i) % R_MAX)

    def grads(collect: bool) -> list[torch.Tensor]:
        model.zero_grad()
        collector = FisherCollector(model, first_step=0).attach() if collect else None
        if collector:
            collector.begin_micro_step(0, b.labels)
        model(input_ids=b.ids, attention_mask=b.mask, labels=b.labels).loss.backward()
        if collector:
            collector.detach()
            assert float(collector.tokens) > 0 and bool(collector.outer.abs().sum() > 0)
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    without, with_ = grads(False), grads(True)
    assert len(without) == len(with_) > 0
    for a, c in zip(without, with_):
        assert torch.equal(a, c)


def test_no_collection_without_a_training_backward():
    """Evaluation passes (no_grad) and forwards that never reach backward add nothing, even inside a collected step."""
    model = allocation_model().train()
    b = calibration_batches(n=4)[0]
    collector = FisherCollector(model, first_step=0).attach()
    collector.begin_micro_step(0, b.labels)
    with torch.no_grad():
        model(input_ids=b.ids, attention_mask=b.mask, labels=b.labels)
    model.eval()
    model(input_ids=b.ids, attention_mask=b.mask, labels=b.labels)  # graph built, never backpropagated
    collector.detach()
    assert float(collector.tokens) == 0 and float(collector.outer.abs().sum()) == 0
    assert all(layer.observe is None for layer in module_layers(model).values())


def test_fisher_train_gains_are_the_averaged_second_order_model():
    """Each position's quadratic model around the configuration c_t it ran at, averaged over positions:
    L(c) - L(c_R) = mean_t [g_t . (c - c_R) + ((c - c_t)^T g_t)^2 / 2 - ((c_R - c_t)^T g_t)^2 / 2], here by hand
    for every rank of a module; the score's gains are its differences."""
    model = allocation_model()
    names = list(module_layers(model))
    cfg = qdylora_config_of(model)
    parts = []
    for i, b in enumerate(calibration_batches(n=6)):
        ranks = {n: torch.full((b.ids.shape[0],), 1 + (i + j) % R_MAX) for j, n in enumerate(names)}
        parts.append(per_position(b.ids, b.mask, b.labels, ranks))
    sums = _sums(parts)
    stats = {"grad": sums["grad"], "outer": sums["outer"], "at_config": sums["at_config"],
             "tokens": torch.tensor([float(sums["tokens"])]), "steps": torch.tensor([0]),
             "names": torch.tensor(list("\n".join(names).encode()), dtype=torch.uint8)}
    costs = {n: 1 for n in names}
    R = 3
    table = fisher_train_scores(stats, costs, cfg, R)
    T = sums["tokens"]
    for m in (0, len(names) - 1):
        gt = torch.cat([p[0][names[m]] for p in parts])
        ct = torch.cat([p[1][names[m]] for p in parts])
        c_R = _scales(R).double()

        def model_loss(c):
            return float(((gt @ c) - (gt * ct).sum(1)).pow(2).sum() / 2 + (gt @ c).sum()) / T

        curve = [model_loss(torch.zeros(R_MAX, dtype=torch.float64) if b == 0 else _scales(b).double())
                 - model_loss(c_R) for b in range(R_MAX + 1)]
        assert table.gains[m].tolist() == pytest.approx([curve[k] - curve[k + 1] for k in range(R_MAX)],
                                                        rel=1e-5, abs=1e-8)


def _dataset(n: int = 4, length: int = 12):
    g = torch.Generator().manual_seed(2)
    rows = []
    for i in range(n):
        ids = torch.randint(1, 256, (length,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2:]
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * length})
    return rows


def _train(tmp_path, name, checkpointing=True, max_steps=4, resume_from=None, rank_per="module"):
    from qdylora.train import TrainConfig, train_model

    model = allocation_model(rank_per=rank_per)
    # a learning rate far below float32's resolution of the weights: every step sees the same adapter
    cfg = TrainConfig(max_steps=max_steps, batch_size=2, grad_accum=2, save_steps=2, learning_rate=1e-20,
                      optim="adamw_torch", warmup_steps=0, gradient_checkpointing=checkpointing, fisher_steps=3)
    train_model(model, None, _dataset(), cfg, tmp_path / name, resume_from=resume_from)
    return tmp_path / name


def _expected_from_schedule(steps, rank_per="module"):
    """The sums for the steps given: every step sees all four examples, module i at the sampler's rank."""
    model = allocation_model(rank_per=rank_per)
    cfg = qdylora_config_of(model)
    sampler = RankSampler(cfg)
    names = list(module_layers(model))
    data = _dataset()
    ids = torch.tensor([r["input_ids"] for r in data])
    labels = torch.tensor([r["labels"] for r in data])
    parts = []
    for s in steps:
        ranks = {n: torch.full((4,), sampler.module(s, i)) for i, n in enumerate(names)}
        parts.append(per_position(ids, torch.ones_like(ids), labels, ranks))
    return _sums(parts)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_training_saves_the_last_steps_sums_beside_the_adapter(tmp_path, checkpointing):
    """--fisher-steps 3 of 4 (grad-accum 2, activation checkpointing on and off): the adapter folder holds the
    sums of steps 1-3 at the rank schedule's module ranks."""
    run = _train(tmp_path, "run", checkpointing)
    got, want = read_stats(run / "adapter"), _expected_from_schedule([1, 2, 3])
    assert got["steps"].tolist() == [1, 2, 3]
    assert float(got["tokens"][0]) == want["tokens"]
    for key in ("grad", "outer", "at_config"):
        _close(got[key], want[key])
    # checkpoint-2, written after steps 0 and 1, holds step 1 only
    assert read_stats(run / "checkpoint-2" / "adapter")["steps"].tolist() == [1]


def test_resume_continues_the_sums(tmp_path):
    """Resumed from checkpoint-2 the final sums equal those of the uninterrupted run."""
    import shutil

    whole = _train(tmp_path, "whole")
    part = tmp_path / "part"
    shutil.copytree(whole / "checkpoint-2", part / "checkpoint-2")
    _train(tmp_path, "part", resume_from=str(part / "checkpoint-2"))
    a, b = read_stats(whole / "adapter"), read_stats(part / "adapter")
    assert a["steps"].tolist() == b["steps"].tolist() == [1, 2, 3]
    for key in ("grad", "outer", "at_config", "tokens"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-9)


def test_no_statistics_without_fisher_steps(tmp_path):
    from qdylora.train import TrainConfig, train_model

    cfg = TrainConfig(max_steps=1, batch_size=2, learning_rate=1e-3, optim="adamw_torch", warmup_steps=0)
    train_model(allocation_model(), None, _dataset(), cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "adapter" / STATS_NAME).exists()
