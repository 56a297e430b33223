"""Exports as the LoRA consumers load them: peft's AutoPeftModelForCausalLM from another working directory (the
base found through base_model_name_or_path), transformers' own bnb NF4 base giving qdylora's logits, bf16 / fp16
tensors, a deterministic adapter_config.json that the oldest supported peft reads, GGUF and GPT-2 (Conv1D) bases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import error_line, randomize_adapters, tiny_tokenizer
from safetensors.torch import load_file, save_file

from qdylora.adapters.attach import attach_adapters, set_rank
from qdylora.adapters.config import QDyLoRAConfig
from qdylora.adapters.export import export_peft
from qdylora.adapters.files import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from qdylora.cli import main
from qdylora.load.model import load_model_and_tokenizer

REPO = Path(__file__).resolve().parents[1]
# LoraConfig's fields in peft 0.6.2 (peft/config.py PeftConfigMixin + PeftConfig, peft/tuners/lora/config.py
# LoraConfig, read from the 0.6.2 wheel): the oldest release checked by hand to load exports (plain and rank
# pattern) on the same NF4 base with qdylora's logits exactly. Older releases refuse keys they do not know.
PEFT_0_6_2_LORA_FIELDS = {"alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out",
                          "inference_mode", "init_lora_weights", "layers_pattern", "layers_to_transform",
                          "lora_alpha", "lora_dropout", "modules_to_save", "peft_type", "r", "rank_pattern",
                          "revision", "target_modules", "task_type"}


def _ids(vocab: int, n: int = 12):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """A run trained (2 steps, lr 1e-2, so every component moved) on the tiny model folder given as a relative
    --model path, from the folder above it."""
    d = tmp_path_factory.mktemp("d")
    data = d / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"count to {i}", "output": " ".join(map(str, range(i)))})
                              for i in range(2, 10)))
    out = tmp_path_factory.mktemp("run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tiny_model_dir.parent)
        assert main(["train", "--model", tiny_model_dir.name, "--data", str(data), "--output", str(out),
                     "--max-steps", "2", "--r-max", "8", "--batch-size", "2", "--optim", "adamw_torch",
                     "--update", "nested", "--lr", "1e-2", "--sweep-ranks", ""]) == 0
    return out


def _qdylora_logits(base, adapter, rank, ids):
    model, _ = load_model_and_tokenizer(str(base), device="cpu")
    model = load_adapter(model, adapter).eval()
    set_rank(model, rank)
    with torch.no_grad():
        return model(ids).logits


def test_autopeft_loads_the_export_from_another_directory(run, tiny_model_dir, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import BitsAndBytesConfig

    export = tmp_path / "r4"
    assert main(["export", str(run), "--rank", "4", "--output", str(export)]) == 0
    cfg = json.loads((export / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir.resolve())  # --model was relative
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    plain = AutoPeftModelForCausalLM.from_pretrained(str(export))  # full-precision base, as a user calls it
    assert isinstance(plain, PeftModel)
    tensors = load_file(str(export / "adapter_model.safetensors"))
    lora = {k.replace(".default", ""): v for k, v in plain.state_dict().items() if "lora_" in k}
    assert set(lora) == set(tensors) and all(torch.equal(lora[k], tensors[k]) for k in tensors)
    # the same call on transformers' own NF4 base (QLoRA's storage) gives qdylora's logits at rank 4
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    nf4 = AutoPeftModelForCausalLM.from_pretrained(str(export), quantization_config=bnb, dtype=torch.float32).eval()
    import bitsandbytes as bnb_lib

    for m in nf4.modules():
        if isinstance(m, bnb_lib.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # else bnb computes in bf16 on CPUs with AVX512-BF16
    ids = _ids(nf4.config.vocab_size)
    with torch.no_grad():
        got = nf4(ids).logits
    want = _qdylora_logits(tiny_model_dir, run / "adapter", 4, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with torch.no_grad():
        at8 = _qdylora_logits(tiny_model_dir, run / "adapter", 8, ids)
    assert not torch.allclose(got, at8, atol=1e-4)  # the rank matters: the comparison can fail


@pytest.mark.parametrize("args", [["--rank", "3"], ["--rank", "3", "--pad-to", "16"]])
def test_bf16_and_fp16_exports_are_the_fp32_export_rounded(run, tmp_path, args):
    assert main(["export", str(run), *args, "--output", str(tmp_path / "default")]) == 0
    meta = json.loads((run / "adapter" / CONFIG_NAME).read_text())
    assert meta["base_model"]["compute_dtype"] == "float32"  # trained on the CPU: fp32, so fp32 is the default
    full = load_file(str(tmp_path / "default" / "adapter_model.safetensors"))
    assert {t.dtype for t in full.values()} == {torch.float32}
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        assert main(["export", str(run), *args, "--dtype", dtype, "--output", str(tmp_path / dtype)]) == 0
        low = load_file(str(tmp_path / dtype / "adapter_model.safetensors"))
        assert set(low) == set(full)
        for k, t in low.items():
            assert t.dtype == torch_dtype and torch.equal(t, full[k].to(torch_dtype)), k
        assert json.loads((tmp_path / dtype / "qdylora_export.json").read_text())["dtype"] == dtype
        assert not torch.equal(low[k].float(), full[k])  # rounding happened: the test can tell the dtypes apart


def _copy_adapter(run: Path, dest: Path, base_update: dict | None = None, scale_b: float = 1.0) -> Path:
    shutil.copytree(run / "adapter", dest)
    meta = json.loads((dest / CONFIG_NAME).read_text())
    meta["base_model"].update(base_update or {})
    (dest / CONFIG_NAME).write_text(json.dumps(meta))
    if scale_b != 1.0:
        t = load_file(str(dest / WEIGHTS_NAME))
        save_file({k: v * scale_b if k.endswith("lora_B") else v for k, v in t.items()}, str(dest / WEIGHTS_NAME))
    return dest


def test_default_dtype_follows_the_base_compute_dtype(run, tmp_path):
    src = _copy_adapter(run, tmp_path / "ad", {"compute_dtype": "bfloat16"})  # as a CUDA run records it
    out = export_peft(src, 2, tmp_path / "out")
    assert {t.dtype for t in load_file(str(out / "adapter_model.safetensors")).values()} == {torch.bfloat16}


def test_bad_dtype_and_fp16_overflow_are_one_line_and_write_nothing(run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(run), "--rank", "2", "--dtype", "fp8", "--output", str(out)]) == 2
    assert "argument --dtype: invalid choice: 'fp8'" in error_line(capsys.readouterr().err)
    big = _copy_adapter(run, tmp_path / "big", scale_b=1e9)
    assert main(["export", str(big), "--rank", "2", "--dtype", "fp16", "--output", str(out)]) == 2
    assert "beyond fp16's range; export with --dtype bf16 or fp32" in error_line(capsys.readouterr().err)
    assert not out.exists()


def test_adapter_config_is_sorted_deterministic_and_known_to_old_peft(run, tmp_path):
    from peft import LoraConfig

    one = tmp_path / "one"
    assert main(["export", str(run), "--rank", "5", "--output", str(one)]) == 0
    # another process with another string hash seed (a set's order follows it) writes the same bytes
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'kernels'}"}
    subprocess.run([sys.executable, "-m", "qdylora", "export", str(run), "--rank", "5", "--output",
                    str(tmp_path / "two")], env=env, check=True, capture_output=True)
    text = (one / "adapter_config.json").read_bytes()
    assert text == (tmp_path / "two" / "adapter_config.json").read_bytes()
    cfg = json.loads(text)
    assert cfg["target_modules"] == sorted(cfg["target_modules"]) and len(cfg["target_modules"]) == 7
    assert cfg["inference_mode"] is True and cfg["r"] == 5
    patterns = tmp_path / "p.json"
    targets = json.loads((run / "adapter" / CONFIG_NAME).read_text())["targets"]
    patterns.write_text(json.dumps({"ranks": {t: i % 4 for i, t in enumerate(targets)}}))
    for args in (["--rank-pattern", str(patterns)], ["--rank-pattern", str(patterns), "--pad-to", "8"]):
        out = tmp_path / str(len(args))
        assert main(["export", str(run), *args, "--output", str(out)]) == 0
        other = json.loads((out / "adapter_config.json").read_text())
        assert set(other) <= PEFT_0_6_2_LORA_FIELDS and set(cfg) <= PEFT_0_6_2_LORA_FIELDS
        assert other["inference_mode"] is True and other["target_modules"] == sorted(other["target_modules"])
        assert list(other["rank_pattern"]) == sorted(other["rank_pattern"])
        assert LoraConfig.from_pretrained(str(out)).inference_mode  # the installed peft reads it too


def test_gguf_base_is_named_by_its_absolute_path_with_a_note(run, tmp_path, capsys):
    from peft import AutoPeftModelForCausalLM

    from qdylora.load.embedded import default_model_path

    gguf = Path(default_model_path())
    # the fingerprint a run on the embedded default model records (qdylora_source: the resolved .gguf path)
    src = _copy_adapter(run, tmp_path / "ad", {"name": gguf.name, "source": str(gguf.resolve())})
    assert main(["export", str(src), "--rank", "2", "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(gguf.resolve())
    note = json.loads((tmp_path / "out" / "qdylora_export.json").read_text())["base_model_note"]
    assert f"gguf_file='{gguf.name}'" in note and "--base EXPORT/base_config" in note and note in printed
    # the folder llama.cpp's converter reads as --base: the GGUF's config (read by transformers from the file's
    # metadata: SmolLM2-135M has 30 layers), with the architecture the converter dispatches on
    written = json.loads((tmp_path / "out" / "base_config" / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"] and written["num_hidden_layers"] == 30
    # what the note says: AutoPeftModelForCausalLM cannot load a .gguf base_model_name_or_path
    with pytest.raises((OSError, ValueError)):
        AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "out"))


def _gpt2_folder(path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=64,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_gpt2_conv1d_export_sets_fan_in_fan_out_as_peft_expects(tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    folder = _gpt2_folder(tmp_path / "gpt2")
    base, _ = load_model_and_tokenizer(str(folder), device="cpu")
    model = attach_adapters(base, QDyLoRAConfig(r_min=1, r_max=8, alpha=12.0))
    randomize_adapters(model, 3)
    save_adapter(model, tmp_path / "ad")
    out = export_peft(tmp_path / "ad", 3, tmp_path / "r3")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    ids = _ids(40)
    # peft on the same NF4 base (its bnb layers ignore fan_in_fan_out): qdylora's logits
    nf4, _ = load_model_and_tokenizer(str(folder), device="cpu")
    with torch.no_grad():
        got = PeftModel.from_pretrained(nf4, str(out)).eval()(ids).logits
        set_rank(model.eval(), 3)
        torch.testing.assert_close(got, model(ids).logits, rtol=0, atol=1e-5)
    # peft on the full-precision GPT-2 takes the config as it is (no "Setting fan_in_fan_out" warning), and
    # merging adds the hand-computed (alpha / r) (B A)^T to each Conv1D weight stored [in, out]
    full = GPT2LMHeadModel.from_pretrained(folder)
    weights = {n: m.weight.detach().clone() for n, m in full.named_modules() if isinstance(m, Conv1D)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = PeftModel.from_pretrained(full, str(out)).merge_and_unload()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    t = load_file(str(out / "adapter_model.safetensors"))
    for name, w in weights.items():
        A, B = t[f"base_model.model.{name}.lora_A.weight"], t[f"base_model.model.{name}.lora_B.weight"]
        torch.testing.assert_close(merged.get_submodule(name).weight, w + (12.0 / 3) * (B @ A).t(),
                                   rtol=1e-5, atol=1e-6)
