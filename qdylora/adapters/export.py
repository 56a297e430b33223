"""Export a qdylora adapter as a plain peft LoRA that every LoRA consumer loads: one rank, or one rank per module.

DyLoRA scales module m at rank b_m by alpha / b_m; the formats keep exactly that:
- `peft`: A[:b_m], B[:, :b_m], one lora_alpha = alpha and peft's rank_pattern {module: b_m}, so peft's
  lora_alpha / r_m is alpha / b_m (modules at rank 0 are left out of target_modules);
- `uniform`: every module padded with zero components to one rank R (the pattern's largest or
  --pad-to) with B[:, :b_m] * R / b_m, so a consumer that reads only r and lora_alpha (vLLM,
  llama.cpp's converter) computes (alpha / R) (R / b_m) B A = (alpha / b_m) B A, the same output.
An svd-sorted adapter (adapters.svd_sort) runs every rank at alpha / r_max: B is multiplied by b_m / r_max
(peft) or R / r_max (uniform) instead, so both formats again compute the adapter's own output.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from ..atomic import atomic_dir
from ..errors import AdapterError, ConfigError
from .attach import check_module_ranks
from .consumers import (GGUF_CONFIG_DIR, base_config, base_reference, cast_tensors, check_dtype, conv1d_suffixes,
                        gguf_note, peft_config_dict, with_architecture, write_peft_config)
from .files import adapter_config, read_adapter, svd_sorted_meta

EXPORT_META_NAME = "qdylora_export.json"
FORMATS = ("peft", "uniform")


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


def export_format(fmt: str | None, pad_to: int | None) -> str:
    """The format to write: as given, else 'uniform' when padding is asked for and 'peft' otherwise."""
    if fmt is None:
        return "uniform" if pad_to is not None else "peft"
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    if fmt == "peft" and pad_to is not None:
        raise ConfigError("--pad-to pads every module to one rank, which is --format uniform; drop --format peft "
                          "or --pad-to")
    return fmt


def padded_rank(ranks: Mapping[str, int], pad_to: int | None) -> int:
    """The uniform format's rank R: --pad-to, else the pattern's largest (refusing a --pad-to below it)."""
    top = max(ranks.values())
    if pad_to is None:
        return top
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < top:
        raise ConfigError(f"--pad-to {pad_to!r} is below the largest rank to export ({top}); pad to {top} or more "
                          "(e.g. one of vLLM's max_lora_rank values 8, 16, 32, 64)")
    return pad_to


def pattern_tensors(tensors: Mapping[str, torch.Tensor], ranks: Mapping[str, int],
                    pad: int | None, svd_sorted: bool = False) -> dict[str, torch.Tensor]:
    """peft's tensors: per module A[:b], B[:, :b]; with `pad`, zero components up to rank pad and B * pad / b
    (svd-sorted: B * b / r_max, with `pad` B * pad / r_max)."""
    out = {}
    for path, b in ranks.items():
        A, B = tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"]
        if b == 0 and pad is None:
            continue
        # peft runs the written rank at alpha / written; the adapter runs rank b at alpha / b (sorted: alpha / r_max)
        written = pad or b
        fold = written / (A.shape[0] if svd_sorted else max(b, 1))
        if pad is None:
            a_out, b_out = A[:b], (B[:, :b] * fold if fold != 1 else B[:, :b])
        else:
            a_out = torch.zeros(pad, A.shape[1], dtype=A.dtype)
            b_out = torch.zeros(B.shape[0], pad, dtype=B.dtype)
            if b > 0:
                a_out[:b] = A[:b]
                b_out[:, :b] = B[:, :b] * fold
        out[f"base_model.model.{path}.lora_A.weight"] = a_out.contiguous()
        out[f"base_model.model.{path}.lora_B.weight"] = b_out.contiguous()
    return out


def _peft_config(alpha: float, ranks: Mapping[str, int], pad: int | None, ref: str | None, base_cfg) -> dict:
    """adapter_config.json for the export: one r (padded) or r + rank_pattern (the modules that differ)."""
    if pad is not None:
        r, targets, pattern = pad, _peft_target_names(list(ranks)), {}
    else:
        on = {m: b for m, b in ranks.items() if b > 0}
        r = Counter(on.values()).most_common(1)[0][0]
        # full names when some modules are off, so peft adapts exactly the modules that are on
        targets = _peft_target_names(list(on)) if len(on) == len(ranks) else sorted(on)
        pattern = {m: b for m, b in on.items() if b != r}
    conv1d = conv1d_suffixes(base_cfg)
    # peft sets fan_in_fan_out for a Conv1D target (weight stored [in, out]) itself, with a warning; its bnb
    # 4-bit layers ignore it. Writing what peft expects keeps a full-precision GPT-2 base quiet.
    fan_in = bool(conv1d) and all(t.rpartition(".")[2] in conv1d for t in targets)
    return peft_config_dict(ref, alpha, r, targets, pattern, fan_in)


def write_export(adapter_dir: str | os.PathLike, meta: dict, tensors: Mapping[str, torch.Tensor],
                 ranks: Mapping[str, int] | int, output: str | os.PathLike, fmt: str | None = None,
                 pad_to: int | None = None, overwrite: bool = False, protect: str | os.PathLike | None = None,
                 extra: dict | None = None, dtype: str | None = None) -> Path:
    """Write a read adapter (meta, tensors) at one rank (int) or a rank per module ({module: rank}, every
    module) as a peft LoRA in `dtype` (fp32, bf16, fp16; default: the base's compute dtype); see export_ranks.
    Every input is checked before anything is written."""
    output = Path(output)
    cfg = adapter_config(meta, str(adapter_dir))
    targets = list(meta["targets"])
    fmt = export_format(fmt, pad_to)
    dtype = check_dtype(dtype, meta["base_model"])
    if isinstance(ranks, Mapping):
        ranks = check_module_ranks(ranks, targets, cfg, complete=True)
        ranks = {t: ranks[t] for t in targets}
    else:
        ranks = dict.fromkeys(targets, cfg.check_rank(ranks))
    if not any(ranks.values()):
        raise ConfigError("the rank pattern switches every module off; there is no adapter to export")
    pad = padded_rank(ranks, pad_to) if fmt == "uniform" else None
    check_output(Path(adapter_dir), output, overwrite, Path(protect) if protect else None)
    ref = base_reference(meta["base_model"])
    base_cfg = base_config(ref)
    peft_cfg = _peft_config(cfg.alpha, ranks, pad, ref, base_cfg)
    peft_tensors = cast_tensors(pattern_tensors(tensors, ranks, pad, svd_sorted_meta(meta)), dtype)
    params = sum(b * (tensors[f"{m}.lora_A"].shape[1] + tensors[f"{m}.lora_B"].shape[0]) for m, b in ranks.items())
    gguf_cfg = with_architecture(base_cfg) if ref and ref.endswith(".gguf") else None
    note = gguf_note(ref, gguf_cfg is not None)
    info = {"format": fmt, "pad_to": pad, "ranks": ranks, "params": int(params), "dtype": dtype,
            "base_model_name_or_path": ref, **({"base_model_note": note} if note else {}),
            "source": str(Path(adapter_dir).resolve()), "qdylora": meta["qdylora"], "base_model": meta["base_model"],
            **(extra or {})}
    with atomic_dir(output) as tmp:
        write_peft_config(tmp, peft_cfg)
        if gguf_cfg is not None:
            gguf_cfg.save_pretrained(str(tmp / GGUF_CONFIG_DIR))
        save_file(peft_tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / EXPORT_META_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return output


def export_ranks(adapter_dir: str | os.PathLike, ranks: Mapping[str, int] | int, output: str | os.PathLike,
                 fmt: str | None = None, pad_to: int | None = None, overwrite: bool = False,
                 protect: str | os.PathLike | None = None, dtype: str | None = None) -> Path:
    """Write the adapter at one rank (int) or at a rank per module ({module: rank}, every module) as a peft LoRA.

    `fmt` 'peft' (rank_pattern) or 'uniform' (zero-padded to `pad_to` or the largest rank, scales folded
    into B); `protect` is a folder the output must stay outside of (the run folder of the adapter);
    `dtype` fp32, bf16 or fp16 (default: bf16 when the base computed in bf16, else fp32).
    """
    meta, tensors = read_adapter(adapter_dir)
    return write_export(adapter_dir, meta, tensors, ranks, output, fmt, pad_to, overwrite, protect, dtype=dtype)


def export_peft(adapter_dir: str | os.PathLike, rank: int, output: str | os.PathLike,
                overwrite: bool = False, protect: str | os.PathLike | None = None,
                pad_to: int | None = None, dtype: str | None = None) -> Path:
    """Write a plain peft LoRA adapter of rank `rank` (A[:rank], B[:, :rank], lora_alpha = alpha);
    with `pad_to`, zero-padded to that rank with the scale ratio folded into B; `dtype` as in export_ranks.

    `protect` is a folder the output must stay outside of (the run folder the adapter belongs to).
    """
    meta, tensors = read_adapter(adapter_dir)
    cfg = adapter_config(meta, str(adapter_dir))
    rank = cfg.check_rank(rank)
    return write_export(adapter_dir, meta, tensors, rank, output, None, pad_to, overwrite, protect,
                        extra={"exported_rank": rank, "scale": cfg.scale(rank, svd_sorted_meta(meta))}, dtype=dtype)


def export_pattern(adapter_dir: str | os.PathLike, pattern, output: str | os.PathLike, fmt: str | None = None,
                   pad_to: int | None = None, overwrite: bool = False,
                   protect: str | os.PathLike | None = None, dtype: str | None = None) -> Path:
    """Write a rank pattern (a RankPattern, or the path of its JSON file) of the adapter as a peft LoRA
    (`dtype` as in export_ranks)."""
    from ..allocate.pattern import RankPattern, check_pattern, costs_from_tensors, read_pattern

    if not isinstance(pattern, RankPattern):
        pattern = read_pattern(pattern)
    meta, tensors = read_adapter(adapter_dir)
    check_pattern(pattern, costs_from_tensors(list(meta["targets"]), tensors), adapter_config(meta, str(adapter_dir)))
    return write_export(adapter_dir, meta, tensors, pattern.ranks, output, fmt, pad_to, overwrite, protect,
                        extra={"pattern": pattern.path, "score": pattern.score, "budget": pattern.budget}, dtype=dtype)
