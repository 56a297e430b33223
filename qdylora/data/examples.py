"""Examples from records: (prompt, response) text by the chat template or the Alpaca format, tokens with response-only labels."""

from __future__ import annotations

from ..errors import DataError
from .records import record_kind

# Used when the tokenizer has no chat template: the Stanford Alpaca prompt format.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
IGNORE_INDEX = -100


def format_example(record: dict, tokenizer) -> tuple[str, str]:
    """(prompt, response): the chat template when the tokenizer has one, else the Alpaca format."""
    kind = record_kind(record)
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


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text by default (e.g. Llama's BOS); [] for most chat tokenizers."""
    cached = getattr(tokenizer, "_qdylora_leading_ids", None)
    if cached is None:
        with_special = tokenizer("a")["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        cached = with_special[:len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []
        try:
            tokenizer._qdylora_leading_ids = cached
        except AttributeError:
            pass
    return list(cached)


def tokenize_example(prompt: str, response: str, tokenizer, max_seq_len: int) -> dict[str, list[int]] | None:
    """input_ids / labels (prompt tokens masked to -100), cut to max_seq_len; None if no response token fits.

    The tokenizer's default leading ids (BOS) start every example, as they start MMLU prompts and
    generation, unless the prompt text (a chat template) already begins with them.
    """
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    lead = leading_special_ids(tokenizer)
    if lead and p_ids[:len(lead)] != lead:
        p_ids = lead + p_ids
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    ids = (p_ids + r_ids)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(p_ids) + r_ids)[:max_seq_len]
    if all(l == IGNORE_INDEX for l in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def build_dataset(records: list[dict], tokenizer, max_seq_len: int):
    """A datasets.Dataset of tokenized examples; raises DataError when nothing is left to train on."""
    from datasets import Dataset

    rows, skipped, empty = [], 0, 0
    for rec in records:
        prompt, response = format_example(rec, tokenizer)
        empty += response == (tokenizer.eos_token or "")
        ex = tokenize_example(prompt, response, tokenizer, max_seq_len)
        if ex is None:
            skipped += 1
        else:
            rows.append(ex)
    if empty == len(records):
        raise DataError(f"every example's output is empty ({empty} records): there is nothing to learn but the "
                        "end-of-sequence token; check the data's output / assistant field")
    if not rows:
        raise DataError(f"no example has a response token within max_seq_len={max_seq_len} "
                        f"({skipped} skipped); raise --max-seq-len or shorten the prompts")
    return Dataset.from_list(rows)
