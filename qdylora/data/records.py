"""Reading training and evaluation data: JSON arrays, JSON Lines, parquet or a hub dataset, with errors that name file and line.

Record kinds: Alpaca (`instruction`, optional `input`, `output`), plain text (`text`), chat
(`messages`: a list of {role, content}, the last one the assistant's answer).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import DataError


def record_kind(rec: Any) -> str | None:
    """'messages', 'alpaca' or 'text' for a record of that kind, else None."""
    if not isinstance(rec, dict):
        return None
    if "messages" in rec:
        return "messages"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "text" in rec:
        return "text"
    return None


def check_record(rec: Any, where: str) -> None:
    """DataError naming `where` unless `rec` is a well-formed record of a known kind."""
    kind = record_kind(rec)
    if kind is None:
        keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
        raise DataError(
            f"{where}: record has fields {keys}; each record needs `instruction` and `output` "
            "(Alpaca), `text`, or `messages` (chat)"
        )
    if kind == "messages":
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer (role 'assistant')")
    elif kind == "alpaca":
        for f in ("instruction", "output"):
            if not isinstance(rec[f], str):
                raise DataError(f"{where}: field `{f}` must be a string")
    elif not isinstance(rec["text"], str):
        raise DataError(f"{where}: field `text` must be a string")


def decode_text(path: Path) -> str:
    """The text of `path` (UTF-8, or UTF-16 with its byte-order mark); DataError for binary or other encodings."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise DataError(f"{path} is a folder; pass a .json or .jsonl file") from None
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}); check the path and its permissions") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    if b"\x00" in raw[:4096]:
        raise DataError(f"{path} is binary, not text; give a JSON array or JSON Lines file (UTF-8)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "re-save it as UTF-8") from None


def read_rows(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """(where, row) pairs from a JSON array, a JSON Lines or a parquet file; `where` names file and line."""
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pandas as pd

            frame = pd.read_parquet(path)
        except Exception as e:
            raise DataError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None
        return [(f"{path}, row {i + 1}", r) for i, r in enumerate(frame.to_dict("records"))]
    text = decode_text(path)
    if text.lstrip().startswith("["):  # one JSON array, whatever the file is called
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); the file starts with '[' "
                            "so it must be one JSON array (or write one object per line, JSON Lines)") from None
        return [(f"{path}, record {i + 1}", r) for i, r in enumerate(data)]
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}, line {i}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {i}: not valid JSON ({e.msg}); each line must be one JSON object "
                            "(JSON Lines), or the whole file one JSON array") from None
    return rows


def looks_like_hub_id(source: str) -> bool:
    """'name' or 'owner/name' without a file suffix or a path prefix: a Hugging Face hub id."""
    parts = source.split("/")
    return (0 < len(parts) <= 2 and all(parts) and not source.startswith((".", "~"))
            and Path(source).suffix not in (".json", ".jsonl", ".parquet", ".csv", ".txt"))


def load_records(source: str | os.PathLike, split: str = "train") -> list[dict]:
    """Records from a .json / .jsonl file or a Hugging Face dataset name; errors name file and line."""
    path = Path(source)
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass a .json or .jsonl file (or a Hugging Face dataset name)")
    if path.is_file():
        records = read_rows(path)
        for where, rec in records:
            check_record(rec, where)
        if not records:
            raise DataError(f"{path} holds no records; give a file with at least one example")
        return [r for _, r in records]
    if not looks_like_hub_id(str(source)):
        raise DataError(f"data file {source} does not exist; check the path (or pass a Hugging Face dataset "
                        "name such as tatsu-lab/alpaca)")
    try:
        from datasets import load_dataset

        ds = load_dataset(str(source), split=split)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"could not load dataset '{source}' ({type(e).__name__}: {first}); there is no local file "
                        "of that name, and offline only a local .json/.jsonl file works") from None
    records = [dict(r) for r in ds]
    if not records:
        raise DataError(f"dataset '{source}' split '{split}' is empty")
    for i, rec in enumerate(records):
        check_record(rec, f"dataset {source}, row {i + 1}")
    return records
