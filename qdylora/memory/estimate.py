"""Memory planner: what a QDyLoRA training step needs on the GPU, item by item, without any weights.

The model is built on the meta device from its config (shipped, local or hub), so the planner
knows every linear's shape (``architecture``). Each item below is computed from those shapes:

- ``nf4_weights``: every quantized linear: 0.5 B/param packed NF4 + 1/64 B/param uint8 absmax
  (blocksize 64) + 4/(64*256) B/param fp32 nested absmax (blocksize 256), plus per linear the
  NF4 code (16 fp32), the nested code (256 fp32) and the absmax offset (1 fp32).
- ``unquantized_params``: embeddings, norms, the LM head (once when tied), in the model dtype.
- ``adapters``, ``adapter_grads``, ``optimizer_state``: from the parameter tensors the layer
  creates in the update mode (``qdylora.adapters.storage``) and the update rule, see
  ``adapter_bytes``: r_max*(in+out) fp32 per target linear; the gradients of the step at rank
  r_max (the one with the most gradient and activations); ComponentAdamW's state per tensor,
  32-bit or 8-bit blockwise as the optimizer name says, *paged* (unified memory that the driver
  may evict to CPU RAM when the GPU is full) for a paged optimizer when the tensor has at least 1e5
  values and the device is CUDA.
- ``activations``: what autograd keeps for backward; with gradient checkpointing one hidden
  state per layer boundary plus one layer's full set while it is recomputed in backward.
- ``logits_loss``: logits in the model dtype, their fp32 copy / log-softmax / gradients
  (batch*seq*vocab*4 bytes each): often the largest transient.
- ``kernel_transients``: the reference path dequantizes the largest weight in full for its
  matmul; the Triton path decodes tiles in registers and needs only small workspaces.
- ``cuda_context`` and ``allocator_slack``: outside ``torch.cuda.max_memory_allocated`` but on the card.

The peak is not the sum: logits transients happen at the start of backward when no adapter
gradient exists yet; the full gradients exist at its end. ``peak`` takes the larger of the two
phases (and of the optimizer step). tests/test_planner.py checks every item against a training
step measured on CPU with a tensor-level tracker (``measure.TensorMemoryTracker``), for tiny Llama
and Falcon models.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..errors import PlannerError
from ..train.config import OPTIMIZERS as TRAIN_OPTIMIZERS
from .adapter_bytes import AdapterBytes, adapter_bytes
from .advice import advice, largest
from .architecture import ArchSpec, LinearSpec, load_arch
from .parallel import STRATEGIES, per_gpu
from .plan import MemoryItem, MemoryPlan
from .units import (ALLOCATOR_SLACK, BNB_8BIT_QMAPS_BYTES, CUDA_CONTEXT_BYTES, NF4_TABLE_BYTES,
                    dtype_bytes, format_bytes, nf4_bytes, parse_memory_size)

# training's optimizer names but 'auto', which means what the training machine finds, not a planned device
OPTIMIZERS = tuple(o for o in TRAIN_OPTIMIZERS if o != "auto")
OPTIMIZER_ALIASES = {"adamw": "adamw_torch"}
# a sanity bound: no practical adapter comes near it
MAX_R = 8192


def _adapters(linears: list[LinearSpec], r_max: int, update: str, optim: str, device: str, c: int, kernel: str) -> AdapterBytes:
    """The adapters' bytes summed over `linears` (one computation per distinct shape)."""
    total = AdapterBytes()
    for (i, o), n in Counter((l.in_features, l.out_features) for l in linears).items():
        total += adapter_bytes(i, o, r_max, update, optim, device, c, kernel) * n
    return total


def _optimizer_items(ab: AdapterBytes, optim: str, device: str) -> list[MemoryItem]:
    """The optimizer state in the allocator and the part bitsandbytes pages (items without bytes left out)."""
    opt_detail = {"adamw_torch": "ComponentAdamW 32-bit, 8 B/param",
                  "paged_adamw_32bit": "ComponentAdamW 32-bit paged, 8 B/param",
                  "paged_adamw_8bit": "ComponentAdamW 8-bit paged, 2 B/param + absmax",
                  "adamw_8bit": "ComponentAdamW 8-bit, 2 B/param + absmax"}[optim]
    opt_detail += f"; state of all {ab.tensors} adapter tensors (each gets a gradient at some rank)"
    if optim.startswith("paged_"):
        if device != "cuda":
            opt_detail += "; nothing paged: bitsandbytes pages only on CUDA"
        elif ab.paged:
            opt_detail += (f"; {ab.paged_tensors} tensors of >= 1e5 values paged ({format_bytes(ab.paged)}, may "
                           "move to CPU RAM when the GPU is full)")
        else:
            opt_detail += "; nothing paged: bnb pages only tensors of >= 1e5 values and every adapter tensor is smaller"
    unpaged = ab.state - ab.paged + (BNB_8BIT_QMAPS_BYTES if optim.endswith("8bit") else 0)
    items = [MemoryItem("optimizer_state", unpaged, opt_detail)] if unpaged else []
    if ab.paged:
        items.append(MemoryItem("optimizer_state_paged", ab.paged,
                                f"{optim} state of the {ab.paged_tensors} adapter tensors of >= 1e5 values: unified "
                                "memory, counted on the card while resident, evicted to CPU RAM under pressure; not "
                                "in torch.cuda.max_memory_allocated", "paged"))
    return items


def _activation_terms(a: ArchSpec, batch: int, seq: int, r: int, c: int, update: str,
                      kernel: str, autocast: bool, factor_copies: int) -> dict[str, int]:
    """Bytes autograd saves for backward, per part; see the module docstring."""
    T, h, f = batch * seq, a.hidden, a.ffn
    heads_tokens = T * a.n_heads
    layer_lin = a.layer_linears(0)
    tgt = [l for l in layer_lin if l.target]
    masks = 0 if kernel == "triton" else (2 if update == "frozen" else 1)
    # per target linear: the low-rank activations h=[T, r] in c, the fp32 rank masks (reference op),
    # the int64 per-row ranks (Triton op); plus the layer's A/B copies (casts, see adapter_bytes)
    lora = len(tgt) * (T * r * c + T * r * 4 * masks) + factor_copies
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
    c = dtype_bytes(dtype)
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
    ab = _adapters(tg, r_max, update, optim, device, c, kernel)
    items.append(MemoryItem("adapters", ab.params * 4,
                            f"{len(tg)} target linears x r_max={r_max} x (in+out) fp32 = {ab.params / 1e6:.1f}M "
                            f"params in {ab.tensors} tensors ({update} storage)"))
    items.append(MemoryItem("adapter_grads", ab.grads,
                            f"fp32 at rank r_max, the step with the most gradient ({update} update)"))
    opt_items = _optimizer_items(ab, optim, device)
    items += opt_items
    unpaged = sum(it.bytes for it in opt_items if it.where == "gpu")

    layer0 = _adapters([l for l in a.layer_linears(0) if l.target], r_max, update, optim, device, c, kernel)
    act = _activation_terms(a, batch_size, seq_len, r_max, c, update, kernel, autocast, layer0.saved_copies)
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

    static = nf4 + a.unquantized_numel * c + ab.params * 4 + unpaged
    grads = ab.grads
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
        # optimizer step: gradients + state + ComponentAdamW's temporaries for the largest tensor
        "optimizer_step": static + grads + ab.step_temporaries,
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
    num_gpus: int = 1,
    strategy: str = "ddp",
) -> MemoryPlan:
    """Itemised memory of one GPU in a QDyLoRA training step; `gpu_memory` (e.g. '32GiB') adds a verdict.

    With num_gpus > 1, `strategy` 'ddp' (every GPU holds everything) or 'fsdp' (full sharding).
    """
    if strategy not in STRATEGIES:
        raise PlannerError(f"strategy={strategy!r}; use one of {', '.join(STRATEGIES)}")
    sizes = {"r_max": r_max, "seq_len": seq_len, "batch_size": batch_size, "num_gpus": num_gpus}
    if layers is not None:
        sizes["layers"] = layers
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PlannerError(f"{name}={v!r} must be a positive integer")
    if r_max > MAX_R:
        raise PlannerError(f"r_max={r_max} is above the largest rank the planner sizes ({MAX_R}); plan a smaller r_max")
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
    c = dtype_bytes(dtype)
    autocast = (device == "cuda" and c == 2) if autocast is None else autocast
    budget = parse_memory_size(gpu_memory) if gpu_memory is not None else None
    arch = model if isinstance(model, ArchSpec) else load_arch(model, target_modules, layers)
    settings = {"r_max": r_max, "seq_len": seq_len, "batch_size": batch_size, "optim": optim,
                "gradient_checkpointing": gradient_checkpointing, "dtype": dtype, "update": update,
                "kernel": kernel, "device": device, "autocast": autocast, "num_gpus": num_gpus,
                "strategy": strategy}

    def peak_of(**over) -> tuple[list[MemoryItem], dict, list[str], int, int]:
        s = dict(settings, **over)
        its, ph, nt = _compute(arch, s["r_max"], s["seq_len"], s["batch_size"], s["optim"],
                               s["gradient_checkpointing"], s["dtype"], s["update"], s["kernel"], s["device"],
                               s["autocast"])
        its, ph = per_gpu(its, ph, arch, s["r_max"], c, s["gradient_checkpointing"], strategy, num_gpus)
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
        plan.max_seq_len = largest(lambda n: fits(seq_len=n), 1 << 20)
        plan.max_batch_size = largest(lambda n: fits(batch_size=n), 1 << 14)
        plan.advice = advice(plan, peak_of, budget)
    return plan


def _total(peak: int, device: str) -> int:
    return peak + (int(peak * ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES if device == "cuda" else 0)
