"""The kernel benchmark's report: speed ratios, the targets, JSON / CSV / table output and the plot."""

from __future__ import annotations

import json
import math
import os
import time

from kernel_cases import modes_for, ALPHA, METHODS, METHOD_NAMES, MODES, SMALL_ROWS, TARGETS


class BenchReport:
    """Ratios, targets and output of a Bench run (mixed into bench_kernels.Bench)."""

    def ratios(self):
        """One entry per (shape, M, r, mode): speedup of the fused op over each baseline."""
        out = []
        for N, K in self.shapes:
            for M in self.rows:
                for r in self.ranks:
                    for mode in modes_for(M, self.large_m, self.args.acceptance):
                        mine = self.find(N, K, M, r, mode, "qdylora")
                        entry = dict(shape=f"{N}x{K}", N=N, K=K, M=M, rank=r, mode=mode,
                                     qdylora_ms=mine.get("time_ms"), correct=mine.get("correct"),
                                     rel_err=mine.get("rel_err"))
                        for m in METHODS[1:]:
                            other = self.find(N, K, M, r, mode, m)
                            if mine.get("time_ms") and other.get("time_ms"):
                                entry[f"speedup_vs_{m}"] = other["time_ms"] / mine["time_ms"]
                        out.append(entry)
        return out

    def targets(self, ratios):
        """The H100 targets (TARGETS), checked on every config they apply to."""
        checks = []
        for e in ratios:
            for rows, mode, base, need, label in TARGETS:
                applies = e["M"] == self.large_m if rows == "large" else e["M"] <= SMALL_ROWS
                if applies and mode in (None, e["mode"]):
                    v = e.get(f"speedup_vs_{base}")
                    checks.append(dict(shape=e["shape"], M=e["M"], rank=e["rank"], mode=e["mode"], target=label,
                                       need=need, value=v, met=(v is not None and v >= need)))
        return checks

    def write_json(self, seconds, final=True):
        """Rows, ratios and targets so far (final=False: written after each config)."""
        import bitsandbytes
        import triton

        ratios = self.ratios()
        targets = self.targets(ratios)
        meta = dict(gpu=self.gpu, dtype=str(self.dtype), seconds=round(seconds, 1), complete=final,
                    torch=self.torch.__version__, triton=triton.__version__, bitsandbytes=bitsandbytes.__version__,
                    date=time.strftime("%Y-%m-%d %H:%M:%S"), quick=self.args.quick, acceptance=self.args.acceptance,
                    dry_run=self.args.dry_run, r_alloc=self.r_alloc, alpha=ALPHA, large_m=self.large_m,
                    methods=METHOD_NAMES)
        tmp = self.paths["json"].with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump(_clean(dict(meta=meta, rows=self.rows_out, ratios=ratios, targets=targets)), f, indent=1)
        os.replace(tmp, self.paths["json"])
        return ratios, targets

    def finish(self, seconds):
        ratios, targets = self.write_json(seconds)
        try:
            self.plot(ratios)
        except Exception as e:  # a missing matplotlib must not lose the numbers
            print(f"plot failed: {type(e).__name__}: {e}")

        print()
        print(f"{'shape':12s} {'M':>5s} {'r':>3s} {'mode':8s} {'fused ms':>9s} {'vs a':>6s} {'vs b':>6s} "
              f"{'vs c':>6s} {'rel err':>8s} {'MiB':>7s}")
        for e in ratios:
            mine = self.find(e["N"], e["K"], e["M"], e["rank"], e["mode"], "qdylora")

            def fmt(v, spec):
                return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "-"

            print(f"{e['shape']:12s} {e['M']:5d} {e['rank']:3d} {e['mode']:8s} {fmt(e['qdylora_ms'], '9.4f')} "
                  f"{fmt(e.get('speedup_vs_a'), '6.2f')} {fmt(e.get('speedup_vs_b'), '6.2f')} "
                  f"{fmt(e.get('speedup_vs_c'), '6.2f')} {fmt(e['rel_err'] if e['rel_err'] != '' else None, '8.1e')} "
                  f"{fmt(mine.get('transient_mb'), '7.1f')}" + ("" if e.get("correct") else "  INCORRECT/ERROR"))
        met = sum(t["met"] for t in targets)
        print(f"\nH100 targets met: {met}/{len(targets)} (speedup = baseline time / fused time)"
              + (" -- meaningless in a dry run" if self.args.dry_run else ""))
        missed = [t for t in targets if not t["met"]]
        for t in missed[: 0 if self.args.dry_run else 12]:
            v = "-" if t["value"] is None else f"{t['value']:.2f}"
            print(f"  missed: {t['shape']} r={t['rank']} {t['mode']}: {t['target']} >= {t['need']:.2f}x (got {v})")
        if len(missed) > 12 and not self.args.dry_run:
            print(f"  ... and {len(missed) - 12} more (see the JSON)")
        errors = [r for r in self.rows_out if r.get("error")]
        if errors:
            print(f"\n{len(errors)} measurements failed, e.g. {errors[0]['method']} {errors[0]['N']}x{errors[0]['K']} "
                  f"M={errors[0]['M']}: {errors[0]['error']}")
        print(f"\nwrote {self.paths['csv']}, {self.paths['json']}, {self.paths['png']} ({seconds:.0f} s)")

    def plot(self, ratios):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(MODES), 1, figsize=(max(8, 0.45 * len(ratios)), 8), squeeze=False)
        for ax, mode in zip(axes[:, 0], MODES):
            es = [e for e in ratios if e["mode"] == mode]
            xs = range(len(es))
            for i, m in enumerate(METHODS[1:]):
                ax.bar([x + (i - 1) * 0.27 for x in xs], [e.get(f"speedup_vs_{m}") or 0 for e in es], width=0.27,
                       label=f"vs ({m}) {METHOD_NAMES[m]}")
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_xticks(list(xs))
            ax.set_xticklabels([f"{e['shape']}\nM={e['M']} r={e['rank']}" for e in es], rotation=90, fontsize=7)
            ax.set_ylabel("speedup of fused op")
            ax.set_title(f"{mode} ({self.gpu}, {self.dtype})")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(self.paths["png"], dpi=110)
        plt.close(fig)


def _clean(o):
    """JSON-safe copy: non-finite floats become null, unknown objects their str()."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if o is None or isinstance(o, (bool, int, str)):
        return o
    return str(o)


CSV_FIELDS = ["shape", "N", "K", "M", "rank", "mode", "method", "time_ms", "tflops", "gbps", "transient_mb",
              "rel_err", "correct", "error"]

