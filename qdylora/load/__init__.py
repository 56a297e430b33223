"""Load a causal LM and store its linears in NF4: from a hub id, a folder, a .gguf file or the embedded default."""

from .model import load_model_and_tokenizer, load_quantized_model, load_tokenizer
from .quantize import quantize_model
from .source import ModelSource, resolve_model

__all__ = ["load_model_and_tokenizer", "load_quantized_model", "load_tokenizer", "quantize_model", "ModelSource",
           "resolve_model"]
