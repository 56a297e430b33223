"""The errors a user can cause: each message names what is wrong and what to do; the CLI prints it as one line."""

from __future__ import annotations

import math
from typing import Any


class QDyLoRAError(Exception):
    """Base of every user-facing error; `qdylora` prints its message and exits with code 2."""


class ConfigError(QDyLoRAError, ValueError):
    """A configuration value is invalid; the message names the value and the fix."""


class DataError(QDyLoRAError, ValueError):
    """The data is missing or malformed; the message names the file, the line and the fix."""


class AdapterError(QDyLoRAError, ValueError):
    """An adapter folder is missing, malformed, or does not fit this base model."""


class ModelLoadError(QDyLoRAError, ValueError):
    """A base model cannot be found or read; the message says what to pass instead."""


class TrainingError(QDyLoRAError, RuntimeError):
    """Training stopped on bad input or a numerical failure; the message says what was kept."""


class PlannerError(QDyLoRAError, ValueError):
    """Bad planner input; the message names the problem and the fix."""


class BackendError(QDyLoRAError, RuntimeError):
    """The backend asked for (QDYLORA_BACKEND / backend='triton') cannot run here; the message says why."""


def check_int(name: str, value: Any, minimum: int, flag: str | None = None) -> None:
    """ConfigError unless `value` is an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{flag or name} {value!r} must be an integer >= {minimum}")


def check_float(name: str, value: Any, minimum: float, strict: bool = False, flag: str | None = None) -> None:
    """ConfigError unless `value` is a finite number >= minimum (> minimum when strict)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value > minimum if strict else value >= minimum)
    if not ok:
        raise ConfigError(f"{flag or name} {value!r} must be a finite number {'>' if strict else '>='} {minimum}")
