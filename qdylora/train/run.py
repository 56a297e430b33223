"""`train`: load -> quantize -> attach adapters -> train into a run folder; what `qdylora train` calls."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..adapters.config import QDyLoRAConfig
from .config import TrainConfig
from .run_folder import RUN_NAME, prepare_output_dir
from .trainer import train_model


def train(model: str | None = None, data: str | None = None, output_dir: str = "runs/qdylora",
          qdylora_config: QDyLoRAConfig | None = None, train_config: TrainConfig | None = None,
          resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Load (default: SmolLM2-135M) -> quantize -> attach adapters -> train; mirrors `qdylora train`."""
    from ..adapters.attach import attach_adapters
    from ..data.embedded_task import default_splits
    from ..data.examples import build_dataset
    from ..data.records import load_records
    from ..load.model import load_model_and_tokenizer

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
