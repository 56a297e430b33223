"""ComponentAdamW against torch's AdamW on one parameter per component (the reference), and its exactness:
components not trained in a step keep value and state bit for bit, in 32-bit, 8-bit and paged settings."""

from __future__ import annotations

import pytest
import torch

from qdylora.train.optimizer import ComponentAdamW

R, IN, OUT = 6, 40, 24
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
# which components each step trains
ACTIVE = [[0, 2], [2], [1, 2, 5], [0, 1, 2, 3, 4, 5], [5]]


def _grads(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(R, IN, generator=g), torch.randn(OUT, R, generator=g)


def _run_component_adamw(bits: int = 32, paged: bool = False):
    torch.manual_seed(0)
    A = torch.nn.Parameter(torch.randn(R, IN))
    B = torch.nn.Parameter(torch.randn(OUT, R))
    current = {}
    opt = ComponentAdamW([A, B], state_bits=bits, paged=paged, axes={A: 0, B: 1},
                         active=lambda p: torch.tensor(current["idx"]), **HYPER)
    history = []
    for step, idx in enumerate(ACTIVE):
        gA, gB = _grads(step)
        mask = torch.zeros(R)
        mask[idx] = 1
        A.grad, B.grad = gA * mask[:, None], gB * mask[None, :]  # what frozen mode's op gives: zeros elsewhere
        current["idx"] = idx
        before = (A.detach().clone(), B.detach().clone(), {k: v.clone() for k, v in opt.state[A].items()})
        opt.step()
        history.append((before, idx))
    return A, B, opt, history


def _run_reference():
    """torch.optim.AdamW with every component its own parameter; an untrained one gets grad None (skipped)."""
    torch.manual_seed(0)
    A0, B0 = torch.randn(R, IN), torch.randn(OUT, R)
    rows = [torch.nn.Parameter(A0[i].clone()) for i in range(R)]
    cols = [torch.nn.Parameter(B0[:, i].clone()) for i in range(R)]
    opt = torch.optim.AdamW(rows + cols, foreach=False, **HYPER)
    for step, idx in enumerate(ACTIVE):
        gA, gB = _grads(step)
        for i in range(R):
            rows[i].grad = gA[i].clone() if i in idx else None
            cols[i].grad = gB[:, i].clone() if i in idx else None
        opt.step()
    return torch.stack([r.detach() for r in rows]), torch.stack([c.detach() for c in cols], dim=1)


def test_32bit_equals_adamw_with_one_parameter_per_component():
    A, B, _, _ = _run_component_adamw()
    refA, refB = _run_reference()
    torch.testing.assert_close(A.detach(), refA, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(B.detach(), refB, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [32, 8])
def test_untrained_components_keep_value_and_state_bit_for_bit(bits):
    A, B, opt, history = _run_component_adamw(bits)
    torch.manual_seed(0)
    for step, ((a_before, b_before, st_before), idx) in enumerate(history):
        a_after = history[step + 1][0][0] if step + 1 < len(history) else A.detach()
        b_after = history[step + 1][0][1] if step + 1 < len(history) else B.detach()
        st_after = history[step + 1][0][2] if step + 1 < len(history) else opt.state[A]
        for i in range(R):
            if i in idx:
                assert not torch.equal(a_after[i], a_before[i]) and not torch.equal(b_after[:, i], b_before[:, i])
            else:
                assert torch.equal(a_after[i], a_before[i]) and torch.equal(b_after[:, i], b_before[:, i])
                for key, value in st_before.items():
                    assert torch.equal(st_after[key][i], value[i]), (step, i, key)
    # the step count of a component is the number of steps that trained it
    assert opt.state[A]["step"].tolist() == [sum(i in a for a in ACTIVE) for i in range(R)]


def test_8bit_tracks_32bit_closely():
    A8, B8, _, _ = _run_component_adamw(8)
    A32, B32, _, _ = _run_component_adamw(32)
    assert (A8 - A32).abs().max() < 5e-3 and (B8 - B32).abs().max() < 5e-3


def test_state_dict_round_trip_keeps_dtypes():
    A, B, opt, _ = _run_component_adamw(8)
    sd = opt.state_dict()
    A2, B2 = torch.nn.Parameter(A.detach().clone()), torch.nn.Parameter(B.detach().clone())
    opt2 = ComponentAdamW([A2, B2], state_bits=8, axes={A2: 0, B2: 1}, **HYPER)
    opt2.load_state_dict(sd)
    for p, q in ((A, A2), (B, B2)):
        for key, value in opt.state[p].items():
            assert opt2.state[q][key].dtype == value.dtype and torch.equal(opt2.state[q][key], value)


def test_per_component_learning_rates():
    """lr_scale[k] multiplies component k's learning rate: torch AdamW with one param group per component."""
    scale = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 0.25])
    torch.manual_seed(0)
    A = torch.nn.Parameter(torch.randn(R, IN))
    opt = ComponentAdamW([A], axes={A: 0}, lr_scale={A: scale}, **HYPER)
    torch.manual_seed(0)
    rows = [torch.nn.Parameter(A.detach()[i].clone()) for i in range(R)]
    ref = torch.optim.AdamW([{"params": [rows[i]], "lr": HYPER["lr"] * float(scale[i])} for i in range(R)],
                            foreach=False, **{k: v for k, v in HYPER.items() if k != "lr"})
    for step in range(3):
        gA, _ = _grads(step)
        A.grad = gA.clone()
        for i in range(R):
            rows[i].grad = gA[i].clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(A.detach(), torch.stack([r.detach() for r in rows]), rtol=1e-6, atol=1e-7)
