"""Memory planning: what a training step needs on the GPU, item by item, from the model's config alone."""

from .advice import choose_memory_settings
from .architecture import load_arch, shipped_configs
from .estimate import OPTIMIZERS, plan_memory
from .plan import MemoryItem, MemoryPlan
from .units import format_bytes, parse_memory_size

__all__ = ["MemoryItem", "MemoryPlan", "OPTIMIZERS", "choose_memory_settings", "format_bytes", "load_arch",
           "parse_memory_size", "plan_memory", "shipped_configs"]
