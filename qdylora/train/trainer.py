"""The Trainer: transformers' Trainer with qdylora adapter checkpoints written atomically, seeded ranks set before
each micro-step (RankSchedule), exact resume."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, default_data_collator
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..adapters.attach import adapter_parameters, dylora_layers, set_rank
from ..adapters.config import QDyLoRAConfig
from ..adapters.files import load_adapter_weights, read_adapter, save_adapter
from ..adapters.svd_sort import sort_components
from ..atomic import WriteError, failure_reason, is_write_failure, usual_mode
from ..errors import AdapterError, TrainingError
from .callbacks import InterruptCallback, LogCallback, SyncCallback
from .config import TrainConfig
from .fisher_stats import FisherCollector, check_collectable, read_stats, stats_files
from .optimizer import ComponentAdamW, resolve_optim, state_settings
from .rank_schedule import RankSchedule
from .run_folder import ADAPTER_SUBDIR, LOG_NAME, rotate_checkpoints
from .sharding import ShardedRun, fsdp_units


class NonFiniteLoss(TrainingError):
    """The loss became nan or inf; the optimizer step was not taken."""


class QDyLoRATrainer(Trainer):
    """Trainer that saves qdylora adapters, writes checkpoints atomically and stops on a non-finite loss."""

    def __init__(self, *args, rank_schedule: RankSchedule | None = None, sharded: bool = False,
                 fisher: FisherCollector | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rank_schedule = rank_schedule
        self.fisher = fisher  # gathers allocate's fisher statistics in the last steps (train.fisher_stats)
        self._fisher_state: dict | None = None
        self.sharded = sharded  # the model is sharded with FSDP2 (train.sharding); it reduces its own gradients
        self._gathered: dict | None = None
        self._staging: str | None = None
        self.last_checkpoint: str | None = None

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        if not self.sharded:
            return super()._wrap_model(model, training, dataloader)
        return model if isinstance(model, ShardedRun) else ShardedRun(model)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.sharded:
            return super()._save_optimizer_and_scheduler(output_dir)
        state = self.optimizer.state_dict()  # every process: the moments' shards are gathered whole
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def get_decay_parameter_names(self, model) -> set[str]:
        # create_optimizer tests `name in` this for every parameter: a set keeps that linear in the
        # number of adapter tensors
        return set(super().get_decay_parameter_names(model))

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.rank_schedule is not None:
            self.rank_schedule.before_micro_step(self.state.global_step, int(inputs["input_ids"].shape[0]))
        if self.fisher is not None:
            self.fisher.begin_micro_step(self.state.global_step, inputs.get("labels"))
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            kept = self.last_checkpoint or "none (no checkpoint was written yet)"
            raise NonFiniteLoss(
                f"the loss became {loss.item()} at step {self.state.global_step + 1}; training stopped before the "
                f"optimizer step. Last good checkpoint: {kept}. Lower --lr or check the data, then --resume."
            )
        return loss

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:  # save_model calls this in every process; one writes
            return
        output_dir = output_dir or self.args.output_dir
        if dylora_layers(self.model):
            save_adapter(self.model, Path(output_dir) / ADAPTER_SUBDIR, params=self._gathered,
                         files=stats_files(self._fisher_state))
        else:
            self.model.save_pretrained(output_dir, safe_serialization=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        adapter = Path(resume_from_checkpoint) / ADAPTER_SUBDIR
        if dylora_layers(self.model) and adapter.is_dir():
            _, tensors = read_adapter(adapter)
            load_adapter_weights(self.model, tensors)
            stats = read_stats(adapter) if self.fisher is not None and self.is_world_process_zero() else None
            if stats is not None:
                self.fisher.load(stats)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint):
        try:
            return super()._load_optimizer_and_scheduler(checkpoint)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TrainingError(f"{checkpoint}: optimizer.pt / scheduler.pt cannot be loaded ({first[:200]}); they "
                                "load with weights_only, so only plain tensors are read. The checkpoint is damaged or "
                                "not qdylora's: delete it to resume from an earlier one") from None

    def _get_output_dir(self, trial) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        # Build the checkpoint in a hidden staging folder and rename it into place: a crash or a full
        # disk while saving leaves the previous checkpoints as they were and no half-written one.
        # Every process writes its RNG state there, so the folder's name is the same in all of them.
        root = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        main = self.is_world_process_zero()
        self._staging = str(root / f".staging-{name}")
        dest = root / name
        try:
            if main:
                shutil.rmtree(self._staging, ignore_errors=True)
                os.makedirs(self._staging)
                usual_mode(Path(self._staging), is_dir=True)
            self.accelerator.wait_for_everyone()
            # sharded adapters are gathered by every process here; the main one writes them in _save
            self._gathered = adapter_parameters(self.model) if self.sharded else None
            self._fisher_state = self.fisher.state() if self.fisher is not None else None  # every process sums
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
            if main:
                if dest.exists():
                    shutil.rmtree(dest)
                os.replace(Path(self._staging) / name, dest)
        except BaseException as e:
            if isinstance(e, AdapterError) or is_write_failure(e):
                kept = self.last_checkpoint or "none (no checkpoint was written yet)"
                why = str(e) if isinstance(e, AdapterError) else failure_reason(e)
                raise TrainingError(f"saving {name} failed ({why}); last good checkpoint: {kept}. Fix that "
                                    "(free space, a writable folder), then continue with --resume") from None
            raise
        finally:
            if main:
                shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = self._gathered = self._fisher_state = None
        self.last_checkpoint = str(dest)
        if main:
            rotate_checkpoints(root, self.args.save_total_limit, protect=dest)
        self.accelerator.wait_for_everyone()


def _checkpointing_args(on: bool) -> dict:
    """Activation checkpointing under the name this transformers uses (5.x renamed gradient_checkpointing)."""
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}


def _training_args(cfg: TrainConfig, output_dir: str) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported() if cfg.bf16 is None else cfg.bf16
    return TrainingArguments(
        output_dir=output_dir, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_steps, lr_scheduler_type="cosine", weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, optim=resolve_optim(cfg.optim), bf16=bf16,
        **_checkpointing_args(cfg.gradient_checkpointing),
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed, data_seed=cfg.seed, report_to=[], disable_tqdm=True, label_names=["labels"],
        remove_unused_columns=False, logging_nan_inf_filter=False, use_cpu=not cuda,
        # counted in every process and summed: the log's tokens/s is the whole run's
        include_num_input_tokens_seen="non_padding",
        # every adapter tensor gets a gradient in every step (zeros past the rank), none is unused
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )


def train_model(model, tokenizer, train_dataset, cfg: TrainConfig, output_dir: str | os.PathLike,
                resume_from: str | None = None) -> dict[str, Any]:
    """Train any PeftModel (qdylora adapters at the seeded ranks of a RankSchedule); returns a summary dict."""
    cfg.validate()
    output_dir = str(output_dir)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    sharded = bool(fsdp_units(model))
    layers = dylora_layers(model)
    qcfg: QDyLoRAConfig | None = layers[0].qdylora_config if layers else None
    schedule = RankSchedule(model, qcfg, process_index=int(os.environ.get("RANK", "0"))) if qcfg else None
    stop_cb = InterruptCallback()
    # without a tokenizer the examples must already have equal lengths (benchmarks, GPU tests)
    collator = (DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
                if tokenizer is not None else default_data_collator)
    args = _training_args(cfg, output_dir)
    fisher = None
    if cfg.fisher_steps and qcfg is not None:
        check_collectable(qcfg, sharded)
        fisher = FisherCollector(model, max(0, cfg.max_steps - cfg.fisher_steps)).attach()
    optimizer = None
    if schedule is not None:
        lr_scale = component_lr_scales(schedule, cfg)
        optimizer = (ComponentAdamW, dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                          eps=args.adam_epsilon, axes=schedule.axes, active=schedule.active,
                                          lr_scale=lr_scale, **state_settings(resolve_optim(cfg.optim))))
    trainer = QDyLoRATrainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                             callbacks=[stop_cb] + ([SyncCallback(schedule)] if schedule else []),
                             rank_schedule=schedule, optimizer_cls_and_kwargs=optimizer, sharded=sharded,
                             fisher=fisher)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(LogCallback(Path(output_dir) / LOG_NAME, trainer))
    if resume_from:
        trainer.last_checkpoint = str(resume_from)

    def on_signal(signum, frame):
        if stop_cb.requested:
            raise KeyboardInterrupt
        stop_cb.requested = True
        tqdm.write(f"{signal.Signals(signum).name}: finishing this step, saving a checkpoint, then stopping "
                   "(again to abort)")

    handled = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, on_signal) for s in handled} if _main_thread() else {}
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if fisher is not None:
            fisher.detach()
    summary = {"global_step": trainer.state.global_step, "interrupted": stop_cb.requested,
               "train_seconds": round(time.perf_counter() - t0, 2), "tokens_seen": trainer.state.num_input_tokens_seen,
               "last_checkpoint": trainer.last_checkpoint}
    if not stop_cb.requested:
        adapter = Path(output_dir) / ADAPTER_SUBDIR
        if qcfg is not None and qcfg.truncation == "svd":
            sort_components(model)  # every process (under FSDP the sort gathers each layer's factors)
        params = adapter_parameters(model) if sharded and qcfg is not None else None  # every process gathers
        stats = fisher.state() if fisher is not None else None  # every process sums
        try:
            if not trainer.is_world_process_zero():
                pass
            elif qcfg is not None:
                set_rank(model, qcfg.r_max)
                save_adapter(model, adapter, extra={"global_step": trainer.state.global_step}, params=params,
                             files=stats_files(stats))
            else:
                model.save_pretrained(str(adapter))
        except (AdapterError, WriteError) as e:
            raise TrainingError(f"{e} (last good checkpoint: {trainer.last_checkpoint}; --resume writes the adapter "
                                "from it)") from None
        finally:
            trainer.accelerator.wait_for_everyone()
        summary["adapter"] = str(adapter)
    return summary


def component_lr_scales(schedule: RankSchedule, cfg: TrainConfig) -> dict | None:
    """ComponentAdamW's per-component learning-rate factors from the config (None: every factor 1)."""
    rows = cfg.batch_size * cfg.grad_accum
    factors = [f for f in ((schedule.lr_scales(rows, cfg.component_lr_power) if cfg.component_lr_power else None),
                           (schedule.scale_lr_scales(rows) if cfg.scale_lr else None)) if f is not None]
    if not factors:
        return None
    return {p: torch.stack([f[p] for f in factors]).prod(0) for p in factors[0]}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
