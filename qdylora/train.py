"""Training: transformers' Trainer with a rank sampled per optimizer step, safe checkpoints and exact resume."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments, default_data_collator
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from .adapter_io import load_adapter_weights, read_adapter, save_adapter
from .config import QDyLoRAConfig
from .model import dylora_layers, set_rank
from .rank_sampler import RankSampler

LOG_NAME = "train_log.jsonl"
RUN_NAME = "run_config.json"
ADAPTER_SUBDIR = "adapter"
OPTIMIZERS = {"auto", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_8bit"}


class TrainingError(RuntimeError):
    """Training stopped on bad input or a numerical failure; the message says what was kept."""


@dataclass
class TrainConfig:
    """Optimisation settings (what `qdylora train` exposes besides the adapter's own config)."""

    max_steps: int = 60
    learning_rate: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int = 256
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3  # QLoRA's value
    # auto: bitsandbytes paged AdamW 32-bit on CUDA; torch's AdamW on CPU, where bnb's paged optimizer
    # is unpaged anyway and steps each of the many small adapter tensors one Python call at a time
    optim: str = "auto"
    gradient_checkpointing: bool = True
    save_steps: int = 20
    logging_steps: int = 1
    seed: int = 0
    bf16: bool | None = None  # None: bf16 autocast on CUDA, fp32 on CPU

    def validate(self) -> None:
        if self.optim not in OPTIMIZERS:
            raise TrainingError(f"optim={self.optim!r} is unknown; use one of {', '.join(sorted(OPTIMIZERS))}")
        for name in ("max_steps", "batch_size", "grad_accum", "max_seq_len", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.learning_rate > 0:
            raise TrainingError(f"learning_rate={self.learning_rate} must be positive")


class NonFiniteLoss(TrainingError):
    pass


class _RankCallback(TrainerCallback):
    """One rank per optimizer step (all gradient-accumulation micro-steps share it), from (seed, step)."""

    def __init__(self, model, sampler: RankSampler | None) -> None:
        self.model, self.sampler, self.rank = model, sampler, None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.sampler is not None:
            self.rank = self.sampler.sample(state.global_step)
            set_rank(self.model, self.rank)


class _LogCallback(TrainerCallback):
    """tqdm bar (loss, rank, tokens/s) and one JSON line per log event."""

    def __init__(self, log_path: Path, rank_cb: _RankCallback, trainer_ref) -> None:
        self.log_path, self.rank_cb, self.trainer_ref = log_path, rank_cb, trainer_ref
        self.bar = None
        self.t0 = self.tok0 = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)
        self.t0, self.tok0 = time.perf_counter(), self.trainer_ref.tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if "loss" not in logs:
            return
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = (self.trainer_ref.tokens_seen - self.tok0) / dt
        rec = {"step": state.global_step, "loss": logs["loss"], "rank": self.rank_cb.rank,
               "learning_rate": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
               "tokens_per_s": round(tps, 2), "tokens_seen": self.trainer_ref.tokens_seen,
               "elapsed_s": round(dt, 3)}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", rank=self.rank_cb.rank, tok_s=f"{tps:.0f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


class _InterruptCallback(TrainerCallback):
    """First Ctrl-C: finish the current step, save a checkpoint, stop. Second Ctrl-C: stop at once."""

    def __init__(self) -> None:
        self.requested = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True


class QDyLoRATrainer(Trainer):
    """Trainer that saves qdylora adapters, writes checkpoints atomically and stops on a non-finite loss."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tokens_seen = 0
        self._staging: str | None = None
        self.last_checkpoint: str | None = None

    def get_decay_parameter_names(self, model) -> set[str]:
        # create_optimizer tests `name in` this for every parameter; as a list that is quadratic and
        # took 7 s for frozen mode's one-parameter-per-component adapters (27k tensors on SmolLM2)
        return set(super().get_decay_parameter_names(model))

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.tokens_seen += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            kept = self.last_checkpoint or "none (no checkpoint was written yet)"
            raise NonFiniteLoss(
                f"the loss became {loss.item()} at step {self.state.global_step + 1}; training stopped before the "
                f"optimizer step. Last good checkpoint: {kept}. Lower --lr or check the data, then --resume."
            )
        return loss

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if dylora_layers(self.model):
            save_adapter(self.model, Path(output_dir) / ADAPTER_SUBDIR)
        else:
            self.model.save_pretrained(output_dir, safe_serialization=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        adapter = Path(resume_from_checkpoint) / ADAPTER_SUBDIR
        if dylora_layers(self.model) and adapter.is_dir():
            _, tensors = read_adapter(adapter)
            load_adapter_weights(self.model, tensors)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _get_output_dir(self, trial) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        # Build the checkpoint in a hidden staging folder and rename it into place: a crash while
        # saving leaves the previous checkpoints as they were and no half-written one.
        root = self.args.output_dir
        self._staging = tempfile.mkdtemp(prefix=".staging-", dir=root)
        try:
            super()._save_checkpoint(model, trial)
            name = f"checkpoint-{self.state.global_step}"
            dest = Path(root) / name
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(Path(self._staging) / name, dest)
            self.last_checkpoint = str(dest)
        finally:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


def _holds_run(output_dir: Path) -> bool:
    return output_dir.is_dir() and (
        (output_dir / LOG_NAME).exists() or any(output_dir.glob("checkpoint-*")) or (output_dir / ADAPTER_SUBDIR).exists()
    )


def prepare_output_dir(output_dir: str | os.PathLike, resume: bool, overwrite: bool) -> str | None:
    """Check the output folder; returns the checkpoint to resume from (or None)."""
    out = Path(output_dir)
    if resume and overwrite:
        raise TrainingError("--resume and --overwrite contradict each other; pass one")
    if resume:
        last = get_last_checkpoint(str(out)) if out.is_dir() else None
        if last is None:
            raise TrainingError(f"--resume: {out} holds no checkpoint-N folder to resume from; "
                                "run without --resume to start a new run")
        return last
    if _holds_run(out):
        if not overwrite:
            raise TrainingError(f"{out} already holds a training run; pass --resume to continue it, "
                                "--overwrite to replace it, or choose another --output")
        for p in list(out.glob("checkpoint-*")) + [out / ADAPTER_SUBDIR]:
            shutil.rmtree(p, ignore_errors=True)
        for p in (out / LOG_NAME, out / RUN_NAME):
            p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return None


def resolve_optim(optim: str) -> str:
    """The transformers optimizer name for `optim` ('auto': paged AdamW 32-bit on CUDA, torch AdamW on CPU)."""
    if optim != "auto":
        return optim
    return "paged_adamw_32bit" if torch.cuda.is_available() else "adamw_torch"


def _training_args(cfg: TrainConfig, output_dir: str) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported() if cfg.bf16 is None else cfg.bf16
    return TrainingArguments(
        output_dir=output_dir, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_steps, lr_scheduler_type="cosine", weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, optim=resolve_optim(cfg.optim), bf16=bf16,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        save_strategy="steps", save_steps=cfg.save_steps, logging_steps=cfg.logging_steps,
        seed=cfg.seed, data_seed=cfg.seed, report_to=[], disable_tqdm=True, label_names=["labels"],
        remove_unused_columns=False, logging_nan_inf_filter=False, use_cpu=not cuda,
        dataloader_num_workers=0,
    )


def train_model(model, tokenizer, train_dataset, cfg: TrainConfig, output_dir: str | os.PathLike,
                resume_from: str | None = None) -> dict[str, Any]:
    """Train any PeftModel (qdylora adapters sample a rank per step); returns a summary dict."""
    cfg.validate()
    output_dir = str(output_dir)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    layers = dylora_layers(model)
    qcfg: QDyLoRAConfig | None = layers[0].qdylora_config if layers else None
    rank_cb = _RankCallback(model, RankSampler(qcfg) if qcfg else None)
    stop_cb = _InterruptCallback()
    # without a tokenizer the examples must already have equal lengths (benchmarks, GPU tests)
    collator = (DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
                if tokenizer is not None else default_data_collator)
    trainer = QDyLoRATrainer(model=model, args=_training_args(cfg, output_dir), train_dataset=train_dataset,
                             data_collator=collator, callbacks=[rank_cb, stop_cb])
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_LogCallback(Path(output_dir) / LOG_NAME, rank_cb, trainer))
    if resume_from:
        trainer.last_checkpoint = resume_from
        trainer.tokens_seen = _tokens_at(Path(output_dir) / LOG_NAME, int(Path(resume_from).name.split("-")[-1]))

    def on_sigint(signum, frame):
        if stop_cb.requested:
            raise KeyboardInterrupt
        stop_cb.requested = True
        tqdm.write("interrupt: finishing this step, saving a checkpoint, then stopping (Ctrl-C again to abort)")

    old = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    t0 = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
    summary = {"global_step": trainer.state.global_step, "interrupted": stop_cb.requested,
               "train_seconds": round(time.perf_counter() - t0, 2), "tokens_seen": trainer.tokens_seen,
               "last_checkpoint": trainer.last_checkpoint}
    if not stop_cb.requested:
        if qcfg is not None:
            set_rank(model, qcfg.r_max)
            save_adapter(model, Path(output_dir) / ADAPTER_SUBDIR)
        else:
            model.save_pretrained(str(Path(output_dir) / ADAPTER_SUBDIR))
        summary["adapter"] = str(Path(output_dir) / ADAPTER_SUBDIR)
    return summary


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _tokens_at(log_path: Path, step: int) -> int:
    """Tokens seen up to `step`, from the JSONL log (so tokens/s stays right across a resume)."""
    if not log_path.exists():
        return 0
    tokens = 0
    for line in log_path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("step", 0) <= step:
            tokens = rec.get("tokens_seen", tokens)
    return tokens


def read_log(output_dir: str | os.PathLike) -> list[dict]:
    """The JSONL training log as a list of dicts (one per logged step)."""
    path = Path(output_dir) / LOG_NAME
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def train(model: str | None = None, data: str | None = None, output_dir: str = "runs/qdylora",
          qdylora_config: QDyLoRAConfig | None = None, train_config: TrainConfig | None = None,
          resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Load (default: SmolLM2-135M) -> quantize -> attach adapters -> train; mirrors `qdylora train`."""
    from .data import build_dataset, load_records
    from .default_task import default_splits
    from .defaults import load_model_and_tokenizer
    from .model import attach_adapters

    qcfg = qdylora_config or QDyLoRAConfig()
    tcfg = train_config or TrainConfig()
    qcfg.validate()
    tcfg.validate()
    resume_from = prepare_output_dir(output_dir, resume, overwrite)
    if resume_from:
        saved = json.loads((Path(output_dir) / RUN_NAME).read_text())
        qcfg = QDyLoRAConfig.from_dict(saved["qdylora"])
        tcfg = TrainConfig(**{**saved["train"], "max_steps": tcfg.max_steps})
        model, data = saved["model"], saved["data"]
    records = load_records(data) if data else default_splits()[0]
    base, tokenizer = load_model_and_tokenizer(model)
    dataset = build_dataset(records, tokenizer, tcfg.max_seq_len)
    peft_model = attach_adapters(base, qcfg)
    if not resume_from:
        run = {"model": model, "data": data, "qdylora": qcfg.to_dict(), "train": dataclasses.asdict(tcfg)}
        (Path(output_dir) / RUN_NAME).write_text(json.dumps(run, indent=2))
    summary = train_model(peft_model, tokenizer, dataset, tcfg, output_dir, resume_from)
    summary.update(model=peft_model, tokenizer=tokenizer)
    return summary
