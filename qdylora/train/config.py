"""TrainConfig: the optimisation settings of a run (what `qdylora train` exposes besides the adapter's own config)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import TrainingError

OPTIMIZERS = ("auto", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_8bit")


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
