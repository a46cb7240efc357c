"""Errors a user can cause. The CLI prints them as one line and exits with code 2.

Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class: bad input from the user (recipe, data, checkpoint, plugin)."""

    exit_code = 2


class ConfigError(UserError):
    """A recipe field is missing, misspelled, of the wrong type or out of range."""


class PluginError(UserError):
    """An unknown component name, or a plugin that failed to load."""


class DataError(UserError):
    """A data folder is missing or empty, or data does not fit the model."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or belongs to a different model."""


class WeightsUnavailableError(UserError):
    """Pretrained weights (VAE, Inception) are not available offline."""


class WorkerError(UserError):
    """A process of a distributed run stopped on a user error: its one line, passed up to
    the command that started the run, with the worker's exit code."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
