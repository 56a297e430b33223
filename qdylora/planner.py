"""Memory planner: what a QDyLoRA training step needs on the GPU, item by item, without any weights.

The model is built on the meta device from its config (shipped, local or hub), so the planner
knows every linear's shape. Each item below is computed from those shapes:

- ``nf4_weights``: every quantized linear: 0.5 B/param packed NF4 + 1/64 B/param uint8 absmax
  (blocksize 64) + 4/(64*256) B/param fp32 nested absmax (blocksize 256), plus per linear the
  NF4 code (16 fp32), the nested code (256 fp32) and the absmax offset (1 fp32).
- ``unquantized_params``: embeddings, norms, the LM head (once when tied), in the model dtype.
- ``adapters``: r_max*(in+out) fp32 per target linear.
- ``adapter_grads``: fp32 gradients at the largest rank (the worst step of a rank sweep).
- ``optimizer_state``: AdamW 32-bit 8 B/param; bnb 8-bit 2 B/param + an fp32 absmax per 256
  values per state (tensors below 4096 values stay 32-bit). bitsandbytes *pages* (unified memory
  that the driver may evict to CPU RAM when the GPU is full) only tensors of at least 1e5 values.
- ``activations``: what autograd keeps for backward; with gradient checkpointing one hidden
  state per layer boundary plus one layer's full set while it is recomputed in backward.
- ``logits_loss``: logits in the model dtype, their fp32 copy / log-softmax / gradients
  (batch*seq*vocab*4 bytes each): often the largest transient.
- ``kernel_transients``: the reference path dequantizes the largest weight in full for its
  matmul; the Triton path decodes tiles in registers and needs only small workspaces.
- ``cuda_context`` and ``allocator_slack``: outside ``torch.cuda.max_memory_allocated`` but on the card.

The peak is not the sum: logits transients happen at the start of backward when no adapter
gradient exists yet; the full gradients exist at its end. ``peak`` takes the larger of the two
phases (and of the optimizer step). The per-layer saved-tensor formulas were checked against a
tensor-level tracker (:class:`TensorMemoryTracker`) on CPU for Llama and Falcon layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import DEFAULT_TARGET_MODULES
from .quantize import DEFAULT_SKIP_MODULES, NESTED_BLOCKSIZE, NF4_BLOCKSIZE

KiB, MiB, GiB = 1024, 1024**2, 1024**3
ARCH_DIR = Path(__file__).parent / "arch_configs"
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw_torch")
OPTIMIZER_ALIASES = {"adamw": "adamw_torch"}
# architectures whose decoder layer the activation model knows
LLAMA_LIKE = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = LLAMA_LIKE + ("falcon",)
# bitsandbytes: state of tensors with fewer values is allocated normally (not paged) / kept 32-bit
BNB_PAGED_MIN_NUMEL = 100_000
BNB_MIN_8BIT_SIZE = 4096
BNB_8BIT_BLOCKSIZE = 256
# per-linear quantization tables: NF4 code (16 fp32) + nested dynamic code (256 fp32) + offset (fp32)
NF4_TABLE_BYTES = 16 * 4 + 256 * 4 + 4
# CUDA context of a recent driver + cuBLAS workspace; outside the torch allocator's count
CUDA_CONTEXT_BYTES = 512 * MiB
# reserved-but-unused blocks of the caching allocator (fragmentation), as a share of the peak
ALLOCATOR_SLACK = 0.03
TIGHT_FRACTION = 0.85  # above this share of the budget, choose_memory_settings plays safe


class PlannerError(ValueError):
    """Bad planner input; the message names the problem and the fix."""


# ----------------------------------------------------------------------------- sizes

_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kib": KiB, "kb": 1000,
    "m": MiB, "mib": MiB, "mb": 1000**2,
    "g": GiB, "gib": GiB, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}


def parse_memory_size(text: str | int | float) -> int:
    """Bytes from '32GiB', '24 GB', '80000MiB', '32G' (binary) or a plain number of bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise PlannerError(f"memory size {text} must be positive")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise PlannerError(
            f"cannot parse memory size {text!r}; write a number and a unit such as 32GiB, 24GB, "
            "80000MiB or 32G (G, M, K and GiB/MiB/KiB are binary; GB/MB/KB are decimal)"
        )
    value = float(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise PlannerError(f"memory size {text!r} must be positive")
    return int(value)


def format_bytes(n: float) -> str:
    """Human-readable binary size, e.g. '19.43 GiB'."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{int(n)} B"


def nf4_bytes(numel: int) -> int:
    """Bytes of one NF4 double-quantized weight of `numel` values, without the code tables."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    nested_blocks = math.ceil(blocks / NESTED_BLOCKSIZE)
    # packed 4-bit values, uint8 absmax per 64, fp32 absmax of those per 256
    return math.ceil(numel / 2) + blocks + 4 * nested_blocks


# ----------------------------------------------------------------------------- configs

def shipped_configs() -> list[str]:
    """Names of the architecture configs that ship with qdylora (work offline)."""
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlannerError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}); fix or replace the file") from e


def load_config_dict(model: str | Path) -> tuple[dict, str]:
    """(config.json content, where it came from) for a shipped name, a local file/folder or a hub id."""
    name = str(model)
    if name in shipped_configs():
        return _read_json(ARCH_DIR / f"{name}.json"), f"shipped:{name}"
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PlannerError(f"folder {path} has no config.json; point --model at a model folder or a config file")
        return _read_json(path / "config.json"), str(path / "config.json")
    if path.is_file():
        return _read_json(path), str(path)
    if name.endswith(".json") or name.startswith((".", "/", "~")):
        raise PlannerError(f"config file {name} does not exist; shipped configs: {', '.join(shipped_configs())}")
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(name)
    except Exception as e:  # offline, unknown repo, gated repo ...
        raise PlannerError(
            f"cannot get the config of {name!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Offline, use a shipped config "
            f"({', '.join(shipped_configs())}) or a local config.json / model folder."
        ) from e
    return cfg.to_dict(), f"hub:{name}"


_REQUIRED = {
    "llama": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"),
    "falcon": ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"),
}


def config_from_dict(d: dict, source: str = "config"):
    """A transformers config for a supported decoder architecture; clear errors for anything else."""
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise PlannerError(f"{source} has no 'model_type'; add one, e.g. \"model_type\": \"llama\" "
                           f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise PlannerError(
            f"architecture {model_type!r} ({source}) is not supported by the memory planner; "
            f"supported model_type values: {', '.join(SUPPORTED_MODEL_TYPES)}. Use one of these or a "
            f"shipped config ({', '.join(shipped_configs())})"
        )
    family = "falcon" if model_type == "falcon" else "llama"
    missing = [k for k in _REQUIRED[family] if d.get(k) in (None, "")]
    if family == "falcon" and d.get("num_hidden_layers") is None and d.get("n_layer") is not None:
        missing.remove("num_hidden_layers")
    if missing:
        raise PlannerError(f"{source} ({model_type}) lacks {', '.join(missing)}; add them to the config "
                           "(copy the model's config.json from its hub page)")
    for k in ("torch_dtype", "dtype", "transformers_version", "architectures", "_name_or_path"):
        d.pop(k, None)
    try:
        return AutoConfig.for_model(model_type, **d)
    except Exception as e:
        raise PlannerError(f"{source}: transformers rejects this {model_type} config: {e}") from e


# ----------------------------------------------------------------------------- architecture

@dataclass
class LinearSpec:
    """One linear layer: its name, shape and whether it gets an adapter."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    target: bool


@dataclass
class ArchSpec:
    """What the planner needs to know about a model: shapes only, no weights."""

    name: str
    model_type: str
    family: str
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    linears: list[LinearSpec]  # every quantized linear of the model
    unquantized_numel: int  # embeddings, norms, head (tied counted once)
    n_params: int
    # Falcon details that change what attention saves
    new_decoder_architecture: bool = False
    num_ln_per_layer: int = 2

    def layer_linears(self, layer: int = 0) -> list[LinearSpec]:
        """The quantized linears of decoder layer `layer`."""
        tag = f".{layer}."
        return [l for l in self.linears if tag in l.name]

    @property
    def targets(self) -> list[LinearSpec]:
        return [l for l in self.linears if l.target]


def _is_skipped(name: str) -> bool:
    return name.rpartition(".")[2] in DEFAULT_SKIP_MODULES


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def arch_from_config(cfg, name: str = "model", target_modules: list[str] | None = None) -> ArchSpec:
    """Build the model on the meta device and read every shape the planner needs."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    wanted = list(target_modules) if target_modules else list(DEFAULT_TARGET_MODULES)
    linears, quant_params = [], set()
    for mod_name, mod in model.named_modules():
        # isinstance, not type(): Falcon's FalconLinear subclasses nn.Linear
        if isinstance(mod, nn.Linear) and not _is_skipped(mod_name):
            linears.append(LinearSpec(mod_name, mod.in_features, mod.out_features, mod.bias is not None,
                                      _matches(mod_name, wanted)))
            quant_params.add(id(mod.weight))
            if mod.bias is not None:
                quant_params.add(id(mod.bias))  # stored beside the 4-bit weight, counted with it
    if not linears:
        raise PlannerError(f"{name}: found no linear layers to quantize")
    if not any(l.target for l in linears):
        raise PlannerError(f"{name}: target modules {wanted} match no linear; linears that exist: "
                           f"{', '.join(sorted({l.name.rpartition('.')[2] for l in linears}))}")
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    # on meta the head is not tied yet; transformers ties it to the embedding when weights load
    skip_head = tied and head is not None and embed is not None and head.weight is not embed.weight
    seen, unquant, total = set(), 0, 0
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or (skip_head and p is head.weight):
            continue
        seen.add(id(p))
        total += p.numel()
        if id(p) not in quant_params:
            unquant += p.numel()
    family = "falcon" if cfg.model_type == "falcon" else "llama"
    n_heads = cfg.num_attention_heads
    if family == "falcon":
        new_arch = bool(cfg.new_decoder_architecture)
        n_kv = cfg.num_kv_heads if new_arch else (1 if cfg.multi_query else n_heads)
        ffn = getattr(cfg, "ffn_hidden_size", None) or 4 * cfg.hidden_size
        head_dim = cfg.hidden_size // n_heads
        n_ln = (cfg.num_ln_in_parallel_attn or 2) if new_arch else (1 if cfg.parallel_attn else 2)
    else:
        new_arch = False
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        ffn = cfg.intermediate_size
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        n_ln = 2
    return ArchSpec(
        name=name, model_type=cfg.model_type, family=family, n_layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size, ffn=ffn, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
        vocab=cfg.vocab_size, tied=tied, linears=linears, unquantized_numel=unquant, n_params=total,
        new_decoder_architecture=new_arch, num_ln_per_layer=n_ln,
    )


def load_arch(model: str | Path, target_modules: list[str] | None = None, layers: int | None = None) -> ArchSpec:
    """ArchSpec for a shipped name, a local config.json / folder, or a hub id; `layers` overrides the depth."""
    d, source = load_config_dict(model)
    if layers is not None:
        d = dict(d, num_hidden_layers=int(layers))
    cfg = config_from_dict(d, source)
    return arch_from_config(cfg, name=str(model), target_modules=target_modules)


# ----------------------------------------------------------------------------- the plan

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
            f"dtype={s['dtype']} kernel={s['kernel']} device={s['device']}",
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


def _dtype_bytes(dtype: str) -> int:
    if dtype in ("bf16", "bfloat16", "fp16", "float16"):
        return 2
    if dtype in ("fp32", "float32"):
        return 4
    raise PlannerError(f"dtype {dtype!r} is unknown; use bf16, fp16 or fp32")


def _optimizer_bytes(numels: list[int], optim: str) -> tuple[int, int]:
    """(total state bytes, bytes of it that bitsandbytes pages) for AdamW over parameters of these sizes."""
    total = paged = 0
    paged_optim = optim.startswith("paged_")
    eight_bit = optim.endswith("8bit")
    for n in numels:
        if eight_bit and n >= BNB_MIN_8BIT_SIZE:
            state = 2 * n  # two uint8 states
            extra = 2 * 4 * math.ceil(n / BNB_8BIT_BLOCKSIZE)  # their fp32 absmax, never paged
        else:
            state, extra = 8 * n, 0
        total += state + extra
        if paged_optim and n >= BNB_PAGED_MIN_NUMEL:
            paged += state
    return total, paged


def _activation_terms(a: ArchSpec, batch: int, seq: int, r: int, c: int, update: str,
                      kernel: str, autocast: bool) -> dict[str, int]:
    """Bytes autograd saves for backward, per part; see the module docstring."""
    T, h, f = batch * seq, a.hidden, a.ffn
    heads_tokens = T * a.n_heads
    layer_lin = a.layer_linears(0)
    tgt = [l for l in layer_lin if l.target]
    masks = 0 if kernel == "triton" else (2 if update == "frozen" else 1)
    # per target linear: the low-rank activations h=[T, r] in c, the fp32 rank masks (reference op),
    # the int64 per-row ranks (Triton op), and A/B cast to the compute dtype (a copy, even in fp32: stacked)
    lora = sum(T * r * c + T * r * 4 * masks + r * (l.in_features + l.out_features) * c for l in tgt)
    if kernel == "triton":
        lora += len(tgt) * T * 8
    # inputs of non-target 4-bit linears are saved by bitsandbytes' matmul only if they differ from
    # a target's input; rare, ignored
    if a.family == "llama":
        qd, kvd = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        # RMSNorm upcasts to fp32 (saved) and saves rsqrt; its output (c) is the next linear's saved input
        norms = 2 * (T * h * 4 + T * 4 + T * h * c)
        attn = T * (2 * qd + 2 * kvd) * c + heads_tokens * 4  # q, k, v after RoPE, output, logsumexp
        mlp = 4 * T * f * c  # gate out, up out, act(gate), act(gate)*up
        first_norm = T * h * 4 + T * 4  # layer 0's input norm saves nothing without checkpointing
        final_norm = T * h * 4 + T * 4
    else:
        n_ln = a.num_ln_per_layer
        stat = 4 if autocast else c  # LayerNorm's mean and rstd, in the dtype it runs in
        if autocast:  # CUDA autocast runs layer_norm in fp32: an fp32 copy of the input per norm
            ln_in = n_ln * T * h * 4
        else:  # the norms share the layer input
            ln_in = T * h * c
        norms = ln_in + n_ln * 2 * T * stat + n_ln * T * h * c  # outputs: saved by the next linears
        d = a.head_dim
        if a.new_decoder_architecture or a.n_kv_heads == a.n_heads:
            # falcon-40b broadcasts k, v to every head before SDPA; q, k, v, output, logsumexp, and
            # the explicit causal mask [batch, 1, seq, seq] that Falcon builds for each layer
            attn = T * 4 * h * c + heads_tokens * 4 + batch * seq * seq * c
        else:
            # multi-query (falcon-7b): q has more heads than k/v, so SDPA takes its math path and
            # saves the fp32 attention probabilities [batch, heads, seq, seq]
            attn = T * (2 * h + 2 * a.n_kv_heads * d) * c + batch * a.n_heads * seq * seq * 4
        mlp = 2 * T * f * c  # h_to_4h out (saved by GELU), GELU out
        first_norm = ln_in + n_ln * 2 * T * stat
        final_norm = (T * h * 4 if autocast else T * h * c) + 2 * T * stat
    rope = 2 * T * a.head_dim * c  # cos, sin shared by all layers
    layer = norms + attn + mlp + lora
    return {"layer": layer, "lora": lora, "first_norm": first_norm, "final_norm": final_norm, "rope": rope,
            "mlp": mlp, "attn": attn, "norms": norms}


def _compute(a: ArchSpec, r_max: int, seq_len: int, batch_size: int, optim: str, gradient_checkpointing: bool,
             dtype: str, update: str, kernel: str, device: str, autocast: bool) -> tuple[list[MemoryItem], dict, list[str]]:
    """The items and phase totals of one configuration."""
    c = _dtype_bytes(dtype)
    T = seq_len * batch_size
    notes: list[str] = []
    items: list[MemoryItem] = []

    qnumel = sum(l.in_features * l.out_features for l in a.linears)
    nf4 = sum(nf4_bytes(l.in_features * l.out_features) + NF4_TABLE_BYTES + (l.out_features * c if l.bias else 0)
              for l in a.linears)
    items.append(MemoryItem("nf4_weights", nf4,
                            f"{len(a.linears)} linears, {qnumel / 1e9:.3f}B params x "
                            f"(0.5 + 1/64 + 4/16384) B + code tables"))
    items.append(MemoryItem("unquantized_params", a.unquantized_numel * c,
                            f"{a.unquantized_numel / 1e6:.1f}M params (embeddings, norms, "
                            f"{'tied ' if a.tied else ''}head) x {c} B"))
    tg = a.targets
    ad_numel = r_max * sum(l.in_features + l.out_features for l in tg)
    items.append(MemoryItem("adapters", ad_numel * 4,
                            f"{len(tg)} target linears x r_max={r_max} x (in+out) fp32 = {ad_numel / 1e6:.1f}M params"))
    # at rank r_max every component's gradient exists; in 'frozen' mode the A side is still one
    # [r, in] tensor (the rows' grads are views of it), B keeps one [out] column
    grad_numel = ad_numel if update == "nested" else r_max * sum(l.in_features for l in tg) + sum(
        l.out_features for l in tg)
    items.append(MemoryItem("adapter_grads", grad_numel * 4,
                            f"fp32 at rank r_max ({update} update)"))
    # one parameter per rank component: rows of A ([in]) and columns of B ([out])
    numels = [n for l in tg for n in [l.in_features] * r_max + [l.out_features] * r_max]
    opt_total, opt_paged = _optimizer_bytes(numels, optim)
    opt_detail = {"adamw_torch": "torch AdamW, 8 B/param", "paged_adamw_32bit": "bnb paged AdamW 32-bit, 8 B/param",
                  "paged_adamw_8bit": "bnb paged AdamW 8-bit, 2 B/param + absmax",
                  "adamw_8bit": "bnb AdamW 8-bit, 2 B/param + absmax"}[optim]
    if optim.startswith("paged_"):
        if opt_paged == 0:
            opt_detail += ("; nothing paged: bnb pages only tensors of >= 1e5 values and each adapter "
                           "component is one row/column (in or out values)")
        else:
            opt_detail += f"; {format_bytes(opt_paged)} paged (may move to CPU RAM when the GPU is full)"
    if opt_total - opt_paged:
        items.append(MemoryItem("optimizer_state", opt_total - opt_paged, opt_detail))
    if opt_paged:
        items.append(MemoryItem("optimizer_state_paged", opt_paged,
                                "unified memory: counted on the card while resident, evicted to CPU RAM under "
                                "pressure; not in torch.cuda.max_memory_allocated", "paged"))

    act = _activation_terms(a, batch_size, seq_len, r_max, c, update, kernel, autocast)
    L = a.n_layers
    boundary = T * a.hidden * c
    # backward of one layer: the incoming gradient and the gradients of the MLP activations
    layer_bwd = T * a.hidden * c + 3 * T * a.ffn * c
    if gradient_checkpointing:
        # checkpointed inputs (hidden state entering each layer) + final norm + RoPE tables;
        # in backward one layer is recomputed with its full saved set
        saved = L * boundary + act["final_norm"] + act["rope"]
        recompute = act["layer"]
        act_detail = (f"checkpointing: {L} layer inputs x {format_bytes(boundary)} + one layer recomputed "
                      f"{format_bytes(act['layer'])} (attn {format_bytes(act['attn'])}, mlp {format_bytes(act['mlp'])}, "
                      f"adapters {format_bytes(act['lora'])})")
    else:
        saved = L * act["layer"] - act["first_norm"] + act["final_norm"] + act["rope"]
        recompute = 0
        act_detail = (f"no checkpointing: {L} layers x {format_bytes(act['layer'])} (attn {format_bytes(act['attn'])}, "
                      f"mlp {format_bytes(act['mlp'])}, adapters {format_bytes(act['lora'])})")
    items.append(MemoryItem("activations", saved + recompute, act_detail))

    V = a.vocab
    logits_peak = T * V * (c + 12)  # + gradient of nll and of log-softmax, fp32
    items.append(MemoryItem("logits_loss", logits_peak,
                            f"batch*seq*vocab = {T}x{V}: logits {c} B + fp32 log-softmax + 2 fp32 gradients "
                            f"(transient at the start of backward)"))
    biggest = max(a.linears, key=lambda l: l.in_features * l.out_features)
    if kernel == "reference":
        kern = biggest.in_features * biggest.out_features * c
        kdetail = f"reference op dequantizes the largest weight ({biggest.out_features}x{biggest.in_features}) in full"
    else:
        kern = T * (max(biggest.in_features, biggest.out_features) + r_max) * 4 + 2 * T * r_max * 4
        kdetail = "Triton op: fp32 workspace [tokens, out+r] and rank masks; weights decoded in registers"
    items.append(MemoryItem("kernel_transients", kern + layer_bwd,
                            kdetail + f"; one layer's backward gradients {format_bytes(layer_bwd)}"))

    static = nf4 + a.unquantized_numel * c + ad_numel * 4 + (opt_total - opt_paged)
    grads = grad_numel * 4
    held_logits = T * V * c  # the model output keeps its logits alive through backward
    if gradient_checkpointing:
        # end of backward: all adapter gradients + layer 0's input, recompute and backward
        bwd = static + grads + held_logits + boundary + recompute + kern + layer_bwd
    else:
        # start of backward: every layer saved, the last layer's backward running
        bwd = static + saved + held_logits + kern + layer_bwd
    phases = {
        # end of forward / start of backward: everything saved + the loss's transients, no gradients yet
        "loss": static + saved + logits_peak,
        "backward": bwd,
        # optimizer step: gradients + state; torch's AdamW (foreach) needs temporaries of gradient size
        "optimizer_step": static + grads + (grads if optim == "adamw_torch" else 0),
    }
    if device == "cuda":
        notes.append("cuda_context and allocator_slack are on the card but outside torch.cuda.max_memory_allocated")
    if autocast and a.family == "falcon":
        notes.append("under bf16 autocast LayerNorm runs in fp32 (its input copy is saved in fp32)")
    return items, phases, notes


def plan_memory(
    model: str | Path | ArchSpec,
    r_max: int = 64,
    seq_len: int = 512,
    batch_size: int = 1,
    gpu_memory: str | int | None = None,
    optim: str = "paged_adamw_32bit",
    gradient_checkpointing: bool = True,
    dtype: str = "bf16",
    update: str = "frozen",
    kernel: str | None = None,
    device: str = "cuda",
    autocast: bool | None = None,
    target_modules: list[str] | None = None,
    layers: int | None = None,
) -> MemoryPlan:
    """Itemised GPU memory of a QDyLoRA training step; `gpu_memory` (e.g. '32GiB') adds a verdict."""
    for name, v in (("r_max", r_max), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PlannerError(f"{name}={v!r} must be a positive integer")
    optim = OPTIMIZER_ALIASES.get(optim, optim)
    if optim not in OPTIMIZERS:
        raise PlannerError(f"optimizer {optim!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
    if update not in ("nested", "frozen"):
        raise PlannerError(f"update={update!r}; use 'nested' or 'frozen'")
    if device not in ("cuda", "cpu"):
        raise PlannerError(f"device={device!r}; use 'cuda' or 'cpu'")
    kernel = kernel or ("triton" if device == "cuda" else "reference")
    if kernel not in ("reference", "triton"):
        raise PlannerError(f"kernel={kernel!r}; use 'reference' or 'triton'")
    c = _dtype_bytes(dtype)
    autocast = (device == "cuda" and c == 2) if autocast is None else autocast
    budget = parse_memory_size(gpu_memory) if gpu_memory is not None else None
    arch = model if isinstance(model, ArchSpec) else load_arch(model, target_modules, layers)
    settings = {"r_max": r_max, "seq_len": seq_len, "batch_size": batch_size, "optim": optim,
                "gradient_checkpointing": gradient_checkpointing, "dtype": dtype, "update": update,
                "kernel": kernel, "device": device, "autocast": autocast}

    def peak_of(**over) -> tuple[list[MemoryItem], dict, list[str], int, int]:
        s = dict(settings, **over)
        its, ph, nt = _compute(arch, s["r_max"], s["seq_len"], s["batch_size"], s["optim"],
                               s["gradient_checkpointing"], s["dtype"], s["update"], s["kernel"], s["device"],
                               s["autocast"])
        peak = max(ph.values())
        return its, ph, nt, peak, _total(peak, device)

    items, phases, notes, peak, total = peak_of()
    if device == "cuda":
        items.append(MemoryItem("allocator_slack", int(peak * ALLOCATOR_SLACK),
                                f"{ALLOCATOR_SLACK:.0%} of the peak: cached, fragmented blocks", "outside"))
        items.append(MemoryItem("cuda_context", CUDA_CONTEXT_BYTES, "CUDA context, kernels, cuBLAS workspace",
                                "outside"))
    plan = MemoryPlan(model=str(arch.name), settings=settings, items=items, peak_allocated=peak, total=total,
                      budget=budget, fits=None if budget is None else total <= budget, phases=phases,
                      notes=notes, arch=arch)
    if budget is not None:
        fits = lambda **o: peak_of(**o)[4] <= budget  # noqa: E731
        plan.max_seq_len = _largest(lambda n: fits(seq_len=n), 1 << 20)
        plan.max_batch_size = _largest(lambda n: fits(batch_size=n), 1 << 14)
        plan.advice = _advice(plan, peak_of, budget)
    return plan


def _total(peak: int, device: str) -> int:
    return peak + (int(peak * ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES if device == "cuda" else 0)


def _largest(ok, limit: int) -> int | None:
    """Largest n in [1, limit] with ok(n) (ok is monotone), None when even 1 fails."""
    if not ok(1):
        return None
    lo, hi = 1, 2
    while hi <= limit and ok(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _advice(plan: MemoryPlan, peak_of, budget: int) -> list[str]:
    """What to shrink, and by how much, when the plan does not fit (or is tight)."""
    s = plan.settings
    over = plan.total - budget
    if over <= 0:
        if plan.total > TIGHT_FRACTION * budget:
            return [f"tight: {format_bytes(budget - plan.total)} to spare; keep gradient checkpointing and "
                    "a paged optimizer"]
        return []
    shrinkable = [it for it in plan.items if it.name not in ("cuda_context", "allocator_slack")]
    top = sorted(shrinkable, key=lambda i: -i.bytes)[:3]
    out = [f"over budget by {format_bytes(over)}: shrink the items by at least that much; the largest are "
           + ", ".join(f"{it.name} {format_bytes(it.bytes)}" for it in top)]
    fits = lambda **o: peak_of(**o)[4] <= budget  # noqa: E731
    options: list[tuple[str, dict]] = []
    if not s["gradient_checkpointing"]:
        options.append(("turn on gradient checkpointing (shrinks activations)", {"gradient_checkpointing": True}))
    if s["optim"] in ("paged_adamw_32bit", "adamw_torch"):
        options.append(("--optim paged_adamw_8bit (shrinks optimizer_state 4x)", {"optim": "paged_adamw_8bit"}))
    for desc, change in options:
        new = peak_of(**change)[4]
        out.append(f"{desc}: saves {format_bytes(plan.total - new)} -> "
                   + ("fits" if new <= budget else f"still over by {format_bytes(new - budget)}"))
    if plan.max_seq_len:
        out.append(f"shrink activations and logits_loss: --seq-len {plan.max_seq_len} fits (from {s['seq_len']})")
    if plan.max_batch_size and s["batch_size"] > 1:
        out.append(f"--batch-size {plan.max_batch_size} fits (use gradient accumulation for the rest)")
    r = _largest(lambda n: fits(r_max=n), s["r_max"])
    if r and r < s["r_max"]:
        out.append(f"shrink adapters, adapter_grads and optimizer_state: --r-max {r} fits (from {s['r_max']})")
    frugal = {"gradient_checkpointing": True, "optim": "paged_adamw_8bit", "seq_len": 1, "batch_size": 1, "r_max": 1}
    floor = peak_of(**frugal)[4]
    if floor > budget:
        base = sum(it.bytes for it in plan.items if it.name in ("nf4_weights", "unquantized_params"))
        out.append(f"no setting fits: the frozen base (nf4_weights + unquantized_params = {format_bytes(base)}) "
                   f"plus overheads needs {format_bytes(floor)} even at r_max=1, seq_len=1; use a smaller model "
                   f"or a GPU with at least {format_bytes(floor)} (this configuration: {format_bytes(plan.total)})")
    return out


def choose_memory_settings(plan: MemoryPlan, gpu_memory: str | int) -> dict[str, Any]:
    """Trainer settings for this budget: gradient checkpointing and a paged optimizer when memory is tight.

    Rules (each checked with the planner): if the fast settings (no checkpointing, the plan's
    optimizer, paged when it is a bnb one) need at most 85% of the budget, use them; otherwise turn
    gradient checkpointing on and use a *paged* optimizer of the plan's precision; if that still
    does not fit, switch to paged 8-bit AdamW. The returned 'reason' says what was chosen and why.
    """
    budget = parse_memory_size(gpu_memory)
    arch = plan.arch
    if arch is None:
        raise PlannerError("this plan has no architecture attached; build it with plan_memory")
    base = {k: plan.settings[k] for k in ("r_max", "seq_len", "batch_size", "dtype", "update", "kernel",
                                         "device", "autocast")}
    asked = plan.settings["optim"]
    paged = {"adamw_torch": "paged_adamw_32bit", "adamw_8bit": "paged_adamw_8bit"}.get(asked, asked)

    def try_(gc: bool, optim: str) -> MemoryPlan:
        return plan_memory(arch, gradient_checkpointing=gc, optim=optim, gpu_memory=budget, **base)

    fast = try_(False, asked)
    if fast.total <= TIGHT_FRACTION * budget:
        p, gc, optim, why = fast, False, asked, "memory is ample: no gradient checkpointing (faster)"
    else:
        p, gc, optim = try_(True, paged), True, paged
        why = (f"memory is tight (without checkpointing {format_bytes(fast.total)} of {format_bytes(budget)}): "
               f"gradient checkpointing on, paged optimizer {paged}")
        if not p.fits and paged != "paged_adamw_8bit":
            p8 = try_(True, "paged_adamw_8bit")
            if p8.fits or p8.total < p.total:
                p, optim = p8, "paged_adamw_8bit"
                why += "; switched to 8-bit paged AdamW because 32-bit state does not fit"
    why = f"planned {format_bytes(p.total)} of {format_bytes(budget)}; " + why
    if not p.fits:
        why += "; still does NOT fit: " + " | ".join(p.advice[1:] or p.advice)
    return {"gradient_checkpointing": gc, "optim": optim, "paged": optim.startswith("paged_"),
            "tight": gc, "fits": bool(p.fits), "planned_bytes": p.total, "budget_bytes": budget, "reason": why}


# ----------------------------------------------------------------------------- measuring

class TensorMemoryTracker:
    """Live and peak bytes of tensor storages allocated inside the context (any device, incl. CPU).

    A TorchDispatchMode sees every op's outputs; a storage not shared with an input is a new
    allocation, and a weakref finalizer on the storage says when it is freed. Tensors made
    before entering are not counted, so around a training step it measures activations,
    gradients, optimizer state and transients, not the model.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0]
                          if isinstance(t, torch.Tensor) and t.device.type != "meta"}
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        tracker._see(t.untyped_storage(), inputs)
                return out

        self._mode = _Mode()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def _see(self, storage, inputs: set[int]) -> None:
        key, n = id(storage), storage.nbytes()
        if key in self.live:  # resized in place
            self.current += n - self.live[key]
            self.live[key] = n
        elif key not in inputs:  # a new allocation (views and in-place results share an input's storage)
            self.live[key] = n
            self.current += n
            weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)

    def reset_peak(self) -> None:
        """Start a new peak from the current live bytes."""
        self.peak = self.current

    def __enter__(self) -> "TensorMemoryTracker":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def quantized_bytes(module: nn.Module) -> int:
    """Bytes of every bnb 4-bit weight in `module`: packed data, absmax, nested absmax, codes, offset, bias."""
    import bitsandbytes as bnb

    total = 0
    for m in module.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            tensors = [m.weight.data, qs.absmax, qs.code]
            if qs.offset is not None:
                tensors.append(qs.offset)
            if qs.state2 is not None:
                tensors += [qs.state2.absmax, qs.state2.code]
            if m.bias is not None:
                tensors.append(m.bias)
            total += sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
    return total
