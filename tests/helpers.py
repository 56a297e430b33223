"""Helpers shared by the tests (not a test module): tiny models and tokenizers, data files, error lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# ../shared/data beside the repository (MMLU validation, Alpaca 5k); never copied into the repo
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_MMLU = SHARED_DATA / "mmlu" / "zero_shot_mmlu_val.jsonl"
SHARED_ALPACA = SHARED_DATA / "alpaca" / "alpaca_5000.json"


def needs_shared(path: Path):
    """A skip marker for a test that reads `path` under ../shared/data, naming the missing file."""
    return pytest.mark.skipif(not path.is_file(), reason=f"{path} is missing: this test reads the shared data "
                                                        "folder ../shared/data beside the repository")


def error_line(err: str) -> str:
    """The one error line a failed command printed on stderr (progress bars of loading may precede it)."""
    assert "Traceback" not in err, err
    lines = [line.strip() for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def write_jsonl(path: Path, rows) -> Path:
    """`rows` as JSON Lines at `path`."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# MMLU rows in QLoRA's layout (the header written out: two spaces after "about", as in QLoRA's files)
QLORA_ROWS = [
    {"subject": "algebra", "input": "The following are multiple choice questions (with answers) about  algebra.\n\n"
                                    "What is 1+1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer:", "output": "A"},
    {"subject": "algebra", "input": "The following are multiple choice questions (with answers) about  algebra.\n\n"
                                    "What is 2+2?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer:", "output": "C"},
    {"subject": "biology", "input": "The following are multiple choice questions (with answers) about  biology.\n\n"
                                    "Cells have a?\nA. wheel\nB. membrane\nC. engine\nD. roof\nAnswer:", "output": "B"},
]


# ------------------------------------------------------------------ tiny models

def tiny_llama_config(vocab_size: int = 256, hidden: int = 64, layers: int = 2, **config):
    """A LlamaConfig of a few hundred thousand parameters; `config` sets further fields."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, tie_word_embeddings=False, **config)


def tiny_llama(seed: int = 0, tokenizer=None, **kw):
    """A fresh full-precision tiny Llama with deterministic random weights.

    With `tokenizer`, its vocabulary size and pad / BOS / EOS ids; `kw` goes to tiny_llama_config.
    """
    from transformers import LlamaForCausalLM

    if tokenizer is not None:
        kw = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kw)
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**kw)).eval()


def tiny_nf4(seed: int = 0, **kw):
    """The tiny Llama with every linear but the LM head in NF4 (on CPU)."""
    from qdylora.load.model import load_quantized_model

    return load_quantized_model(tiny_llama(seed, **kw), device="cpu")


# ------------------------------------------------------------------ a word-level tokenizer and adapters on it

WORDS = ("The following are multiple choice questions with answers about algebra biology elementary mathematics "
         "What is 1 2 3 4 5 Cells have a wheel membrane engine roof A B C D E Answer Below an instruction that "
         "describes task Write response appropriately completes the request Instruction Response Input paired "
         "provides further context Name colour of sky blue green sun yellow red grass").split()


def tiny_tokenizer(padding_side: str = "right"):
    """A word-level tokenizer (no network): words, punctuation and digits are one token each."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "</s>"]
    punct = list(".:?+,()#'\n!-")
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + WORDS + punct))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")
    fast.padding_side = padding_side
    return fast


def bpe_tokenizer(bos: bool = False):
    """A byte-level BPE tokenizer (the GPT-2 / Llama 3 / SmolLM2 kind), built offline: every byte is a
    token, plus one merge each for " A".."D", so " A" and "A" are different tokens. With `bos`, its
    post-processor puts "<s>" before every text, as Llama 2's does (add_special_tokens=True)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    letters = [f"\u0120{c}" for c in "ABCD"]  # \u0120 (Ġ): byte-level BPE's spelling of a leading space
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + letters)}
    tok = Tokenizer(models.BPE(vocab, [("\u0120", c) for c in "ABCD"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def randomize_adapters(peft_model, seed: int = 0, scale: float = 0.3) -> None:
    """B starts at zero (every rank = base); give it values so ranks differ."""
    from qdylora.adapters.attach import dylora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in dylora_layers(peft_model):
            for p in layer.lora_dyB[layer.active_adapters[0]]:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def tiny_qdylora(r_max: int = 8, seed: int = 0):
    """(NF4 tiny Llama on tiny_tokenizer() with random QDyLoRA adapters r 1..r_max, that tokenizer)."""
    from qdylora.adapters.attach import attach_adapters
    from qdylora.adapters.config import QDyLoRAConfig
    from qdylora.load.model import load_quantized_model

    tok = tiny_tokenizer()
    base = load_quantized_model(tiny_llama(seed, tokenizer=tok), device="cpu")
    pm = attach_adapters(base, QDyLoRAConfig(r_min=1, r_max=r_max, alpha=16.0))
    randomize_adapters(pm, seed)
    return pm.eval(), tok


def mean_response_loss(model, batches):
    """Mean response-token NLL of calibration batches by plain cross-entropy over the model's logits (independent
    of qdylora's response_sums)."""
    import torch.nn.functional as F

    from qdylora.data.examples import IGNORE_INDEX

    nll, n = 0.0, 0
    for b in batches:
        logits = model(input_ids=b.ids, attention_mask=b.mask).logits[:, :-1]
        target = b.labels[:, 1:]
        keep = target != IGNORE_INDEX
        nll = nll + F.cross_entropy(logits[keep], target[keep], reduction="sum")
        n += int(keep.sum())
    return nll / n


def allocation_model(r_max: int = 8, alpha: float = 16.0, update: str = "nested", r_min: int = 1, seed: int = 0,
                     **config):
    """A tiny NF4 llama with QDyLoRA adapters of seeded random values (every component matters), in eval mode;
    `config` sets further QDyLoRAConfig fields."""
    from qdylora.adapters.attach import attach_adapters, dylora_layers
    from qdylora.adapters.config import QDyLoRAConfig

    model = attach_adapters(tiny_nf4(seed), QDyLoRAConfig(r_min=r_min, r_max=r_max, alpha=alpha, update=update,
                                                          **config))
    g = torch.Generator().manual_seed(5)
    for layer in dylora_layers(model):
        for p in (layer.lora_dyA["default"], layer.lora_dyB["default"]):
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def calibration_batches(n: int = 4, length: int = 10, seed: int = 3):
    """Calibration batches over the tiny vocabulary: the second half of each row is the response, one row padded."""
    from qdylora.allocate.calib import CalibBatch
    from qdylora.data.examples import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    out = []
    for size in (n // 2, n - n // 2):
        ids = torch.randint(1, 256, (size, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        labels = ids.clone()
        labels[:, : length // 2] = IGNORE_INDEX
        labels[mask == 0] = IGNORE_INDEX
        out.append(CalibBatch(ids, mask, labels))
    return out
