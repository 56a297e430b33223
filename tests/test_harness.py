"""lm-evaluation-harness sweeps: every rank's numbers equal lm-eval run directly on that rank's peft export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install qdylora[eval])")

from qdylora.adapters.attach import attach_adapters, dylora_layers  # noqa: E402
from qdylora.adapters.config import QDyLoRAConfig  # noqa: E402
from qdylora.adapters.export import export_peft  # noqa: E402
from qdylora.adapters.files import save_adapter  # noqa: E402
from qdylora.eval.harness import evaluate_harness  # noqa: E402
from qdylora.load.model import load_model_and_tokenizer  # noqa: E402

TASKS = str(Path(__file__).parent / "data" / "lm_eval_task")


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    base, tok = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    model = attach_adapters(base, QDyLoRAConfig(r_max=8, alpha=8.0))
    g = torch.Generator().manual_seed(0)
    for layer in dylora_layers(model):  # B away from zero so the ranks differ
        layer.lora_dyB["default"].data.normal_(0, 0.3, generator=g)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(model, out)
    return model, tok, out


def _direct(model_dir, export_dir) -> dict:
    """lm-eval on a plain PeftModel of the export over a freshly loaded NF4 base (what a user runs)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from peft import PeftModel

    from qdylora.eval.harness import _quiet_and_in, metric_columns

    base, tok = load_model_and_tokenizer(str(model_dir), device="cpu")
    peft_model = PeftModel.from_pretrained(base, str(export_dir)).eval()
    with _quiet_and_in(TASKS):
        res = simple_evaluate(model=HFLM(pretrained=peft_model, tokenizer=tok, batch_size=4, device="cpu"),
                              tasks=["qdylora_colors"], task_manager=TaskManager(include_path=TASKS),
                              bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    return metric_columns(res["results"])


def test_sweep_numbers_equal_lm_eval_on_each_export(adapter, tiny_model_dir, tmp_path):
    model, tok, adapter_dir = adapter
    got = evaluate_harness(model, tok, ["qdylora_colors"], [2, 8], include_path=TASKS, batch_size=4, progress=False)
    assert set(got[2]["metrics"]) == {"qdylora_colors/acc", "qdylora_colors/acc_norm"}
    for rank in (2, 8):
        export_peft(adapter_dir, rank, tmp_path / f"r{rank}")
        assert got[rank]["metrics"] == _direct(tiny_model_dir, tmp_path / f"r{rank}")


def test_unknown_task_and_missing_lm_eval_are_one_line(adapter, monkeypatch):
    from qdylora.errors import ConfigError, DataError
    import qdylora.eval.harness as harness

    model, tok, _ = adapter
    with pytest.raises(DataError, match="lm-eval knows no task no_such_task"):
        evaluate_harness(model, tok, ["no_such_task"], [2], include_path=TASKS, progress=False)

    def missing():
        raise ConfigError(harness.INSTALL)

    monkeypatch.setattr(harness, "_lm_eval", missing)
    with pytest.raises(ConfigError, match=r"pip install qdylora\[eval\]"):
        evaluate_harness(model, tok, ["qdylora_colors"], [2], progress=False)


def test_cli_sweep_on_an_lm_eval_task_writes_lm_evals_numbers(adapter, tiny_model_dir, tmp_path, capsys):
    import csv
    import json

    from qdylora.cli import main

    _, _, adapter_dir = adapter
    out = tmp_path / "sweep"
    rc = main(["sweep", str(adapter_dir), "--task", "lm-eval", "--lm-eval-tasks", "qdylora_colors",
               "--include-path", TASKS, "--ranks", "2,8", "--model", str(tiny_model_dir), "--batch-size", "4",
               "--output", str(out)])
    assert rc == 0
    assert "qdylora_colors/acc" in capsys.readouterr().out
    rows = {r["label"]: r for r in json.loads((out / "sweep_lm-eval.json").read_text())["rows"]}
    assert sorted(rows) == ["2", "8", "base"]
    with open(out / "sweep_lm-eval.csv") as f:
        csv_rows = {r["label"]: r for r in csv.DictReader(f)}
    assert (out / "sweep_lm-eval.png").stat().st_size > 0
    for rank in (2, 8):
        export_peft(adapter_dir, rank, tmp_path / f"r{rank}")
        direct = _direct(tiny_model_dir, tmp_path / f"r{rank}")
        assert {k: rows[str(rank)][k] for k in direct} == direct
        assert {k: float(csv_rows[str(rank)][k]) for k in direct} == pytest.approx(direct, abs=1e-12)


def test_cli_sweep_lm_eval_refuses_bad_options_before_loading(adapter, tmp_path, capsys):
    from qdylora.cli import main

    _, _, adapter_dir = adapter
    cases = [(["--task", "lm-eval"], "--task lm-eval needs --lm-eval-tasks"),
             (["--task", "lm-eval", "--lm-eval-tasks", "no_such_task", "--include-path", TASKS],
              "lm-eval knows no task no_such_task"),
             (["--task", "lm-eval", "--lm-eval-tasks", "x", "--include-path", str(tmp_path / "none")],
              "is not a folder of lm-eval task YAML files"),
             (["--task", "default", "--lm-eval-tasks", "arc_easy"], "only apply to --task lm-eval")]
    for extra, message in cases:
        rc = main(["sweep", str(adapter_dir), "--model", str(tmp_path / "no_model_needed"), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (extra, err)
