"""Run by tests/test_distributed.py under torchrun (or alone): train from JSON settings and record, per
process, the ranks every DyLoRA forward ran at (not a test module)."""

import json
import os
import sys

import torch

from qdylora.adapters.layer import DyLoRALinear
from qdylora.train.run import run_training

out, settings = sys.argv[1], json.loads(sys.argv[2])
resume = settings.pop("resume", False)
if settings.pop("seed_per_process", False):
    settings["qdylora"]["seed"] = int(os.environ.get("RANK", "0"))
seen = []
orig = DyLoRALinear.forward


def forward(layer, x, *a, **k):
    if layer.training:
        r = layer.rank
        seen.append(r.tolist() if torch.is_tensor(r) else [r] * x.shape[0])
    return orig(layer, x, *a, **k)


DyLoRALinear.forward = forward

import qdylora.train.trainer as trainer_module  # noqa: E402

writes = []
save_adapter = trainer_module.save_adapter


def counted_save(*a, **k):  # who writes adapters (checkpoints and the final one): the main process only
    writes.append(str(a[1]))
    return save_adapter(*a, **k)


trainer_module.save_adapter = counted_save
result = run_training(out, settings, resume=resume)
if "model" in result:  # what this process holds of every parameter (FSDP: its shards)
    from qdylora.shards import local

    params = list(result["model"].parameters())
    with open(os.path.join(os.path.dirname(os.path.abspath(out)), f"held_{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump({"numel": sum(p.numel() for p in params), "bytes": sum(local(p).numel() * p.element_size() for p in params),
                   "full_bytes": sum(p.numel() * p.element_size() for p in params)}, f)
with open(os.path.join(os.path.dirname(os.path.abspath(out)), f"ranks_{os.environ.get('RANK', '0')}.json"), "w") as f:
    json.dump(seen, f)
with open(os.path.join(os.path.dirname(os.path.abspath(out)), f"writes_{os.environ.get('RANK', '0')}.json"), "w") as f:
    json.dump(writes, f)
