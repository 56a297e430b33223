"""Fisher statistics gathered in the last steps of training, for `qdylora allocate --score fisher-train`.

Module m adds sum_k c_k B[:, k] A[k] x to its output; a position that ran at rank b has c_k = alpha / b for k < b,
else 0 (qdylora.allocate.scores, fisher). For every position t of the collected steps and every module, with
u_t = dy_t B and v_t = A x_t over all r_max components and kappa the factor between dy and the gradient of the summed
token losses (measured at the logits, so whatever normalisation the Trainer applies drops out), the per-position
gradient in the scales is g_t = u_t * v_t / kappa. The collector sums g_t, g_t g_t^T and g_t (g_t . c_t) per module
and counts the loss tokens T. Averaging each position's second-order model around the configuration c_t it ran at
gives, at any reference c_R, the gradient h_R = (sum g_t + (sum g_t g_t^T) c_R - sum g_t (g_t . c_t)) / T and the
curvature F = sum g_t g_t^T / T (`at_reference`): the same (h, F) fisher gets from a calibration pass at c_R, from
positions the run computed anyway. The op hands its backward's A x_t and dy_t B over (`observe`), so only the
components a forward did not run (above the batch's largest rank) cost two products [tokens, in or out] x
[in or out, r_max - r]; the rest is one r_max x r_max product per module and position, in the collected steps
only, in float32 with float64 running sums.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..adapters.attach import module_layers
from ..data.examples import IGNORE_INDEX
from ..errors import ConfigError
from ..ops import row_ranks

STATS_NAME = "fisher_stats.safetensors"
_KAPPA_POSITIONS = 64  # one kappa per micro-step: a few target positions measure it as well as all of them


def check_collectable(config, sharded: bool) -> None:
    """Refuse settings whose forward is not sum_k c_k B[:, k] A[k] x with c of the module's rank (one line each)."""
    if config.truncation == "svd":
        raise ConfigError("--fisher-steps does not apply to --truncation svd: the final sort mixes the components the "
                          "statistics describe; allocate with --score fisher --data CALIB instead")
    if config.update == "matryoshka":
        raise ConfigError("--fisher-steps does not apply to --update matryoshka (every component runs weighted, not "
                          "at rank b); allocate with --score fisher --data CALIB instead")
    if sharded:
        raise ConfigError("--fisher-steps does not apply to --fsdp runs (each process holds part of the factors); "
                          "allocate with --score fisher --data CALIB instead")


class FisherCollector:
    """Sums of g_t, g_t g_t^T and g_t (g_t . c_t) per module over the optimizer steps >= first_step (module doc)."""

    def __init__(self, model: nn.Module, first_step: int) -> None:
        self.layers = module_layers(model)
        self.names = list(self.layers)
        layer = next(iter(self.layers.values()))
        cfg = layer.qdylora_config
        self.first_step = first_step
        self.model = model
        device = next(p for p, _ in layer.component_axes()).device
        self.table32 = cfg.component_scales().to(device, torch.float32)
        m, r = len(self.names), cfg.r_max
        self.grad = torch.zeros(m, r, dtype=torch.float64, device=device)
        self.outer = torch.zeros(m, r, r, dtype=torch.float64, device=device)
        self.at_config = torch.zeros(m, r, dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)
        self.steps: set[int] = set()
        self.active = False
        self.kappa: float | None = None
        self.labels: torch.Tensor | None = None
        self.handles: list = []

    def attach(self) -> "FisherCollector":
        """Hand every adapted module's op the observer and hook the logits (both idle outside the collected steps)."""
        for i, layer in enumerate(self.layers.values()):
            layer.observe = self._observer(i, layer)
        head = self.model.get_output_embeddings()
        self.handles = [head.register_forward_hook(self._logits_hook)]
        return self

    def detach(self) -> None:
        """Remove the observers and the hook."""
        for h in self.handles:
            h.remove()
        self.handles = []
        for layer in self.layers.values():
            layer.observe = None

    def begin_micro_step(self, step: int, labels: torch.Tensor) -> None:
        """Before micro-step of optimizer step `step` (0-based) whose batch has these labels."""
        self.active = step >= self.first_step
        self.labels = labels if self.active else None
        self.kappa = None
        if self.active:
            self.steps.add(step)

    def _logits_hook(self, _module, _args, logits):
        if not (self.active and torch.is_grad_enabled() and logits.requires_grad) or self.labels is None:
            return
        labels = self.labels.to(logits.device)[:, 1:]
        keep = labels != IGNORE_INDEX
        if not bool(keep.any()):
            return
        b, t = keep.nonzero(as_tuple=True)
        n = len(b)
        b, t = b[:_KAPPA_POSITIONS], t[:_KAPPA_POSITIONS]
        target = labels[b, t]
        rows = logits.detach()[b, t].float()
        p_y = (rows.gather(1, target[:, None]).squeeze(1) - rows.logsumexp(1)).exp()

        def on_grad(dlogits):
            # the loss is a multiple kappa of the summed token losses: d/dlogit_y = kappa (p_y - 1) at every target
            d_y = dlogits[b, t, target].double()
            self.kappa = float(-d_y.sum() / (1 - p_y.double()).sum().clamp(min=1e-12))
            self.tokens += n

        logits.register_hook(on_grad)

    def _observer(self, i: int, layer):
        def observe(rank, xl, dy, h, dyB):
            # called by the op once per backward, also under activation checkpointing (the forward runs twice)
            if not (self.active and self.kappa):
                return
            # float32 products (a micro-step's sums lose nothing that matters), float64 running sums
            g = dyB.float() * h.float()  # the components this forward ran
            if g.shape[1] < self.grad.shape[1]:  # and those it did not: c = 0 there, but the gradient is not
                (A, _), (B, _) = layer.component_axes()
                k = g.shape[1]
                rest = (dy.float() @ B.detach()[:, k:].float()) * (xl.float() @ A.detach()[k:].float().t())
                g = torch.cat([g, rest], 1)
            g.mul_(1.0 / self.kappa)
            c = self.table32[row_ranks(rank, g.shape[0], g.device)]
            self.grad[i] += g.sum(0).double()
            self.outer[i] += (g.t() @ g).double()
            self.at_config[i] += (g.t() @ (g * c).sum(1)).double()

        return observe

    def state(self) -> dict[str, torch.Tensor] | None:
        """The sums over every process (each saw its own rows) as CPU tensors, for the adapter folder (STATS_NAME);
        None before the first collected step. Call it in every process."""
        import torch.distributed as dist

        sums = [self.grad, self.outer, self.at_config, self.tokens.reshape(1)]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from .processes import collective_device

            summed = []
            for t in sums:
                buf = t.to(collective_device(), copy=True)
                dist.all_reduce(buf)
                summed.append(buf)
            sums = summed
        if not self.steps:
            return None
        grad, outer, at_config, tokens = (t.cpu() for t in sums)
        return {"grad": grad, "outer": outer, "at_config": at_config, "tokens": tokens,
                "steps": torch.tensor(sorted(self.steps), dtype=torch.long), "names": _encode_names(self.names)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Continue from the sums a checkpoint saved (call in the main process only: they hold every process's);
        sums from before this run's first collected step (a resume with a larger --max-steps or a smaller
        --fisher-steps moved the window) are dropped."""
        steps = {int(s) for s in tensors["steps"].tolist()}
        if _decode_names(tensors["names"]) != self.names or min(steps) < self.first_step:
            return
        for mine, key in ((self.grad, "grad"), (self.outer, "outer"), (self.at_config, "at_config")):
            mine.copy_(tensors[key].to(mine.device))
        self.tokens.fill_(float(tensors["tokens"][0]))
        self.steps = steps


def _encode_names(names: list[str]) -> torch.Tensor:
    return torch.tensor(list("\n".join(names).encode()), dtype=torch.uint8)


def _decode_names(t: torch.Tensor) -> list[str]:
    return bytes(t.tolist()).decode().split("\n")


def at_reference(tensors: dict[str, torch.Tensor], table: torch.Tensor, reference: int) -> dict[str, tuple]:
    """{module: (h_R [r_max], F [r_max, r_max])} at every module at rank `reference` (module doc), float64."""
    T = float(tensors["tokens"][0])
    if T <= 0:
        raise ConfigError(f"{STATS_NAME} holds no tokens: the run collected no steps")
    c = table[reference].double()
    out = {}
    for i, name in enumerate(_decode_names(tensors["names"])):
        outer = tensors["outer"][i].double()
        h = (tensors["grad"][i].double() + outer @ c - tensors["at_config"][i].double()) / T
        out[name] = (h, outer / T)
    return out


def stats_files(state: dict[str, torch.Tensor] | None) -> dict | None:
    """The `files` argument of save_adapter / write_adapter that puts the statistics beside the adapter (None: none)."""
    return {STATS_NAME: state} if state is not None else None


def read_stats(adapter_dir: str | Path) -> dict[str, torch.Tensor] | None:
    """The statistics saved beside an adapter, or None when the run collected none."""
    from safetensors.torch import load_file

    path = Path(adapter_dir) / STATS_NAME
    return load_file(str(path)) if path.is_file() else None


def stats_info(tensors: dict[str, torch.Tensor]) -> dict:
    """Which optimizer steps (first and last, counted from 1 as the training log does) and how many loss tokens the
    statistics cover (for the pattern's source)."""
    steps = [int(s) + 1 for s in tensors["steps"].tolist()]
    return {"stats_steps": [min(steps), max(steps)] if steps else None, "stats_tokens": int(tensors["tokens"][0])}
