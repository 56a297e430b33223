"""Export one rank of a qdylora adapter as a plain peft LoRA that every LoRA consumer loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file

from ..atomic import atomic_dir
from ..errors import AdapterError
from .files import adapter_config, read_adapter

EXPORT_META_NAME = "qdylora_export.json"


def _peft_target_names(paths: list[str]) -> list[str]:
    """Suffix names, as LoRA consumers expect; a same-named module that was not adapted gets peft's B = 0."""
    return sorted({p.rpartition(".")[2] for p in paths})


def check_output(source: Path, output: Path, overwrite: bool, protect: Path | None = None) -> None:
    """Refuse an --output that is a file, is not empty (without overwrite), or lies inside / around what it reads."""
    src, out = source.resolve(), output.resolve()
    keep = (protect or source).resolve()
    for guarded in {src, keep}:
        if out == guarded or guarded in out.parents or out in guarded.parents:
            raise AdapterError(f"--output {output} overlaps {guarded}, which the export reads from; "
                               "choose a folder outside it")
    if output.exists() and not output.is_dir():
        raise AdapterError(f"--output {output} is a file; give a folder path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} already exists and is not empty; choose another --output or pass --overwrite")


def export_peft(adapter_dir: str | os.PathLike, rank: int, output: str | os.PathLike,
                overwrite: bool = False, protect: str | os.PathLike | None = None) -> Path:
    """Write a plain peft LoRA adapter of rank `rank` (A[:rank], B[:, :rank], lora_alpha = alpha).

    `protect` is a folder the output must stay outside of (the run folder the adapter belongs to).
    """
    from peft import LoraConfig

    output = Path(output)
    meta, tensors = read_adapter(adapter_dir)
    cfg = adapter_config(meta, str(adapter_dir))
    rank = cfg.check_rank(rank)
    check_output(Path(adapter_dir), output, overwrite, Path(protect) if protect else None)
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
             "qdylora": meta["qdylora"], "base_model": meta["base_model"]}, indent=2) + "\n")
    return output
