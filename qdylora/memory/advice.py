"""Advice from a plan: the largest setting that fits, what to shrink when over budget, and the Trainer settings to use."""

from __future__ import annotations

from typing import Any

from ..errors import PlannerError
from .plan import MemoryPlan
from .units import TIGHT_FRACTION, format_bytes, parse_memory_size


def largest(ok, limit: int) -> int | None:
    """Largest n in [1, limit] with ok(n) (ok is monotone), None when even 1 fails."""
    if not ok(1):
        return None
    lo, hi = 1, 2
    while hi <= limit and ok(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def advice(plan: MemoryPlan, peak_of, budget: int) -> list[str]:
    """What to shrink, and by how much, when the plan does not fit (or is tight)."""
    s = plan.settings
    over = plan.total - budget
    if over <= 0:
        if plan.total > TIGHT_FRACTION * budget:
            return [f"tight: {format_bytes(budget - plan.total)} to spare; keep gradient checkpointing and "
                    "a paged optimizer"]
        return []
    shrinkable = [it for it in plan.items if it.name not in ("cuda_context", "allocator_slack")]
    top = sorted(shrinkable, key=lambda i: -i.bytes)[:3]
    out = [f"over budget by {format_bytes(over)}: shrink the items by at least that much; the largest are "
           + ", ".join(f"{it.name} {format_bytes(it.bytes)}" for it in top)]
    fits = lambda **o: peak_of(**o)[4] <= budget  # noqa: E731
    options: list[tuple[str, dict]] = []
    if not s["gradient_checkpointing"]:
        options.append(("turn on gradient checkpointing (shrinks activations)", {"gradient_checkpointing": True}))
    if s["optim"] in ("paged_adamw_32bit", "adamw_torch"):
        options.append(("--optim paged_adamw_8bit (shrinks optimizer_state 4x)", {"optim": "paged_adamw_8bit"}))
    for desc, change in options:
        new = peak_of(**change)[4]
        out.append(f"{desc}: saves {format_bytes(plan.total - new)} -> "
                   + ("fits" if new <= budget else f"still over by {format_bytes(new - budget)}"))
    if plan.max_seq_len:
        out.append(f"shrink activations and logits_loss: --seq-len {plan.max_seq_len} fits (from {s['seq_len']})")
    if plan.max_batch_size and s["batch_size"] > 1:
        out.append(f"--batch-size {plan.max_batch_size} fits (use gradient accumulation for the rest)")
    r = largest(lambda n: fits(r_max=n), s["r_max"])
    if r and r < s["r_max"]:
        out.append(f"shrink adapters, adapter_grads and optimizer_state: --r-max {r} fits (from {s['r_max']})")
    frugal = {"gradient_checkpointing": True, "optim": "paged_adamw_8bit", "seq_len": 1, "batch_size": 1, "r_max": 1}
    floor = peak_of(**frugal)[4]
    if floor > budget:
        base = sum(it.bytes for it in plan.items if it.name in ("nf4_weights", "unquantized_params"))
        out.append(f"no setting fits: the frozen base (nf4_weights + unquantized_params = {format_bytes(base)}) "
                   f"plus overheads needs {format_bytes(floor)} even at r_max=1, seq_len=1; use a smaller model "
                   f"or a GPU with at least {format_bytes(floor)} (this configuration: {format_bytes(plan.total)})")
    return out


def choose_memory_settings(plan: MemoryPlan, gpu_memory: str | int) -> dict[str, Any]:
    """Trainer settings for this budget: gradient checkpointing and a paged optimizer when memory is tight.

    Rules (each checked with the planner): if the fast settings (no checkpointing, the plan's
    optimizer, paged when it is a bnb one) need at most 85% of the budget, use them; otherwise turn
    gradient checkpointing on and use a *paged* optimizer of the plan's precision; if that still
    does not fit, switch to paged 8-bit AdamW. The returned 'reason' says what was chosen and why.
    """
    budget = parse_memory_size(gpu_memory)
    arch = plan.arch
    if arch is None:
        raise PlannerError("this plan has no architecture attached; build it with plan_memory")
    base = {k: plan.settings[k] for k in ("r_max", "seq_len", "batch_size", "dtype", "update", "kernel", "num_gpus",
                                         "strategy", "device", "autocast")}
    asked = plan.settings["optim"]
    paged = {"adamw_torch": "paged_adamw_32bit", "adamw_8bit": "paged_adamw_8bit"}.get(asked, asked)

    def try_(gc: bool, optim: str) -> MemoryPlan:
        from .estimate import plan_memory

        return plan_memory(arch, gradient_checkpointing=gc, optim=optim, gpu_memory=budget, **base)

    fast = try_(False, asked)
    if fast.total <= TIGHT_FRACTION * budget:
        p, gc, optim, why = fast, False, asked, "memory is ample: no gradient checkpointing (faster)"
    else:
        p, gc, optim = try_(True, paged), True, paged
        why = (f"memory is tight (without checkpointing {format_bytes(fast.total)} of {format_bytes(budget)}): "
               f"gradient checkpointing on, paged optimizer {paged}")
        if not p.fits and paged != "paged_adamw_8bit":
            p8 = try_(True, "paged_adamw_8bit")
            if p8.fits or p8.total < p.total:
                p, optim = p8, "paged_adamw_8bit"
                why += "; switched to 8-bit paged AdamW because 32-bit state does not fit"
    why = f"planned {format_bytes(p.total)} of {format_bytes(budget)}; " + why
    if not p.fits:
        why += "; still does NOT fit: " + " | ".join(p.advice[1:] or p.advice)
    return {"gradient_checkpointing": gc, "optim": optim, "paged": optim.startswith("paged_"),
            "tight": gc, "fits": bool(p.fits), "planned_bytes": p.total, "budget_bytes": budget, "reason": why}
