"""Low-memory loading: NF4 as the shards are read, peak RSS well below the bf16 size, same model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qdylora.errors import ModelLoadError
from qdylora.load.quantize import quantizable_linear_names as quantizable_linears
from qdylora.load.sharded import (load_quantized_sharded, quantize_linear_chunked,
                                 quantize_random_init)
from qdylora.load.quantize import check_nf4_storage, quantize_linear, quantize_model

ROOT = Path(__file__).resolve().parents[1]


def _llama(hidden, inter, layers, vocab, tied, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=vocab, tie_word_embeddings=tied,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def _normally_loaded(path):
    """transformers' from_pretrained in bf16, then quantize_model: the reference for the sharded loader."""
    from transformers import AutoModelForCausalLM

    return quantize_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16), "cpu")


def _run_py(code: str, cwd: Path) -> str:
    """Run `code` in a fresh interpreter (outside the repo root: its kernels/ folder shadows a hub package)."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("shape,bias,dtype", [((2048, 512), False, torch.bfloat16), ((300, 200), True, torch.float32),
                                              ((129, 70), False, torch.bfloat16)])
def test_chunked_quantization_is_bit_identical(shape, bias, dtype):
    lin = torch.nn.Linear(shape[1], shape[0], bias=bias, dtype=dtype)
    ref = quantize_linear(lin, "cpu", torch.float32)
    # several chunks per weight, whole blocks of 64 except the last one of the (129, 70) weight
    got = quantize_linear_chunked(lin.weight, lin.bias, torch.float32, chunk_values=max(4096, lin.weight.numel() // 6))
    check_nf4_storage(got)
    a, b = ref.weight.quant_state, got.weight.quant_state
    assert torch.equal(ref.weight.data, got.weight.data)
    for x, y in ((a.absmax, b.absmax), (a.offset, b.offset), (a.code, b.code), (a.state2.absmax, b.state2.absmax),
                 (a.state2.code, b.state2.code)):
        assert torch.equal(x, y)
    x = torch.randn(3, shape[1])
    assert torch.equal(ref(x), got(x))


@pytest.mark.parametrize("tied", [True, False])
def test_sharded_load_equals_quantize_model(tmp_path, tied):
    m = _llama(128, 256, 2, 512, tied)
    m.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    got = load_quantized_sharded(tmp_path, "cpu")
    ref = _normally_loaded(tmp_path)
    import bitsandbytes as bnb

    four_bit = [mod for mod in got.modules() if isinstance(mod, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7 and quantizable_linears(got) == []  # every linear but the head
    for mod in four_bit:
        check_nf4_storage(mod)
    assert (got.lm_head.weight is got.model.embed_tokens.weight) == tied
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)


def test_single_file_and_errors(tmp_path):
    m = _llama(64, 128, 1, 256, True)
    m.save_pretrained(tmp_path / "one")  # one model.safetensors
    got = load_quantized_sharded(tmp_path / "one" / "config.json", "cpu")  # a file inside the folder works too
    ref = _normally_loaded(tmp_path / "one")
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)
    with pytest.raises(ModelLoadError, match="config.json"):
        load_quantized_sharded(tmp_path, "cpu")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_quantized_sharded(tmp_path / "empty", "cpu")


def test_missing_tensor_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    m = _llama(64, 128, 1, 256, False)
    m.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.0.mlp.up_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="mlp.up_proj.weight.*not in the checkpoint"):
        load_quantized_sharded(tmp_path, "cpu")


@pytest.fixture(scope="module", params=["10MB", "1GB"], ids=["shards", "single-file"])
def sharded_checkpoint(tmp_path_factory, request):
    """A ~100 MB bf16 Llama (12 layers, hidden 512), tied embeddings, in 10 MB shards or one file."""
    path = tmp_path_factory.mktemp("sharded")
    m = _llama(512, 2048, 12, 1024, True)
    bf16_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    m.save_pretrained(path, max_shard_size=request.param)
    del m
    return path, bf16_bytes


def test_sharded_load_peak_rss_below_half_the_bf16_size(sharded_checkpoint, tmp_path):
    # a single file is the hard case: mapped whole (safe_open), all of it would count in RSS
    path, bf16_bytes = sharded_checkpoint
    assert len(list(path.glob("*.safetensors"))) >= 8 or (path / "model.safetensors").stat().st_size > 0.9 * bf16_bytes
    out = _run_py(f"""
        import ctypes, json, resource
        import torch, transformers, bitsandbytes
        import transformers.models.llama.modeling_llama
        from qdylora.load.sharded import load_quantized_sharded, quantize_linear_chunked
        from qdylora.memory.measure import nf4_model_bytes
        # warm up lazily loaded libraries (bitsandbytes' CPU ops) so they are part of the baseline
        quantize_linear_chunked(torch.nn.Linear(128, 128).weight, None, torch.float32)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        m = load_quantized_sharded({str(path)!r}, "cpu")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"extra": (peak - base) * 1024, "model": nf4_model_bytes(m)}}))
    """, tmp_path)
    r = json.loads(out.strip().splitlines()[-1])
    # the 4-bit model is ~27% of the bf16 size; the load may add one chunk's scratch and a few pages
    assert r["model"] < 0.3 * bf16_bytes
    assert r["extra"] < 0.5 * bf16_bytes, f"peak extra RSS {r['extra'] / 2**20:.1f} MiB vs bf16 {bf16_bytes / 2**20:.1f} MiB"


def test_quantize_random_init_tiny_falcon():
    from qdylora.memory.architecture import config_from_dict, load_config_dict

    d, src = load_config_dict("tiny-falcon")
    model = quantize_random_init(config_from_dict(d, src), "cpu", compute_dtype=torch.float32, dtype=torch.float32)
    import bitsandbytes as bnb

    lin = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(lin) == 4 * d["num_hidden_layers"]  # FalconLinear subclasses nn.Linear: all quantized
    for m in lin:
        check_nf4_storage(m)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight  # falcon ties its head
    assert not any(p.device.type == "meta" for p in model.parameters())
    with torch.no_grad():
        logits = model(torch.randint(0, d["vocab_size"], (1, 8))).logits
    assert torch.isfinite(logits).all()


def test_falcon_benchmark_help_and_wiring(tmp_path):
    script = ROOT / "benchmarks" / "falcon40b_32gb.py"
    r = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--layers" in r.stdout and "set_per_process_memory_fraction" in r.stdout
    # the same code path on the tiny Falcon config (the full-width --layers 2 CPU smoke run takes minutes)
    out = tmp_path / "tiny.json"
    r = subprocess.run([sys.executable, str(script), "--config", "tiny-falcon", "--seq-len", "16", "--steps", "2",
                        "--output", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert [s["rank"] for s in res["steps"]][0] == 64
    for name, v in res["planned_vs_measured"].items():
        assert 0.85 < v["ratio"] < 1.15, (name, v)


# Hash of every NF4 layer's storage (packed bytes, both absmax levels, offset, shape, dtype), by base name.
NF4_DIGEST = '''
def nf4_digest(model):
    import hashlib
    from qdylora.load.quantize import packed_nf4, quantized_linears
    h = hashlib.sha256()
    for name, layer in sorted((n.replace(".base_layer", ""), m) for n, m in quantized_linears(model).items()):
        w, qs = packed_nf4(layer)
        h.update(name.encode() + str((tuple(qs.shape), qs.dtype, qs.blocksize)).encode())
        for t in (w, qs.absmax, qs.offset, qs.state2.absmax, qs.state2.code, qs.code):
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
'''


def _byte_tokenizer(path: Path) -> None:
    """A 258-token byte-level tokenizer (no network): the embeddings stay small beside the linears."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab |= {"<s>": 256, "</s>": 257}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)


def _save_llama(path: Path, hidden: int, inter: int, layers: int, shard: str) -> int:
    """A random bf16 Llama (byte vocabulary) saved in safetensors shards; returns its bf16 bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=258, bos_token_id=256, eos_token_id=257,
                      tie_word_embeddings=False, max_position_embeddings=128)
    with torch.device("meta"):
        m = LlamaForCausalLM(cfg)
    m = m.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a random init without transformers' slow per-module initializers
        for p in m.parameters():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0, 0.02, generator=gen)
    m.save_pretrained(path, max_shard_size=shard)
    _byte_tokenizer(path)
    return sum(p.numel() * p.element_size() for p in m.parameters())


def test_training_from_shards_keeps_peak_rss_below_0_6x_bf16(tmp_path):
    """`qdylora train` on a ~270 MB bf16 Llama in 20 MB shards: peak RSS growth over load + a training step
    stays under 0.6x the bf16 size (from_pretrained + quantize took ~3x), and the NF4 bytes are the old path's."""
    from transformers import AutoModelForCausalLM

    big, tiny = tmp_path / "big", tmp_path / "tiny"
    bf16 = _save_llama(big, 1024, 2816, 12, "20MB")
    _save_llama(tiny, 64, 128, 1, "20MB")
    assert len(list(big.glob("model-*.safetensors"))) >= 10
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} is followed by {i + 1}."}) + "\n" for i in range(8)))
    out = _run_py(NF4_DIGEST + f"""
import json, sys
import torch
import qdylora.cli
import qdylora.load.model as lm

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

loaded = []
load = lm.load_model_and_tokenizer
lm.load_model_and_tokenizer = lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1]

def train(model, out):
    return qdylora.cli.main(["train", "--model", model, "--output", out, "--data", {str(data)!r}, "--max-steps", "1",
                             "--batch-size", "1", "--max-seq-len", "32", "--r-max", "8", "--sweep-ranks", "",
                             "--warmup-steps", "0"])

# the same command on a tiny model first: imports, lazily loaded kernels and allocator pools are the baseline
assert train({str(tiny)!r}, {str(tmp_path / 'warm')!r}) == 0
loaded.clear()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = rss("VmRSS")
assert train({str(big)!r}, {str(tmp_path / 'run')!r}) == 0
peak = rss("VmHWM")
print(json.dumps({{"extra": peak - base, "digest": nf4_digest(loaded[0][0])}}))
""", tmp_path)
    r = json.loads(out.strip().splitlines()[-1])
    assert r["extra"] < 0.6 * bf16, f"peak RSS growth {r['extra'] / 2**20:.0f} MiB vs bf16 {bf16 / 2**20:.0f} MiB"
    namespace = {"torch": torch}
    exec(NF4_DIGEST, namespace)
    old = quantize_model(AutoModelForCausalLM.from_pretrained(str(big), dtype=torch.float32), "cpu", torch.float32)
    assert r["digest"] == namespace["nf4_digest"](old)
