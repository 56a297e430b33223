"""scripts/gpu_check.sh's machinery on the CPU: time boxes, a failing stage, copies within the device's limits, summaries.

The stages themselves run in the rehearsal (`bash scripts/gpu_check.sh --rehearse`, its fast part in
.ci/run); here fake stages and hand-made result files check the orchestration and the arithmetic.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_stages  # noqa: E402
import gpu_wheels  # noqa: E402


def test_every_test_file_with_gpu_tests_is_run_by_the_tests_stage():
    with_gpu = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")
                if re.search(r"mark\.gpu\b", p.read_text())}
    assert with_gpu and with_gpu <= set(gpu_stages.GPU_TEST_FILES), with_gpu - set(gpu_stages.GPU_TEST_FILES)


# ---------------------------------------------------------------------------------------------
# the run: time boxes, failures, copies


def fake(name, share, code, files=()):
    """A stage running `python -c code` that writes `files` (names in the results folder) first."""
    def command(ctx):
        writes = "".join(f"open({str(ctx.path(f))!r}, 'w').write('{{}}');" for f in files)
        return [sys.executable, "-c", writes + code]

    return gpu_stages.Stage(name, share, f"{name} target", command, files=lambda ctx: list(files),
                            rows=lambda ctx, found: [gpu_stages.row(name, f"{len(found)} files", "t", bool(found))])


def test_a_stage_past_its_time_box_is_killed_and_the_next_ones_still_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "RESERVE_S", 0)
    monkeypatch.setattr(gpu_wheels, "WHEELS", tmp_path / "no-wheels")
    monkeypatch.setattr(gpu_stages, "STAGES", [
        fake("slow", 0.5, "import time; print('started', flush=True); time.sleep(60)", ["slow.json"]),
        fake("broken", 0.25, "raise SystemExit(3)"),
        fake("fine", 0.25, "print('done')", ["fine.json"]),
    ])
    monkeypatch.delenv("OUT", raising=False)
    t = time.time()
    rc = gpu_check.main(["--budget-s", "8", "--results", str(tmp_path / "res"), "--out", str(tmp_path / "out"),
                         "--scratch", str(tmp_path / "scratch")])
    elapsed = time.time() - t
    assert rc == 1 and elapsed < 30, elapsed  # slow: box 8 * 0.5 = 4 s, then SIGTERM
    summary = json.loads(next((tmp_path / "res").glob("gpu_check_*.json")).read_text())
    st = summary["stages"]
    assert st["slow"]["status"] == "timed out" and 3 <= st["slow"]["seconds"] < 20
    assert "started" in st["slow"]["tail"]  # its output up to the kill is kept
    assert st["broken"]["status"] == "exit 3"
    assert st["fine"]["status"] == "ok" and st["fine"]["files"] == ["fine.json"]
    assert summary["wheels"]["installed"] is False
    # the time left after the slow stage is shared by the rest: the last one got its box from what was left
    assert st["fine"]["timebox_s"] <= 8 - st["slow"]["seconds"] - st["broken"]["seconds"] + 1
    rows = {(r["stage"], r["result"].split(" ")[0]) for r in summary["rows"]}
    assert ("slow", "timed") in rows and ("broken", "exit") in rows and ("fine", "1") in rows
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {"slow.json", "fine.json"} <= set(out) and any(n.endswith(".log") for n in out)
    assert gpu_check._out_ok(tmp_path / "out")


def test_unknown_stage_is_refused(tmp_path):
    assert gpu_check.main(["--stages", "env,warp", "--results", str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def test_copies_stay_within_the_device_limits(tmp_path, monkeypatch):
    out = gpu_check.Out(tmp_path / "out", "h200")
    src = tmp_path / "src"
    src.mkdir()
    names = [f"r{i}.json" for i in range(9)] + ["plot.png", "rows.csv", "odd name!.json"]
    for n in names:
        (src / n).write_text(n)
    big = src / "big.json"
    big.write_bytes(b"x" * (gpu_check.OUT_BYTES + 1))
    for n in names + ["big.json", "r0.json"]:  # r0 again: rewritten in place, not a second copy
        out.put(src / n)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) == gpu_check.OUT_FILES and gpu_check._out_ok(tmp_path / "out")
    with tarfile.open(tmp_path / "out" / "gpu_check_h200_more.tar") as tar:
        bundled = set(tar.getnames())
    assert set(files) - {"gpu_check_h200_more.tar"} | bundled == {re.sub(r"[^A-Za-z0-9._-]", "_", n) for n in names}
    assert {"plot.png", "rows.csv"} <= bundled
    assert out.left_out and "big.json" in out.left_out[0]


def test_table_is_markdown():
    rows = [gpu_stages.row("env", "H200", "GPU", True), gpu_stages.row("kernels", "0.9x", ">= 1.15x", False),
            gpu_stages.row("throughput", "1.1", "sampled", None)]
    lines = gpu_check.table(rows).splitlines()
    assert lines[0] == "| stage | result | target | met? |" and len(lines) == 5
    assert lines[2].endswith("| yes |") and lines[3].endswith("| **no** |") and lines[4].endswith("| - |")


# ---------------------------------------------------------------------------------------------
# the summary rows from each stage's files (hand-made)


CTX = gpu_stages.Context(Path("."), "h200", False, sys.executable)


def write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_test_rows_count_from_junit(tmp_path):
    xml = write(tmp_path, "t.xml", '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1">'
                '<testcase classname="tests.test_kernels" name="test_a"><failure message="x"/></testcase>'
                '</testsuite></testsuites>')
    (r,) = gpu_stages._test_rows(CTX, [xml])
    assert r["result"].startswith("3 passed, 1 failed, 0 errors, 1 skipped (test_kernels::test_a)") and r["met"] is False
    ok = write(tmp_path, "u.xml", '<testsuites><testsuite tests="4" failures="0" errors="0" skipped="2"/></testsuites>')
    assert gpu_stages._test_rows(CTX, [ok])[0]["met"] is True
    assert gpu_stages._test_rows(CTX, [])[0]["met"] is False


def test_kernel_targets_and_rows():
    import bench_kernels

    def e(M, mode, **speedups):
        return dict(shape="4096x4096", N=4096, K=4096, M=M, rank=64, mode=mode,
                    **{f"speedup_vs_{k}": v for k, v in speedups.items()})

    ratios = [e(4096, "fwd+bwd", a=1.2, b=0.95), e(4096, "fwd", a=9.0, b=9.0), e(16, "fwd", b=3.1, c=1.4),
              e(1, "fwd+bwd", b=2.0, c=2.0), e(256, "fwd", a=0.1, b=0.1, c=0.1)]
    targets = bench_kernels.Bench.targets(SimpleNamespace(large_m=4096), ratios)
    got = {(t["M"], t["mode"], t["target"].split(" vs ")[1][:3]): t["met"] for t in targets}
    # M=4096 fwd+bwd: 1.2 >= 1.15 met; 0.95 >= 1/1.10 = 0.909 met; fwd at 4096 and M=256 have no target
    assert got == {(4096, "fwd+bwd", "(a)"): True, (4096, "fwd+bwd", "(b)"): True, (16, "fwd", "(b)"): True,
                   (16, "fwd", "(c)"): False, (1, "fwd+bwd", "(b)"): False, (1, "fwd+bwd", "(c)"): True}


def test_bench_rows(tmp_path):
    targets = [dict(target="M<=16 vs (c) bnb.matmul_4bit", need=1.5, value=v, met=v >= 1.5) for v in (1.6, 1.4, 2.0)]
    rows = [dict(method="qdylora", rel_err=e, correct=e < 3e-2) for e in (1e-3, 8e-3)] + [dict(method="a")]
    f = write(tmp_path, "kernels_NVIDIA_H200_acceptance.json", dict(meta=dict(complete=True), rows=rows, targets=targets))
    correct, speed = gpu_stages._bench_rows(CTX, [f])
    assert correct["met"] is True and "8.0e-03" in correct["result"]
    assert speed["met"] is False and speed["result"].startswith("min 1.40x, median 1.60x over 3 configs (2/3 met)")


def test_falcon_rows(tmp_path):
    d = dict(steps=[dict(rank=64), dict(rank=3)], peak_allocated=29 * 2**30, complete=True, tokens_per_s=100.0,
             kernel_backend="triton",
             planner=dict(peak_allocated=28 * 2**30), kernel_checks=[dict(ok=True)],
             targets=[dict(target="peak allocated <= cap 32 GiB", value=29 * 2**30, met=True)])
    rows = gpu_stages._falcon_rows(CTX, [write(tmp_path, "f.json", d)])
    assert rows[0]["met"] is True and "29.00 GiB (planned 28.00 GiB)" in rows[0]["result"]
    assert rows[1] == gpu_stages.row("falcon-40b", "29.00 GiB", "peak allocated <= cap 32 GiB", True)
    d["kernel_checks"] = [dict(ok=False, reason="the Triton kernels fail their self-check (gemm): y differs")]
    assert gpu_stages._falcon_rows(CTX, [write(tmp_path, "f.json", d)])[0]["met"] is False


def test_falcon_compare_sums_an_items_parts():
    import falcon40b_32gb

    items = [SimpleNamespace(name=n, bytes=b) for n, b in (("nf4_weights", 100), ("optimizer_state", 60),
                                                           ("optimizer_state_paged", 40), ("adapters", 10))]
    plan = SimpleNamespace(items=items, peak_allocated=1000)
    rows, targets = falcon40b_32gb.compare(plan, {"nf4_weights": 95, "optimizer_state": 100, "adapters": 12,
                                                  "peak_allocated": 1100}, cap=1050)
    assert rows["optimizer_state"]["planned"] == 100 and rows["adapters"]["ratio"] == pytest.approx(10 / 12)
    assert [t["met"] for t in targets] == [False, False]  # 1100 > 1050; adapters 17% off
    rows, targets = falcon40b_32gb.compare(plan, {"nf4_weights": 95, "peak_allocated": 990}, cap=1050)
    assert [t["met"] for t in targets] == [True, True]


def test_throughput_summary_and_rows(tmp_path):
    import train_throughput

    args = SimpleNamespace(config="llama-1b", steps=8, batch_size=8, seq_len=512, rounds=2, dry_run=False)

    def run(arm, tps, mem, checks=()):
        return dict(arm=arm, tokens_per_s=tps, seconds=1.0, final_loss=1.0, peak_mem_bytes=mem,
                    kernel_checks=list(checks))

    runs = {"peft": [run("peft", 100, 10), run("peft", 110, 10)],
            "qdylora": [run("qdylora", 100, 8), run("qdylora", 104, 8)]}
    s = train_throughput.summarize(args, "H200", runs, [], True, "2.11")
    assert s["ratio_tokens_per_s_qdylora_r64_vs_peft"] == pytest.approx(102 / 105)
    assert s["spread_over_rounds"]["peft"] == pytest.approx(10 / 105)
    assert s["ratio_peak_memory_qdylora_r64_vs_peft"] == pytest.approx(0.8)
    assert "ratio_tokens_per_s_qdylora_sampled_vs_peft" not in s
    rows = gpu_stages._throughput_rows(CTX, [write(tmp_path, "t.json", s)])
    assert rows[0]["met"] is True and rows[0]["result"].startswith("0.971")
    runs["qdylora"][0]["kernel_checks"] = [dict(ok=False, reason="fell back")]
    s = train_throughput.summarize(args, "H200", runs, [dict(arm="peft", round=1, returncode=1)], True, "2.11")
    rows = gpu_stages._throughput_rows(CTX, [write(tmp_path, "t.json", s)])
    assert rows[0]["met"] is False and "fell back" in rows[0]["result"] and rows[-1]["met"] is False


def test_env_rows(tmp_path):
    d = dict(gpu="NVIDIA H200", driver="580", cuda=True, versions=dict(torch="2.11"), imports={"torch": "ok"},
             selfcheck=[dict(variant="split path, cuda:0", ok=True, reason=None, seconds=3.0)],
             selfcheck_after_compile_s=0.004)
    env, check = gpu_stages._env_rows(CTX, [write(tmp_path, "gpu_check_h200_env.json", d)])
    assert env["met"] is True and check["met"] is True and "0.004 s once compiled" in check["result"]
    d["imports"]["bitsandbytes"] = "ModuleNotFoundError"
    d["selfcheck_after_compile_s"] = 1.5
    env, check = gpu_stages._env_rows(CTX, [write(tmp_path, "gpu_check_h200_env.json", d)])
    assert env["met"] is False and "bitsandbytes" in env["result"] and check["met"] is False


# ---------------------------------------------------------------------------------------------
# wheels


def make_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    dist = f"{name}-{version}.dist-info"
    record = []
    for n, data in files.items():
        h = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{n},sha256={h},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    path = folder / f"{name}-{version}-py3-none-manylinux_2_24_x86_64.whl"
    with zipfile.ZipFile(path, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
        z.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return path


def test_slimming_bitsandbytes_keeps_cpu_and_cuda130_and_a_valid_record(tmp_path):
    libs = {f"bitsandbytes/libbitsandbytes_{v}.so": v.encode() * 100 for v in ("cpu", "cuda118", "cuda130", "rocm64")}
    w = make_wheel(tmp_path, "bitsandbytes", "0.50.2", {"bitsandbytes/__init__.py": b"x = 1\n", **libs})
    assert gpu_wheels.slim_bnb(w) > 0
    names = zipfile.ZipFile(w).namelist()
    assert sorted(n for n in names if n.endswith(".so")) == ["bitsandbytes/libbitsandbytes_cpu.so",
                                                            "bitsandbytes/libbitsandbytes_cuda130.so"]
    record = zipfile.ZipFile(w).read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert "cuda118" not in record and "cuda130" in record and gpu_wheels._record_ok(w)
    assert gpu_wheels.problems(tmp_path) == []


def test_wheel_problems(tmp_path):
    make_wheel(tmp_path, "peft", "0.21.2", {"peft/__init__.py": b""})
    make_wheel(tmp_path, "peft", "0.20.0", {"peft/__init__.py": b""})
    make_wheel(tmp_path, "bitsandbytes", "0.50.2", {"bitsandbytes/libbitsandbytes_cuda128.so": b"1"})
    found = gpu_wheels.problems(tmp_path)
    assert any("two versions of peft" in p for p in found) and any("CUDA 13.0" in p for p in found)


def test_blocker_hides_what_the_image_lacks(tmp_path):
    folder = gpu_wheels.blocker(tmp_path / "block", ("json", "gguf"))
    code = ("import importlib.util, sys\n"
            "assert importlib.util.find_spec('json') is None and importlib.util.find_spec('csv') is not None\n"
            "try:\n    import json\nexcept ImportError:\n    print('hidden')\n")
    env = gpu_wheels.stage_env([folder])
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "hidden", p.stderr
    assert env["HF_HUB_OFFLINE"] == "1" and env["PYTHONPATH"].split(":")[0] == str(folder)


def test_the_script_runs_from_anywhere_and_explains_itself(tmp_path):
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--help"], cwd=tmp_path,
                       env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and "--budget-s" in p.stdout and "--rehearse" in p.stdout
