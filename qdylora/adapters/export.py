"""Export one rank of a qdylora adapter as a plain peft LoRA that every LoRA consumer loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file

from ..atomic import atomic_dir
from .config import QDyLoRAConfig
from .files import read_adapter

EXPORT_META_NAME = "qdylora_export.json"


def _peft_target_names(paths: list[str]) -> list[str]:
    """Suffix names, as LoRA consumers expect; a same-named module that was not adapted gets peft's B = 0."""
    return sorted({p.rpartition(".")[2] for p in paths})


def export_peft(adapter_dir: str | os.PathLike, rank: int, output: str | os.PathLike,
                overwrite: bool = False) -> Path:
    """Write a plain peft LoRA adapter of rank `rank` (A[:rank], B[:, :rank], lora_alpha = alpha)."""
    from peft import LoraConfig

    meta, tensors = read_adapter(adapter_dir)
    cfg = QDyLoRAConfig.from_dict(meta["qdylora"])
    rank = cfg.check_rank(rank)
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} already exists and is not empty; choose another --output or pass --overwrite")
    targets = list(meta["targets"])
    peft_tensors = {}
    for path in targets:
        A, B = tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"]
        peft_tensors[f"base_model.model.{path}.lora_A.weight"] = A[:rank].contiguous()
        peft_tensors[f"base_model.model.{path}.lora_B.weight"] = B[:, :rank].contiguous()
    names = _peft_target_names(targets)
    lora = LoraConfig(r=rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=names,
                      bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=meta["base_model"].get("name"))
    with atomic_dir(output) as tmp:
        lora.save_pretrained(str(tmp))
        save_file(peft_tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / EXPORT_META_NAME).write_text(json.dumps(
            {"exported_rank": rank, "scale": cfg.alpha / rank, "source": str(Path(adapter_dir).resolve()),
             "qdylora": meta["qdylora"], "base_model": meta["base_model"]}, indent=2))
    return output
