"""Scores of every component of every module: how much the calibration loss gains from keeping it.

Every score is measured around a reference: all modules at one rank R (the uniform rank of the
budget). Each returns a ScoreTable of gains g[m, k] for component k of module m (given components
< k); the greedy allocation compares them per adapter value. With A [r_max, in], B [out, r_max],
scale s = alpha / R and gA = dL/dA, gB = dL/dB the gradients of the mean calibration loss at the
reference (for components >= R: the gradient they would get if switched on at scale s):

- loss:     g[m, k] = (L_m(r_i) - L_m(r_{i+1})) / (r_{i+1} - r_i) for r_i <= k < r_{i+1}, where L_m(r) is the
            measured calibration loss with module m at rank r and every other module at R, for r on a
            grid of ranks (0, the powers of two, r_max); module m may take the grid's ranks only.
- taylor:   g[m, k] = sum_i |A[k, i] gA[k, i]| + sum_j |B[j, k] gB[j, k]| (AdaLoRA's |p * dL/dp| sensitivity,
            summed over the component; one backward pass), where a component k >= R takes its gradient at
            the scale alpha / (k + 1) it runs at as the last component of rank k + 1, not at alpha / R
            (svd-sorted components run at alpha / r_max at every rank: s = alpha / r_max throughout).
- norm:     g[m, k] = ||B[:, k]|| ||A[k]|| / ||B A||_F (the component's share of the update; data-free).
- gradnorm: G_m = sqrt(||gA[:n]||^2 + ||gB[:, :n]||^2) with n = min(r_max, 2R) (HeteroLoRA's GRAD-NORM): a
            module is off or on at rank n as a whole, g[m, k] = G_m / n for k < n.
- fisher:   a second-order model of L_m(b), module m at rank b and the others at R, in the component scales c (module
            m adds sum_k c_k B[:, k] A[k] x; rank b is c_k = s_b for k < b, else 0, with s_b = alpha / b):
            L_m(b) - L = h . d + d^T F d / 2 with d = c(b) - c(R), h_k = dL/dc_k = sum_t u_tk v_tk (u_t = dy_t B,
            v_t = A x_t over the calibration positions t) and F = T sum_t w_t w_t^T, w_t = u_t * v_t, the empirical
            Fisher of the T response tokens' losses with position t's share of the gradient standing for token t's;
            g[m, k] = L_m(k) - L_m(k + 1). Unlike taylor it models the scale change alpha / R -> alpha / b of the kept
            components and how components interact; it needs more calibration data (it fits 8 examples' loss).
- fisher-train: fisher's curves from statistics gathered in the last training steps (train.fisher_stats): each
            position's gradient g_t in the scales at the configuration c_t it trained at, its second-order model
            around c_t averaged over positions, so h = (sum g_t + sum g_t g_t^T c_R - sum g_t (g_t . c_t)) / T and
            F = sum g_t g_t^T / T. No calibration pass: the training run computed every dy and x it needs.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters.attach import module_layers, qdylora_config_of
from ..errors import ConfigError
from ..eval.common import ranks_restored
from ..eval.loss import response_sums
from .calib import CalibBatch, PrefixCache, batch_losses, configs_per_pass
from .greedy import ScoreTable, default_allowed

SCORES = ("loss", "taylor", "norm", "gradnorm", "fisher", "fisher-train")


def loss_grid(r_min: int, r_max: int, reference: int) -> list[int]:
    """The ranks the loss score measures: 0, r_min, the powers of two, r_max and the reference."""
    return sorted({0, r_min, r_max, reference} | {2 ** i for i in range(20) if r_min <= 2 ** i <= r_max})


def _costs(layers: Sequence[nn.Module]) -> list[int]:
    return [layer.in_features + layer.out_features for layer in layers]


def _sorted(layers) -> bool:
    """Whether the adapter's components are svd-sorted (every rank at alpha / r_max)."""
    return next(iter(layers.values())).svd_sorted


def _factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    A, B = layer.factors()
    return A.float(), B.float()


@torch.no_grad()
def norm_scores(model: nn.Module) -> ScoreTable:
    """g[m, k] = ||B[:, k]|| ||A[k]|| / ||B A||_F (data-free)."""
    layers = module_layers(model)
    cfg = qdylora_config_of(model)
    rows = []
    for layer in layers.values():
        A, B = _factors(layer)
        frob = float(((A @ A.t()) * (B.t() @ B)).sum().clamp(min=0).sqrt())
        share = B.norm(dim=0) * A.norm(dim=1)
        rows.append(share / frob if frob > 0 else torch.zeros_like(share))
    return ScoreTable(list(layers), torch.stack(rows).double(), _costs(list(layers.values())),
                      [default_allowed(cfg)] * len(layers), "norm")


@contextlib.contextmanager
def _activations_differentiable(model: nn.Module, layers: Sequence[nn.Module]) -> Iterator[None]:
    """Inside, every layer output carries a gradient while no parameter gets one: the adapters are frozen and the
    input embeddings' output requires grad (the hooks compute the adapters' gradients for all r_max components,
    so autograd computing those of the active ones too would be work done twice). Flags restored after."""
    params = [p for layer in layers for p, _ in layer.component_axes()]
    flags = [p.requires_grad for p in params]
    handle = model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        handle.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@dataclass
class ReferencePass:
    """The mean calibration loss at the reference rank and its gradients for all r_max components of every module."""

    grads: dict[str, tuple[torch.Tensor, torch.Tensor]]  # {module: (gA [r_max, in], gB [out, r_max])}
    loss: float
    # with curvature: {module: (h [r_max], sum_t w_t w_t^T [r_max, r_max])} in the component scales (fisher's h, F / T)
    scale_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    tokens: int = 0


def reference_gradients(model: nn.Module, batches: Sequence[CalibBatch], reference: int,
                        bar=None, curvature: bool = False) -> ReferencePass:
    """The mean calibration loss at rank `reference` everywhere and its gradients for all r_max components (those
    >= reference as if switched on at scale alpha / reference), from one forward and backward pass per batch; with
    `curvature`, also fisher's per-position statistics in the component scales."""
    layers = module_layers(model)
    cfg = qdylora_config_of(model)
    scale = cfg.scale(reference, _sorted(layers))
    grads = {}
    factors = {}
    stats = {} if curvature else None
    for name, layer in layers.items():
        A, B = _factors(layer)
        factors[name] = (A, B)
        grads[name] = (torch.zeros_like(A), torch.zeros_like(B))
        if curvature:
            stats[name] = (A.new_zeros(cfg.r_max, dtype=torch.float64), A.new_zeros(cfg.r_max, cfg.r_max,
                                                                                   dtype=torch.float64))

    # the current batch's positions (flat) and its real ones: padded positions get no gradient, so their rows are
    # skipped (inputs not laid out as [rows, positions, features] are taken whole)
    positions, keep = 0, None

    def rows(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, t.shape[-1])
        return (t.index_select(0, keep) if keep is not None and t.shape[0] == positions else t).float()

    def capture(name):
        def hook(_module, args, output):
            x = args[0].detach()

            def on_grad(dy):
                A, B = factors[name]
                x2, dy2 = rows(x), rows(dy)
                u, v = dy2 @ B, x2 @ A.t()  # [tokens, r_max]
                if stats is not None:
                    w = u * v  # each position's share of dL/dc
                    stats[name][0].add_(w.sum(0).double())
                    stats[name][1].add_((w.t() @ w).double())
                # the scale goes on the [tokens, r_max] products, the smallest tensors on the way
                grads[name][0].addmm_(u.mul_(scale).t(), x2)
                grads[name][1].addmm_(dy2.t(), v.mul_(scale))
            output.register_hook(on_grad)
        return hook

    total = sum(b.tokens for b in batches)
    mean_loss = 0.0
    with ranks_restored(model), _activations_differentiable(model, list(layers.values())), torch.enable_grad():
        for layer in layers.values():
            layer.set_rank(reference)
        handles = [layer.register_forward_hook(capture(name)) for name, layer in layers.items()]
        try:
            for batch in batches:
                flat = batch.mask.reshape(-1).bool()
                positions, keep = flat.numel(), (None if bool(flat.all()) else flat.nonzero().squeeze(1))
                loss = response_sums(model, batch.ids, batch.mask, batch.labels)[:, 0].sum() / total
                loss.backward()
                mean_loss += float(loss.detach())
                if bar is not None:
                    bar.update(1)
        finally:
            for h in handles:
                h.remove()
    return ReferencePass(grads, mean_loss, stats, total)


def taylor_scores(model: nn.Module, batches: Sequence[CalibBatch], reference: int, bar=None,
                  ref: ReferencePass | None = None) -> ScoreTable:
    """g[m, k] = sum_i |A[k, i] gA[k, i]| + sum_j |B[j, k] gB[j, k]| at the reference (`ref`: reference_gradients
    already computed at it)."""
    layers = module_layers(model)
    ref = ref or reference_gradients(model, batches, reference, bar)
    cfg = qdylora_config_of(model)
    # gradients came at the reference's scale; a component k >= reference runs at the scale of rank k + 1 at
    # the most (alpha / (k + 1); svd-sorted: alpha / r_max, the same as the reference's)
    sorted_ = _sorted(layers)
    rescale = torch.tensor([1.0 if i < reference else cfg.scale(i + 1, sorted_) / cfg.scale(reference, sorted_)
                            for i in range(cfg.r_max)])
    rows = []
    for name, layer in layers.items():
        A, B = _factors(layer)
        gA, gB = ref.grads[name]
        rows.append(((A * gA).abs().sum(1) + (B * gB).abs().sum(0)) * rescale)
    return ScoreTable(list(layers), torch.stack(rows).double(), _costs(list(layers.values())),
                      [default_allowed(cfg)] * len(layers), "taylor",
                      {"reference": reference, "reference_loss": ref.loss})


def fisher_curves(stats: dict[str, tuple[torch.Tensor, torch.Tensor]], table: torch.Tensor,
                  reference: int) -> torch.Tensor:
    """[modules, r_max + 1]: fisher's modelled L_m(b) - L at every rank b = 0..r_max (module doc) from each module's
    (h, F) at `reference`; `table`: the component scales of every rank (QDyLoRAConfig.component_scales)."""
    d = table.double().cpu() - table[reference].double().cpu()  # [r_max + 1, r_max]
    curves = []
    for h, F in stats.values():
        h, F = h.double().cpu(), F.double().cpu()  # small; the tables live on the CPU
        curves.append(d @ h + 0.5 * ((d @ F) * d).sum(1))
    return torch.stack(curves)


def curve_table(names: list[str], curves: torch.Tensor, costs: list[int], cfg, score: str,
                info: dict) -> ScoreTable:
    """The ScoreTable of modelled loss curves: g[m, k] = L_m(k) - L_m(k + 1)."""
    return ScoreTable(names, curves[:, :-1] - curves[:, 1:], costs, [default_allowed(cfg)] * len(names), score, info)


def fisher_scores(model: nn.Module, batches: Sequence[CalibBatch], reference: int, bar=None,
                  ref: ReferencePass | None = None) -> ScoreTable:
    """g[m, k] = L_m(k) - L_m(k + 1) of fisher's second-order model at the reference (`ref`: reference_gradients
    already computed there with curvature)."""
    layers = module_layers(model)
    cfg = qdylora_config_of(model)
    if ref is None or ref.scale_stats is None:
        ref = reference_gradients(model, batches, reference, bar, curvature=True)
    stats = {n: (h, ref.tokens * ww) for n, (h, ww) in ref.scale_stats.items()}
    curves = fisher_curves(stats, cfg.component_scales(_sorted(layers)), reference)
    return curve_table(list(layers), curves, _costs(list(layers.values())), cfg, "fisher",
                       {"reference": reference, "reference_loss": ref.loss})


def fisher_train_scores(stats: dict[str, torch.Tensor], costs: dict[str, int], cfg, reference: int) -> ScoreTable:
    """fisher's g[m, k] from the statistics `qdylora train --fisher-steps` saved beside the adapter (no data)."""
    from ..train.fisher_stats import at_reference, stats_info

    table = cfg.component_scales()
    at = at_reference(stats, table, reference)
    if set(at) != set(costs):
        raise ConfigError(f"the training statistics describe other modules than the adapter ({len(at)} vs "
                          f"{len(costs)}); train again with --fisher-steps, or use --score fisher --data CALIB")
    curves = fisher_curves({n: at[n] for n in costs}, table, reference)
    return curve_table(list(costs), curves, list(costs.values()), cfg, "fisher-train",
                       {"reference": reference, **stats_info(stats)})


def gradnorm_on_rank(r_max: int, reference: int) -> int:
    """The rank a module switched on by gradnorm gets: twice the reference, so about half the modules fit."""
    return min(r_max, 2 * reference)


def gradnorm_scores(model: nn.Module, batches: Sequence[CalibBatch], reference: int, bar=None,
                    ref: ReferencePass | None = None) -> ScoreTable:
    """Per module G_m = ||(gA[:n], gB[:, :n])|| at the reference; the module is off or on at rank n."""
    layers = module_layers(model)
    cfg = qdylora_config_of(model)
    n = gradnorm_on_rank(cfg.r_max, reference)
    ref = ref or reference_gradients(model, batches, reference, bar)
    gains = torch.zeros(len(layers), cfg.r_max, dtype=torch.float64)
    for i, name in enumerate(layers):
        gA, gB = ref.grads[name]
        gains[i, :n] = float((gA[:n].pow(2).sum() + gB[:, :n].pow(2).sum()).sqrt()) / n
    return ScoreTable(list(layers), gains, _costs(list(layers.values())), [[0, n]] * len(layers), "gradnorm",
                      {"reference": reference, "on_rank": n, "reference_loss": ref.loss})


@torch.no_grad()
def loss_scores(model: nn.Module, batches: Sequence[CalibBatch], reference: int, grid: Sequence[int] | None = None,
                bar=None) -> ScoreTable:
    """Measured loss of every module truncated to every grid rank with the others at the reference (see module doc).

    All truncations of a batch run in passes of several configurations (per-row ranks); a truncation in
    decoder block l starts from the reference's recorded output of block l - 1.
    """
    layers = module_layers(model)
    names, mods = list(layers), list(layers.values())
    cfg = qdylora_config_of(model)
    grid = sorted(set(grid or loss_grid(cfg.r_min, cfg.r_max, reference)) | {reference})
    others = [g for g in grid if g != reference]
    configs = torch.full((len(names) * len(others), len(names)), reference, dtype=torch.long)
    for m in range(len(names)):
        configs[m * len(others):(m + 1) * len(others), m] = torch.tensor(others)
    cache = PrefixCache(model, names)
    by_block: dict[int, list[int]] = {}
    for c in range(configs.shape[0]):
        by_block.setdefault(cache.block_of(c // len(others)), []).append(c)
    nll = torch.zeros(configs.shape[0], dtype=torch.float64)
    count = torch.zeros_like(nll)
    ref_nll = ref_count = 0.0
    passes = 0
    ref_config = torch.full((1, len(names)), reference, dtype=torch.long)
    with ranks_restored(model):
        for batch in batches:
            with cache.record():
                a, b = batch_losses(model, batch, ref_config, mods)
            ref_nll, ref_count, passes = ref_nll + float(a[0]), ref_count + float(b[0]), passes + 1
            step = configs_per_pass(batch)
            for block, idx in sorted(by_block.items()):
                for s in range(0, len(idx), step):
                    chunk = idx[s:s + step]
                    with cache.start_at(block, len(chunk)):
                        a, b = batch_losses(model, batch, configs[chunk], mods)
                    nll[chunk] += a
                    count[chunk] += b
                    passes += 1
                    if bar is not None:
                        bar.update(len(chunk))
    losses = (nll / count.clamp(min=1)).reshape(len(names), len(others))
    ref_loss = ref_nll / max(ref_count, 1.0)
    gains = torch.zeros(len(names), cfg.r_max, dtype=torch.float64)
    for m in range(len(names)):
        at = {g: float(losses[m, i]) for i, g in enumerate(others)} | {reference: ref_loss}
        for lo, hi in zip(grid, grid[1:]):
            gains[m, lo:hi] = (at[lo] - at[hi]) / (hi - lo)
    info = {"reference": reference, "grid": grid, "reference_loss": ref_loss, "passes": passes,
            "truncations": int(configs.shape[0]), "losses": {n: dict(zip(others, losses[i].tolist()))
                                                             for i, n in enumerate(names)}}
    return ScoreTable(names, gains, _costs(mods), [list(grid)] * len(names), "loss", info)


def score_work(score: str, batches: Sequence[CalibBatch], n_modules: int, grid_size: int) -> int:
    """Units of work a score's progress bar counts (batches, or configurations x batches for loss)."""
    if score == "norm":
        return 0
    if score == "loss":
        return len(batches) * n_modules * (grid_size - 1)
    return len(batches)


def compute_scores(score: str, model: nn.Module, batches: Sequence[CalibBatch], reference: int,
                   grid: Sequence[int] | None = None, progress: bool = True) -> ScoreTable:
    """The ScoreTable of `score` (one of SCORES) at the reference rank, timed, with a progress bar."""
    if score not in SCORES or score == "fisher-train":
        raise ValueError(f"score {score!r}; use one of {', '.join(s for s in SCORES if s != 'fisher-train')} "
                         "(fisher-train: fisher_train_scores on the run's statistics)")
    cfg = qdylora_config_of(model)
    size = len(sorted(set(grid or loss_grid(cfg.r_min, cfg.r_max, reference)) | {reference}))
    work = score_work(score, batches, len(module_layers(model)), size)
    bar = tqdm(total=work, desc=f"score {score}", dynamic_ncols=True) if progress and work else None
    t0 = time.perf_counter()
    try:
        if score == "norm":
            table = norm_scores(model)
        elif score == "taylor":
            table = taylor_scores(model, batches, reference, bar)
        elif score == "gradnorm":
            table = gradnorm_scores(model, batches, reference, bar)
        elif score == "fisher":
            table = fisher_scores(model, batches, reference, bar)
        else:
            table = loss_scores(model, batches, reference, grid, bar)
    finally:
        if bar is not None:
            bar.close()
    table.info["seconds"] = time.perf_counter() - t0
    return table
