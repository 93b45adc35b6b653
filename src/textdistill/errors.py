"""The library's exception types: every user mistake raises one of these with a message naming the problem."""

from __future__ import annotations


class TextDistillError(Exception):
    """Base class for errors the command line reports as a one-line message (no traceback)."""


class ConfigError(TextDistillError, ValueError):
    """A configuration value or preset is invalid."""


class DataError(TextDistillError, ValueError):
    """A dataset is missing, malformed, empty, or lacks a required field or split."""


class ModelError(TextDistillError, ValueError):
    """A model name or path cannot be resolved or loaded."""


class AssetsError(TextDistillError, RuntimeError):
    """The offline asset packages are missing or a cached conversion is broken."""


class TrajectoryError(TextDistillError, ValueError):
    """Expert trajectories do not match the model, LoRA shape or tokenizer they are used with."""


class TrainingError(TextDistillError, RuntimeError):
    """Training diverged (NaN/inf loss) or cannot proceed."""
