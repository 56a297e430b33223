"""Every bad input a user can give: one clear line, exit code 2, no traceback, nothing written or lost."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import error_line
from safetensors.torch import save_file

from qdylora.cli import main
from qdylora.data.records import load_records
from qdylora.errors import DataError

# flag -> values that must be refused (int flags get 'x' / '1.5' too: argparse refuses them)
INT_FLAGS = {"--max-steps": ["0", "-1"], "--r-min": ["0", "-3"], "--r-max": ["0", "-1"],
             "--batch-size": ["0", "-2"], "--grad-accum": ["0"], "--max-seq-len": ["0", "-5"],
             "--warmup-steps": ["-5"], "--save-steps": ["0"], "--save-total-limit": ["0", "-1"], "--seed": ["-1"]}
FLOAT_FLAGS = {"--alpha": ["0", "-1", "nan", "inf"], "--dropout": ["-0.1", "1", "nan", "inf"],
               "--lr": ["0", "-1", "nan", "inf", "-inf"], "--weight-decay": ["-1", "nan", "inf"],
               "--max-grad-norm": ["-1", "nan", "inf"]}
CASES = ([(f, v) for f, vs in INT_FLAGS.items() for v in vs + ["x", "1.5", "nan"]]
         + [(f, v) for f, vs in FLOAT_FLAGS.items() for v in vs + ["x"]]
         + [("--update", "sometimes"), ("--optim", "sgd"), ("--rank-sampler", "zipf"), ("--rank-list", "1,x"),
            ("--rank-list", "0,4"), ("--rank-list", "4,99")])


@pytest.mark.parametrize("flag,value", CASES)
def test_every_bad_number_or_choice_is_one_line(tiny_model_dir, tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    rc = main(["train", "--model", str(tiny_model_dir), "--output", str(out), flag, value])
    err = error_line(capsys.readouterr().err)
    assert rc == 2 and flag.split("-")[-1] in err.replace("_", "-"), err
    assert not out.exists()  # refused before anything was written


def test_contradicting_flags(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_model_dir), "--output", str(out), "--rank-list", "2,4",
                 "--rank-sampler", "uniform"]) == 2
    assert "rank_list is used only with rank_sampler='list'" in error_line(capsys.readouterr().err)
    assert main(["train", "--model", str(tiny_model_dir), "--output", str(out), "--resume", "--overwrite"]) == 2
    assert "contradict" in error_line(capsys.readouterr().err)
    assert not out.exists()


def _records(text_or_bytes, tmp_path, name="d.jsonl"):
    p = tmp_path / name
    (p.write_bytes if isinstance(text_or_bytes, bytes) else p.write_text)(text_or_bytes)
    return p


DATA_CASES = [
    ("d.jsonl", '{"text": "ok"}\n{"text": oops}\n', "line 2: not valid JSON"),
    ("d.jsonl", '{"question": "x"}\n', "record has fields ['question']"),
    ("d.jsonl", '{"instruction": 3, "output": "x"}\n', "field `instruction` must be a string"),
    ("d.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', "last message must be the assistant's"),
    ("d.jsonl", "caf\xe9".encode("latin-1") + b'\n', "is not UTF-8 text (byte 0xe9"),
    ("d.jsonl", b"\x89PNG\r\n\x1a\n" + bytes(200), "is binary, not text"),
    ("d.jsonl", "", "holds no records"),
    ("d.jsonl", "\n\n  \n", "holds no records"),
    ("d.json", '[{"text": "a"}, ', "must be one JSON array"),
    ("d.json", '{"data": [{"text": "a"}]}', "record has fields ['data']"),
    ("d.json", "[1, 2]", "record has fields int"),
]


@pytest.mark.parametrize("name,content,message", DATA_CASES)
def test_bad_data_files_are_one_line(tiny_model_dir, tmp_path, capsys, name, content, message):
    data = _records(content, tmp_path, name)
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out)]) == 2
    assert message in error_line(capsys.readouterr().err)
    assert not out.exists()


def test_data_that_is_a_folder_or_missing_or_all_empty(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(tmp_path), "--output", str(out)]) == 2
    assert "is a folder; pass a .json or .jsonl file" in error_line(capsys.readouterr().err)
    assert main(["train", "--model", str(tiny_model_dir), "--data", "no/such/file.jsonl", "--output", str(out)]) == 2
    assert "does not exist" in error_line(capsys.readouterr().err)
    empty = _records("\n".join(json.dumps({"instruction": f"q{i}", "output": ""}) for i in range(4)), tmp_path)
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(empty), "--output", str(out)]) == 2
    assert "every example's output is empty" in error_line(capsys.readouterr().err)
    assert not out.exists()


def test_readers_accept_what_they_should(tmp_path):
    rec = {"instruction": "hi", "output": "yo"}
    assert load_records(_records(json.dumps([rec, rec]), tmp_path, "arr.jsonl")) == [rec, rec]  # an array in .jsonl
    assert load_records(_records(json.dumps(rec).encode("utf-16"), tmp_path, "u16.jsonl")) == [rec]
    assert load_records(_records(b"\xef\xbb\xbf" + json.dumps(rec).encode(), tmp_path, "bom.jsonl")) == [rec]
    huge = {"text": "word " * 400_000}  # a 2 MB line
    assert load_records(_records(json.dumps(huge), tmp_path, "huge.jsonl"))[0]["text"] == huge["text"]
    with pytest.raises(DataError, match="could not load dataset 'someone/no-such-dataset'"):
        load_records("someone/no-such-dataset")  # a hub id with a '/' reaches the hub (offline here)


@pytest.fixture(scope="module")
def adapter_run(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("d") / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"line {i} of text"}) for i in range(8)))
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--max-steps",
                 "2", "--r-max", "8", "--batch-size", "2", "--optim", "adamw_torch", "--sweep-ranks", ""]) == 0
    return out


def _damaged(adapter_run, tmp_path, how):
    run = tmp_path / "run"
    shutil.copytree(adapter_run, run)
    w, c = run / "adapter" / "qdylora_adapter.safetensors", run / "adapter" / "qdylora_config.json"
    meta = json.loads(c.read_text())
    if how == "truncated":
        w.write_bytes(w.read_bytes()[:200])
    elif how == "garbage":
        w.write_bytes(b"not a safetensors file at all" * 10)
    elif how == "empty":
        w.write_bytes(b"")
    elif how == "no-qdylora-key":
        c.write_text(json.dumps({k: v for k, v in meta.items() if k != "qdylora"}))
    elif how == "config-not-json":
        c.write_text("{oops")
    elif how == "rows-mismatch":  # config says r_max 16, tensors hold 8 rows
        c.write_text(json.dumps({**meta, "qdylora": {**meta["qdylora"], "r_max": 16}}))
    elif how == "nan":
        t = {k: v.clone() for k, v in __import__("safetensors.torch", fromlist=["x"]).load_file(str(w)).items()}
        next(iter(t.values()))[0, 0] = float("nan")
        save_file(t, str(w))
    elif how == "path-in-target":
        c.write_text(json.dumps({**meta, "targets": ["../../etc/passwd"] + meta["targets"][1:]}))
    return run


DAMAGE = ["truncated", "garbage", "empty", "no-qdylora-key", "config-not-json", "rows-mismatch", "nan", "path-in-target"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_adapters_are_refused_by_export_and_sweep(adapter_run, tmp_path, capsys, how):
    run = _damaged(adapter_run, tmp_path, how)
    out = tmp_path / "exp"
    assert main(["export", str(run), "--rank", "4", "--output", str(out)]) == 2
    assert "error:" in error_line(capsys.readouterr().err)
    assert main(["sweep", str(run), "--task", "default", "--ranks", "2", "--output", str(tmp_path / "sw")]) == 2
    error_line(capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / "sw").exists()


def test_export_to_a_file_or_an_unknown_folder(adapter_run, tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("keep me")
    assert main(["export", str(adapter_run), "--rank", "4", "--output", str(f)]) == 2
    assert "is a file" in error_line(capsys.readouterr().err) and f.read_text() == "keep me"
    assert main(["export", str(tmp_path / "nowhere"), "--rank", "4", "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in error_line(capsys.readouterr().err)


def test_sweep_of_bad_mmlu_files(adapter_run, tmp_path, capsys):
    for content in (b"\x00\x01\x02" * 100, b"{oops\n"):
        bad = tmp_path / "m.jsonl"
        bad.write_bytes(content)
        assert main(["sweep", str(adapter_run), "--task", "mmlu", "--data", str(bad), "--ranks", "2"]) == 2
        error_line(capsys.readouterr().err)


def test_ctrl_c_during_start_up_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import qdylora.load.model as load_model

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(load_model, "load_model_and_tokenizer", interrupted)
    assert main(["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "aborted" and not (tmp_path / "o").exists()


def test_an_unpicklable_optimizer_state_is_not_loaded(adapter_run, tmp_path, capsys):
    """Checkpoint files load with weights_only: a pickle that would run code is refused, not executed."""
    run = tmp_path / "run"
    shutil.copytree(adapter_run, run)
    shutil.rmtree(run / "adapter")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state": Evil()}, run / "checkpoint-2" / "optimizer.pt")
    rc = main(["train", "--output", str(run), "--resume", "--max-steps", "3"])
    out, err = capsys.readouterr()
    assert "pwned" not in out
    assert rc == 2 and "optimizer.pt" in error_line(err)
