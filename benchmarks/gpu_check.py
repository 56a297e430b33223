"""Every GPU claim of qdylora settled in one call: the driver behind scripts/gpu_check.sh.

  (GPU)  bash scripts/gpu_check.sh [--budget-s 540] [--stages env,tests,...]
         installs the carried wheels (.whl/) offline, then runs the stages of gpu_stages.py, each
         time-boxed (its share of what is left of the budget) and killed at its limit; each
         stage's result files are written as it goes and copied under $OUT as soon as it ends
         (at most 8 files: the rest in one tar). Prints one table (stage, result, target, met?)
         and writes benchmarks/results/gpu_check_<gpu>.json (+ .log) after every stage.
  (CPU)  bash scripts/gpu_check.sh --fetch-wheels   fill .whl/ from the package registry
         bash scripts/gpu_check.sh --rehearse [--fast]
         the carried wheels installed offline into a scratch folder (.gpu/rehearse/) against
         this machine's torch; every import the stages need, with the packages the image lacks
         hidden; every kernel call the stages make compiled for sm_90 with this checkout's triton
         and (full rehearsal) with triton 3.6.0, the image's, in a side folder; then (full) this
         whole script with --dry-run: every stage on the CPU, Triton's interpreter, tiny shapes.

Standard library only at import: it runs before the carried wheels are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_stages  # noqa: E402
import gpu_wheels  # noqa: E402

ROOT = gpu_stages.ROOT
SCRATCH = ROOT / ".gpu"
SIDE_TRITON = SCRATCH / "triton-3.6.0"  # the image's triton, for the rehearsal's second compile
DEFAULT_BUDGET_S = 540  # 9 minutes: one device command may run 10
RESERVE_S = 10  # kept back from the stages for the summary and the copies
OUT_FILES, OUT_BYTES = 8, 16 << 20  # what a device call brings back from $OUT


def tag_of(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "gpu"


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out[0].strip() if out else None


class Out:
    """Copies under $OUT within the device's limits: at most 8 plain files of 16 MiB, flat, safe names;
    plots, CSVs and anything past the 7th file go into one tar."""

    def __init__(self, folder: Path | None, tag: str):
        self.folder, self.tar_name = folder, f"gpu_check_{tag}_more.tar"
        self.direct: list[str] = []
        self.bundled: dict[str, Path] = {}
        self.left_out: list[str] = []
        if folder:
            folder.mkdir(parents=True, exist_ok=True)

    def put(self, path: Path) -> None:
        if self.folder is None or not path.is_file():
            return
        name = re.sub(r"[^A-Za-z0-9._-]", "_", path.name)
        if path.stat().st_size > OUT_BYTES:
            self.left_out.append(f"{name} ({path.stat().st_size >> 20} MiB > 16 MiB)")
            return
        if name in self.direct or (len(self.direct) < OUT_FILES - 1 and path.suffix not in (".png", ".csv")):
            if name not in self.direct:
                self.direct.append(name)
            if path.resolve() != (self.folder / name).resolve():
                shutil.copyfile(path, self.folder / name)
            return
        self.bundled[name] = path
        with tarfile.open(self.folder / (self.tar_name + ".tmp"), "w") as tar:
            for n, p in self.bundled.items():
                if p.is_file():
                    tar.add(p, arcname=n)
        os.replace(self.folder / (self.tar_name + ".tmp"), self.folder / self.tar_name)


class Run:
    """One gpu_check run: its context, log, summary JSON and copies under $OUT."""

    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        name = "cpu dry run" if self.dry else (gpu_name() or "no gpu")
        self.gpu, self.tag = name, tag_of(name)
        results = Path(args.results) if args.results else (SCRATCH / "rehearse" / "results" if self.dry
                                                           else ROOT / "benchmarks" / "results")
        results.mkdir(parents=True, exist_ok=True)
        out = args.out or os.environ.get("OUT") or (str(SCRATCH / "rehearse" / "out") if self.dry else None)
        self.out = Out(Path(out) if out else None, self.tag)
        self.ctx = gpu_stages.Context(results, self.tag, self.dry, sys.executable)
        self.summary_path = results / f"gpu_check_{self.tag}.json"
        self.log_path = (self.out.folder or results) / f"gpu_check_{self.tag}.log"
        self.log = open(self.log_path, "w", buffering=1)
        self.t0 = time.time()
        self.summary = {"gpu": self.gpu, "tag": self.tag, "dry_run": self.dry, "budget_s": args.budget_s,
                        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": {}, "rows": []}

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")

    def write_summary(self) -> None:
        self.summary["seconds"] = round(time.time() - self.t0, 1)
        self.summary["rows"] = [r for st in self.summary["stages"].values() for r in st.get("rows", [])]
        self.summary["out_left_out"] = self.out.left_out
        tmp = self.summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.summary, indent=1))
        os.replace(tmp, self.summary_path)
        self.out.put(self.summary_path)
        self.out.put(self.log_path)

    def setup(self) -> dict:
        """Install the carried wheels, link the packages; the environment every stage runs in."""
        scratch = Path(self.args.scratch) if self.args.scratch else SCRATCH / "rehearse" if self.dry else Path("/tmp")
        site = scratch / "qdylora_site"
        t = time.time()
        error = gpu_wheels.install(site, target_tags=self.dry) if gpu_wheels.wheels() else "no wheels in .whl/"
        names = [w.name for w in gpu_wheels.wheels()]
        self.summary["wheels"] = {"installed": error is None, "wheels": names, "error": error,
                                  "seconds": round(time.time() - t, 1)}
        self.say(f"wheels: {'installed ' + ', '.join(names) if error is None else 'NOT installed: ' + error}")
        paths = [site, gpu_wheels.packages_dir(scratch / "qdylora_pkgs")]
        if self.dry:  # what the image lacks must not be found here either
            paths.append(gpu_wheels.blocker(scratch / "qdylora_block"))
        return gpu_wheels.stage_env(paths)

    def run_stage(self, stage: gpu_stages.Stage, env: dict, timebox: float) -> dict:
        cmd = stage.command(self.ctx)
        self.say(f"\n=== {stage.name}: {stage.target} (time box {timebox:.0f} s)\n$ {' '.join(cmd)}")
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, **stage.env(self.ctx)}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        tail: list[str] = []

        def pump():
            for line in proc.stdout:
                self.say(line.rstrip("\n"))
                tail.append(line.rstrip("\n"))
                del tail[:-20]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        status = "ok"
        try:
            proc.wait(timeout=max(timebox, 1))
        except subprocess.TimeoutExpired:
            status = "timed out"
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        reader.join(timeout=10)
        if status == "ok" and proc.returncode != 0:
            status = f"exit {proc.returncode}"
        files = sorted({p for pat in stage.files(self.ctx) for p in self.ctx.results.glob(pat)
                        if p.stat().st_mtime >= start - 1})
        for f in files:
            self.out.put(f)
        try:
            rows = stage.rows(self.ctx, files)
        except Exception as e:  # a malformed result file must not stop the next stage
            rows = [gpu_stages.row(stage.name, f"result unreadable: {type(e).__name__}: {e}", stage.target, False)]
        if status != "ok":
            rows.insert(0, gpu_stages.row(stage.name, f"{status} after {time.time() - start:.0f} s: "
                                          + (tail[-1][:200] if tail else "no output"), "runs to the end", False))
        return {"status": status, "returncode": proc.returncode, "seconds": round(time.time() - start, 1),
                "timebox_s": round(timebox), "command": cmd, "files": [f.name for f in files], "rows": rows,
                "tail": tail}

    def main(self) -> int:
        wanted = self.args.stages.split(",") if self.args.stages else [s.name for s in gpu_stages.STAGES]
        stages = [s for s in gpu_stages.STAGES if s.name in wanted]
        unknown = set(wanted) - {s.name for s in gpu_stages.STAGES}
        if unknown:
            self.say(f"unknown stage(s) {', '.join(sorted(unknown))}; stages: "
                     + ", ".join(s.name for s in gpu_stages.STAGES))
            return 2
        self.say(f"gpu_check on {self.gpu}: stages {', '.join(s.name for s in stages)}, budget {self.args.budget_s} s"
                 + (" (dry run: CPU, Triton interpreter, tiny shapes)" if self.dry else ""))
        env = self.setup()
        self.write_summary()
        for i, stage in enumerate(stages):
            left = self.args.budget_s - (time.time() - self.t0) - RESERVE_S
            box = left * stage.share / sum(s.share for s in stages[i:])
            self.summary["stages"][stage.name] = self.run_stage(stage, env, box)
            self.write_summary()
        self.say("\n" + table(self.summary["rows"]))
        self.say(f"\n{self.gpu}: {time.time() - self.t0:.0f} s; wrote {self.summary_path}"
                 + (f"; copies under {self.out.folder}" if self.out.folder else ""))
        self.write_summary()
        if self.log_path.parent != self.ctx.results:
            shutil.copyfile(self.log_path, self.ctx.results / self.log_path.name)
        return 0 if all(st["status"] == "ok" for st in self.summary["stages"].values()) else 1


def table(rows: list[dict]) -> str:
    """The summary as a markdown table: stage | result | target | met?"""
    mark = {True: "yes", False: "**no**", None: "-"}
    lines = ["| stage | result | target | met? |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['result']} | {r['target']} | {mark[r['met']]} |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the rehearsal (CPU)


def compile_plan(check_imports: bool, fast: bool) -> int:
    """(child) Import what the stages import, then compile every kernel call they make for sm_90
    (fast: each kernel configuration once, whatever its integer specialisations; no ptxas report)."""
    if check_imports:
        import importlib

        import gpu_env_report

        bad = {}
        for name in gpu_env_report.IMPORTS + ("bench_kernels", "falcon40b_32gb", "train_throughput"):
            try:
                importlib.import_module(name)
            except Exception as e:
                bad[name] = f"{type(e).__name__}: {e}"
        for name in gpu_wheels.ABSENT_ON_IMAGE:
            try:
                importlib.import_module(name)
                bad[name] = "importable, but the GPU image lacks it (the rehearsal should hide it)"
            except ImportError:
                pass
        if bad:
            print("imports FAILED: " + "; ".join(f"{k}: {v}" for k, v in bad.items()))
            return 1
        print(f"imports: {len(gpu_env_report.IMPORTS) + 3} modules import; {', '.join(gpu_wheels.ABSENT_ON_IMAGE)} "
              "are absent as on the image")
    import triton

    from qdylora_kernels import aot_check

    t = time.time()
    calls = gpu_stages.launches()
    records = aot_check.compile_launches(calls, configs_only=fast, ptxas_report=not fast)
    spills = [r for r in records if r["spills"] > 0]
    bad = [] if fast else [r for r in records if r["regs"] < 0]
    print(f"{len(records)} kernels compiled for sm_90 with triton {triton.__version__} from {len(calls)} calls "
          f"({time.time() - t:.0f} s" + (", one per configuration)" if fast else f"); {len(spills)} spill registers")
          + (f"; {len(bad)} failed in ptxas" if bad else ""))
    return 1 if bad else 0


def rehearse(args) -> int:
    """The CPU rehearsal; one line per step, exit 1 if any step failed."""
    failed = []
    scratch = SCRATCH / "rehearse"

    def report(step, ok, detail):
        print(f"{'PASS' if ok is True else 'SKIP' if ok is None else 'FAIL'}  {step}: {detail}", flush=True)
        if ok is False:
            failed.append(step)

    site = scratch / "qdylora_site"
    shutil.rmtree(site, ignore_errors=True)
    if gpu_wheels.wheels():
        issues = gpu_wheels.problems()
        err = issues[0] if issues else gpu_wheels.install(site, target_tags=True)
        report("wheels", err is None, "installed offline for python 3.12 manylinux x86-64: "
               + ", ".join(w.name for w in gpu_wheels.wheels()) if err is None else err)
    else:
        report("wheels", None, "nothing in .whl/ (bash scripts/gpu_check.sh --fetch-wheels fills it): install not rehearsed")
    paths = [site, gpu_wheels.packages_dir(scratch / "qdylora_pkgs"), gpu_wheels.blocker(scratch / "qdylora_block")]
    env = gpu_wheels.stage_env(paths)
    env.pop("TRITON_INTERPRET", None)
    me = [sys.executable, str(Path(__file__).resolve())]

    def child(cmd, child_env, timeout):
        t = time.time()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout} s"
        lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
        keep = [ln for ln in lines if ln.startswith(("imports", "kernels compiled")) or "kernels compiled" in ln]
        detail = "; ".join(keep) or (lines[-1] if lines else "")
        if p.returncode:
            detail = "\n    ".join(lines[-15:])
        return p.returncode == 0, f"{detail} [{time.time() - t:.0f} s]"

    ok, detail = child(me + ["--compile-plan", "--check-imports"] + (["--fast"] if args.fast else []), env, 1800)
    report("imports + sm_90 compile (this checkout's triton)", ok, detail)
    if args.fast:
        report("sm_90 compile with triton 3.6.0", None, "full rehearsal only (bash scripts/gpu_check.sh --rehearse)")
        report("dry run of every stage", None, "full rehearsal only")
    else:
        if not (SIDE_TRITON / "triton" / "__init__.py").exists():
            p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(SIDE_TRITON),
                                "triton==3.6.0"], capture_output=True, text=True)
            if p.returncode:
                shutil.rmtree(SIDE_TRITON, ignore_errors=True)
        if (SIDE_TRITON / "triton" / "__init__.py").exists():
            side = dict(env, PYTHONPATH=os.pathsep.join([str(SIDE_TRITON), env["PYTHONPATH"]]))
            ok, detail = child(me + ["--compile-plan"], side, 1800)
            report("sm_90 compile with triton 3.6.0 (the image's)", ok, detail)
        else:
            report("sm_90 compile with triton 3.6.0", None, "no side environment: pip cannot fetch triton==3.6.0 here")
        ok, detail = child(me + ["--dry-run", "--budget-s", str(args.budget_s or 1500)], env, 3600)
        summary = scratch / "results" / "gpu_check_cpu_dry_run.json"
        if summary.exists():
            st = json.loads(summary.read_text())["stages"]
            detail = ", ".join(f"{k} {v['status']} ({v['seconds']:.0f} s)" for k, v in st.items()) \
                + ("" if ok else "\n    " + detail)
        out_ok = _out_ok(scratch / "out")
        report("dry run of every stage (--dry-run)", ok and out_ok,
               detail + ("" if out_ok else "; $OUT holds more than a device call brings back"))
    return 1 if failed else 0


def _out_ok(folder: Path) -> bool:
    """What a device call would bring back: at most 8 plain files of 16 MiB, flat, safe names."""
    files = [p for p in folder.rglob("*")] if folder.is_dir() else []
    return (0 < len(files) <= OUT_FILES and all(p.is_file() and p.parent == folder for p in files)
            and all(p.stat().st_size <= OUT_BYTES and re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=int, default=None, help=f"wall-clock cap for all stages (default {DEFAULT_BUDGET_S})")
    p.add_argument("--stages", default=None, help="comma-separated subset: " + ",".join(s.name for s in gpu_stages.STAGES))
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU: Triton interpreter, tiny shapes")
    p.add_argument("--results", default=None, help="result folder (default benchmarks/results; .gpu/rehearse/results)")
    p.add_argument("--out", default=None, help="copies for the device call (default $OUT)")
    p.add_argument("--rehearse", action="store_true", help="the CPU rehearsal (see above)")
    p.add_argument("--fast", action="store_true", help="with --rehearse: wheels, imports, sm_90 compile only (CI)")
    p.add_argument("--fetch-wheels", action="store_true", help="download the carried wheels into .whl/")
    p.add_argument("--scratch", default=None, help=argparse.SUPPRESS)  # where the wheels are installed (tests)
    p.add_argument("--compile-plan", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check-imports", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fetch_wheels:
        return gpu_wheels.fetch()
    if args.compile_plan:
        return compile_plan(args.check_imports, args.fast)
    if args.rehearse:
        return rehearse(args)
    args.budget_s = args.budget_s or (1500 if args.dry_run else DEFAULT_BUDGET_S)
    return Run(args).main()


if __name__ == "__main__":
    sys.exit(main())
