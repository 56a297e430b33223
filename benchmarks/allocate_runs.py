"""The training runs of the allocation benchmarks: trained here, or taken again from a folder that holds them.

A run trained with --keep-runs is kept in --work-dir as NAME_STEPS_SEED (adapter/ and NAME_STEPS_SEED.json, its
training record), where --adapters finds it again; rank_sampling.py's work-dir uses the same names.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from alpaca_arms import attach_lora, train_arm


def attach_qdylora(base, args, rank_per: str, seed: int):
    from qdylora.adapters.attach import attach_adapters
    from qdylora.adapters.config import QDyLoRAConfig

    torch.manual_seed(seed)
    chosen = {k: getattr(args, k, None) for k in ("truncation", "r_max_prob")}  # None: the config's default
    return attach_adapters(base, QDyLoRAConfig(r_min=1, r_max=args.r_max, alpha=args.alpha, update=args.update,
                                               rank_per=rank_per, seed=seed,
                                               **{k: v for k, v in chosen.items() if v is not None}))


def reused(args, name: str, steps: int, seed: int) -> tuple[Path, dict] | None:
    """(adapter folder, training record) of a run trained with these settings, if --adapters has it: by this script
    with --keep-runs (its record beside it) or by rank_sampling.py (its record in --adapters-results)."""
    if not args.adapters:
        return None
    run = Path(args.adapters) / f"{name}_{steps}_{seed}"
    folder = run / "adapter" if (run / "adapter").is_dir() else run
    if not any((folder / f).is_file() for f in ("adapter_config.json", "qdylora_config.json")):
        return None
    record = run.with_name(run.name + ".json")
    if record.is_file():
        return folder, {**json.loads(record.read_text()), "trained_by": f"benchmarks/allocate.py ({run.name})"}
    arm = {"lora r=" + name[4:] if name.startswith("lora") else name.replace("-", "/"): None}
    rec = {}
    if Path(args.adapters_results).is_file():
        runs = json.loads(Path(args.adapters_results).read_text())["budgets"].get(str(steps), {})
        rec = runs.get("seeds", {}).get(str(seed), {}).get(next(iter(arm)), {})
    return folder, {"train_seconds": rec.get("train_wall_s"), "steps": rec.get("steps", steps),
                    "train_loss_first10pct": rec.get("train_loss_first10pct"),
                    "train_loss_last10pct": rec.get("train_loss_last10pct"),
                    "trained_by": f"benchmarks/rank_sampling.py ({name}_{steps}_{seed})"}


def qdylora_run(args, base, tok, dataset, rank_per: str, found: tuple[Path, dict] | None):
    """(model in eval mode, training record) of the QDyLoRA run of args.seed: loaded from `found` (reused()) or
    trained here (kept in --work-dir with --keep-runs, where --adapters finds it again); svd-sorted when its
    truncation (--truncation, else the CLI's default for its rule) is svd."""
    from qdylora.adapters.attach import qdylora_config_of
    from qdylora.adapters.svd_sort import sort_components

    model = attach_qdylora(copy.deepcopy(base), args, rank_per, args.seed)
    if found:
        from qdylora.adapters.files import load_adapter

        load_adapter(model, found[0])
        arm = dict(found[1])
    else:
        name = f"{rank_per}-{args.update}_{args.steps}_{args.seed}"
        arm = train_arm(name, model, tok, dataset, args)
        if args.keep_runs:
            (Path(args.work_dir) / f"{name}.json").write_text(json.dumps(arm))
    if qdylora_config_of(model).truncation == "svd":  # a run taken again holds its trained components
        sort_components(model)
    model.eval()
    arm.pop("ranks_sampled", None)
    return model, arm


def lora_run(args, base, tok, dataset, r: int, seed: int, found: tuple[Path, dict] | None):
    """(peft model in eval mode, training record) of the LoRA run at rank r and this seed: loaded from `found`
    (reused()) or trained here (kept in --work-dir with --keep-runs)."""
    if found:
        from peft import PeftModel

        model, arm = PeftModel.from_pretrained(copy.deepcopy(base), str(found[0])), dict(found[1])
    else:
        run_args = argparse.Namespace(**{**vars(args), "seed": seed})
        model = attach_lora(copy.deepcopy(base), run_args, r)
        arm = train_arm(f"lora{r}_{args.steps}_{seed}", model, tok, dataset, run_args)
        arm.pop("ranks_sampled", None)
        if args.keep_runs:
            (Path(args.work_dir) / f"lora{r}_{args.steps}_{seed}.json").write_text(json.dumps(arm))
    model.eval()
    arm.pop("ranks_sampled", None)
    return model, arm
