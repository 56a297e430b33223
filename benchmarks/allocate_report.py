"""benchmarks/allocate.py's report: per-budget summary against uniform ranks, LoRA and noise; markdown and plot."""

from __future__ import annotations

import json
from pathlib import Path

STEM = "allocate"
SCORES = ("loss", "taylor", "norm", "gradnorm")


def summarise(res: dict) -> dict:
    """Per budget: each score's gain over the uniform rank (main run), the noise, the LoRA gap; the winner."""
    main_key = next(iter(res["runs"]))
    main_rule = res["runs"][main_key]["rank_per"]
    noise_key = next((k for k, r in res["runs"].items() if r["rank_per"] == main_rule and k != main_key), None)
    out = {"main": main_key, "noise_run": noise_key, "per_budget": {}, "wins": {}}
    for R, row in res["runs"][main_key]["heldout"].items():
        deltas = {s: round(v - row["uniform"], 5) for s, v in row.items() if s != "uniform"}
        entry = {"uniform": row["uniform"], "delta_vs_uniform": deltas,
                 "room": room(res["runs"][main_key], R)}
        if noise_key:
            other = res["runs"][noise_key]["heldout"][R]
            entry["noise_uniform"] = round(abs(other["uniform"] - row["uniform"]), 5)
            entry["noise_delta"] = {s: round(abs((other[s] - other["uniform"]) - deltas[s]), 5)
                                    for s in deltas if s in other}
        if R in res["lora"]:
            entry["lora"] = res["lora"][R]["heldout"]
        best = min(deltas, key=deltas.get) if deltas else None
        entry["best"] = best
        out["per_budget"][R] = entry
        if best:
            out["wins"][best] = out["wins"].get(best, 0) + 1
    train_s = res["runs"][main_key]["train_seconds"]
    out["seconds_per_allocation"] = {}
    for s in SCORES:
        secs = [a[s]["seconds"] for a in res["runs"][main_key]["allocations"].values() if s in a]
        if secs:
            mean = sum(secs) / len(secs)
            out["seconds_per_allocation"][s] = {"mean": round(mean, 2), "percent_of_training":
                                                round(100 * mean / train_s, 2) if train_s else None}
    # every run against its own training time (a run trained in this process was timed under the same load)
    out["percent_of_training_per_run"] = {}
    for key, run in res["runs"].items():
        for s in SCORES:
            secs = [a[s]["seconds"] for a in run["allocations"].values() if s in a]
            if secs and run.get("train_seconds"):
                out["percent_of_training_per_run"].setdefault(s, {})[key] = round(
                    100 * sum(secs) / len(secs) / run["train_seconds"], 2)
    agreement = {key: calibration_agreement(run) for key, run in res["runs"].items()}
    out["calibration_vs_heldout"] = {key: a for key, a in agreement.items() if a["total"]}
    out["rule_noise"] = rule_noise(res)
    out["vs_lora_noise"] = vs_lora_noise(res, main_key, noise_key)
    return out


def lora_of(res: dict, seed: int) -> dict:
    """{R: run} of the LoRA runs trained with this seed (the main seed's in res["lora"])."""
    if seed == res["config"]["seed"]:
        return res["lora"]
    return res.get("lora_seeds", {}).get(str(seed), {})


def lora_beside(res: dict, run: dict) -> tuple[dict, int]:
    """(LoRA runs {R: run}, their seed) a QDyLoRA run is compared with: its own seed's, else the main seed's."""
    own = lora_of(res, run["seed"])
    return (own, run["seed"]) if own else (res["lora"], res["config"]["seed"])


def vs_lora_noise(res: dict, main_key: str, noise_key: str | None) -> dict:
    """Per budget where LoRA has two seeds: each seed's best pattern (main rule) minus the LoRA of the same seed,
    against the run-to-run noise (the larger of LoRA's and the best patterns' spread across the seeds). Matches:
    the mean gap is at most the noise; beats: below minus the noise."""
    if noise_key is None:
        return {}
    runs = [res["runs"][main_key], res["runs"][noise_key]]
    loras = [lora_of(res, run["seed"]) for run in runs]
    out = {}
    for R in runs[0]["heldout"]:
        if not all(R in lo for lo in loras) or R not in runs[1]["heldout"]:
            continue
        best = [min(v for k, v in run["heldout"][R].items() if k != "uniform") for run in runs]
        lora = [lo[R]["heldout"] for lo in loras]
        gaps = [round(b - lo, 5) for b, lo in zip(best, lora)]
        noise = round(max(abs(lora[0] - lora[1]), abs(best[0] - best[1])), 5)
        mean = round(sum(gaps) / 2, 5)
        out[R] = {"seeds": [run["seed"] for run in runs], "lora": lora, "best_pattern": best, "gaps": gaps,
                  "mean_gap": mean, "lora_spread": round(abs(lora[0] - lora[1]), 5),
                  "pattern_spread": round(abs(best[0] - best[1]), 5), "noise": noise,
                  "verdict": "beats" if mean < -noise else "matches" if mean <= noise else "behind"}
    return out


def rule_noise(res: dict) -> dict:
    """Per rank_per rule with two seeds, per budget: the score best on the first seed, its gain over the uniform
    rank on each seed, the spread (run-to-run noise) and whether both gains are below minus the spread."""
    by_rule: dict = {}
    for run in res["runs"].values():
        by_rule.setdefault(run["rank_per"], []).append(run)
    out = {}
    for rule, runs in by_rule.items():
        if len(runs) < 2:
            continue
        first, second = runs[:2]
        out[rule] = {"seeds": [first["seed"], second["seed"]], "per_budget": {}}
        for R, row in first["heldout"].items():
            other = second["heldout"].get(R)
            scores = [k for k in row if k != "uniform" and other and k in other]
            if not scores:
                continue
            best = min(scores, key=lambda k: row[k] - row["uniform"])
            gains = [round(row[best] - row["uniform"], 5), round(other[best] - other["uniform"], 5)]
            spread = round(abs(gains[0] - gains[1]), 5)
            out[rule]["per_budget"][R] = {"score": best, "gains": gains, "spread": spread,
                                          "beats_noise": all(g < -spread for g in gains)}
    return out


def calibration_agreement(run: dict) -> dict:
    """How often a pattern's calibration loss against the uniform rank's has the sign of its held-out difference."""
    rows = []
    for R, allocs in run["allocations"].items():
        for s, a in allocs.items():
            if "calibration" in a:
                cal = a["calibration"]["pattern"] - a["calibration"]["uniform"]
                held = run["heldout"][R][s] - run["heldout"][R]["uniform"]
                rows.append({"R": R, "score": s, "calibration": round(cal, 5), "heldout": round(held, 5)})
    return {"agree": sum((r["calibration"] < 0) == (r["heldout"] < 0) for r in rows), "total": len(rows), "rows": rows}


def room(run: dict, R: str) -> float | None:
    """How much better than uniform rank R the run is at its best uniform rank >= R (held-out loss): a pattern of
    budget R that beats uniform R by much more than this would beat adapters with more parameters."""
    uni = run.get("uniform_heldout")
    if not uni or R not in uni:
        return None
    return round(uni[R] - min(v for r, v in uni.items() if int(r) >= int(R)), 5)


def save(results: dict, out_dir: Path, stem: str = STEM) -> None:
    """stem.json, stem.md and stem.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (out_dir / f"{stem}.md").write_text(markdown(results))
    plot(results, out_dir / f"{stem}.png")


def _cell(v) -> str:
    return "" if v is None else f"{v:.4f}"


def markdown(res: dict) -> str:
    """Tables: held-out loss per budget and score for every run, LoRA, noise, allocation times, pattern shapes."""
    cfg, summ = res["config"], res["summary"]
    lines = [f"# Rank allocation from one QDyLoRA run ({res['machine']})", "",
             f"SmolLM2-135M-Instruct NF4, Alpaca: {cfg['steps']} steps x batch {cfg['batch_size']}, max "
             f"{cfg['max_seq_len']} tokens, lr {cfg['lr']}, alpha {cfg['alpha']}, r_max {cfg['r_max']}, update "
             f"{cfg['update']}. Held-out: {cfg['n_heldout']} examples ({cfg['heldout_tokens']} response tokens); "
             f"calibration: the first {cfg['calib']} training examples ({cfg['calib_tokens']} tokens), "
             f"{cfg['loss_calib']} for the loss score ({cfg['loss_calib_tokens']} tokens, grid "
             f"{cfg['loss_grid']}, budgets {cfg['loss_budgets']} of the main run only). Base model without adapter: "
             f"held-out loss {res['base_loss']:.4f}."
             + (" taylor's greedy starts from `qdylora allocate`'s default --min-rank (1 from R = 2 up)."
                if cfg.get("taylor_floor") == "default" else "")
             + (f" QDyLoRA runs cut by --truncation {cfg['truncation']}"
                + (" (components sorted by each module's singular values; rank b at alpha / r_max)."
                   if cfg["truncation"] == "svd" else " (the trained components; rank b at alpha / b).")
                if cfg.get("truncation") else "")
             + (f" LoRA held-out losses from {res['lora_from']} (same settings and held-out set)."
                if res.get("lora_from") else ""), ""]
    for key, run in res["runs"].items():
        scores = [s for s in SCORES if any(s in row for row in run["heldout"].values())]
        trained = f"{run['train_seconds']:.0f} s" if run.get("train_seconds") else "time not recorded"
        by = f", by {run['trained_by']}" if run.get("trained_by") else ""
        lines += [f"## Held-out loss, QDyLoRA rank_per={run['rank_per']} seed {run['seed']} (trained in "
                  f"{trained}{by})", "",
                  "| avg rank R | uniform R | room | " + " | ".join(f"{s} pattern" for s in scores)
                  + " | LoRA trained at R |", "|---|---|---|" + "---|" * len(scores) + "---|"]
        for R, row in run["heldout"].items():
            lo = lora_beside(res, run)[0].get(R, {}).get("heldout")
            cells = [_cell(row["uniform"]), _cell(room(run, R))] + [
                (f"{row[s]:.4f} ({row[s] - row['uniform']:+.4f})" if s in row else "") for s in scores]
            lines.append(f"| {R} | " + " | ".join(cells) + f" | {_cell(lo)} |")
        if run.get("uniform_heldout"):
            lines += ["", "Uniform ranks: " + ", ".join(f"{r}: {v:.4f}" for r, v in run["uniform_heldout"].items())
                      + ". Room: uniform R minus the best uniform rank >= R."]
        lines.append("")
    lines += [f"## Summary (main run {summ.get('main')}, noise from {summ.get('noise_run')})", "",
              "| R | best score | its gain vs uniform | room | noise: uniform across seeds | "
              "noise: gain across seeds | "
              "best pattern vs LoRA at R |", "|---|---|---|---|---|---|---|"]
    for R, e in summ["per_budget"].items():
        best = e["best"]
        gain = e["delta_vs_uniform"].get(best)
        vs_lora = None if "lora" not in e or best is None else e["uniform"] + gain - e["lora"]
        lines.append(f"| {R} | {best} | {gain:+.4f} | {_cell(e.get('room'))} | "
                     f"{e.get('noise_uniform', float('nan')):.4f} | "
                     f"{e.get('noise_delta', {}).get(best, float('nan')):.4f} | "
                     + ("" if vs_lora is None else f"{vs_lora:+.4f}") + " |")
    lines += ["", "Best score per budget: " + ", ".join(f"{s} {n}x" for s, n in summ["wins"].items()) + ".", ""]
    noise = summ.get("rule_noise", {})
    if noise:
        lines += ["## Run-to-run noise per rule (two seeds of the same settings)", "",
                  "The score best on the first seed; its gain over the uniform rank on each seed (negative: the "
                  "pattern wins) and the gains' spread. Beats noise: both gains below minus the spread.", "",
                  "| rule | R | score | gain (seeds) | spread | beats noise |", "|---|---|---|---|---|---|"]
        for rule, n in noise.items():
            for R, e in n["per_budget"].items():
                lines.append(f"| {rule} (seeds {n['seeds'][0]}, {n['seeds'][1]}) | {R} | {e['score']} | "
                             f"{e['gains'][0]:+.4f} / {e['gains'][1]:+.4f} | {e['spread']:.4f} | "
                             f"{'yes' if e['beats_noise'] else 'no'} |")
        lines.append("")
    versus = summ.get("vs_lora_noise", {})
    if versus:
        lines += ["## Best pattern against LoRA trained at R, per seed (the main rule)", "",
                  "Each seed's best pattern minus the LoRA trained at R with the same seed. Noise: the larger of "
                  "LoRA's and the patterns' spread across the two seeds. Matches: mean gap <= noise; beats: mean gap "
                  "< -noise.", "",
                  "| R | LoRA (seeds) | best pattern (seeds) | gap (seeds) | mean gap | noise (LoRA / patterns) | "
                  "verdict |", "|---|---|---|---|---|---|---|"]
        for R, e in versus.items():
            lines.append(f"| {R} | {e['lora'][0]:.4f} / {e['lora'][1]:.4f} | {e['best_pattern'][0]:.4f} / "
                         f"{e['best_pattern'][1]:.4f} | {e['gaps'][0]:+.4f} / {e['gaps'][1]:+.4f} | "
                         f"{e['mean_gap']:+.4f} | {e['noise']:.4f} ({e['lora_spread']:.4f} / "
                         f"{e['pattern_spread']:.4f}) | {e['verdict']} |")
        lines.append("")
    lines += ["## Every run: its best pattern against its uniform rank and the LoRA trained at R", "",
              "| run | " + " | ".join(f"R={R}" for R in summ["per_budget"]) + " |",
              "|---|" + "---|" * len(summ["per_budget"])]
    for key, run in res["runs"].items():
        cells = []
        for R in summ["per_budget"]:
            row, lo = run["heldout"].get(R), lora_beside(res, run)[0].get(R, {}).get("heldout")
            if not row:
                cells.append("")
                continue
            s = min((k for k in row if k != "uniform"), key=row.get)
            cells.append(f"{s} {row[s]:.4f}: {row[s] - row['uniform']:+.4f} vs uniform"
                         + ("" if lo is None else f", {row[s] - lo:+.4f} vs LoRA"))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["",
              "## Seconds per allocation (scores + greedy; main run)", "",
              "| score | mean s | % of the training run |", "|---|---|---|"]
    for s, t in summ["seconds_per_allocation"].items():
        lines.append(f"| {s} | {t['mean']:.1f} | {t['percent_of_training']:.2f}% |")
    per_run = summ.get("percent_of_training_per_run", {})
    keys = sorted({k for v in per_run.values() for k in v})
    if keys:
        lines += ["", "Each run against its own training time (runs taken from rank_sampling.py were trained by "
                  "another process under another load; a run trained here was timed under the same one):", "",
                  "| score | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for s, v in per_run.items():
            lines.append(f"| {s} | " + " | ".join(f"{v[k]:.2f}%" if k in v else "" for k in keys) + " |")
    agreement = summ.get("calibration_vs_heldout", {})
    if agreement:
        lines += ["", "## Calibration loss against held-out loss", "",
                  "`qdylora allocate` prints the pattern's calibration loss beside the uniform rank's. How often does "
                  "its sign (pattern better or worse) match the held-out one?", "",
                  "| run | same sign | taylor: calibration / held-out difference per R |", "|---|---|---|"]
        for key, a in agreement.items():
            taylor = ", ".join(f"R={r['R']} {r['calibration']:+.4f} / {r['heldout']:+.4f}" for r in a["rows"]
                               if r["score"] == "taylor")
            lines.append(f"| {key} | {a['agree']} of {a['total']} | {taylor} |")
    main_run = next(iter(res["runs"].values()))
    lines += ["", "## Where the patterns put their parameters (main run)", "",
              "| R | score | off | max rank | share per module type | mean rank, layers 0-9 / 10-19 / 20-29 |",
              "|---|---|---|---|---|---|"]
    for R, allocs in main_run["allocations"].items():
        for s, a in allocs.items():
            share = ", ".join(f"{t.split('.')[-1]} {v:.2f}" for t, v in a["type_share"].items())
            lm = [v for k, v in sorted(a["layer_mean_rank"].items(), key=lambda kv: int(kv[0]))]
            thirds = " / ".join(f"{sum(c) / len(c):.1f}" for c in (lm[:10], lm[10:20], lm[20:]) if c)
            lines.append(f"| {R} | {s} | {a['modules_off']} | {a['max_rank']} | {share} | {thirds} |")
    done = res.get("total_seconds")
    lines += ["", (f"Total wall time {done / 60:.1f} min" if done else
                   f"PARTIAL: {res['elapsed_seconds'] / 60:.1f} min so far") +
              " (2 CPU cores shared with other jobs: times are noisy).", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """Held-out loss against adapter parameters, one panel per run, zoomed on the uniform ranks: patterns worse than
    the panel's top are drawn at the top edge, hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(res["runs"].items())
    cols = min(2, len(runs))
    rows = (len(runs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    style = {"loss": ("s", "tab:blue"), "taylor": ("^", "tab:orange"), "norm": ("D", "tab:green"),
             "gradnorm": ("v", "tab:purple")}
    for ax, (key, run) in zip(axes.flat, runs):
        Rs = list(run["heldout"])
        total = next(iter(run["allocations"].values()))
        per_rank = next(iter(total.values()))["budget"] / int(Rs[0])
        uni = run.get("uniform_heldout") or {R: run["heldout"][R]["uniform"] for R in Rs}
        own, seed = lora_beside(res, run)
        lora = [(int(R) * per_rank, own[R]["heldout"]) for R in Rs if R in own]
        shown = list(uni.values()) + [v for _, v in lora]
        bottom, top = min(shown + [run["heldout"][R][s] for R in Rs for s in run["heldout"][R]]) - 0.003, \
            max(shown) + 0.01
        ax.plot([int(r) * per_rank for r in uni], list(uni.values()), "o-", color="k", label="uniform rank (same run)")
        for s, (m, color) in style.items():
            pts = [(run["allocations"][R][s]["params"], run["heldout"][R][s]) for R in Rs if s in run["heldout"][R]]
            inside = [(x, y) for x, y in pts if y <= top]
            above = [(x, top) for x, y in pts if y > top]
            if inside:
                ax.plot(*zip(*inside), m, color=color, markersize=8, linestyle="none", label=f"{s} pattern")
            if above:
                ax.plot(*zip(*above), m, color=color, markerfacecolor="none", markersize=8, linestyle="none",
                        clip_on=False, label=f"{s} pattern (worse than shown)")
        if lora:
            ax.plot(*zip(*lora), "*", color="tab:red", markersize=12, linestyle="none",
                    label=f"LoRA trained at R (seed {seed})")
        ax.set_ylim(bottom, top)
        ax.set_xscale("log")
        ax.set_xlabel("adapter parameters")
        ax.set_ylabel("held-out loss")
        ax.set_title(f"rank_per={run['rank_per']}, seed {run['seed']} (base model {res['base_loss']:.3f})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    fig.suptitle(f"per-module ranks vs uniform ranks, NF4 SmolLM2-135M, {res['config']['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
