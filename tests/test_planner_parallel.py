"""The planner with several GPUs: DDP adds its gradient buckets, FSDP divides what it shards and adds the
gathered wrap units; the 70B verdicts the README quotes."""

from __future__ import annotations

import math

import pytest

from qdylora.cli import main
from qdylora.memory import plan_memory

SHARDED = ("nf4_weights", "unquantized_params", "adapters", "adapter_grads", "optimizer_state_paged")


def test_ddp_holds_everything_plus_gradient_buckets():
    one = plan_memory("llama-2-7b", r_max=64)
    ddp = plan_memory("llama-2-7b", r_max=64, num_gpus=4, strategy="ddp")
    for name in SHARDED:
        assert ddp.item(name).bytes == one.item(name).bytes
    assert ddp.item("ddp_buckets").bytes == one.item("adapter_grads").bytes
    assert ddp.peak_allocated == one.peak_allocated + one.item("adapter_grads").bytes


def test_fsdp_divides_what_it_shards_and_gathers_two_layers():
    one = plan_memory("llama-2-7b", r_max=64)
    fsdp = plan_memory("llama-2-7b", r_max=64, num_gpus=4, strategy="fsdp")
    for name in SHARDED:
        assert fsdp.item(name).bytes == math.ceil(one.item(name).bytes / 4)
    a = fsdp.arch
    layer_nf4 = sum(l.in_features * l.out_features for l in a.layer_linears(0)) * (0.5 + 1 / 64 + 4 / 16384)
    embed_head = 2 * 32000 * 4096 * 2  # untied embeddings and head in bf16: the root unit is the largest
    gathered = fsdp.item("fsdp_gathered").bytes
    assert gathered == pytest.approx(embed_head + layer_nf4 + 4 * 64 * sum(
        l.in_features + l.out_features for l in a.layer_linears(0)) + 2 * 4096 * 2, rel=1e-3)
    assert fsdp.peak_allocated < one.peak_allocated / 2


@pytest.mark.parametrize("gpus,strategy,fits", [(1, "ddp", False), (2, "ddp", False), (2, "fsdp", True),
                                                (4, "fsdp", True)])
def test_llama_70b_on_24gb_cards(gpus, strategy, fits):
    plan = plan_memory("llama-2-70b", r_max=64, seq_len=512, gpu_memory="24GiB", num_gpus=gpus, strategy=strategy)
    assert plan.fits is fits


def test_plan_cli_takes_gpus_and_strategy(capsys):
    assert main(["plan", "--model", "llama-2-70b", "--num-gpus", "4", "--strategy", "fsdp", "--gpu-memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "per GPU of 4 (fsdp)" in out and "fsdp_gathered" in out and "FITS" in out
    assert main(["plan", "--model", "llama-2-70b", "--num-gpus", "0"]) == 2
    assert main(["plan", "--model", "llama-2-70b", "--strategy", "zero3"]) == 2
