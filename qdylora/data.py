"""Training data: read records, turn them into (prompt, response) text, tokenize with response-only labels.

Record kinds: Alpaca (`instruction`, optional `input`, `output`), plain text (`text`), chat
(`messages`: a list of {role, content}, the last one the assistant's answer). Files: a JSON array,
JSON Lines, or a Hugging Face dataset name (online only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Used when the tokenizer has no chat template: the Stanford Alpaca prompt format.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
IGNORE_INDEX = -100


class DataError(ValueError):
    """The data is missing or malformed; the message names the file, the line and the fix."""


def _record_kind(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return None
    if "messages" in rec:
        return "messages"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "text" in rec:
        return "text"
    return None


def _check_record(rec: Any, where: str) -> None:
    kind = _record_kind(rec)
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


def load_records(source: str | os.PathLike, split: str = "train") -> list[dict]:
    """Records from a .json / .jsonl file or a Hugging Face dataset name; errors name file and line."""
    path = Path(source)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        records: list[tuple[str, Any]] = []
        stripped = text.lstrip()
        if path.suffix == ".json" and stripped.startswith("["):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); fix the file or use JSON Lines") from e
            records = [(f"{path}, record {i + 1}", r) for i, r in enumerate(data)]
        else:
            for i, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    records.append((f"{path}, line {i}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {i}: not valid JSON ({e.msg}); each line must be one JSON object") from e
        for where, rec in records:
            _check_record(rec, where)
        if not records:
            raise DataError(f"{path} holds no records; give a file with at least one example")
        return [r for _, r in records]
    if path.suffix in (".json", ".jsonl") or os.sep in str(source) or path.exists():
        raise DataError(f"data file {source} does not exist; check the path (or pass a Hugging Face dataset name)")
    try:
        from datasets import load_dataset

        ds = load_dataset(str(source), split=split)
    except Exception as e:
        raise DataError(f"could not load dataset '{source}' ({type(e).__name__}: {e}). Offline, pass a local "
                        ".json/.jsonl file instead") from e
    records = [dict(r) for r in ds]
    if not records:
        raise DataError(f"dataset '{source}' split '{split}' is empty")
    for i, rec in enumerate(records):
        _check_record(rec, f"dataset {source}, row {i + 1}")
    return records


def format_example(record: dict, tokenizer) -> tuple[str, str]:
    """(prompt, response): the chat template when the tokenizer has one, else the Alpaca format."""
    kind = _record_kind(record)
    eos = tokenizer.eos_token or ""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if kind == "text":
        return "", record["text"] + eos
    if kind == "alpaca":
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        if has_template:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                   add_generation_prompt=True)
        else:
            ctx = ", paired with an input that provides further context" if record.get("input") else ""
            input_block = f"### Input:\n{record['input']}\n\n" if record.get("input") else ""
            prompt = ALPACA_PROMPT.format(ctx=ctx, instruction=record["instruction"], input_block=input_block)
        return prompt, record["output"] + eos
    msgs = record["messages"]
    if has_template:
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    else:
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in msgs[:-1]) + "assistant: "
    return prompt, msgs[-1]["content"] + eos


def tokenize_example(prompt: str, response: str, tokenizer, max_seq_len: int) -> dict[str, list[int]] | None:
    """input_ids / labels (prompt tokens masked to -100), cut to max_seq_len; None if no response token fits."""
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    if not p_ids and tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        p_ids = [tokenizer.bos_token_id]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    ids = (p_ids + r_ids)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(p_ids) + r_ids)[:max_seq_len]
    if all(l == IGNORE_INDEX for l in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def build_dataset(records: list[dict], tokenizer, max_seq_len: int):
    """A datasets.Dataset of tokenized examples; raises DataError when nothing is left to train on."""
    from datasets import Dataset

    rows, skipped = [], 0
    for rec in records:
        ex = tokenize_example(*format_example(rec, tokenizer), tokenizer, max_seq_len)
        if ex is None:
            skipped += 1
        else:
            rows.append(ex)
    if not rows:
        raise DataError(f"no example has a response token within max_seq_len={max_seq_len} "
                        f"({skipped} skipped); raise --max-seq-len or shorten the prompts")
    return Dataset.from_list(rows)
