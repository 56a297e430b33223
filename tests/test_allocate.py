"""Per-module ranks: set_rank with a dict, the greedy allocation, the scores against autograd and separate
evaluations, the rank-pattern file."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import allocation_model, calibration_batches, mean_response_loss
from qdylora.adapters.attach import dylora_layers, module_layers, set_rank
from qdylora.adapters.config import QDyLoRAConfig
from qdylora.allocate.calib import CalibBatch, config_losses
from qdylora.allocate.greedy import (ScoreTable, budget_params, default_allowed, default_min_rank, greedy_allocate,
                                     uniform_rank)
from qdylora.allocate.pattern import check_pattern, parse_pattern, pattern_params, read_pattern
from qdylora.allocate.scores import (gradnorm_scores, loss_scores, norm_scores, reference_gradients,
                                     taylor_scores)
from qdylora.data.examples import IGNORE_INDEX
from qdylora.errors import ConfigError
from qdylora.eval.common import length_batches
from qdylora.eval.loss import evaluate_examples

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
Q0, V1, D1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"


# set_rank with a dict -------------------------------------------------------------------------------

def test_set_rank_dict_equals_modules_set_one_by_one():
    a, b = allocation_model(), allocation_model()
    set_rank(a, 5)
    set_rank(a, {Q0: 3, V1: 0, D1: 8})
    for name, module in b.named_modules():  # by peft's own module names, one layer at a time
        if hasattr(module, "set_rank") and name.startswith("base_model.model."):
            plain = name[len("base_model.model."):]
            module.set_rank({Q0: 3, V1: 0, D1: 8}.get(plain, 5))
    assert [l.rank for l in dylora_layers(a)] == [l.rank for l in dylora_layers(b)]
    with torch.no_grad():
        torch.testing.assert_close(a(IDS).logits, b(IDS).logits, rtol=0, atol=0)
        # rank 0 switches the adapter off: the same as a zero B in that module
        c = allocation_model()
        set_rank(c, 5)
        set_rank(c, {Q0: 3, D1: 8})
        module_layers(c)[V1].lora_dyB["default"].zero_()
        torch.testing.assert_close(a(IDS).logits, c(IDS).logits, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(a(IDS).logits, allocation_model()(IDS).logits, atol=1e-4)


def test_set_rank_dict_refuses_unknown_modules_and_bad_ranks():
    model = allocation_model(r_min=2)
    with pytest.raises(ConfigError, match=r"names 1 module\(s\) this adapter does not have \(e.g. "
                                          r"model.layers.9.q_proj\); use names as in the base model, e.g. "
                                          r"model.layers.0.self_attn.q_proj, .* \(14 adapted in all\)"):
        set_rank(model, {"model.layers.9.q_proj": 2})
    for bad in (1, 9, -1, 2.5, True, "4"):
        with pytest.raises(ConfigError, match=r"outside \{0\} and \[2, 8\]"):
            set_rank(model, {Q0: bad})
    assert all(l.rank == 8 for l in dylora_layers(model))  # nothing changed


# greedy ------------------------------------------------------------------------------------------------

def _table(gains, costs, allowed=None, r_max=None):
    g = torch.tensor(gains, dtype=torch.float64)
    names = [f"m{i}" for i in range(len(gains))]
    allowed = allowed or [list(range(g.shape[1] + 1))] * len(gains)
    return ScoreTable(names, g, list(costs), allowed)


def test_greedy_picks_the_hand_computed_pattern():
    # m0 gains [3, 1, .5] at cost 1; m1 [4, 4, .1] at cost 2; budget 5 values.
    # ratios from rank 0: m0 -> 1: 3/1 = 3 (best); m1 -> 2: 8/4 = 2 (ties m1 -> 1 at 4/2, the larger gain wins).
    # take m0 -> 1 (4 values left); now m0 -> 2: 1/1, m1 -> 2: 2 -> take m1 -> 2 (0 left).
    assert greedy_allocate(_table([[3, 1, .5], [4, 4, .1]], [1, 2]), 5) == {"m0": 1, "m1": 2}
    # a strong component behind a weak one: m0 [0.1, 5], m1 [1, 1], costs 1, budget 2. Component by component
    # the greedy would take m1's two (gain 2); moves to any rank take m0 -> 2 (gain 5.1 for 2 values).
    assert greedy_allocate(_table([[0.1, 5], [1, 1]], [1, 1]), 2) == {"m0": 2, "m1": 0}
    # with r_min = 2 a module goes from 0 to 2 at least: m0 [5, 0, 0], m1 [1, 1, 1], budget 3 at cost 1:
    # m0 -> 2: 5/2, m1 -> 2: 1 -> take m0 -> 2; 1 value left, every move needs 1 more component of m0 (gain 0)
    # or 2 of m1: none gains, so 1 value stays unused
    allowed = [[0, 2, 3]] * 2
    assert greedy_allocate(_table([[5, 0, 0], [1, 1, 1]], [1, 1], allowed), 3) == {"m0": 2, "m1": 0}
    # gradnorm-style blocks: modules only 0 or 2
    assert greedy_allocate(_table([[1, 1], [3, 3], [2, 2]], [1, 1, 1], [[0, 2]] * 3), 4) == \
        {"m0": 0, "m1": 2, "m2": 2}
    # nothing that gains is never bought
    assert greedy_allocate(_table([[0, 0], [-1, 2]], [1, 1]), 10) == {"m0": 0, "m1": 2}


def test_greedy_with_a_floor_keeps_every_module_on():
    # m0 [5, 5, 5], m1 [.1, 0, 0], m2 [1, .5, 0], costs 1, budget 5. From 0: m0 -> 3 (5 per value), m2 -> 1 (1),
    # m2 -> 2 (.5 beats m1's .1): m1 stays off. With min_rank 1 every module starts at 1 (3 values), and the 2
    # values left go to m0 -> 3 (5 per value).
    t = _table([[5, 5, 5], [.1, 0, 0], [1, .5, 0]], [1, 1, 1])
    assert greedy_allocate(t, 5) == {"m0": 3, "m1": 0, "m2": 2}
    assert greedy_allocate(t, 5, min_rank=1) == {"m0": 3, "m1": 1, "m2": 1}
    assert greedy_allocate(t, 3, min_rank=1) == {"m0": 1, "m1": 1, "m2": 1}
    # the floor is the smallest allowed rank >= min_rank: with r_min = 2, min_rank 1 starts every module at 2
    assert greedy_allocate(_table([[5, 5, 5], [1, 1, 1]], [1, 1], [[0, 2, 3]] * 2), 5, min_rank=1) == \
        {"m0": 3, "m1": 2}
    with pytest.raises(ConfigError, match="--min-rank 1 needs 3 values on these modules, more than the budget of 2"):
        greedy_allocate(t, 2, min_rank=1)
    with pytest.raises(ConfigError, match="--min-rank 4 is above the adapter's r_max 3"):
        greedy_allocate(t, 9, min_rank=4)
    with pytest.raises(ConfigError, match="--min-rank -1 must be an integer >= 0"):
        greedy_allocate(t, 9, min_rank=-1)


def test_greedy_stays_within_budget_in_prefix_order():
    g = torch.Generator().manual_seed(0)
    gains = torch.rand(30, 16, generator=g, dtype=torch.float64)
    gains[7, :10] = 0.0
    gains[7, 10] = 1000.0  # worth buying only together with components 0..9
    costs = [int(c) for c in torch.randint(3, 40, (30,), generator=g)]
    for budget in (0, 11, 100, 500, 2000, 16 * sum(costs)):
        ranks = greedy_allocate(ScoreTable([f"m{i}" for i in range(30)], gains, costs,
                                           [list(range(17))] * 30), budget)
        spent = sum(ranks[f"m{i}"] * costs[i] for i in range(30))
        assert spent <= budget
        # a module's rank counts all of its first components: module 7 holds component 10 only with 0..9
        if 11 * costs[7] <= budget:
            assert ranks["m7"] >= 11
        # nothing profitable that fits is left: no module's next component fits in what is left
        left = budget - spent
        assert all(ranks[f"m{i}"] == 16 or costs[i] > left for i in range(30) if i != 7)


def test_budgets_and_uniform_ranks():
    cfg = QDyLoRAConfig(r_min=2, r_max=8)
    costs = {"a": 10, "b": 30}
    assert budget_params(costs, cfg, avg_rank=4) == 160
    assert budget_params(costs, cfg, avg_rank=2.5) == 100
    assert budget_params(costs, cfg, params=77) == 77
    assert uniform_rank(160, costs, cfg) == 4 and uniform_rank(79, costs, cfg) is None
    for bad in ({"avg_rank": -1}, {"avg_rank": 0}, {"avg_rank": 8.5}, {"avg_rank": float("nan")},
                {"params": -5}, {"params": 0}, {"params": 321}, {}):
        with pytest.raises(ConfigError, match="--avg-rank|--params"):
            budget_params(costs, cfg, **bad)
    assert default_allowed(cfg) == [0, 2, 3, 4, 5, 6, 7, 8]
    # the default floor: 1 when every module at r_min (2 x 40 values) takes at most half the budget
    assert default_min_rank(160, costs, cfg) == 1 and default_min_rank(159, costs, cfg) == 0
    assert default_min_rank(80, costs, QDyLoRAConfig(r_min=1, r_max=8)) == 1
    assert default_min_rank(79, costs, QDyLoRAConfig(r_min=1, r_max=8)) == 0


# scores ------------------------------------------------------------------------------------------------

def test_norm_score_is_the_component_share():
    model = allocation_model()
    table = norm_scores(model)
    A, B = module_layers(model)[V1].factors()
    full = torch.linalg.matrix_norm(B @ A)  # the explicit product
    want = torch.stack([B[:, k].norm() * A[k].norm() for k in range(8)]) / full
    i = table.names.index(V1)
    torch.testing.assert_close(table.gains[i].float(), want, rtol=1e-5, atol=1e-7)
    assert table.costs[i] == 64 + 32 and table.allowed[i] == list(range(9))


@pytest.mark.parametrize("reference", [8, 3])
def test_reference_gradients_match_autograd(reference):
    """At reference R, components < R get the gradient plain autograd gives in nested mode (all of them at R = r_max),
    and the pass's loss is the mean loss at R."""
    model, batches = allocation_model(), calibration_batches()
    ref = reference_gradients(model, batches, reference)
    check = allocation_model()
    set_rank(check, reference)
    for p in check.parameters():
        p.grad = None
    loss = mean_response_loss(check, batches)
    loss.backward()
    assert ref.loss == pytest.approx(float(loss.detach()), abs=2e-6)
    for name, layer in module_layers(check).items():
        gA, gB = ref.grads[name]
        torch.testing.assert_close(gA[:reference], layer.lora_dyA["default"].grad[:reference], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gB[:, :reference], layer.lora_dyB["default"].grad[:, :reference], rtol=1e-4,
                                   atol=1e-6)
    # the model is left as it was: ranks, no gradients
    assert all(l.rank == 8 for l in dylora_layers(model))
    assert all(p.grad is None for p in model.parameters())


def test_taylor_and_gradnorm_from_autograd():
    model, batches = allocation_model(), calibration_batches()
    check = allocation_model()
    set_rank(check, 8)
    mean_response_loss(check, batches).backward()
    taylor, gradnorm = taylor_scores(model, batches, 8), gradnorm_scores(model, batches, 4)
    assert gradnorm.info["on_rank"] == 8 and gradnorm.allowed[0] == [0, 8]
    for i, (name, layer) in enumerate(module_layers(check).items()):
        A, B = layer.lora_dyA["default"], layer.lora_dyB["default"]
        want = (A * A.grad).abs().sum(1) + (B * B.grad).abs().sum(0)
        torch.testing.assert_close(taylor.gains[i].float(), want.detach(), rtol=1e-4, atol=1e-8)
    # at reference 3, components < 3 use the true gradient there; component k >= 3 its gradient at alpha / (k + 1)
    low = taylor_scores(model, batches, 3)
    check3 = allocation_model()
    set_rank(check3, 3)
    mean_response_loss(check3, batches).backward()
    for i, (name, layer) in enumerate(module_layers(check3).items()):
        A, B = layer.lora_dyA["default"], layer.lora_dyB["default"]
        want = ((A * A.grad).abs().sum(1) + (B * B.grad).abs().sum(0)).detach()
        torch.testing.assert_close(low.gains[i, :3].float(), want[:3], rtol=1e-4, atol=1e-8)
    gA, gB = reference_gradients(model, batches, 3).grads[Q0]
    A, B = module_layers(model)[Q0].factors()
    at3 = ((A * gA).abs().sum(1) + (B * gB).abs().sum(0))[3:]
    torch.testing.assert_close(low.gains[0, 3:].float(), at3 * 3 / torch.arange(4, 9), rtol=1e-5, atol=1e-9)
    # gradnorm at reference 4 switches modules on at rank 8: its norm covers all 8 components' gradients at 4
    gA, gB = reference_gradients(model, batches, 4).grads[V1]
    i = gradnorm.names.index(V1)
    assert float(gradnorm.gains[i, 0]) * 8 == pytest.approx(float(torch.cat([gA.flatten(), gB.flatten()]).norm()),
                                                              rel=1e-5)


def test_length_batches_cut_to_the_fewest_padded_tokens():
    """Hand-computed: lengths 128 x 5, 72, 53, 50 at a pass cost of 64 tokens. One batch of 8 pads to 1024 + 64;
    [5 x 128] + [72, 53, 50] costs 640 + 216 + 128 = 984, the minimum (a third batch adds 64 to save 38)."""
    lengths = [128, 50, 128, 53, 128, 72, 128, 128]
    assert length_batches(lengths, 8, pass_cost=64) == [[0, 2, 4, 6, 7], [5, 3, 1]]
    # at 4 a batch: [5 x 128] + [72] + [53, 50] = 818 + 12 beats four batches (815 + 16) and two (856 + 8)
    assert length_batches(lengths, 8, pass_cost=4) == [[0, 2, 4, 6, 7], [5], [3, 1]]
    # at most batch_size rows: [128] + [128 x 4] + [72, 53, 50] = 128 + 512 + 216 + 3 x 64 beats [128 x 4] + [...]
    assert length_batches(lengths, 4, pass_cost=64) == [[0], [2, 4, 6, 7], [5, 3, 1]]
    assert length_batches(lengths, 4) == [[0, 2, 4, 6], [7, 5, 3, 1]]  # pass_cost 0: plain chunks
    assert length_batches([], 3, pass_cost=64) == []


def test_taylor_gradients_do_not_depend_on_the_batch_cut():
    """The reference gradients of cut batches equal plain autograd over one padded batch of the same examples."""
    g = torch.Generator().manual_seed(7)
    lengths = [12, 5, 12, 7]
    rows = [torch.randint(1, 256, (n,), generator=g) for n in lengths]
    def batch(idx):
        ids = torch.zeros(len(idx), max(lengths[i] for i in idx), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, :lengths[i]], mask[r, :lengths[i]] = rows[i], 1
        labels = ids.clone()
        labels[:, :3] = IGNORE_INDEX
        labels[mask == 0] = IGNORE_INDEX
        return CalibBatch(ids, mask, labels)
    cut = [batch(b) for b in length_batches(lengths, 4, pass_cost=3)]
    assert [c.ids.shape for c in cut] == [(2, 12), (2, 7)]  # the second batch pads the 5-token example
    ref = reference_gradients(allocation_model(), cut, 4)
    check = allocation_model()
    set_rank(check, 4)
    mean_response_loss(check, [batch([0, 1, 2, 3])]).backward()
    for name, layer in module_layers(check).items():
        torch.testing.assert_close(ref.grads[name][0][:4], layer.lora_dyA["default"].grad[:4], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ref.grads[name][1][:, :4], layer.lora_dyB["default"].grad[:, :4], rtol=1e-4,
                                   atol=1e-6)


def test_loss_score_equals_separate_evaluations():
    """Every truncation the loss score measures (batched, starting at the module's block) equals evaluating that
    configuration on its own with set_rank and the sweep's loss evaluation."""

    class Tok:
        pad_token_id, padding_side = 0, "right"

    model, batches = allocation_model(), calibration_batches()
    examples = [{"input_ids": b.ids[i][b.mask[i].bool()].tolist(), "labels": b.labels[i][b.mask[i].bool()].tolist()}
                for b in batches for i in range(b.ids.shape[0])]
    table = loss_scores(model, batches, reference=2, grid=[0, 1, 2, 4, 8])
    assert table.info["truncations"] == 14 * 4
    check = allocation_model()
    for name in (Q0, V1, D1, "model.layers.1.self_attn.q_proj"):
        for g in (0, 1, 4, 8):
            set_rank(check, 2)
            set_rank(check, {name: g})
            want = evaluate_examples(check, Tok(), examples, None, batch_size=3, progress=False)[None].loss
            assert table.info["losses"][name][g] == pytest.approx(want, abs=2e-6), (name, g)
    set_rank(check, 2)
    ref = evaluate_examples(check, Tok(), examples, None, progress=False)[None].loss
    assert table.info["reference_loss"] == pytest.approx(ref, abs=2e-6)
    # gains are the loss drops per component between grid ranks; only grid ranks may be chosen
    i = table.names.index(V1)
    at = table.info["losses"][V1] | {2: ref}
    assert float(table.gains[i, 2]) == pytest.approx((at[2] - at[4]) / 2, abs=1e-6)
    assert float(table.gains[i, 3]) == float(table.gains[i, 2])
    assert float(table.gains[i, 0]) == pytest.approx(at[0] - at[1], abs=1e-6)
    assert table.allowed[i] == [0, 1, 2, 4, 8]
    # several configurations per pass, without the block cache, give the same losses
    configs = torch.full((2, 14), 2)
    configs[1, table.names.index(D1)] = 8
    got = config_losses(model, batches, configs)
    assert float(got[1]) == pytest.approx(table.info["losses"][D1][8], abs=2e-6)
    assert float(got[0]) == pytest.approx(ref, abs=2e-6)


# calibration losses of the pattern and of the uniform rank -------------------------------------------

@pytest.mark.parametrize("score", ["norm", "taylor"])  # taylor: the uniform rank's loss from its reference pass
def test_allocation_reports_the_calibration_losses_of_pattern_and_uniform_rank(monkeypatch, score):
    """The calibration losses allocate prints for the pattern and for the uniform rank of the budget equal plain
    cross-entropy on the model set to each, whether the pattern wins or loses there."""
    from qdylora.allocate import run as run_mod

    model, batches = allocation_model(), calibration_batches()
    names = list(module_layers(model))
    budget = 2 * sum(_costs(model).values())
    # on this seeded model the second pattern beats the uniform rank 2 (found by a random search), the first does not
    patterns = [dict.fromkeys(names, 2) | {Q0: 0, V1: 4}, dict(zip(names, [2, 0, 3, 3, 4, 1, 0, 0, 4, 2, 2, 0, 0, 1]))]
    check = allocation_model()
    set_rank(check, 2)
    with torch.no_grad():
        uniform_loss = float(mean_response_loss(check, batches))
    wins = []
    for scored in patterns:
        monkeypatch.setattr(run_mod, "greedy_allocate", lambda table, b, k=0, scored=scored: dict(scored))
        set_rank(check, scored)
        with torch.no_grad():
            scored_loss = float(mean_response_loss(check, batches))
        alloc = run_mod.allocate_model(model, batches, budget, score, progress=False)
        assert alloc.pattern.ranks == scored and alloc.uniform_rank == 2
        assert alloc.pattern_loss == pytest.approx(scored_loss, abs=2e-6)
        assert alloc.uniform_loss == pytest.approx(uniform_loss, abs=2e-6)
        assert f"difference {scored_loss - uniform_loss:+.4f}" in alloc.summary()
        wins.append(scored_loss < uniform_loss)
    assert wins == [False, True]


# pattern files ------------------------------------------------------------------------------------------

def _costs(model):
    return {n: l.in_features + l.out_features for n, l in module_layers(model).items()}


def test_pattern_file_round_trip_and_checks(tmp_path):
    model = allocation_model()
    costs, cfg = _costs(model), QDyLoRAConfig(r_max=8)
    ranks = dict.fromkeys(costs, 2) | {Q0: 0, V1: 8}
    params = pattern_params(ranks, costs)
    assert params == sum(2 * c for c in costs.values()) - 2 * 128 + 6 * 96
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"ranks": ranks, "params": params, "budget": {"params": params}, "score": "norm",
                             "source": {"x": 1}}))
    pattern = check_pattern(read_pattern(p), costs, cfg)
    assert pattern.ranks == ranks and pattern.name == "p"
    bad = {
        "[1, 2]": "holds a list, not an object with key 'ranks'",
        "{oops": "is not valid JSON",
        json.dumps({"params": 3}): "key 'ranks' is missing",
        json.dumps({"ranks": []}): "key 'ranks' must be a non-empty object",
        json.dumps({"ranks": {Q0: "2"}}): f"key 'ranks.{Q0}' is '2', not an integer rank",
        json.dumps({"ranks": ranks, "params": -1}): "key 'params' is -1",
        json.dumps({"ranks": ranks, "budget": 5}): "key 'budget' must be an object",
        json.dumps({"ranks": ranks, "rank": 5}): "key 'rank' is not a rank-pattern key",
    }
    for text, message in bad.items():
        p.write_text(text)
        with pytest.raises(ConfigError) as e:
            read_pattern(p)
        assert message in str(e.value) and str(p) in str(e.value)
    for obj, message in (({"ranks": ranks | {"model.layers.7.mlp.up_proj": 2}}, "does not have"),
                         ({"ranks": ranks | {Q0: 9}}, r"rank 9 for model.layers.0.self_attn.q_proj is outside"),
                         ({"ranks": {Q0: 2}}, "gives no rank to 13 of the adapter's 14 modules"),
                         ({"ranks": ranks, "params": params + 1}, f"says {params + 1} but its ranks keep {params}")):
        with pytest.raises(ConfigError, match=message):
            check_pattern(parse_pattern(obj, "x.json"), costs, cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        read_pattern(tmp_path / "none.json")
