"""Data: the three record kinds, prompt formats, response-only labels, and clear errors."""

from __future__ import annotations

import json

import pytest

from helpers import SHARED_ALPACA, bpe_tokenizer, needs_shared
from qdylora.data import IGNORE_INDEX, DataError, build_dataset, format_example, load_records, tokenize_example
from qdylora.data.embedded_task import default_splits, make_task


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_reads_json_array_jsonl_text_and_messages(tmp_path):
    a = _write(tmp_path / "a.json", json.dumps([{"instruction": "hi", "input": "", "output": "yo"}]))
    b = _write(tmp_path / "b.jsonl", '{"text": "plain"}\n\n{"messages": [{"role": "user", "content": "q"}, '
                                     '{"role": "assistant", "content": "a"}]}\n')
    assert load_records(a) == [{"instruction": "hi", "input": "", "output": "yo"}]
    assert [sorted(r) for r in load_records(b)] == [["text"], ["messages"]]


@needs_shared(SHARED_ALPACA)
def test_shared_alpaca_file_loads():
    recs = load_records(SHARED_ALPACA)
    assert len(recs) == 5000 and {"instruction", "input", "output"} <= set(recs[0])


@pytest.mark.parametrize("name,text,match", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"bad.jsonl, line 2: not valid JSON"),
    ("fields.jsonl", '{"text": "ok"}\n{"prompt": "x", "completion": "y"}\n',
     r"fields.jsonl, line 2: record has fields \['completion', 'prompt'\]; each record needs `instruction`"),
    ("empty.jsonl", "\n\n", r"holds no records"),
    ("msgs.jsonl", '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}\n',
     r"line 1: the last message must be the assistant's answer"),
    ("arr.json", '[{"instruction": "a", "output": 3}]', r"arr.json, record 1: field `output` must be a string"),
])
def test_malformed_data_names_file_and_line(tmp_path, name, text, match):
    with pytest.raises(DataError, match=match):
        load_records(_write(tmp_path / name, text))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist; check the path"):
        load_records(str(tmp_path / "nope.jsonl"))


def test_chat_template_prompt_and_response_only_labels(tokenizer):
    prompt, response = format_example({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, tokenizer)
    assert prompt.endswith("<|im_start|>assistant\n") and "Add 2 and 3." in prompt
    assert response == "5" + tokenizer.eos_token
    ex = tokenize_example(prompt, response, tokenizer, 512)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert tokenizer.decode(ex["input_ids"][n_prompt:]) == response


@pytest.mark.parametrize("record", [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
                                    {"text": "plain text"}], ids=["alpaca", "text"])
def test_examples_start_with_the_bos_the_tokenizer_adds(record):
    """A tokenizer whose post-processor adds BOS (Llama 2's kind): every example starts with it once,
    the same ids as tokenizing the whole text with the tokenizer's defaults; labels mask BOS + prompt."""
    tok = bpe_tokenizer(bos=True)
    prompt, response = format_example(record, tok)
    assert not prompt.startswith("<s>")
    ex = tokenize_example(prompt, response, tok, 512)
    assert ex["input_ids"] == tok(prompt + response)["input_ids"]
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"][1] != tok.bos_token_id
    n_prompt = len(tok(prompt)["input_ids"]) if prompt else 1  # BOS (+ the prompt's tokens)
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == tok(response, add_special_tokens=False)["input_ids"]


def test_chat_template_that_writes_bos_gets_no_second_one():
    tok = bpe_tokenizer(bos=True)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    prompt, response = format_example({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, tok)
    assert prompt == "<s><user>Add 2 and 3.\n<assistant>" and response == "5</s>"
    ex = tokenize_example(prompt, response, tok, 512)
    # the template's "<s>" is the BOS token: the text's own ids, BOS once
    assert ex["input_ids"] == tok(prompt + response, add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"].count(tok.bos_token_id) == 1


def test_alpaca_format_without_chat_template(tokenizer):
    class NoTemplate:
        chat_template = None
        eos_token = "</s>"

    prompt, response = format_example({"instruction": "Sum", "input": "1 2", "output": "3"}, NoTemplate())
    assert "### Instruction:\nSum\n\n### Input:\n1 2\n\n### Response:\n" in prompt and response == "3</s>"


def test_prompt_longer_than_max_len_leaves_no_example(tokenizer):
    recs = [{"instruction": "word " * 300, "input": "", "output": "x"}]
    with pytest.raises(DataError, match="no example has a response token within max_seq_len=32"):
        build_dataset(recs, tokenizer, 32)


def test_default_task_is_reproducible_and_split_disjoint():
    assert make_task(20, seed=3) == make_task(20, seed=3)
    train, held = default_splits(200, 40)
    assert len(held) == 40
    assert not {(r["instruction"], r["input"]) for r in held} & {(r["instruction"], r["input"]) for r in train}
    for r in make_task(50):
        if "+" in r["instruction"]:
            a, b = r["instruction"].split("What is ")[1].split("?")[0].split(" + ")
            assert r["output"] == str(int(a) + int(b))
