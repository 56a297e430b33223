"""`train`: load -> quantize -> attach adapters -> train into a run folder; what `qdylora train` calls.

A new run validates everything (settings, data, model, targets, a writable folder) before it writes
or replaces anything. A resumed run takes every setting from run_config.json; a setting given again
must match it, except max_steps, which may grow (training continues) and the settings that do not
change what is trained (checkpointing, logging).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..adapters.config import QDyLoRAConfig
from ..atomic import remove_stale
from ..errors import TrainingError
from .config import TrainConfig
from .fisher_stats import check_collectable
from .processes import barrier, check_same_settings, is_main, training_device
from .run_folder import (ADAPTER_SUBDIR, check_writable, checkpoints, holds_run, latest_checkpoint, read_log,
                         read_run_config, remove_run, truncate_log, write_run_config)

# settings a resume may change: they do not change what is trained
FREE_ON_RESUME = {"save_steps", "save_total_limit", "logging_steps", "gradient_checkpointing", "fisher_steps"}
# chosen by each launch, like the number of processes: checkpoints hold whole tensors, so a run started with
# FSDP resumes with or without it
PER_LAUNCH = {"fsdp": False, "quant_storage": "auto"}
SETTING_FLAGS = {"model": "--model", "data": "--data", "r_min": "--r-min", "r_max": "--r-max", "alpha": "--alpha",
                 "dropout": "--dropout", "update": "--update", "target_modules": "--target-modules",
                 "rank_sampler": "--rank-sampler", "rank_per": "--rank-per", "max_rows": "--max-rows",
                 "r_max_prob": "--r-max-prob", "rank_list": "--rank-list", "truncation": "--truncation",
                 "learning_rate": "--lr", "batch_size": "--batch-size", "grad_accum": "--grad-accum",
                 "max_seq_len": "--max-seq-len", "warmup_steps": "--warmup-steps", "weight_decay": "--weight-decay",
                 "max_grad_norm": "--max-grad-norm", "optim": "--optim", "seed": "--seed", "max_steps": "--max-steps"}


def _configs(settings: dict[str, Any], saved: bool) -> tuple[QDyLoRAConfig, TrainConfig]:
    """(adapter config, train config) from settings {'qdylora': {...}, 'train': {...}}; saved: a run's own."""
    return (QDyLoRAConfig.from_dict(settings["qdylora"], strict=True, saved=saved),
            TrainConfig(**settings["train"]))


def _resume_settings(out: Path, given: dict[str, Any]) -> dict[str, Any]:
    """The run's saved settings with the allowed changes from `given` applied; refuses the others."""
    saved = read_run_config(out)
    q_names, t_names = {f.name for f in dataclasses.fields(QDyLoRAConfig)}, TrainConfig.field_names()
    unknown = sorted((set(saved["qdylora"]) - q_names) | (set(saved["train"]) - t_names))
    if unknown:
        raise TrainingError(f"{out / 'run_config.json'} has unknown setting(s) {', '.join(unknown)} "
                            "(written by another qdylora version?); resume it with that version, or start again "
                            "with --overwrite")
    merged = {"model": saved.get("model"), "data": saved.get("data"), "qdylora": dict(saved["qdylora"]),
              "train": dict(saved["train"])}
    merged["train"].update({k: given.get("train", {}).get(k, default) for k, default in PER_LAUNCH.items()})
    changes = [((k,), v, saved.get(k)) for k, v in given.items() if k in ("model", "data")]
    for group in ("qdylora", "train"):
        changes += [((group, k), v, saved[group].get(k)) for k, v in given.get(group, {}).items()]
    for where, value, old in changes:
        key = where[-1]
        if key == "max_steps" or key in FREE_ON_RESUME or key in PER_LAUNCH:
            merged[where[0]][key] = value
        elif value != old:
            flag = SETTING_FLAGS.get(key, key)
            raise TrainingError(f"{flag} {value!r} differs from this run's {old!r}; a resumed run keeps its "
                                f"settings. Drop {flag} to continue the run, or start a new run in another --output")
    return merged


def _finished_step(out: Path) -> int | None:
    """The step at which the finished adapter was written, or None when there is none."""
    from ..adapters.files import CONFIG_NAME

    try:
        return int(json.loads((out / ADAPTER_SUBDIR / CONFIG_NAME).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _prepare_resume(out: Path, given: dict[str, Any]) -> tuple[dict[str, Any], Path | None, str | None]:
    """(settings, checkpoint to resume from or None, 'finished' message or None)."""
    if not holds_run(out):
        raise TrainingError(f"--resume: {out} holds no checkpoint-N folder to resume from (no training run there); "
                            "run without --resume to start one")
    settings = _resume_settings(out, given)
    if is_main():
        remove_stale(out)
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        logged = read_log(out)
        where = f" (it stopped at step {logged[-1]['step']})" if logged else ""
        raise TrainingError(f"--resume: {out} has no usable checkpoint-N folder{where}, so there is nothing to "
                            "continue from; start it again with --overwrite")
    step = int(ckpt.name.split("-")[-1])
    max_steps = settings["train"]["max_steps"]
    was = read_run_config(out)["train"].get("max_steps")
    done = _finished_step(out)
    if step >= max_steps and done is not None and done >= max_steps:
        return settings, None, (f"{out} is already finished: trained to step {done} of --max-steps {max_steps}, "
                                f"adapter in {out / ADAPTER_SUBDIR}. Pass a larger --max-steps to train on.")
    if step >= max_steps:
        if step == max_steps:  # killed between the last checkpoint and the final adapter
            if is_main():
                finish_from_checkpoint(out, ckpt, step)
            barrier()
            return settings, None, f"{out}: finished from {ckpt.name}; adapter in {out / ADAPTER_SUBDIR}"
        raise TrainingError(f"--max-steps {max_steps} is not beyond this run's last checkpoint (step {step}); "
                            "pass a larger --max-steps to continue")
    if max_steps != was and is_main():
        print(f"continuing {out} from step {step} to --max-steps {max_steps} (was {was})", file=sys.stderr)
    return settings, ckpt, None


def finish_from_checkpoint(out: Path, ckpt: Path, step: int) -> None:
    """Write the final adapter/ from a checkpoint's adapter (training had reached max_steps), svd-sorted as
    train_model sorts it when the run's truncation is 'svd'."""
    from ..adapters.files import SORTED_KEY, adapter_config, read_adapter, svd_sorted_meta, write_adapter
    from ..adapters.svd_sort import sorted_tensors
    from .fisher_stats import read_stats, stats_files

    meta, tensors = read_adapter(ckpt / ADAPTER_SUBDIR)
    if adapter_config(meta).truncation == "svd" and not svd_sorted_meta(meta):
        tensors, meta = sorted_tensors(tensors, meta["targets"]), {**meta, SORTED_KEY: True}
    write_adapter(out / ADAPTER_SUBDIR, {**meta, "global_step": step}, tensors,
                  stats_files(read_stats(ckpt / ADAPTER_SUBDIR)))


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if holds_run(out) and not overwrite:
        if not checkpoints(out) and not (out / ADAPTER_SUBDIR).exists():
            raise TrainingError(f"{out} holds a run that stopped before its first checkpoint; pass --overwrite to "
                                "start it again, or choose another --output")
        raise TrainingError(f"{out} already holds a training run; pass --resume to continue it, "
                            "--overwrite to replace it, or choose another --output")


def run_training(output_dir: str | Path, given: dict[str, Any], resume: bool = False,
                 overwrite: bool = False) -> dict[str, Any]:
    """Train into `output_dir` from the settings the user gave: {'model', 'data', 'qdylora': {...}, 'train': {...}}."""
    from ..adapters.attach import attach_adapters
    from ..data.embedded_task import default_splits
    from ..data.examples import build_dataset
    from ..data.records import load_records
    from ..load.model import load_model_and_tokenizer
    from ..load.quantize import default_compute_dtype, set_quant_storage
    from .sharding import shard_model
    from .trainer import train_model

    out = Path(output_dir)
    if resume and overwrite:
        raise TrainingError("--resume and --overwrite contradict each other; pass one")
    check_same_settings({"output": str(out.resolve()), "resume": resume, **given})
    device = training_device()
    check_writable(out)
    if resume:
        settings, ckpt, finished = _prepare_resume(out, given)
        if finished:
            qcfg, _ = _configs(settings, saved=True)
            return {"finished": True, "message": finished, "interrupted": False, "qdylora_config": qcfg,
                    "adapter": str(out / ADAPTER_SUBDIR)}
    else:
        _refuse_existing(out, overwrite)
        settings, ckpt = given, None
    model_name, data = settings.get("model"), settings.get("data")
    qcfg, tcfg = _configs({"qdylora": settings.get("qdylora", {}), "train": settings.get("train", {})}, saved=resume)
    if tcfg.fisher_steps:
        check_collectable(qcfg, tcfg.fsdp)
    # every input is read and checked before anything in the folder changes
    storage = _quant_storage(tcfg, device)
    records = load_records(data) if data else default_splits()[0]
    # FSDP: loaded and quantized in CPU RAM, then each process moves only its shards to its GPU
    base, tokenizer = load_model_and_tokenizer(model_name, device=torch.device("cpu") if tcfg.fsdp else device,
                                               compute_dtype=default_compute_dtype(device))
    dataset = build_dataset(records, tokenizer, tcfg.max_seq_len)
    torch.manual_seed(qcfg.seed)  # the adapters' initial A: the same for the same --seed, in every process
    peft_model = attach_adapters(base, qcfg)
    if tcfg.fsdp:
        shard_model(peft_model, storage, device)
    elif storage is not None:
        set_quant_storage(peft_model, storage)
    barrier()  # every process has checked its inputs before the main one changes the folder
    if is_main():
        if overwrite:
            remove_run(out)
        out.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        if ckpt is not None:
            truncate_log(out, int(ckpt.name.split("-")[-1]))
        write_run_config(out, {"model": model_name, "data": data, "qdylora": qcfg.to_dict(),
                               "train": tcfg.to_dict()})
    barrier()
    summary = train_model(peft_model, tokenizer, dataset, tcfg, out, str(ckpt) if ckpt else None)
    summary.update(model=peft_model, tokenizer=tokenizer, qdylora_config=qcfg, finished=False, sharded=tcfg.fsdp)
    return summary


def _quant_storage(tcfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The packed weights' storage dtype (None: bnb's uint8), checked against --fsdp before anything loads."""
    from ..load.quantize import QUANT_STORAGE, default_compute_dtype
    from .optimizer import resolve_optim
    from .sharding import check_fsdp_launch, fsdp_storage

    if tcfg.fsdp:
        check_fsdp_launch(resolve_optim(tcfg.optim))
        return fsdp_storage(default_compute_dtype(device), tcfg.quant_storage)
    return None if tcfg.quant_storage in ("auto", "uint8") else QUANT_STORAGE[tcfg.quant_storage]


def train(model: str | None = None, data: str | None = None, output_dir: str = "runs/qdylora",
          qdylora_config: QDyLoRAConfig | None = None, train_config: TrainConfig | None = None,
          resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Load (default: SmolLM2-135M) -> quantize -> attach adapters -> train; mirrors `qdylora train`.

    With resume=True, configs left as None take the run's saved settings; configs given must agree with
    them (a larger max_steps continues training).
    """
    given: dict[str, Any] = {k: v for k, v in (("model", model), ("data", data)) if v is not None}
    for key, cfg in (("qdylora", qdylora_config), ("train", train_config)):
        if cfg is not None:
            cfg.validate()
            given[key] = cfg.to_dict()
    return run_training(output_dir, given, resume=resume, overwrite=overwrite)
