"""Resume and the run folder: a resume continues the run as it was started, refuses changes that would alter
it, says when it is finished; nothing is deleted before new inputs are checked; rotation; file modes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat

import pytest

from helpers import error_line

from qdylora.cli import main

BASE = ["--max-steps", "6", "--r-min", "2", "--r-max", "8", "--alpha", "8", "--lr", "5e-3", "--batch-size", "2",
        "--save-steps", "2", "--max-seq-len", "64", "--optim", "adamw_torch", "--seed", "3", "--sweep-ranks", "",
        "--r-max-prob", "0"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "d.jsonl"
    p.write_text("\n".join(json.dumps({"instruction": f"Repeat {i}.", "output": f"{i} {i}"}) for i in range(16)))
    return p


def _train(model_dir, data, out, *extra):
    return main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), *extra])


def _snapshot(folder):
    """Every file under `folder` (relative path -> sha256), to prove nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _log_steps(out):
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]


def _cut_after(out, step):
    """What a kill right after checkpoint-`step` leaves: later checkpoints and the adapter gone, the log longer."""
    for p in out.glob("checkpoint-*"):
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)
    shutil.rmtree(out / "adapter")


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _train(tiny_model_dir, data_file, out, *BASE) == 0
    return out


@pytest.fixture()
def run6(finished_run, tmp_path, capsys):
    """A copy of a finished 6-step run (checkpoints 2, 4, 6 and adapter/) that a test may damage."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    capsys.readouterr()
    return out


def test_resume_without_flags_continues_the_saved_run(run6, tiny_model_dir, data_file, capsys):
    full_log = (run6 / "train_log.jsonl").read_text().splitlines()
    config = (run6 / "run_config.json").read_text()
    _cut_after(run6, 2)
    assert main(["train", "--output", str(run6), "--resume"]) == 0  # no --model, --data, --max-steps, --r-max
    assert _log_steps(run6) == [1, 2, 3, 4, 5, 6]  # the log was cut back to step 2 and continued, no repeats
    assert (run6 / "run_config.json").read_text() == config
    meta = json.loads((run6 / "adapter" / "qdylora_config.json").read_text())
    assert (meta["qdylora"]["r_min"], meta["qdylora"]["r_max"], meta["global_step"]) == (2, 8, 6)
    resumed = [json.loads(x) for x in (run6 / "train_log.jsonl").read_text().splitlines()]
    for a, b in zip(resumed, map(json.loads, full_log)):
        assert a["rank"] == b["rank"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.parametrize("flag,value,saved", [("--r-max", "16", "8"), ("--alpha", "16", "8.0"), ("--lr", "1e-3", "0.005"),
                                               ("--update", "frozen", "'nested'"), ("--seed", "4", "3"),
                                               ("--batch-size", "4", "2")])
def test_resume_refuses_a_setting_that_changes_the_run(run6, capsys, flag, value, saved):
    _cut_after(run6, 4)
    before = _snapshot(run6)
    assert main(["train", "--output", str(run6), "--resume", flag, value]) == 2
    err = error_line(capsys.readouterr().err)
    assert f"{flag} " in err and f"differs from this run's {saved}" in err
    assert _snapshot(run6) == before


def test_resume_of_a_finished_run_says_so_and_changes_nothing(run6, capsys):
    before = _snapshot(run6)
    assert main(["train", "--output", str(run6), "--resume"]) == 0
    assert "already finished: trained to step 6" in capsys.readouterr().out
    assert _snapshot(run6) == before


def test_a_larger_max_steps_continues_a_finished_run(run6, capsys):
    assert main(["train", "--output", str(run6), "--resume", "--max-steps", "8"]) == 0
    assert "continuing" in capsys.readouterr().err
    assert _log_steps(run6) == list(range(1, 9))
    assert json.loads((run6 / "adapter" / "qdylora_config.json").read_text())["global_step"] == 8
    assert json.loads((run6 / "run_config.json").read_text())["train"]["max_steps"] == 8


def test_a_run_killed_before_its_first_checkpoint_points_to_overwrite(run6, tiny_model_dir, data_file, capsys):
    _cut_after(run6, 0)
    assert main(["train", "--output", str(run6), "--resume"]) == 2
    assert "no usable checkpoint" in capsys.readouterr().err
    assert _train(tiny_model_dir, data_file, run6, *BASE) == 2
    assert "stopped before its first checkpoint; pass --overwrite" in capsys.readouterr().err
    assert _train(tiny_model_dir, data_file, run6, *BASE, "--overwrite") == 0


@pytest.mark.parametrize("bad", [["--data", "/nonexistent/typo.jsonl"], ["--model", "/nonexistent/model"],
                                 ["--target-modules", "qkv_typo"], ["--r-min", "9"]])
def test_overwrite_with_a_bad_input_loses_nothing(run6, tiny_model_dir, data_file, capsys, bad):
    before = _snapshot(run6)
    args = dict(zip(["--model", "--data"], [str(tiny_model_dir), str(data_file)]))
    args.update(dict(zip(bad[::2], bad[1::2])))
    rc = main(["train", "--output", str(run6), "--overwrite", *BASE,
               *[x for kv in args.items() for x in kv]])
    assert rc == 2 and error_line(capsys.readouterr().err).startswith("error: ")
    assert _snapshot(run6) == before


def test_checkpoints_rotate_but_the_newest_stays(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "rot"
    assert _train(tiny_model_dir, data_file, out, *BASE, "--save-steps", "1", "--save-total-limit", "2") == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]
    out3 = tmp_path / "rot3"
    assert _train(tiny_model_dir, data_file, out3, *BASE, "--save-steps", "1") == 0  # default: keep 3
    assert sorted(p.name for p in out3.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5", "checkpoint-6"]


def test_damaged_checkpoints_are_skipped_with_a_warning(run6, capsys):
    _cut_after(run6, 6)  # adapter gone, checkpoints 2, 4, 6 left (3 kept)
    w = run6 / "checkpoint-6" / "adapter" / "qdylora_adapter.safetensors"
    w.write_bytes(w.read_bytes()[:100])  # truncated
    (run6 / "checkpoint-4" / "optimizer.pt").unlink()
    with open(run6 / "train_log.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a torn last line from a kill
    (run6 / ".staging-abc").mkdir()
    (run6 / ".adapter.tmp-xyz").mkdir()
    assert main(["train", "--output", str(run6), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint-6" in err and "skipping checkpoint-4: it lacks optimizer.pt" in err
    assert _log_steps(run6) == [1, 2, 3, 4, 5, 6]  # resumed from checkpoint-2
    assert not list(run6.glob(".*"))


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_text('{"model": '), "is damaged"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "train": {
        **json.loads(p.read_text())["train"], "lr_warp": 3}})), "unknown setting(s) lr_warp"),
])
def test_a_damaged_run_config_is_one_clear_line(run6, capsys, damage, message):
    _cut_after(run6, 4)
    damage(run6 / "run_config.json")
    assert main(["train", "--output", str(run6), "--resume"]) == 2
    assert message in error_line(capsys.readouterr().err)


def test_written_files_get_the_usual_modes(tiny_model_dir, data_file, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "modes"
        assert _train(tiny_model_dir, data_file, out, *BASE, "--max-steps", "2") == 0
        assert main(["export", str(out), "--rank", "4", "--output", str(tmp_path / "exp")]) == 0
    finally:
        os.umask(old)
    for p in [out, *out.rglob("*"), tmp_path / "exp", *(tmp_path / "exp").rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))


@pytest.mark.parametrize("where", ["run", "run/adapter", "run/sub", "run/checkpoint-6"])
def test_export_never_writes_into_its_own_run(run6, capsys, where):
    before = _snapshot(run6)
    target = run6.parent / where
    assert main(["export", str(run6), "--rank", "4", "--output", str(target), "--overwrite"]) == 2
    assert "overlaps" in capsys.readouterr().err
    assert _snapshot(run6) == before


def test_a_new_cli_run_takes_the_config_defaults_and_an_old_run_resumes_with_its_draws(tiny_model_dir, data_file,
                                                                                      tmp_path):
    # no rank flags: the dataclass defaults (every row at r_max, first row at r_max), not the legacy fill of old saves
    out = tmp_path / "new"
    args = ["--max-steps", "2", "--r-max", "8", "--batch-size", "2", "--save-steps", "1", "--max-seq-len", "64",
            "--optim", "adamw_torch", "--sweep-ranks", ""]
    assert _train(tiny_model_dir, data_file, out, *args) == 0
    q = json.loads((out / "run_config.json").read_text())["qdylora"]
    assert (q["rank_per"], q["update"], q["max_rows"], q["r_max_prob"]) == ("example", "nested", 1, 1.0)
    log = lambda: [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    assert [r["ranks"] for r in log()] == [[8], [8]]
    # a run saved before max_rows / r_max_prob existed: resumed, it keeps drawing every row's rank
    cfg = json.loads((out / "run_config.json").read_text())
    del cfg["qdylora"]["max_rows"], cfg["qdylora"]["r_max_prob"]
    cfg["train"]["max_steps"] = 2
    (out / "run_config.json").write_text(json.dumps(cfg))
    shutil.rmtree(out / "checkpoint-2")
    assert _train(tiny_model_dir, data_file, out, "--resume", "--max-steps", "6") == 0
    assert [r["step"] for r in log()] == [1, 2, 3, 4, 5, 6]  # resumed from checkpoint-1
    later = log()[1:]
    assert len(later) == 5 and len({r for row in later for r in row["ranks"]}) > 1


def test_the_write_probe_survives_another_process_cleaning_the_folder(tmp_path, monkeypatch):
    """Under DDP/FSDP the main process removes temporary leftovers from the run folder while another process probes
    it for writing: a probe removed under that process still proves the folder writable (a race tests/test_fsdp.py
    hit on a loaded machine)."""
    import tempfile
    from pathlib import Path

    from qdylora.atomic import remove_stale
    from qdylora.train import run_folder

    real = tempfile.mkstemp

    def racing(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        assert remove_stale(kwargs["dir"]) == [Path(name).name]  # the other process's clean-up takes the probe
        return fd, name

    monkeypatch.setattr(run_folder.tempfile, "mkstemp", racing)
    run_folder.check_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []
