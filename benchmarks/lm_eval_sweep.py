"""An lm-eval rank sweep against separate lm-eval runs of each rank's export: wall time and numbers.

`qdylora sweep RUN --task lm-eval` loads and quantizes the base once and evaluates every rank (and the base)
through lm-eval's Python API. The baseline is what a user does without it: for each rank, `qdylora export`
and then a fresh lm-eval run (a new Python process: imports, the base loaded and quantized in NF4, the peft
export on top, `simple_evaluate`), plus one run of the base alone. Both sides run the same local lm-eval task
(MMLU validation from ../shared/data as a multiple-choice YAML, --limit questions) on SmolLM2-135M-Instruct
(NF4, CPU); the numbers of the two sides must be equal. Writes benchmarks/results/lm_eval_sweep.{json,md,png}.

    python benchmarks/lm_eval_sweep.py --adapter RUN_OR_ADAPTER   # a qdylora run (default: a seeded random one)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
STEM = "lm_eval_sweep"
TASK = "qdylora_mmlu_val"
# Jinja braces stay as written: the data file is put in with str.replace, not format()
YAML = """task: TASK
dataset_path: json
dataset_kwargs:
  data_files:
    validation: DATA
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{input}}"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: output
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""".replace("TASK", TASK)
# one separate lm-eval run: a fresh process, the NF4 base, the peft export (none for the base row)
SEPARATE = r"""
import json, sys, time
t0 = time.perf_counter()
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from qdylora.eval.harness import _quiet_and_in, metric_columns
from qdylora.load.model import load_model_and_tokenizer
base, tok = load_model_and_tokenizer(None, device="cpu")
model = base
if sys.argv[1] != "-":
    from peft import PeftModel
    model = PeftModel.from_pretrained(base, sys.argv[1]).eval()
with _quiet_and_in(sys.argv[2]):
    res = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=int(sys.argv[4]), device="cpu"),
                          tasks=[sys.argv[5]], limit=int(sys.argv[3]), task_manager=TaskManager(include_path=sys.argv[2]),
                          bootstrap_iters=0, log_samples=False, verbosity="ERROR")
print(json.dumps({"metrics": metric_columns(res["results"]), "seconds": time.perf_counter() - t0}))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default=None, help="qdylora run or adapter folder (default: a seeded random adapter)")
    p.add_argument("--ranks", default="1,4,16,64")
    p.add_argument("--limit", type=int, default=40, help="MMLU validation questions")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mmlu", default=str(SHARED / "mmlu" / "zero_shot_mmlu_val.jsonl"))
    p.add_argument("--output", default=str(RESULTS))
    return p.parse_args(argv)


def env(threads: int) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")]), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


def timed(cmd: list[str], threads: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env(threads), capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0, done.stdout


def random_adapter(work: Path, threads: int) -> Path:
    """A seeded random qdylora adapter (r_max 64) on the default model: timing does not need a trained one."""
    code = ("import torch; from qdylora.load.model import load_model_and_tokenizer; "
            "from qdylora.adapters.attach import attach_adapters, dylora_layers; "
            "from qdylora.adapters.config import QDyLoRAConfig; from qdylora.adapters.files import save_adapter; "
            "b, _ = load_model_and_tokenizer(None, device='cpu'); torch.manual_seed(0); "
            "m = attach_adapters(b, QDyLoRAConfig(r_max=64, alpha=16.0)); "
            "[l.lora_dyB['default'].data.normal_(0, 0.02) for l in dylora_layers(m)]; "
            f"save_adapter(m, {str(work / 'adapter')!r})")
    timed([sys.executable, "-c", code], threads)
    return work / "adapter"


def main(argv=None) -> int:
    args = parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    work = Path(tempfile.mkdtemp(prefix="qdylora_lm_eval_"))
    tasks = work / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(YAML.replace("DATA", str(Path(args.mmlu).resolve())))
    adapter = Path(args.adapter) if args.adapter else random_adapter(work, args.threads)
    py = sys.executable
    sweep_s, out = timed([py, "-m", "qdylora", "sweep", str(adapter), "--task", "lm-eval", "--lm-eval-tasks", TASK,
                          "--include-path", str(tasks), "--limit", str(args.limit), "--ranks", args.ranks,
                          "--batch-size", str(args.batch_size), "--output", str(work / "sweep")], args.threads)
    sweep = {str(r["label"]): r for r in json.loads((work / "sweep" / "sweep_lm-eval.json").read_text())["rows"]}
    separate = {}
    for r in [0] + ranks:
        export_s = 0.0
        target = "-"
        if r:
            export_s, _ = timed([py, "-m", "qdylora", "export", str(adapter), "--rank", str(r), "--output",
                                 str(work / f"r{r}")], args.threads)
            target = str(work / f"r{r}")
        eval_s, out = timed([py, "-c", SEPARATE, target, str(tasks), str(args.limit), str(args.batch_size), TASK],
                            args.threads)
        got = json.loads(out.strip().splitlines()[-1])
        separate["base" if r == 0 else str(r)] = {"export_s": round(export_s, 1), "eval_s": round(eval_s, 1),
                                                   "metrics": got["metrics"]}
        print(f"rank {r}: export {export_s:.1f} s, lm-eval {eval_s:.1f} s, {got['metrics']}", flush=True)
    metric = f"{TASK}/acc"
    rows = {k: {"sweep": sweep[k][metric], "separate": v["metrics"][metric]} for k, v in separate.items()}
    separate_s = sum(v["export_s"] + v["eval_s"] for v in separate.values())
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), "
                      f"{args.threads} thread(s)",
           "config": {**vars(args), "ranks": ranks, "task": f"MMLU validation (QLoRA's zero-shot prompts), first "
                                                            f"{args.limit} questions, lm-eval multiple_choice acc",
                      "adapter": str(adapter) if args.adapter else "seeded random adapter (r_max 64)"},
           "sweep_seconds": round(sweep_s, 1), "separate_seconds": round(separate_s, 1),
           "speedup": round(separate_s / sweep_s, 2), "separate": separate, "acc": rows,
           "numbers_equal": all(v["sweep"] == v["separate"] for v in rows.values())}
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{STEM}.json").write_text(json.dumps(res, indent=2))
    (out_dir / f"{STEM}.md").write_text(markdown(res))
    plot(res, out_dir / f"{STEM}.png")
    shutil.rmtree(work, ignore_errors=True)
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    lines = [f"# lm-eval rank sweep vs separate lm-eval runs ({res['machine']})", "",
             f"{res['config']['task']}; SmolLM2-135M-Instruct NF4; adapter: {res['config']['adapter']}.", "",
             "| rank | sweep acc | separate run acc | separate: export s | separate: lm-eval s |", "|---|---|---|---|---|"]
    for k, v in res["separate"].items():
        lines.append(f"| {k} | {res['acc'][k]['sweep']:.4f} | {res['acc'][k]['separate']:.4f} | {v['export_s']} | "
                     f"{v['eval_s']} |")
    lines += ["", f"`qdylora sweep --task lm-eval` (one process, base loaded and quantized once): "
                  f"**{res['sweep_seconds']} s**; separate runs (export + a fresh lm-eval process per rank, and "
                  f"the base): **{res['separate_seconds']} s**; ratio {res['speedup']}x. Numbers equal on both "
                  f"sides: {res['numbers_equal']}.", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    sep = res["separate"]
    ax.barh(["qdylora sweep"], [res["sweep_seconds"]], color="tab:blue")
    left = 0.0
    for k, v in sep.items():
        ax.barh(["separate runs"], [v["export_s"] + v["eval_s"]], left=left, label=f"rank {k}")
        left += v["export_s"] + v["eval_s"]
    ax.set_xlabel("wall seconds")
    ax.set_title(f"lm-eval over {len(sep)} ranks (incl. base): {res['speedup']}x")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
