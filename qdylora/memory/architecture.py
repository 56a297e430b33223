"""Architectures for the planner: shipped / local / hub configs, and the shapes of every linear built on the meta device."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters.config import DEFAULT_TARGET_MODULES
from ..errors import PlannerError
from ..load.quantize import quantizable_linear_names

ARCH_DIR = Path(__file__).parent / "arch_configs"
# architectures whose decoder layer the activation model knows
LLAMA_LIKE = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = LLAMA_LIKE + ("falcon",)


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


# sizes a supported config may give (Llama-like and Falcon names); each must be a positive integer
_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "n_layer", "num_attention_heads", "n_head",
          "num_key_value_heads", "num_kv_heads", "vocab_size", "head_dim", "ffn_hidden_size")


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
    _check_sizes(d, source)
    for k in ("torch_dtype", "dtype", "transformers_version", "architectures", "_name_or_path"):
        d.pop(k, None)
    try:
        return AutoConfig.for_model(model_type, **d)
    except Exception as e:
        raise PlannerError(f"{source}: transformers rejects this {model_type} config: {_one_line(e)}") from e


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _check_sizes(d: dict, source: str) -> None:
    """Every size the config gives is a positive integer, and the heads divide as attention needs."""
    for k in _SIZES:
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise PlannerError(f"{source}: {k}={v!r} must be a positive integer; fix it in the config")
    hidden = d["hidden_size"]
    heads = d.get("num_attention_heads") or d.get("n_head")
    kv = d.get("num_key_value_heads") or d.get("num_kv_heads")
    if heads and kv and heads % kv:
        raise PlannerError(f"{source}: {heads} attention heads cannot share {kv} key/value heads evenly; "
                           "num_attention_heads must be a multiple of the key/value heads")
    if heads and not d.get("head_dim") and hidden % heads:
        raise PlannerError(f"{source}: hidden_size={hidden} is not a multiple of num_attention_heads={heads}; "
                           "fix one of them (or give head_dim)")


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


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def arch_from_config(cfg, name: str = "model", target_modules: list[str] | None = None) -> ArchSpec:
    """Build the model on the meta device and read every shape the planner needs."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # sizes transformers accepts in the config but cannot build a model from
        raise PlannerError(f"{name}: transformers cannot build a {cfg.model_type} model from this config "
                           f"({type(e).__name__}: {_one_line(e)}); check its sizes") from e
    wanted = list(target_modules) if target_modules else list(DEFAULT_TARGET_MODULES)
    linears, quant_params = [], set()
    for mod_name in quantizable_linear_names(model):
        mod = model.get_submodule(mod_name)
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
        d = dict(d, num_hidden_layers=layers)
    cfg = config_from_dict(d, source)
    return arch_from_config(cfg, name=str(model), target_modules=target_modules)
