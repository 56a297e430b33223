"""Atomic writes: a file or folder appears whole or not at all, an older one survives a crash or a full disk.

Temporary names start with '.' and contain '.tmp-' (folders and files) or '.old-' (a replaced folder on
its way out), so `remove_stale` can tell leftovers of a killed writer from real content. What is
written gets the usual modes (0777 / 0666 minus the umask), not mkdtemp's private 0700 / 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import QDyLoRAError


class WriteError(QDyLoRAError, OSError):
    """Writing failed (full disk, read-only folder, no permission); what existed before is kept."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_mode(path: Path, is_dir: bool) -> None:
    """Give `path` the mode a plain mkdir / open would have given it under the current umask."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def is_write_failure(e: BaseException) -> bool:
    """True for how a full disk or a read-only folder shows up: OSError, or the writers' own errors
    (safetensors' I/O error; torch.save's zip writer reports a short write as 'unexpected pos')."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    if type(e).__name__ == "SafetensorError":
        return "I/O error" in text or "os error" in text
    return isinstance(e, RuntimeError) and ("unexpected pos" in text or "PytorchStreamWriter" in text
                                            or "file write failed" in text)


def failure_reason(e: BaseException) -> str:
    """The short reason of a failed write, e.g. 'No space left on device'."""
    text = str(e)
    return (getattr(e, "reason", None) or getattr(e, "strerror", None) or ("No space left on device" if "os error 28" in text else None)
            or ("a short write: is the disk full?" if "unexpected pos" in text else None)
            or (text.splitlines()[0] if text else type(e).__name__))


def write_error(dest: Path, e: BaseException) -> WriteError:
    """A one-line WriteError for a failed write of `dest`."""
    why = failure_reason(e)
    return WriteError(f"could not write {dest} ({why}); nothing there was replaced. Free space or choose a "
                      "writable folder, then run the command again", why)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; on success it replaces `dest`, on error it is removed."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        usual_mode(tmp, is_dir=True)
    except OSError as e:
        raise write_error(dest, e) from None
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_failure(e) and not isinstance(e, WriteError):
            raise write_error(dest, e) from None
        raise
    for p in tmp.rglob("*"):  # some writers (safetensors) create private 0600 files
        usual_mode(p, p.is_dir())
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON to `path` through a temporary file and a rename."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        usual_mode(Path(tmp), is_dir=False)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, e) from None


def is_stale(name: str) -> bool:
    """True for the name of a leftover temporary file or folder of these writers (or the Trainer's staging)."""
    return name.startswith(".") and (".tmp-" in name or ".old-" in name or name.startswith(".staging-"))


def remove_stale(folder: str | os.PathLike) -> list[str]:
    """Delete leftovers of killed writers directly in `folder`; returns their names."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if is_stale(p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed
