"""Sweep plots: each metric against rank (log2 axis) or against adapter parameters (rank patterns as points)."""

from __future__ import annotations

from pathlib import Path

BASE_LABEL = "base model (no adapter)"


def run_name(adapter: str) -> str:
    """The name a plot shows for an adapter: its run folder's name when the adapter is RUN/adapter."""
    p = Path(adapter)
    return p.parent.name if p.name == "adapter" and p.parent.name else p.name


def _y_axis(ax, values: list[float]) -> None:
    """A flat all-zero series would get matplotlib's [-0.055, 0.055]; show the metric's natural 0..1 range instead."""
    finite = [v for v in values if v is not None]
    if finite and all(v == 0 for v in finite):
        ax.set_ylim(-0.02, 1.0)


def _split(result) -> tuple[list[dict], dict | None]:
    """(rows at a rank >= 1, the base row or None)."""
    ranked = [r for r in result.rows if r.get("rank") not in (None, 0)]
    return ranked, next((r for r in result.rows if r.get("rank") == 0), None)


def _finish(ax, key: str, label: str, xlabel: str, base: dict | None, ys: list, legend_size: int) -> None:
    """The base model's line, labels, y-range, grid and legend of one metric's panel."""
    if base is not None and base.get(key) is not None:
        ax.axhline(base[key], color="gray", linestyle="--", label=BASE_LABEL)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(label)
    _y_axis(ax, ys + ([base.get(key)] if base else []))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def plot_sweep(result, path: str | Path) -> None:
    """Each of result.plot_metrics() against rank (log2 axis), the base model as a dashed horizontal line."""
    plt = _pyplot()
    ranked, base = _split(result)
    metrics = result.plot_metrics()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        ys = [r.get(key) for r in ranked]
        ax.plot([r["rank"] for r in ranked], ys, "o-", label="adapter at rank r")
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["rank"] for r in ranked], [str(r["rank"]) for r in ranked])
        _finish(ax, key, label, "rank", base, ys, 8)
    fig.suptitle(f"rank sweep of {run_name(result.adapter)}, task {result.task_label()}")
    _save(fig, plt, path)


def plot_params(result, path: str | Path) -> None:
    """Each metric against adapter parameters: uniform ranks as a line, rank patterns as points."""
    plt = _pyplot()
    ranked, base = _split(result)
    patterns = [r for r in result.rows if r.get("pattern")]
    metrics = result.plot_metrics()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        ys = [r.get(key) for r in ranked]
        ax.plot([r["params"] for r in ranked], ys, "o-", label="uniform rank r")
        for r in ranked:
            ax.annotate(str(r["rank"]), (r["params"], r.get(key)), textcoords="offset points", xytext=(3, 3),
                        fontsize=7)
        for r in patterns:
            ax.plot([r["params"]], [r.get(key)], "*", markersize=11, label=f"pattern {r['label']}")
        ax.set_xscale("log")
        _finish(ax, key, label, "adapter parameters", base, ys + [r.get(key) for r in patterns], 7)
    fig.suptitle(f"{run_name(result.adapter)}, task {result.task_label()}: uniform ranks and rank patterns")
    _save(fig, plt, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
