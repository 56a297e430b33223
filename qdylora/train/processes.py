"""Several training processes (torchrun / accelerate launch): who writes files, waiting for each other, the
device of each process, and checking that every process was given the same settings.

One process writes the run folder (the main one); all of them read it. Everything here also works
for a single process, where it does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from ..errors import ConfigError, TrainingError


def _state():
    from accelerate import PartialState

    return PartialState()  # starts the process group from torchrun's environment the first time


def start_processes() -> None:
    """Join the launcher's process group (torchrun / accelerate launch set its environment); once."""
    _state()


def world_size() -> int:
    """Number of training processes (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _group():
    """torch.distributed once this process has joined the launcher's group, else None.

    The group's own rank and barrier, not accelerate's state: on CPU, accelerate joins the gloo group but reports
    DistributedType.NO (every process "main", its barrier a no-op) until the Trainer resets it with cpu=True,
    and the run folder is written before that.
    """
    import torch.distributed as dist

    _state()
    return dist if dist.is_available() and dist.is_initialized() else None


def is_main() -> bool:
    """True in the process that writes the run folder."""
    if world_size() == 1:
        return True
    group = _group()
    return group.get_rank() == 0 if group is not None else _state().is_main_process


def barrier() -> None:
    """Wait until every process got here (nothing to wait for in a single process)."""
    if world_size() > 1:
        group = _group()
        if group is not None:
            group.barrier()
        else:
            _state().wait_for_everyone()


def training_device() -> torch.device:
    """This process's device: its own GPU (LOCAL_RANK) under a launcher, else cuda:0 or the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise ConfigError(f"process {local} has no GPU: {world_size()} processes were launched on a machine with "
                          f"{torch.cuda.device_count()} GPU(s); use --nproc_per_node {torch.cuda.device_count()} "
                          "(or --num_processes) at most")
    return torch.device("cuda", local)


def collective_device() -> torch.device:
    """Where tensors for collectives must live: the GPU under NCCL, the CPU under gloo."""
    import torch.distributed as dist

    return training_device() if dist.get_backend() == "nccl" else torch.device("cpu")


def check_same_settings(settings: dict) -> None:
    """TrainingError in every process unless all processes were given the same settings (seed included)."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    _state()
    text = json.dumps(settings, sort_keys=True, default=str)
    digest = int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)
    seed = settings.get("qdylora", {}).get("seed")
    mine = torch.tensor([digest, -1 if seed is None else seed], dtype=torch.int64, device=collective_device())
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    gathered = [g.cpu() for g in gathered]
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        seeds = sorted({int(g[1]) for g in gathered})
        what = f"--seed {seeds}" if len(seeds) > 1 else "settings"
        raise TrainingError(f"the {dist.get_world_size()} training processes were given different {what}; every "
                            "process must get the same command line (the rank draws and the data order depend on it)")
