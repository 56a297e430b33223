"""Reading benchmarks/rank_sampling.py's results: run-to-run noise, the issue's targets, markdown tables, the plot.

Noise: for every arm run with several seeds, the variance across seeds at each rank, pooled over ranks and
arms (sigma_run); a difference between two single runs has sigma_diff = sqrt(2) * sigma_run, and is called
"within noise" when it is at most 2 sigma_diff.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

STEM = "rank_sampling"
K_SIGMA = 2.0
LORA, TRUNC = "lora r=", "lora-64 truncated"


def mean_loss(e: dict) -> float:
    return statistics.fmean(e["by_rank"].values())


def best_arm(runs: dict, arms: list[str]) -> str:
    """The QDyLoRA arm with the lowest held-out loss averaged over the evaluated ranks."""
    return min((a for a in arms if a in runs), key=lambda a: mean_loss(runs[a]))


def lora_losses(runs: dict) -> dict[str, float]:
    """{rank: loss} of the separately trained LoRA runs."""
    return {k[len(LORA):]: v["by_rank"][k[len(LORA):]] for k, v in runs.items() if k.startswith(LORA)}


def noise(budget: dict) -> dict | None:
    """sigma_run and sigma_diff from the arms run with several seeds (None if there are none)."""
    seeds = budget.get("seeds", {})
    if len(seeds) < 2:
        return None
    per_arm, variances = {}, []
    for arm in budget.get("noise_arms", []):
        runs = [s[arm]["by_rank"] for s in seeds.values() if arm in s]
        if len(runs) < 2:
            continue
        v = [statistics.variance([run[r] for run in runs]) for r in runs[0] if all(r in run for run in runs)]
        per_arm[arm] = {"sigma_run": round(math.sqrt(statistics.fmean(v)), 5), "n_seeds": len(runs),
                        "seed_diffs": {r: round(runs[1][r] - runs[0][r], 5) for r in runs[0]}}
        variances.append(statistics.fmean(v))
    if not variances:
        return None
    sigma = math.sqrt(statistics.fmean(variances))
    return {"sigma_run": round(sigma, 5), "sigma_diff": round(sigma * math.sqrt(2), 5),
            "threshold": round(K_SIGMA * sigma * math.sqrt(2), 5), "per_arm": per_arm}


def targets(res: dict) -> dict | None:
    """The issue's three loss targets at the largest budget, each with its numbers and a verdict."""
    budgets = res["config"]["budgets"]
    b = res["budgets"].get(str(budgets[-1]))
    if not b or "base" not in res:
        return None
    runs = b["seeds"].get(str(res["config"]["seed"]))
    if runs is None:  # a part with noise runs only
        return None
    nz = noise(b)
    if nz is None:
        return None
    thr, arms = nz["threshold"], [a for a in res["config"]["arms"] if a in runs]
    if not arms:  # a part with LoRA runs only
        return None
    best = best_arm(runs, arms)
    q, lora = runs[best]["by_rank"], lora_losses(runs)
    vs = {r: {"qdylora": q[r], "lora": lora[r], "diff": round(q[r] - lora[r], 5),
              "rel_pct": round(100 * (q[r] - lora[r]) / lora[r], 3)} for r in lora if r in q}
    t1 = all(v["diff"] <= thr and v["rel_pct"] <= 0.5 for v in vs.values())
    mono = {a: round(monotone_violation(runs[a]["by_rank"]), 5) for a in arms}
    out = {"budget": budgets[-1], "best_arm": best, "threshold": thr,
           "lora_match": {"met": t1, "by_rank": vs},
           "monotone": {"met": mono[best] <= thr, "max_increase_best": mono[best], "max_increase_by_arm": mono}}
    base = res["base"]["heldout_loss"]
    top = str(res["config"]["r_max"])
    if "example/frozen" in runs and "example/nested" in runs:
        gain_f = base - runs["example/frozen"]["by_rank"][top]
        gain_n = base - runs["example/nested"]["by_rank"][top]
        out["frozen_gain"] = {"met": gain_f >= 0.8 * gain_n, "frozen_gain": round(gain_f, 5),
                              "nested_gain": round(gain_n, 5), "ratio": round(gain_f / gain_n, 3) if gain_n else None}
    return out


def monotone_violation(by_rank: dict) -> float:
    """The largest rise of loss from a lower rank to a higher one (0 when loss never rises with rank)."""
    rs = sorted(by_rank, key=int)
    return max([0.0] + [by_rank[hi] - by_rank[lo] for i, lo in enumerate(rs) for hi in rs[i + 1:]])


def rows(res: dict, b: dict) -> list[tuple[str, dict]]:
    """(row title, entry) per run of a budget: LoRA, truncated LoRA, QDyLoRA arms, then the other seeds' runs."""
    seed0 = str(res["config"]["seed"])
    out = []
    for seed, runs in sorted(b.get("seeds", {}).items(), key=lambda kv: kv[0] != seed0):
        tag = "" if seed == seed0 else f" (seed {seed})"
        lora = {k: v for k, v in runs.items() if k.startswith(LORA)}
        if lora and seed == seed0:
            out.append(("LoRA trained at r", {"by_rank": {k: v for e in lora.values() for k, v in e["by_rank"].items()}}))
        elif lora:
            out += [(k.replace(LORA, "LoRA r=") + tag, v) for k, v in lora.items()]
        out += [((TRUNC if k == TRUNC else f"QDyLoRA {k}") + tag, v) for k, v in runs.items() if not k.startswith(LORA)]
    return out


def markdown(res: dict) -> str:
    """The results as markdown: per budget a loss table, differences against LoRA, noise; then targets and timings."""
    cfg = res["config"]
    ranks = [str(r) for r in cfg["ranks"]]
    base = (res.get("base") or {}).get("heldout_loss")
    lines = [f"# Rank granularity and update rule, NF4 SmolLM2-135M-Instruct ({res['machine']})", "",
             f"Batch {cfg['batch_size']} x max {cfg['max_seq_len']} tokens, lr {cfg['lr']} (warm-up "
             f"{cfg['warmup_steps']}, cosine), alpha {cfg['alpha']}, r_max {cfg['r_max']}, optimizer {cfg['optim']} "
             f"(QDyLoRA: ComponentAdamW, 32-bit state), seed {cfg['seed']}; Alpaca train {cfg['n_train']} / held-out "
             f"{cfg['n_heldout']} (loss over response tokens, lower is better). Base model without adapter: "
             f"{base if base is None else f'{base:.4f}'}.", ""]
    for bs in cfg["budgets"]:
        b = res["budgets"].get(str(bs))
        if not b:
            continue
        nz = noise(b) or noise(res["budgets"].get(str(cfg["budgets"][-1]), {}))
        lines += [f"## {bs} optimizer steps", "", "| arm | " + " | ".join(f"r={r}" for r in ranks) + " | mean | s/step |",
                  "|---|" + "---|" * (len(ranks) + 2)]
        for title, e in rows(res, b):
            cells = [f"{e['by_rank'][r]:.4f}" if r in e["by_rank"] else "" for r in ranks]
            m = f"{mean_loss(e):.4f}" if len(e["by_rank"]) == len(ranks) else ""
            lines.append(f"| {title} | " + " | ".join(cells) + f" | {m} | {e.get('s_per_step', '')} |")
        runs = b["seeds"].get(str(cfg["seed"]), {})
        lora = lora_losses(runs)
        q_arms = [a for a in cfg["arms"] if a in runs]
        if nz:
            own = "" if noise(b) else f" (measured at {cfg['budgets'][-1]} steps; none at this budget)"
            lines += ["", f"Run-to-run noise{own}: sigma_run {nz['sigma_run']:.4f}, a difference of two single runs "
                      f"sigma_diff {nz['sigma_diff']:.4f}; within noise = at most {K_SIGMA:g} sigma_diff = "
                      f"{nz['threshold']:.4f}. Seed differences: " +
                      "; ".join(f"{a}: " + ", ".join(f"r{r} {d:+.4f}" for r, d in v["seed_diffs"].items())
                                for a, v in nz["per_arm"].items()) + "."]
        if lora and q_arms:
            lines += ["", "Difference against the LoRA trained at that rank (seed-0 runs; in units of sigma_diff):", "",
                      "| arm | " + " | ".join(f"r={r}" for r in lora) + " |", "|---|" + "---|" * len(lora)]
            for a in [TRUNC] * (TRUNC in runs) + q_arms:
                cells = []
                for r, ref in lora.items():
                    d = runs[a]["by_rank"][r] - ref
                    cells.append(f"{d:+.4f}" + (f" ({d / nz['sigma_diff']:+.1f})" if nz else ""))
                lines.append(f"| {a} | " + " | ".join(cells) + " |")
            order = sorted(q_arms, key=lambda a: mean_loss(runs[a]))
            if len(order) > 1:
                gap = mean_loss(runs[order[1]]) - mean_loss(runs[order[0]])
                lines += ["", f"Best QDyLoRA arm (lowest mean over ranks): **{order[0]}** "
                          f"({mean_loss(runs[order[0]]):.4f}), {gap:.4f} ahead of {order[1]}"
                          + (f" ({gap / nz['sigma_diff']:.1f} sigma_diff)." if nz else ".")]
        lines.append("")
    lines += verdict_lines(res) + timing_lines(res)
    return "\n".join(lines)


def verdict_lines(res: dict) -> list[str]:
    t = targets(res)
    if t is None:
        return []
    yes = {True: "**met**", False: "**missed**"}
    lm, mo = t["lora_match"], t["monotone"]
    out = [f"## Targets at {t['budget']} steps (best arm: {t['best_arm']}; within noise = <= {t['threshold']:.4f})", "",
           f"- Best arm within noise of the LoRA trained at r, and never worse by > 0.5%: {yes[lm['met']]} ("
           + "; ".join(f"r={r}: {v['diff']:+.4f}, {v['rel_pct']:+.2f}%" for r, v in lm["by_rank"].items()) + ").",
           f"- Loss non-increasing in rank within noise (largest rise from a lower to a higher rank "
           f"{mo['max_increase_best']:.4f}): {yes[mo['met']]}. Other arms: "
           + ", ".join(f"{a} {v:.4f}" for a, v in mo["max_increase_by_arm"].items() if a != t["best_arm"]) + "."]
    fg = t.get("frozen_gain")
    if fg:
        out.append(f"- example/frozen gains >= 80% of example/nested's improvement over the base at r = "
                   f"{res['config']['r_max']}: {yes[fg['met']]} (frozen {fg['frozen_gain']:.4f}, nested "
                   f"{fg['nested_gain']:.4f}, ratio {fg['ratio']}).")
    return out + [""]


def timing_lines(res: dict) -> list[str]:
    out = ["## Wall time (shared machine: 1-minute load average at the start and end of each training run)", "",
           "| budget | run | train s | s/step | CPU s/step | eval s | load avg |", "|---|---|---|---|---|---|---|"]
    for bs, b in res["budgets"].items():
        for seed, runs in b.get("seeds", {}).items():
            for k, e in runs.items():
                if k != TRUNC and "train_wall_s" in e:
                    out.append(f"| {bs} | {k} (seed {seed}) | {e['train_wall_s']:.0f} | {e['s_per_step']} | "
                               f"{e['cpu_s_per_step']} | {e['eval_wall_s']:.0f} | {e['load_avg_train']} |")
    total = res.get("total_seconds", res.get("wall_s_previous", 0) + res.get("wall_s_this", 0))
    cpu = res.get("cpu_s_total")
    out += ["", f"Total wall time {total / 60:.1f} min" + (f"; this process's CPU time {cpu / 60:.1f} min (with "
            f"{res['config']['threads']} thread(s), about what the run would take alone)" if cpu else "") + ".", ""]
    out += [f"Added later: {note}" for note in res.get("later_runs", [])] + ([""] if res.get("later_runs") else [])
    return out


def plot(res: dict, path: Path) -> None:
    """Held-out loss against rank per arm, one panel per budget, log2 x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = res["config"]
    budgets = [b for b in cfg["budgets"] if str(b) in res["budgets"]]
    fig, axes = plt.subplots(1, max(len(budgets), 1), figsize=(6 * max(len(budgets), 1) + 3, 4.8), squeeze=False)
    colors: dict[str, str] = {}  # one colour per arm, its other seeds fainter
    for ax, bs in zip(axes[0], budgets):
        for title, e in rows(res, res["budgets"][str(bs)]):
            rs = sorted(e["by_rank"], key=int)
            x, y = [int(r) for r in rs], [e["by_rank"][r] for r in rs]
            other_seed = "(seed" in title
            if title.startswith("LoRA"):
                ax.plot(x, y, "kx" if other_seed else "k*", markersize=8 if other_seed else 11, label=title)
                continue
            arm = title.split(" (seed")[0]
            color = colors.setdefault(arm, f"C{len(colors) % 10}")
            ax.plot(x, y, "--" if arm == TRUNC else "-", marker="o", markersize=3, color=color,
                    alpha=0.4 if other_seed else 1.0, label=title)
        if "base" in res:
            ax.axhline(res["base"]["heldout_loss"], color="gray", linestyle=":", label="base (no adapter)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(cfg["ranks"], [str(r) for r in cfg["ranks"]])
        ax.set_xlabel("rank")
        ax.set_ylabel("held-out loss")
        ax.set_title(f"{bs} steps")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.suptitle("NF4 SmolLM2-135M + Alpaca: held-out loss against rank")
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(res: dict, out_dir: Path) -> None:
    """Write the JSON (with noise and targets), the markdown and the plot."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for b in res["budgets"].values():
        b["noise"] = noise(b)
    res["targets"] = targets(res)
    (out_dir / f"{STEM}.json").write_text(json.dumps(res, indent=2))
    (out_dir / f"{STEM}.md").write_text(markdown(res))
    plot(res, out_dir / f"{STEM}.png")
