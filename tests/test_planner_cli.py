"""`qdylora plan` on the command line: the table and JSON, and one clear line with exit code 2 for every bad input."""

from __future__ import annotations

import json

import pytest


def test_cli(capsys):
    import argparse

    from qdylora.cli.plan import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "--model", "tiny-llama", "--gpu-memory", "2GiB", "--json"])
    assert args.func(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] and d["recommended_settings"]["fits"]
    args = parser.parse_args(["plan", "--model", "falcon-40b", "--gpu-memory", "24GiB"])
    assert args.func(args) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "advice:" in out
    args = parser.parse_args(["plan", "--model", "tiny-llama", "--gpu-memory", "32 gigs"])
    assert args.func(args) == 2
    assert "cannot parse memory size '32 gigs'" in capsys.readouterr().err


def _plan_cli(capsys, *argv):
    """(exit code, stderr) of `qdylora plan ...` through the CLI's entry point."""
    from qdylora.cli import main

    rc = main(["plan", *argv])
    return rc, capsys.readouterr().err


TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
FALCON = {"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "new_decoder_architecture": True, "num_kv_heads": 2, "vocab_size": 100}


@pytest.mark.parametrize("base,key,value", [
    (TINY, "hidden_size", -64), (TINY, "hidden_size", 0), (TINY, "num_hidden_layers", 0),
    (TINY, "num_hidden_layers", -1), (TINY, "num_attention_heads", 0), (TINY, "num_attention_heads", -4),
    (TINY, "vocab_size", 0), (TINY, "vocab_size", -5), (TINY, "intermediate_size", -1),
    (TINY, "num_key_value_heads", 0), (TINY, "hidden_size", 64.5), (TINY, "hidden_size", "abc"),
    (TINY, "head_dim", -2), (FALCON, "num_kv_heads", 0), (FALCON, "hidden_size", -8), (FALCON, "vocab_size", 0),
])
def test_cli_refuses_bad_config_sizes(tmp_path, capsys, base, key, value):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(dict(base, **{key: value})))
    rc, err = _plan_cli(capsys, "--model", str(cfg))
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1
    assert f"{key}={value!r} must be a positive integer; fix it in the config" in err


@pytest.mark.parametrize("change,message", [
    ({"num_key_value_heads": 3}, "4 attention heads cannot share 3 key/value heads evenly"),
    ({"hidden_size": 66}, "hidden_size=66 is not a multiple of num_attention_heads=4"),
    ({"hidden_size": 100}, "transformers rejects this llama config: "),  # head_dim 25: RoPE needs an even one
])
def test_cli_refuses_sizes_that_do_not_divide(tmp_path, capsys, change, message):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(dict(TINY, **change)))
    rc, err = _plan_cli(capsys, "--model", str(cfg))
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1 and message in err


@pytest.mark.parametrize("flag", ["--r-max", "--seq-len", "--batch-size", "--layers"])
@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf", "-inf", "x", "1.5", "1e3", ""])
def test_cli_refuses_bad_integer_flags(capsys, flag, value):
    rc, err = _plan_cli(capsys, "--model", "tiny-llama", f"{flag}={value}")
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1
    assert f"error: {flag} {value!r} must be a positive integer" in err


@pytest.mark.parametrize("value,message", [
    ("32", "memory size '32' has no unit; write 32GiB"),
    ("0.5", "memory size '0.5' has no unit; write 0.5GiB"),
    ("0GiB", "memory size '0GiB' must be positive"),
    ("-32GiB", "cannot parse memory size '-32GiB'"),
    ("nan", "cannot parse memory size 'nan'"),
    ("inf", "cannot parse memory size 'inf'"),
    ("32 gigs", "cannot parse memory size '32 gigs'"),
])
def test_cli_refuses_bad_gpu_memory(capsys, value, message):
    rc, err = _plan_cli(capsys, "--model", "tiny-llama", f"--gpu-memory={value}")
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1 and message in err


def test_cli_refuses_r_max_the_planner_cannot_size(capsys):
    rc, err = _plan_cli(capsys, "--model", "tiny-llama", "--r-max", "100000")
    assert rc == 2 and "r_max=100000 is above the largest rank the planner sizes" in err
