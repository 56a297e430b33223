"""The fisher score: its statistics against per-position autograd, its curves against the formula by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import allocation_model, calibration_batches
from qdylora.adapters.attach import module_layers, set_rank
from qdylora.allocate.greedy import greedy_allocate
from qdylora.allocate.scores import compute_scores, fisher_scores, reference_gradients
from qdylora.data.examples import IGNORE_INDEX

ALPHA = 16.0


def _per_position_gradients(batches, reference: int) -> tuple[dict, int]:
    """{module: [positions, r_max]}: dL/dc at every real position of every batch, where module m adds
    sum_k c_k B[:, k] A[k] x with c = alpha / reference on the first `reference` components, one c per position (a
    leaf each), by plain autograd on a model whose own adapters are off; and the number of response tokens T."""
    model = allocation_model()
    layers = module_layers(model)
    set_rank(model, dict.fromkeys(layers, 0))  # off: the hooks below add the adapters
    total = sum(int(((b.labels[:, 1:] != IGNORE_INDEX) & b.mask[:, :-1].bool()).sum()) for b in batches)
    out = {name: [] for name in layers}
    for b in batches:
        gates = {}

        def hook(name):
            def add(module, args, output):
                A, B = module.lora_dyA["default"].detach(), module.lora_dyB["default"].detach()
                c = torch.zeros(*output.shape[:-1], A.shape[0])
                c[..., :reference] = ALPHA / reference
                gates[name] = c.requires_grad_(True)
                return output + ((args[0] @ A.t()) * c) @ B.t()
            return add

        handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
        try:
            logits = model(input_ids=b.ids, attention_mask=b.mask).logits[:, :-1]
            target = b.labels[:, 1:]
            keep = (target != IGNORE_INDEX) & b.mask[:, :-1].bool()
            (F.cross_entropy(logits[keep], target[keep], reduction="sum") / total).backward()
        finally:
            for h in handles:
                h.remove()
        real = b.mask.bool()
        for name, c in gates.items():
            out[name].append(c.grad[real].double())
    return {name: torch.cat(g) for name, g in out.items()}, total


@pytest.mark.parametrize("reference", [3, 8])
def test_fisher_statistics_match_per_position_autograd(reference):
    """h = sum_t w_t and sum_t w_t w_t^T equal the per-position gradients of the component scales by autograd."""
    batches = calibration_batches()
    ref = reference_gradients(allocation_model(), batches, reference, curvature=True)
    want, total = _per_position_gradients(batches, reference)
    assert ref.tokens == total
    for name, w in want.items():
        h, ww = ref.scale_stats[name]
        torch.testing.assert_close(h, w.sum(0), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(ww, w.t() @ w, rtol=1e-4, atol=1e-9)


def test_fisher_curves_are_the_quadratic_model_by_hand():
    """The score's gains are the differences L_m(k) - L_m(k + 1) of L_m(b) - L = h . d + T d^T (sum_t w_t w_t^T) d / 2
    with d = c(b) - c(R), c(b) = alpha / b on the first b components; the same through compute_scores."""
    model, batches, R = allocation_model(), calibration_batches(), 3
    ref = reference_gradients(model, batches, R, curvature=True)
    names = list(module_layers(model))
    table = fisher_scores(model, batches, R, ref=ref)
    for m in (0, len(names) - 1):
        h, ww = ref.scale_stats[names[m]]
        c_R = torch.tensor([ALPHA / R if k < R else 0.0 for k in range(8)], dtype=torch.float64)
        by_hand = []
        for b in range(9):
            c_b = torch.tensor([ALPHA / b if k < b else 0.0 for k in range(8)], dtype=torch.float64)
            d = c_b - c_R
            by_hand.append(float(h @ d + ref.tokens * (d @ ww @ d) / 2))
        assert by_hand[R] == 0.0
        # gain of component k: the modelled loss at rank k minus that at rank k + 1
        assert table.gains[m].tolist() == pytest.approx([by_hand[k] - by_hand[k + 1] for k in range(8)],
                                                        rel=1e-9, abs=1e-12)
    same = compute_scores("fisher", model, batches, R, progress=False)
    torch.testing.assert_close(same.gains, table.gains, rtol=1e-6, atol=1e-9)
    ranks = greedy_allocate(table, R * sum(table.costs), min_rank=1)
    assert sum(r * c for r, c in zip(ranks.values(), table.costs)) <= R * sum(table.costs)
