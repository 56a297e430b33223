"""The errors a user can cause: each message names what is wrong and what to do; the CLI prints it as one line."""

from __future__ import annotations


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
