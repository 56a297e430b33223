"""Optimizers: the `--optim` names, and ComponentAdamW, which steps only the adapter components trained in a step.

A DyLoRA step trains some components of each adapter (row k of A and column k of B is component k)
and must leave the others exactly as they were: AdamW moves a parameter with a zero gradient through
its momentum and weight decay, so a plain AdamW over [r_max, in] tensors would not. ComponentAdamW
keeps full-size state, per component: AdamW moments (32-bit, or 8-bit blockwise like bitsandbytes,
one 256-value block never spanning two components) and a step count, so the bias correction of a
component counts the steps it was trained in, as if it were a parameter of its own. In a step it
reads and writes only the components named trained: every other value and state entry stays bit
for bit. Large states can live in bitsandbytes' paged memory on CUDA, like its paged optimizers.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from ..shards import gather_dim, is_sharded, local, row_offset

STATE_BLOCK = 256  # values per absmax block of the 8-bit state (bitsandbytes' blockwise optimizers)
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages only states of at least this many values


def resolve_optim(optim: str) -> str:
    """The transformers optimizer name for `optim` ('auto': paged AdamW 32-bit on CUDA, torch AdamW on CPU)."""
    if optim != "auto":
        return optim
    return "paged_adamw_32bit" if torch.cuda.is_available() else "adamw_torch"


def state_settings(optim: str) -> dict:
    """ComponentAdamW's (state_bits, paged) for a resolved --optim name."""
    return {"state_bits": 8 if optim.endswith("8bit") else 32, "paged": optim.startswith("paged_")}


def component_state_nbytes(n_components: int, n: int, state_bits: int, paged: bool, device: str) -> tuple[int, int]:
    """(bytes, bytes of them paged) of ComponentAdamW's state for a tensor of `n_components` x `n` values.

    32-bit: two fp32 moments per value; 8-bit: two uint8 moments per value, each component padded to
    whole 256-value blocks, plus one fp32 absmax per block and moment (never paged). Step counts live
    on the CPU.
    """
    if state_bits == 32:
        moments, absmax = 2 * 4 * n_components * n, 0
    else:
        width = math.ceil(n / STATE_BLOCK) * STATE_BLOCK
        moments, absmax = 2 * n_components * width, 2 * 4 * n_components * (width // STATE_BLOCK)
    is_paged = paged and device == "cuda" and n_components * n >= PAGED_MIN_NUMEL
    return moments + absmax, moments if is_paged else 0


# fp32 [k, n] temporaries a step holds at once for the k stepped components of one tensor: the
# value, gradient and two moments gathered, and the update term
STEP_TEMPORARIES = 5


def _components(t: torch.Tensor, axis: int, idx: torch.Tensor | None) -> torch.Tensor:
    """[k, n]: the components `idx` of t along `axis` (all when idx is None), one per row."""
    sel = t if idx is None else t.index_select(axis, idx)
    return sel if axis == 0 else sel.t()


def _put(t: torch.Tensor, axis: int, idx: torch.Tensor | None, rows: torch.Tensor) -> None:
    """Write [k, n] rows back as components `idx` of t (the inverse of _components)."""
    rows = rows if axis == 0 else rows.t()
    if idx is None:
        t.copy_(rows)
    else:
        t.index_copy_(axis, idx, rows.to(t.dtype))


class ComponentAdamW(torch.optim.Optimizer):
    """AdamW that steps only the components `active(p)` names (a LongTensor of indices, or None for all).

    `axes` maps an adapter parameter to its component axis (0 for A [r, in], 1 for B [out, r]); other
    parameters are stepped whole. `lr_scale` may give a per-component learning-rate factor [r].
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, state_bits: int = 32, paged: bool = False,
                 axes: dict | None = None, active: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
                 lr_scale: dict | None = None) -> None:
        if state_bits not in (8, 32):
            raise ValueError(f"state_bits={state_bits}; use 8 or 32")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_bits, self.paged = state_bits, paged
        self.axes = axes or {}
        self.active = active or (lambda p: None)
        self.lr_scale = lr_scale or {}
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _qmap(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """bitsandbytes' signed (first moment) and unsigned (second moment) 8-bit maps, once per device."""
        if device not in self._qmaps:
            import bitsandbytes.functional as F

            self._qmaps[device] = (F.create_dynamic_map(signed=True).to(device),
                                   F.create_dynamic_map(signed=False).to(device))
        return self._qmaps[device]

    # ------------------------------------------------------------------ state

    def _buffer(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.paged and device.type == "cuda" and shape[0] * shape[1] >= PAGED_MIN_NUMEL:
            import bitsandbytes.functional as F

            buf = F.get_paged(*shape, dtype=dtype, device=device)
            F.fill(buf, 0)
            return buf
        return torch.zeros(shape, dtype=dtype, device=device)

    def _matrix(self, t: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(2-D view of t, component axis): an adapter tensor as it is, anything else as one component."""
        return (t, self.axes[p]) if p in self.axes else (t.view(1, -1), 0)

    def _init_state(self, p: torch.Tensor) -> dict:
        data = local(p)
        if is_sharded(p) and self.state_bits != 32:
            raise ValueError("8-bit ComponentAdamW state cannot be sharded (FSDP); use state_bits=32")
        mat, axis = self._matrix(data, p)
        n_comp, n = (mat if axis == 0 else mat.t()).shape  # the components held here, values per component
        # step counts of every component of the whole tensor: the same in every process
        state = {"step": torch.zeros(p.shape[axis] if p in self.axes else 1, dtype=torch.int64)}
        if self.state_bits == 32:
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = self._buffer((n_comp, n), torch.float32, p.device)
        else:
            width = math.ceil(n / STATE_BLOCK) * STATE_BLOCK
            for key in ("state1", "state2"):
                state[key] = self._buffer((n_comp, width), torch.uint8, p.device)
            for key in ("absmax1", "absmax2"):
                state[key] = torch.zeros(n_comp, width // STATE_BLOCK, dtype=torch.float32, device=p.device)
        return state

    def _moments(self, state: dict, idx: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(exp_avg, exp_avg_sq) of the components idx, fp32 [k, n]."""
        if self.state_bits == 32:
            return tuple(state[k] if idx is None else state[k].index_select(0, idx) for k in ("exp_avg", "exp_avg_sq"))
        from bitsandbytes.functional import QuantState, dequantize_blockwise

        out = []
        maps = self._qmap(state["state1"].device)
        for q, a, code in (("state1", "absmax1", maps[0]), ("state2", "absmax2", maps[1])):
            qs, am = (state[q], state[a]) if idx is None else (state[q].index_select(0, idx), state[a].index_select(0, idx))
            qstate = QuantState(absmax=am.reshape(-1), code=code, blocksize=STATE_BLOCK, dtype=torch.float32)
            out.append(dequantize_blockwise(qs.reshape(-1), qstate).reshape(qs.shape)[:, :n])
        return out[0], out[1]

    def _store(self, state: dict, idx: torch.Tensor | None, m: torch.Tensor, v: torch.Tensor) -> None:
        if self.state_bits == 32:
            for key, val in (("exp_avg", m), ("exp_avg_sq", v)):
                _put(state[key], 0, idx, val)
            return
        from bitsandbytes.functional import quantize_blockwise

        width = state["state1"].shape[1]
        maps = self._qmap(state["state1"].device)
        for val, q, a, code in ((m, "state1", "absmax1", maps[0]), (v, "state2", "absmax2", maps[1])):
            padded = torch.nn.functional.pad(val, (0, width - val.shape[1]))
            qv, qstate = quantize_blockwise(padded.reshape(-1).contiguous(), code=code, blocksize=STATE_BLOCK)
            _put(state[q], 0, idx, qv.reshape(padded.shape))
            _put(state[a], 0, idx, qstate.absmax.reshape(padded.shape[0], -1))

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                idx = self.active(p) if p in self.axes else None
                if idx is not None and idx.numel() == 0:
                    continue
                # the step counts of every component trained, in every process; the values of those it holds
                counted = None if idx is None else idx.cpu()
                _put(state["step"], 0, counted,
                     (state["step"] if counted is None else state["step"].index_select(0, counted)) + 1)
                mat, axis = self._matrix(local(p), p)
                first, held = (row_offset(p), mat.shape[0]) if axis == 0 and p in self.axes else (0, None)
                if idx is not None and held is not None and is_sharded(p):
                    idx = idx[(idx >= first) & (idx < first + held)] - first  # the rows of A this process holds
                    if idx.numel() == 0:
                        continue
                if mat.numel() == 0:
                    continue
                idx = None if idx is None else idx.to(p.device)
                x = _components(mat, axis, idx).float()
                g = _components(self._matrix(local(p.grad), p)[0], axis, idx).float()
                m, v = self._moments(state, idx, x.shape[1])
                cpu_idx = None if idx is None else idx.cpu()
                if idx is None:
                    steps = state["step"].narrow(0, first, x.shape[0]) if state["step"].numel() > 1 else state["step"]
                else:
                    steps = state["step"].index_select(0, cpu_idx + first)
                t = steps.to(torch.float64)
                lr = torch.full_like(t, group["lr"])
                if p in self.lr_scale:
                    scale = self.lr_scale[p].to(torch.float64)
                    lr = lr * (scale if idx is None else scale.index_select(0, cpu_idx))

                def per_row(values: torch.Tensor) -> torch.Tensor:
                    # computed in float64 and rounded once, as torch's AdamW rounds its Python-float scalars
                    return values.to(x.dtype).to(x.device)[:, None]

                x.mul_(per_row(1 - lr * group["weight_decay"]))
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v.sqrt() / per_row((1 - beta2 ** t).sqrt())).add_(group["eps"])
                x.sub_(per_row(lr / (1 - beta1 ** t)) * (m / denom))
                _put(mat, axis, idx, x)
                self._store(state, idx, m, v)
        return loss

    # ------------------------------------------------------------------ checkpoints

    def _sharded_dim(self, p: torch.Tensor) -> int:
        """The dim of p's moment tensors [components, n] that FSDP's row shards split: 0 for A, 1 otherwise."""
        return 0 if self.axes.get(p) == 0 else 1

    def state_dict(self) -> dict:
        """As torch's; with sharded parameters the moments are gathered whole (a collective: every process)."""
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            if i in sd["state"] and is_sharded(p):
                dim = self._sharded_dim(p)
                sd["state"][i] = {k: gather_dim(v, dim) if k in ("exp_avg", "exp_avg_sq") else v
                                  for k, v in sd["state"][i].items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but each state tensor keeps its dtype (8-bit states stay uint8) and step counts stay on the CPU;
        whole moments of a sharded parameter are cut to the rows this process holds."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for pid, p in zip(ids, params):
            if pid not in saved:
                continue
            fresh = self._init_state(p)
            for key, value in saved[pid].items():
                if value.shape != fresh[key].shape and is_sharded(p):
                    dim = self._sharded_dim(p)
                    width = local(p).shape[1:].numel() if dim == 1 and p not in self.axes else 1
                    value = value.narrow(dim, row_offset(p) * width, fresh[key].shape[dim])
                fresh[key].copy_(value.to(device=fresh[key].device, dtype=fresh[key].dtype))
            self.state[p] = fresh
