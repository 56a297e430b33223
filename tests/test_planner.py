"""The memory planner: pinned arithmetic, agreement with a measured CPU training step, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qdylora.errors import PlannerError
from qdylora.memory import choose_memory_settings, parse_memory_size, plan_memory, shipped_configs
from qdylora.memory.measure import ITEMS, TensorMemoryTracker, measure_training_step, planned_items
from qdylora.memory.units import NF4_TABLE_BYTES, nf4_bytes

GiB = 1024**3


# ----------------------------------------------------------------------------- arithmetic

def test_nf4_bytes_per_param_is_half_plus_absmax_plus_nested_absmax():
    n = 64 * 256 * 1000  # whole blocks and whole nested blocks
    assert nf4_bytes(n) / n == 0.5 + 1 / 64 + 4 / (64 * 256)
    # partial blocks round up: 65 values -> 33 packed bytes, 2 absmax bytes, one fp32 nested absmax
    assert nf4_bytes(65) == 33 + 2 + 4
    # code tables per linear: NF4 code (16 fp32) + nested dynamic code (256 fp32) + offset (fp32)
    assert NF4_TABLE_BYTES == 16 * 4 + 256 * 4 + 4


def test_tiny_llama_items_hand_computed():
    # tiny-llama: hidden 256, intermediate 704, 4 layers, 4 heads (head_dim 64), 2 kv heads, vocab 8000
    plan = plan_memory("tiny-llama", r_max=64, seq_len=128, batch_size=1, optim="paged_adamw_32bit",
                       dtype="bf16", update="nested", device="cuda")
    shapes = [(256, 256), (128, 256), (128, 256), (256, 256), (704, 256), (704, 256), (256, 704)]  # (out, in)

    def nf4(n):  # 0.5 B packed + 1 B absmax per 64 + 4 B nested absmax per 64*256, + tables
        return n // 2 + math.ceil(n / 64) + 4 * math.ceil(n / 64 / 256) + NF4_TABLE_BYTES

    assert plan.item("nf4_weights").bytes == 4 * sum(nf4(o * i) for o, i in shapes) == 1_551_936
    # embeddings + untied head + 2 norms per layer + final norm, bf16
    assert plan.item("unquantized_params").bytes == 2 * (2 * 8000 * 256 + 9 * 256)
    adapter_params = 4 * 64 * sum(o + i for o, i in shapes)
    assert adapter_params == 1_196_032
    assert plan.item("adapters").bytes == 4 * adapter_params
    assert plan.item("adapter_grads").bytes == 4 * adapter_params  # nested: both tensors get a full gradient
    # paged AdamW 32-bit: exp_avg + exp_avg_sq in fp32; the [64, 256] / [64, 704] tensors hold fewer than
    # 1e5 values, so nothing is paged
    assert plan.item("optimizer_state").bytes == 8 * adapter_params
    with pytest.raises(KeyError):
        plan.item("optimizer_state_paged")
    # logits: bf16 logits + fp32 log-softmax + two fp32 gradients
    assert plan.item("logits_loss").bytes == 128 * 8000 * (2 + 12)

    frozen = plan_memory("tiny-llama", r_max=64, seq_len=128, update="frozen")
    # frozen keeps nested's two tensors: the same full-size gradients
    assert frozen.item("adapter_grads").bytes == 4 * adapter_params

    # 8-bit ComponentAdamW: per component two uint8 moments over whole 256-value blocks and two fp32 absmax per
    # block (A: 64 components of `in` values, B: 64 of `out`), plus the two 256-entry fp32 quantization maps
    def state8(n):
        width = math.ceil(n / 256) * 256
        return 64 * (2 * width + 8 * width // 256)

    expect8 = 4 * sum(state8(i) + state8(o) for o, i in shapes) + 2048
    for update in ("nested", "frozen"):
        plan8 = plan_memory("tiny-llama", r_max=64, update=update, optim="paged_adamw_8bit")
        assert plan8.item("optimizer_state").bytes == expect8


def test_falcon40b_arithmetic():
    plan = plan_memory("falcon-40b", r_max=64, seq_len=512, batch_size=1, optim="paged_adamw_8bit")
    a = plan.arch
    assert (a.n_layers, a.hidden, a.n_heads, a.n_kv_heads, a.vocab, a.ffn) == (60, 8192, 128, 8, 65024, 32768)
    qkv = 8192 * (128 + 2 * 8) * 64
    per_layer = qkv + 8192 * 8192 + 2 * 8192 * 32768
    assert sum(l.in_features * l.out_features for l in a.linears) == 60 * per_layer
    assert a.tied and a.unquantized_numel == 65024 * 8192 + 60 * 2 * 2 * 8192 + 2 * 8192  # LN weight+bias
    # NF4 of ~40.8B params: ~0.5159 B/param
    assert plan.item("nf4_weights").bytes == pytest.approx(60 * per_layer * (0.5 + 1 / 64 + 4 / 16384), rel=1e-4)
    # 8-bit ComponentAdamW: one [64, in] A and one [out, 64] B per linear in either update rule, each >= 1e5
    # values: their uint8 moments (2 B/param) are paged on CUDA; the fp32 absmax (two per 256 values) and the
    # quantization maps stay in the allocator
    tensors = [64 * n for n in (8192, 8192, 8192, 32768, 9216, 8192, 32768, 8192)]
    for update in ("frozen", "nested"):
        p8 = plan if update == "frozen" else plan_memory("falcon-40b", r_max=64, seq_len=512, update=update,
                                                            optim="paged_adamw_8bit")
        assert p8.item("optimizer_state_paged").bytes == 60 * sum(2 * n for n in tensors)
        assert p8.item("optimizer_state").bytes == 60 * sum(8 * math.ceil(n / 256) for n in tensors) + 2048
        assert "480 tensors of >= 1e5 values paged" in p8.item("optimizer_state").detail
    assert plan.item("logits_loss").bytes == 512 * 65024 * 14
    # 32-bit: everything paged, so no unpaged state item at all
    nested32 = plan_memory("falcon-40b", r_max=64, seq_len=512, update="nested", optim="paged_adamw_32bit")
    assert nested32.item("optimizer_state_paged").bytes == 60 * sum(8 * n for n in tensors)
    # bitsandbytes pages on CUDA only
    cpu = plan_memory("falcon-40b", r_max=64, seq_len=512, update="nested", optim="paged_adamw_32bit", device="cpu")
    assert cpu.item("optimizer_state").bytes == 60 * sum(8 * n for n in tensors)
    assert "pages only on CUDA" in cpu.item("optimizer_state").detail


def test_parse_memory_size():
    assert parse_memory_size("32GiB") == 32 * GiB
    assert parse_memory_size("32G") == 32 * GiB
    assert parse_memory_size("24 GB") == 24 * 1000**3
    assert parse_memory_size("80000MiB") == 80000 * 1024**2
    assert parse_memory_size("2B") == 2
    assert parse_memory_size(1234) == 1234  # a Python number is bytes; a string needs its unit
    for bad in ("32 gigs", "", "GiB", "-3GiB", "thirty", "32"):
        with pytest.raises(PlannerError, match="32GiB"):
            parse_memory_size(bad)
    for bad in (float("nan"), float("inf"), 0, -5):
        with pytest.raises(PlannerError, match="positive number of bytes"):
            parse_memory_size(bad)


# ----------------------------------------------------------------------------- verdicts and advice

def test_falcon40b_fits_32gib_with_seq_and_batch_limits():
    plan = plan_memory("falcon-40b", r_max=64, seq_len=512, batch_size=1, gpu_memory="32GiB")
    assert plan.fits
    assert 20 * GiB < plan.peak_allocated < 32 * GiB
    assert plan.max_seq_len >= 512 and plan.max_batch_size >= 1
    assert plan_memory(plan.arch, seq_len=plan.max_seq_len, gpu_memory="32GiB").fits
    assert not plan_memory(plan.arch, seq_len=plan.max_seq_len + 1, gpu_memory="32GiB").fits
    table = plan.format_table()
    for name in ("nf4_weights", "unquantized_params", "adapters", "adapter_grads", "optimizer_state",
                 "activations", "logits_loss", "kernel_transients", "cuda_context", "FITS"):
        assert name in table
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["fits"] is True and d["architecture"]["layers"] == 60


def test_not_fitting_says_what_to_shrink_and_by_how_much():
    plan = plan_memory("llama-3-8b", seq_len=2048, gpu_memory="12GiB", gradient_checkpointing=False)
    assert plan.fits is False
    text = " ".join(plan.advice)
    assert "over budget by" in text and "activations" in text
    assert "gradient checkpointing" in text and "saves" in text
    assert "--seq-len" in text
    hopeless = plan_memory("falcon-40b", gpu_memory="8GiB")
    assert "no setting fits" in " ".join(hopeless.advice) and "nf4_weights" in " ".join(hopeless.advice)


def test_choose_memory_settings():
    ample = choose_memory_settings(plan_memory("tiny-llama"), "80GiB")
    assert ample["gradient_checkpointing"] is False and ample["fits"] and "ample" in ample["reason"]
    tight = choose_memory_settings(plan_memory("falcon-40b"), "32GiB")
    assert tight["gradient_checkpointing"] is True and tight["optim"] == "paged_adamw_32bit"
    assert tight["paged"] and tight["fits"] and "tight" in tight["reason"]
    # at 24 GiB nothing fits: the adapters' optimizer state is paged anyway, so 8-bit state would not help
    small = choose_memory_settings(plan_memory("falcon-40b"), "24GiB")
    assert not small["fits"] and "does NOT fit" in small["reason"] and "paged" in small["reason"]


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_plans(name):
    plan = plan_memory(name, gpu_memory="80GiB")
    assert plan.total > 0 and plan.item("nf4_weights").bytes > 0
    expected_params = {"llama-2-7b": 6.74e9, "llama-3-8b": 8.03e9, "mistral-7b": 7.24e9, "qwen2-7b": 7.62e9,
                       "falcon-7b": 6.92e9, "falcon-40b": 41.3e9, "smollm2-135m": 134.5e6}
    if name in expected_params:
        assert plan.arch.n_params == pytest.approx(expected_params[name], rel=0.01)


# ----------------------------------------------------------------------------- bad input

def test_unknown_architecture(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    with pytest.raises(PlannerError, match="gpt2.*not supported.*llama"):
        plan_memory(str(cfg))
    cfg.write_text(json.dumps({"hidden_size": 768}))
    with pytest.raises(PlannerError, match="model_type"):
        plan_memory(str(tmp_path))  # a folder with config.json works the same


def test_config_missing_fields(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(PlannerError, match="lacks intermediate_size.*vocab_size.*add them"):
        plan_memory(str(cfg))
    cfg.write_text("{not json")
    with pytest.raises(PlannerError, match="not valid JSON"):
        plan_memory(str(cfg))


def test_offline_hub_name_names_the_shipped_configs(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PlannerError, match="shipped config.*falcon-40b.*smollm2-135m"):
        plan_memory("no-such-org/no-such-model-qdylora")


def test_bad_numbers():
    with pytest.raises(PlannerError, match="r_max"):
        plan_memory("tiny-llama", r_max=0)
    with pytest.raises(PlannerError, match="optimizer"):
        plan_memory("tiny-llama", optim="sgd")
    with pytest.raises(PlannerError, match="layers=0 must be a positive integer"):
        plan_memory("tiny-llama", layers=0)


def test_planner_optimizers_are_trainings():
    from qdylora.memory import OPTIMIZERS
    from qdylora.train.config import OPTIMIZERS as TRAIN

    assert set(OPTIMIZERS) == set(TRAIN) - {"auto"}
    for name in TRAIN:
        if name != "auto":
            assert plan_memory("tiny-llama", optim=name).total > 0


# ----------------------------------------------------------------------------- against measurement

def test_tracker_counts_live_and_peak_bytes():
    keep = torch.zeros(1000)
    with TensorMemoryTracker() as tr:
        a = torch.ones(1000)  # 4000 B
        b = a * 2  # 4000 B -> peak 8000
        v = b.view(10, 100)  # a view: no new storage, keeps b's alive
        del a, b
        c = torch.empty(250)  # 1000 B
        keep.add_(1)  # in place on a tensor made outside: not counted
    assert tr.peak == 8000 and tr.current == 5000
    del v, c
    assert tr.current == 0


def _check_within(plan, measured, tol=0.15):
    planned = planned_items(plan)
    for name in ITEMS + ("peak",):
        assert planned[name] == pytest.approx(measured[name], rel=tol), name
    # what follows from the tensors' shapes alone is exact
    for name in ("nf4_weights", "unquantized_params", "adapters", "adapter_grads", "optimizer_state"):
        assert planned[name] == measured[name], name


# CI runs these on 2 cores: the tiny configs, two layers of Llama; every layer adds the same terms
@pytest.mark.parametrize("update", ["nested", "frozen"])
@pytest.mark.parametrize("config,gc,dtype,optim", [
    ("tiny-llama", True, "fp32", "paged_adamw_32bit"),
    ("tiny-llama", False, "fp32", "paged_adamw_32bit"),
    ("tiny-falcon", True, "fp32", "paged_adamw_32bit"),
    ("tiny-falcon", False, "fp32", "paged_adamw_32bit"),
    ("tiny-llama", True, "bf16", "paged_adamw_8bit"),
    ("tiny-falcon", False, "bf16", "paged_adamw_8bit"),
])
def test_planner_matches_measured_cpu_step(config, gc, dtype, optim, update):
    plan, measured = measure_training_step(config, gc, dtype, seq_len=128, layers=2, update=update, optim=optim)
    _check_within(plan, measured)


def test_a_step_below_r_max_keeps_full_size_gradients():
    """At rank b < r_max the sliced A and B still get gradients of their full size (zeros past b)."""
    plan, measured = measure_training_step("tiny-falcon", True, "fp32", seq_len=64, update="frozen", rank=8)
    # tiny-falcon per layer: query_key_value 256 -> 384, dense 256 -> 256, h_to_4h 256 -> 1024, 4h_to_h 1024 -> 256
    shapes = [(384, 256), (256, 256), (1024, 256), (256, 1024)]  # (out, in)
    assert measured["adapter_grads"] == 2 * 4 * sum(64 * (i + o) for o, i in shapes)
    from qdylora.memory.adapter_bytes import adapter_bytes

    derived = sum(adapter_bytes(i, o, 64, "frozen", "paged_adamw_32bit", "cpu", 4, "reference", rank=8).grads
                  for o, i in shapes)
    assert 2 * derived == measured["adapter_grads"] == plan.item("adapter_grads").bytes
    assert measured["peak"] < plan.peak_allocated


@pytest.mark.parametrize("update", ["nested", "frozen"])
def test_layer_stores_the_shapes_the_planner_sizes(update):
    from qdylora.adapters import QDyLoRAConfig, attach_adapters, dylora_layers
    from qdylora.adapters.storage import adapter_tensor_shapes
    from qdylora.load.sharded import quantize_random_init
    from qdylora.memory.architecture import config_from_dict, load_config_dict

    model = attach_adapters(quantize_random_init(config_from_dict(*load_config_dict("tiny-falcon")), "cpu"),
                            QDyLoRAConfig(r_max=8, update=update))
    for layer in dylora_layers(model):
        i, o = layer.in_features, layer.out_features
        # every update rule: peft's two matrices
        expect = {"A": [(8, i)], "B": [(o, 8)]}
        got = {"A": [tuple(layer.lora_dyA["default"].shape)], "B": [tuple(layer.lora_dyB["default"].shape)]}
        assert got == expect == adapter_tensor_shapes(i, o, 8, update)


@pytest.mark.parametrize("update", ["nested", "frozen"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_factor_copies_the_op_saves(update, dtype):
    """What one adapted linear keeps for backward: its output, h [T, r], the rank masks and the A/B copies.

    Both rules slice their two tensors: views (no copy) in fp32, a cast copy in bf16; frozen keeps a
    second (gradient) mask.
    """
    from qdylora.adapters import QDyLoRAConfig, attach_adapters, dylora_layers, set_rank
    from qdylora.load.sharded import quantize_random_init
    from qdylora.memory.adapter_bytes import adapter_bytes
    from qdylora.memory.architecture import config_from_dict, load_config_dict
    from qdylora.memory.measure import DTYPES

    t, c = DTYPES[dtype], 4 if dtype == "fp32" else 2
    model = quantize_random_init(config_from_dict(*load_config_dict("tiny-falcon")), "cpu", compute_dtype=t, dtype=t)
    model = attach_adapters(model, QDyLoRAConfig(r_max=16, update=update)).train()
    set_rank(model, 16)
    layer = dylora_layers(model)[0]
    T, i, o = 32, layer.in_features, layer.out_features
    x = torch.randn(T, i, dtype=t, requires_grad=True)
    with TensorMemoryTracker() as tr:
        y = layer(x)
    masks = 1 if update == "nested" else 2  # nested's gradient mask is its forward mask
    expect_copies = 16 * (i + o) * c if c == 2 else 0
    assert tr.current == T * o * c + T * 16 * c + masks * T * 16 * 4 + expect_copies
    assert adapter_bytes(i, o, 16, update, "adamw_torch", "cpu", c, "reference").saved_copies == expect_copies
    del y


def test_planner_follows_the_storage(monkeypatch):
    """A storage change in adapters.storage alone (frozen mode in nested mode's two tensors) keeps the planner right."""
    import qdylora.adapters.storage as storage
    from qdylora.memory.adapter_bytes import adapter_bytes

    nested_shapes = storage.adapter_tensor_shapes
    monkeypatch.setattr(storage, "adapter_tensor_shapes",
                        lambda i, o, r, update: nested_shapes(i, o, r, "nested"))
    adapter_bytes.cache_clear()
    try:
        plan, measured = measure_training_step("tiny-falcon", True, "fp32", seq_len=64, update="frozen")
        assert measured["adapter_grads"] == measured["adapters"]  # one tensor per side: full-size gradients
        _check_within(plan, measured)
        paged = plan_memory("falcon-40b", update="frozen", optim="paged_adamw_32bit").item("optimizer_state_paged")
        assert paged.bytes == 60 * 64 * 8 * (3 * 8192 + 32768 + 9216 + 8192 + 32768 + 8192)  # A [64, in], B [out, 64]
    finally:
        adapter_bytes.cache_clear()


@pytest.mark.slow
@pytest.mark.parametrize("update", ["nested", "frozen"])
def test_planner_matches_measured_smollm2_135m_step(update):
    """SmolLM2-135M's width, heads and 49152-token tied vocabulary, random weights, fp32.

    4 of its 30 layers: every layer adds the same terms, and the CPU reference path needs ~2 s per
    layer and step here; all 30 layers: python benchmarks/planner_vs_measured.py (same checks).
    """
    plan, measured = measure_training_step("smollm2-135m", True, "fp32", seq_len=64, layers=4, update=update)
    _check_within(plan, measured)
