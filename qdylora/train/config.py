"""TrainConfig: the optimisation settings of a run (what `qdylora train` exposes besides the adapter's own config)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, check_float, check_int

OPTIMIZERS = ("auto", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_8bit")
QUANT_STORAGES = ("auto", "uint8", "bfloat16", "float16", "float32")
# the command-line flag of each setting, for messages
FLAGS = {"max_steps": "--max-steps", "learning_rate": "--lr", "batch_size": "--batch-size",
         "grad_accum": "--grad-accum", "max_seq_len": "--max-seq-len", "warmup_steps": "--warmup-steps",
         "weight_decay": "--weight-decay", "max_grad_norm": "--max-grad-norm", "optim": "--optim",
         "save_steps": "--save-steps", "save_total_limit": "--save-total-limit", "logging_steps": "--logging-steps",
         "seed": "--seed", "fisher_steps": "--fisher-steps"}


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
    max_grad_norm: float = 0.3  # QLoRA's value; 0 turns clipping off
    # auto: paged AdamW 32-bit on CUDA; plain AdamW on CPU, where bitsandbytes does not page. Adapters are
    # stepped by ComponentAdamW with the state this name describes (train.optimizer.state_settings)
    optim: str = "auto"
    gradient_checkpointing: bool = True
    save_steps: int = 20
    save_total_limit: int = 3  # checkpoints kept (the newest ones); the final adapter is kept besides
    logging_steps: int = 1
    seed: int = 0
    bf16: bool | None = None  # None: bf16 autocast on CUDA, fp32 on CPU
    # learning rate of component k times (p_max / p_k) ** power, p_k the chance a step trains it (0: off)
    component_lr_power: float = 0.0
    # learning rate of component k times rms / mean of the scale its gradient has per step (Adam's view)
    scale_lr: bool = False
    fsdp: bool = False  # shard with FSDP2 over the launcher's processes (train.sharding); else DDP
    quant_storage: str = "auto"  # the packed NF4 bytes' dtype; auto: uint8, the compute dtype with fsdp
    # the last N steps gather fisher statistics for `qdylora allocate --score fisher-train` (0: none)
    fisher_steps: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the flag and the allowed values."""
        if self.optim not in OPTIMIZERS:
            raise ConfigError(f"--optim {self.optim!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
        for name in ("max_steps", "batch_size", "grad_accum", "max_seq_len", "save_steps", "save_total_limit",
                     "logging_steps"):
            check_int(name, getattr(self, name), 1, FLAGS[name])
        check_int("warmup_steps", self.warmup_steps, 0, FLAGS["warmup_steps"])
        check_int("seed", self.seed, 0, FLAGS["seed"])
        check_int("fisher_steps", self.fisher_steps, 0, FLAGS["fisher_steps"])
        check_float("learning_rate", self.learning_rate, 0.0, strict=True, flag=FLAGS["learning_rate"])
        check_float("weight_decay", self.weight_decay, 0.0, flag=FLAGS["weight_decay"])
        check_float("max_grad_norm", self.max_grad_norm, 0.0, flag=FLAGS["max_grad_norm"])
        check_float("component_lr_power", self.component_lr_power, 0.0, flag="component_lr_power")
        if self.quant_storage not in QUANT_STORAGES:
            raise ConfigError(f"--quant-storage {self.quant_storage!r} is unknown; use one of {', '.join(QUANT_STORAGES)}")
        if self.scale_lr not in (True, False):
            raise ConfigError(f"scale_lr={self.scale_lr!r} must be True or False")
        if self.fsdp not in (True, False):
            raise ConfigError(f"fsdp={self.fsdp!r} must be True or False")
        if self.bf16 not in (None, True, False):
            raise ConfigError(f"bf16={self.bf16!r} must be True, False or None (automatic)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}
