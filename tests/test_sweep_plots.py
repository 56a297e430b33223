"""Sweep plots name the run (not its adapter/ folder) and give an all-zero metric a readable y-axis."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qdylora.eval.plots import plot_sweep  # noqa: E402
from qdylora.eval.sweep import SweepResult  # noqa: E402


def _plotted(result, tmp_path, monkeypatch):
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    plot_sweep(result, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    return figs[0]


def test_title_names_the_run_and_zero_metric_axis(tmp_path, monkeypatch):
    rows = [{"rank": 0, "label": "base", "accuracy": 0.0, "loss": 2.5},
            {"rank": 1, "label": "1", "accuracy": 0.0, "loss": 2.0},
            {"rank": 8, "label": "8", "accuracy": 0.0, "loss": 1.5}]
    result = SweepResult(task="default", adapter=str(tmp_path / "my_run" / "adapter"), base_model="m", rows=rows)
    fig = _plotted(result, tmp_path, monkeypatch)
    assert fig._suptitle.get_text() == "rank sweep of my_run, task default"
    acc_ax, loss_ax = fig.axes
    lo, hi = acc_ax.get_ylim()
    assert lo <= 0 and hi >= 0.99  # all-zero exact match: the 0..1 range, not +-0.055 around zero
    assert loss_ax.get_ylim()[1] < 3  # other metrics keep matplotlib's range


def test_lm_eval_plot_has_one_panel_per_metric(tmp_path, monkeypatch):
    rows = [{"rank": r, "label": str(r), "t/acc": a, "t/acc_norm": b} for r, a, b in
            [(0, 0.25, 0.3), (2, 0.5, 0.4), (8, 0.75, 0.6)]]
    result = SweepResult(task="lm-eval", adapter=str(tmp_path / "run"), base_model="m", rows=rows,
                         settings={"lm_eval_tasks": ["t"]})
    fig = _plotted(result, tmp_path, monkeypatch)
    assert [ax.get_ylabel() for ax in fig.axes] == ["t/acc", "t/acc_norm"]
    assert fig._suptitle.get_text() == "rank sweep of run, task lm-eval t"
    assert list(fig.axes[0].lines[0].get_ydata()) == [0.5, 0.75]
