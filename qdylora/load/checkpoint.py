"""The safetensors files of a saved model: which shard holds which tensor, each shard's header checked,
and reading a shard one tensor at a time into memory of its own.

safetensors' safe_open maps the whole file: every page a tensor is read from stays mapped, and
counted in the process's RSS, until the file is closed, so RSS grows by a whole shard (by the whole
model for a single-file checkpoint). `read_tensors` reads each tensor with plain file reads
instead, from the offsets of the header safe_open has checked: RSS grows by one tensor.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch

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


# safetensors dtype names -> torch dtypes (the format is little-endian, as are the machines torch runs on)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_tensors(path: Path, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, CPU tensor) for each of `keys` in shard `path`, in file order, each in a buffer of its own.

    Call after shard_plan has checked the shard. Tensors of a dtype not listed in DTYPES are read
    through safe_open.
    """
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        start = 8 + size
        for key in sorted(keys, key=lambda k: header[k]["data_offsets"][0]):
            info = header[key]
            dtype = DTYPES.get(info["dtype"])
            if dtype is None:
                with open_shard(path) as g:
                    yield key, g.get_tensor(key)
                continue
            begin, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=dtype)
            buf = t.view(-1).view(torch.uint8).numpy() if t.numel() else bytearray()
            f.seek(start + begin)
            if f.readinto(buf) != end - begin or len(buf) != end - begin:
                raise ModelLoadError(f"{path} ends inside tensor {key}; the file is truncated; {RESAVE}")
            yield key, t
