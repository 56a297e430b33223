"""The command line: help for every flag, a full train -> export run, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from qdylora.cli import build_parser, main


def test_help_explains_every_train_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--data", "--output", "--max-steps", "--r-min", "--r-max", "--alpha", "--update",
                 "--seed", "--resume", "--overwrite", "--optim", "--grad-accum", "--max-seq-len"):
        assert flag in out
    actions = [a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions]
    assert all(a.help for a in actions), [a.dest for a in actions if not a.help]


def test_train_then_export_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"line {i} of text"}) for i in range(12)))
    out = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
               "--max-steps", "3", "--r-min", "2", "--r-max", "8", "--alpha", "8", "--update", "nested",
               "--seed", "1", "--batch-size", "2", "--save-steps", "2", "--max-seq-len", "32", "--optim", "adamw_torch"])
    assert rc == 0
    assert "adapter saved to" in capsys.readouterr().out
    assert main(["export", str(out), "--rank", "5", "--output", str(tmp_path / "peft")]) == 0
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 5 and cfg["lora_alpha"] == 8
    # bad rank for this adapter: one line naming the range, exit code 2
    assert main(["export", str(out), "--rank", "9", "--output", str(tmp_path / "p2")]) == 2
    assert "outside this adapter's range [2, 8]" in capsys.readouterr().err
    # the run folder is not clobbered without --resume / --overwrite
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
                 "--max-steps", "3", "--r-max", "8"]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert (out / "adapter" / "qdylora_adapter.safetensors").exists()


@pytest.mark.parametrize("args,message", [
    (["--r-min", "9", "--r-max", "4"], "r_min=9 is larger than r_max=4"),
    (["--target-modules", "attn_qkv"], "match no linear layer of this model. Linears that exist:"),
    (["--data", "/nonexistent/data.jsonl"], "data file /nonexistent/data.jsonl does not exist"),
])
def test_bad_train_input_is_one_clear_line(tiny_model_dir, tmp_path, capsys, args, message):
    rc = main(["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "o"), "--max-steps", "1"] + args)
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
