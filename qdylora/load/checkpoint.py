"""The safetensors files of a saved model: which shard holds which tensor, each shard's header checked."""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import ModelLoadError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
RESAVE = "download it again or re-save the model with save_pretrained"


def some_names(names: list[str]) -> str:
    """`a` or `a and N more`: a list of names short enough for one line."""
    return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def has_safetensors(folder: Path) -> bool:
    """True when `folder` holds a safetensors checkpoint transformers would load (index + shards, or one file)."""
    return (folder / INDEX_NAME).is_file() or (folder / SINGLE_NAME).is_file()


def index_weight_map(index: Path) -> dict[str, str]:
    """Tensor name -> shard file, from a safetensors index; ModelLoadError when it is not one."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not a name -> file mapping")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e}); {RESAVE}") from None
    return weight_map


@contextmanager
def open_shard(path: Path, device: str = "cpu") -> Iterator:
    """safetensors' safe_open on `path`; a missing, corrupt or truncated file raises ModelLoadError naming it."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ModelLoadError(f"{path} is missing (the checkpoint's index lists it); {RESAVE}")
    try:
        handle = safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{path} is not a readable safetensors file, probably corrupt or truncated "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); {RESAVE}") from None
    with handle as f:
        yield f


def shard_plan(folder: Path) -> dict[str, list[str]]:
    """Shard file name -> tensor names, from the index (or the single file); every shard's header is read and
    checked, so a missing, corrupt or truncated shard is reported before any weight is loaded."""
    index = folder / INDEX_NAME
    if index.is_file():
        files: dict[str, list[str]] = defaultdict(list)
        for key, fname in index_weight_map(index).items():
            files[fname].append(key)
        for fname, keys in files.items():
            with open_shard(folder / fname) as f:
                absent = sorted(set(keys) - set(f.keys()))
            if absent:
                raise ModelLoadError(f"{folder / fname} lacks {some_names(absent)}, which {INDEX_NAME} places "
                                     f"there; {RESAVE}")
        return dict(files)
    single = folder / SINGLE_NAME
    if single.is_file():
        with open_shard(single) as f:
            return {SINGLE_NAME: list(f.keys())}
    raise ModelLoadError(f"{folder} has neither {INDEX_NAME} nor {SINGLE_NAME}; save the model with "
                         "save_pretrained(..., safe_serialization=True)")
