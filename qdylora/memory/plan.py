"""The plan itself: itemised bytes, the phases' totals, the verdict against a budget, as a table or JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .architecture import ArchSpec
from .units import format_bytes


@dataclass
class MemoryItem:
    """One line of the plan."""

    name: str
    bytes: int
    detail: str
    # where it lives: 'gpu' (torch allocator), 'paged' (unified memory, may move to CPU RAM),
    # 'outside' (on the card, not counted by torch.cuda.max_memory_allocated)
    where: str = "gpu"


@dataclass
class MemoryPlan:
    """The itemised estimate, the verdict and what to change."""

    model: str
    settings: dict[str, Any]
    items: list[MemoryItem]
    peak_allocated: int  # what torch.cuda.max_memory_allocated should show
    total: int  # peak_allocated + slack + context: what the card must hold
    budget: int | None
    fits: bool | None
    phases: dict[str, int] = field(default_factory=dict)
    max_seq_len: int | None = None
    max_batch_size: int | None = None
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    arch: ArchSpec | None = field(default=None, repr=False)

    def item(self, name: str) -> MemoryItem:
        """The item called `name`."""
        for it in self.items:
            if it.name == name:
                return it
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (bytes as ints)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "arch"}
        if self.arch is not None:
            a = self.arch
            d["architecture"] = {
                "model_type": a.model_type, "layers": a.n_layers, "hidden": a.hidden, "ffn": a.ffn,
                "heads": a.n_heads, "kv_heads": a.n_kv_heads, "vocab": a.vocab, "tied_embeddings": a.tied,
                "params": a.n_params, "quantized_params": sum(l.in_features * l.out_features for l in a.linears),
                "adapter_targets": len(a.targets),
            }
        return d

    def format_table(self) -> str:
        """A human-readable table with verdict and advice."""
        s = self.settings
        lines = [
            f"qdylora memory plan: {self.model} | r_max={s['r_max']} seq_len={s['seq_len']} "
            f"batch={s['batch_size']} optim={s['optim']} gradient_checkpointing={s['gradient_checkpointing']} "
            f"dtype={s['dtype']} kernel={s['kernel']} device={s['device']}"
            + (f" | per GPU of {s['num_gpus']} ({s['strategy']})" if s.get("num_gpus", 1) > 1 else ""),
            "",
            f"{'item':<22}{'size':>13}  {'where':<8} detail",
            "-" * 100,
        ]
        for it in self.items:
            lines.append(f"{it.name:<22}{format_bytes(it.bytes):>13}  {it.where:<8} {it.detail}")
        lines.append("-" * 100)
        for ph, v in self.phases.items():
            lines.append(f"{'phase ' + ph:<22}{format_bytes(v):>13}")
        lines.append(f"{'peak allocated':<22}{format_bytes(self.peak_allocated):>13}  (torch.cuda.max_memory_allocated)")
        lines.append(f"{'total on the device':<22}{format_bytes(self.total):>13}  (+ allocator slack + CUDA context)")
        if self.budget is not None:
            verdict = "FITS" if self.fits else "DOES NOT FIT"
            lines.append(f"{'budget':<22}{format_bytes(self.budget):>13}  -> {verdict} "
                         f"({format_bytes(abs(self.budget - self.total))} "
                         f"{'to spare' if self.fits else 'over'})")
            lines.append(f"largest seq_len that fits at batch {s['batch_size']}: {self.max_seq_len or 'none'}; "
                         f"largest batch at seq_len {s['seq_len']}: {self.max_batch_size or 'none'}")
        for a in self.advice:
            lines.append(f"advice: {a}")
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)
