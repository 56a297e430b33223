"""Human-readable views of a rank pattern: ranks per module type x layer, and totals per type / per layer."""

from __future__ import annotations

import re
from typing import Mapping

LAYER = re.compile(r"\.(\d+)\.")

SORT_ADVICE_MIN_R_MAX_PROB = 0.9  # the smallest share of draws at r_max the sort advice was measured on


def split_name(name: str) -> tuple[str, int | None]:
    """('self_attn.q_proj', 3) for 'model.layers.3.self_attn.q_proj'; (name, None) without a layer number."""
    m = LAYER.search(name)
    if not m:
        return name, None
    return name[m.end():], int(m.group(1))


def by_type_and_layer(ranks: Mapping[str, int]) -> tuple[list[str], list[int | None], dict]:
    """(module types, layers, {(type, layer): rank}) in the order they first appear / numerically."""
    cells, types, layers = {}, [], set()
    for name, r in ranks.items():
        t, layer = split_name(name)
        if t not in types:
            types.append(t)
        layers.add(layer)
        cells[(t, layer)] = r
    ordered = sorted((x for x in layers if x is not None)) + ([None] if None in layers else [])
    return types, ordered, cells


def rank_table(ranks: Mapping[str, int], per_line: int = 32) -> str:
    """Ranks as a compact table: a row per module type, a column per layer ('.' = off), then the type's mean rank."""
    types, layers, cells = by_type_and_layer(ranks)
    width = max([len(t) for t in types] + [4])
    cell = max(2, max(len(str(r)) for r in ranks.values()))
    lines = []
    for start in range(0, len(layers), per_line):
        chunk = layers[start:start + per_line]
        head = " ".join(f"{'-' if x is None else x:>{cell}}" for x in chunk)
        lines.append(f"{'layer':<{width}}  {head}" + ("   mean" if start + per_line >= len(layers) else ""))
        for t in types:
            row = " ".join(f"{_cell(cells.get((t, x))):>{cell}}" for x in chunk)
            tail = ""
            if start + per_line >= len(layers):
                vals = [v for (tt, _), v in cells.items() if tt == t]
                tail = f"  {sum(vals) / len(vals):5.1f}"
            lines.append(f"{t:<{width}}  {row}{tail}")
    return "\n".join(lines)


def _cell(r: int | None) -> str:
    return " " if r is None else "." if r == 0 else str(r)


def type_shares(ranks: Mapping[str, int], costs: Mapping[str, int]) -> dict[str, float]:
    """Fraction of the pattern's parameters that each module type holds."""
    total = sum(r * costs[m] for m, r in ranks.items()) or 1
    out: dict[str, float] = {}
    for m, r in ranks.items():
        t = split_name(m)[0]
        out[t] = out.get(t, 0.0) + r * costs[m] / total
    return out


def layer_means(ranks: Mapping[str, int]) -> dict[int | None, float]:
    """Mean rank per layer over its module types."""
    sums: dict = {}
    for m, r in ranks.items():
        layer = split_name(m)[1]
        s, n = sums.get(layer, (0, 0))
        sums[layer] = (s + r, n + 1)
    return {k: s / n for k, (s, n) in sums.items()}


def low_budget_note(avg_rank: float, r_max_prob: float, svd_sorted: bool) -> str | None:
    """The measured advice for budgets under average rank 2 on unsorted adapters trained mostly at r_max, else None."""
    # on such adapters rank 1 is an arbitrary slice of r_max components; sorted, it is the best rank-1 approximation.
    # Measured on runs with every draw at r_max and with 90% of the module draws at r_max (docs/allocation.md).
    if avg_rank >= 2 or svd_sorted or r_max_prob < SORT_ADVICE_MIN_R_MAX_PROB:
        return None
    return ("note: under an average rank of 2 on an adapter trained (mostly) at r_max, taylor's pattern on the "
            "svd-sorted adapter was better on every run measured (docs/allocation.md): qdylora sort RUN --output "
            "SORTED, then qdylora allocate SORTED --score taylor --data CALIB")
