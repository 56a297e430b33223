"""`qdylora allocate` end to end on a tiny trained run, the pattern through export and sweep, and every bad input
as one line with nothing written."""

from __future__ import annotations

import json

import pytest
from helpers import error_line

from qdylora.cli import main

# tiny Llama: per layer q 64+64, k 64+32, v 64+32, o 64+64, gate/up 64+128, down 128+64; 2 layers
COST = 2 * (128 + 96 + 96 + 128 + 192 * 3)


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("d")
    data = d / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"count to {i}", "output": " ".join(map(str, range(i)))})
                              for i in range(2, 10)))
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--max-steps",
                 "2", "--r-max", "8", "--batch-size", "2", "--optim", "adamw_torch", "--update", "nested",
                 "--lr", "1e-2", "--sweep-ranks", ""]) == 0
    return out, data


@pytest.mark.parametrize("score", ["taylor", "norm", "gradnorm", "loss", "fisher"])
def test_allocate_writes_a_pattern_within_budget(run, tmp_path, capsys, score):
    out, data = run
    pattern = tmp_path / "p.json"
    assert main(["allocate", str(out), "--avg-rank", "2", "--data", str(data), "--output", str(pattern), "--score",
                 score, "--limit", "2"]) == 0
    text = capsys.readouterr().out
    p = json.loads(pattern.read_text())
    assert set(p) == {"ranks", "params", "budget", "score", "source"} and p["score"] == score
    # the default floor: 1 from a budget of twice rank 1 everywhere on (gradnorm switches whole modules: 0)
    assert p["budget"] == {"params": 2 * COST, "avg_rank": 2.0, "min_rank": 0 if score == "gradnorm" else 1}
    assert len(p["ranks"]) == 14 and all(r in range(9) for r in p["ranks"].values())
    assert p["params"] <= 2 * COST
    assert p["source"]["uniform_rank"] == 2 and p["source"]["calibration_examples"] == 2
    for line in ("ranks per module type x layer", "self_attn.q_proj", "mlp.down_proj", "of a budget of 4,096",
                 "calibration loss: pattern", "uniform rank 2"):
        assert line in text, text
    if score == "gradnorm":
        assert set(p["ranks"].values()) <= {0, 4}


def test_min_rank_keeps_every_module_on(run, tmp_path, capsys):
    out, data = run
    pattern = tmp_path / "p.json"
    assert main(["allocate", str(out), "--avg-rank", "3", "--data", str(data), "--output", str(pattern),
                 "--limit", "2", "--min-rank", "2"]) == 0
    assert "every module at rank >= 2" in capsys.readouterr().out
    p = json.loads(pattern.read_text())
    assert min(p["ranks"].values()) >= 2 and p["params"] <= 3 * COST and p["budget"]["min_rank"] == 2
    # below twice rank 1 everywhere the default lets modules go: min_rank 0
    assert main(["allocate", str(out), "--avg-rank", "1.5", "--data", str(data), "--output", str(pattern),
                 "--limit", "2", "--overwrite"]) == 0
    assert json.loads(pattern.read_text())["budget"]["min_rank"] == 0


def test_pattern_through_export_and_sweep(run, tmp_path, capsys):
    out, data = run
    p1, p2 = tmp_path / "p1.json", tmp_path / "p2.json"
    assert main(["allocate", str(out), "--params", "900", "--data", str(data), "--output", str(p1), "--limit", "2"]) == 0
    assert main(["allocate", str(out), "--avg-rank", "4", "--data", str(data), "--output", str(p2), "--limit", "2",
                 "--score", "norm"]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--rank-pattern", str(p1), "--output", str(tmp_path / "e")]) == 0
    assert main(["sweep", str(out), "--task", "loss", "--data", str(data), "--ranks", "1,4",
                 "--rank-pattern", f"{p1},{p2}", "--output", str(tmp_path / "sw")]) == 0
    res = json.loads((tmp_path / "sw" / "sweep_loss.json").read_text())
    rows = {r["label"]: r for r in res["rows"]}
    assert set(rows) == {"base", "1", "4", "p1", "p2"}
    assert rows["4"]["params"] == 4 * COST and rows["base"]["params"] == 0
    assert rows["p1"]["params"] == json.loads(p1.read_text())["params"] <= 900
    assert rows["p2"]["pattern"] == str(p2) and rows["p2"]["rank"] is None
    assert (tmp_path / "sw" / "sweep_loss.png").stat().st_size > 0
    assert "p1" in (tmp_path / "sw" / "sweep_loss.csv").read_text()


BAD = [
    (["--avg-rank", "-1"], "--avg-rank -1.0 must be a number in (0, 8]"),
    (["--avg-rank", "0"], "--avg-rank 0.0 must be a number in (0, 8]"),
    (["--avg-rank", "9"], "--avg-rank 9.0 must be a number in (0, 8] (r_max"),
    (["--params", "-5"], "--params -5 must be an integer in [1, 16384]"),
    (["--params", "16385"], "--params 16385 must be an integer in [1, 16384] (the largest adapter"),
    (["--avg-rank", "2", "--params", "5"], "not allowed with argument"),
    (["--avg-rank", "nan"], "must be a number in (0, 8]"),
    (["--avg-rank", "2", "--limit", "0"], "--limit 0 must be an integer >= 1"),
    (["--avg-rank", "2", "--score", "random"], "invalid choice: 'random'"),
    (["--avg-rank", "2", "--min-rank", "3"], "--min-rank 3 needs 6,144 values on these modules, more than the "
                                              "budget of 4,096; lower --min-rank or raise the budget"),
    (["--avg-rank", "8", "--min-rank", "9"], "--min-rank 9 is above the adapter's r_max 8"),
    (["--avg-rank", "2", "--min-rank", "-1"], "--min-rank -1 must be an integer >= 0"),
    (["--avg-rank", "2", "--min-rank", "1", "--score", "gradnorm"], "--min-rank does not apply to --score gradnorm"),
    (["--avg-rank", "2", "--score", "fisher-train"], "has no training statistics for --score fisher-train"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_allocate_input_is_one_line_and_writes_nothing(run, tmp_path, capsys, args, message):
    out, data = run
    pattern = tmp_path / "p.json"
    assert main(["allocate", str(out), "--data", str(data), "--output", str(pattern)] + args) == 2
    assert message in error_line(capsys.readouterr().err)
    assert not pattern.exists()


def test_allocate_refuses_bad_outputs_and_data(run, tmp_path, capsys):
    out, data = run
    base = ["allocate", str(out), "--avg-rank", "2", "--limit", "2"]
    existing = tmp_path / "keep.json"
    existing.write_text("keep")
    cases = [(["--data", str(data), "--output", str(existing)], "already exists; choose another --output or pass --overwrite"),
             (["--data", str(data), "--output", str(tmp_path)], "is a folder; give a file path"),
             (["--data", str(data), "--output", str(out / "adapter" / "p.json")], "lies inside the adapter folder"),
             (["--data", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "p.json")], "does not exist"),
             (["--output", str(tmp_path / "p.json")], "allocate needs --data: calibration records"),
             (["--output", str(tmp_path / "p.json"), "--score", "fisher-train"],
              "has no training statistics for --score fisher-train; train with --fisher-steps N")]
    for args, message in cases:
        assert main(base + args) == 2
        assert message in error_line(capsys.readouterr().err)
    assert existing.read_text() == "keep" and not (tmp_path / "p.json").exists()
    assert not (out / "adapter" / "p.json").exists()


def test_sweep_refuses_a_bad_pattern_before_loading(run, tmp_path, capsys):
    out, data = run
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"ranks": {"model.layers.0.self_attn.q_proj": 2, "lm_head": 1}}))
    assert main(["sweep", str(out), "--task", "loss", "--data", str(data), "--ranks", "1",
                 "--rank-pattern", str(p), "--output", str(tmp_path / "sw")]) == 2
    assert "does not have (e.g. lm_head)" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "sw").exists()


def test_low_budgets_on_an_unsorted_r_max_adapter_point_to_the_sorted_one(run, tmp_path, capsys):
    """Under average rank 2 on an adapter trained at r_max (the fixture's default rule) the report says to allocate
    on the svd-sorted adapter; from rank 2, and on the sorted adapter, it says nothing more."""
    out, data = run
    pattern = tmp_path / "p.json"
    args = ["--data", str(data), "--output", str(pattern), "--limit", "2", "--overwrite"]
    assert main(["allocate", str(out), "--avg-rank", "1", *args]) == 0
    assert "qdylora sort RUN --output SORTED" in capsys.readouterr().out
    assert main(["allocate", str(out), "--avg-rank", "2", *args]) == 0
    assert "note:" not in capsys.readouterr().out
    sorted_dir = tmp_path / "sorted"
    assert main(["sort", str(out), "--output", str(sorted_dir)]) == 0
    assert main(["allocate", str(sorted_dir), "--avg-rank", "1", *args]) == 0
    text = capsys.readouterr().out
    assert "calibration loss: pattern" in text and "note:" not in text, text


def test_the_sort_advice_covers_runs_with_a_tenth_of_their_draws_below_r_max():
    """The advice holds where it was measured: every draw at r_max, or 90% of them (module draws); not at 50%."""
    from qdylora.allocate.report import low_budget_note

    assert low_budget_note(1.0, 0.9, svd_sorted=False) is not None
    assert low_budget_note(1.0, 0.5, svd_sorted=False) is None
    assert low_budget_note(1.0, 0.9, svd_sorted=True) is None
    assert low_budget_note(2.0, 1.0, svd_sorted=False) is None


def test_fisher_train_allocates_from_the_runs_statistics_without_data(tiny_model_dir, run, tmp_path, capsys):
    """A run trained with --fisher-steps: allocate --score fisher-train needs no --data (no model loads) and gives
    the same pattern with it, then also the calibration losses."""
    from qdylora.train.fisher_stats import STATS_NAME

    _, data = run
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--max-steps",
                 "3", "--r-max", "8", "--batch-size", "2", "--optim", "adamw_torch", "--rank-per", "module",
                 "--lr", "1e-2", "--sweep-ranks", "", "--fisher-steps", "2"]) == 0
    assert (out / "adapter" / STATS_NAME).is_file()
    capsys.readouterr()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["allocate", str(out), "--avg-rank", "2", "--score", "fisher-train", "--output", str(a)]) == 0
    text = capsys.readouterr().out
    assert "from training steps 2-3" in text and "calibration loss: not measured" in text, text
    assert main(["allocate", str(out), "--avg-rank", "1", "--score", "fisher-train", "--output",
                 str(tmp_path / "c.json")]) == 0
    assert "note:" not in capsys.readouterr().out  # drawn ranks (--rank-per module): no advice measured
    p = json.loads(a.read_text())
    assert p["score"] == "fisher-train" and p["params"] <= 2 * COST and p["source"]["stats_steps"] == [2, 3]
    assert p["source"]["calibration_loss"] == {"pattern": None, "uniform": None}
    assert main(["allocate", str(out), "--avg-rank", "2", "--score", "fisher-train", "--output", str(b), "--data",
                 str(data), "--limit", "2"]) == 0
    assert "calibration loss: pattern" in capsys.readouterr().out
    assert json.loads(b.read_text())["ranks"] == p["ranks"]


@pytest.mark.parametrize("args,message", [
    (["--fisher-steps", "-1"], "--fisher-steps"),
    (["--fisher-steps", "2", "--truncation", "svd"], "--fisher-steps does not apply to --truncation svd"),
])
def test_bad_fisher_steps_are_one_line(tiny_model_dir, run, tmp_path, capsys, args, message):
    _, data = run
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--max-steps",
                 "2", "--sweep-ranks", ""] + args) == 2
    assert message in error_line(capsys.readouterr().err)
    assert not out.exists()
