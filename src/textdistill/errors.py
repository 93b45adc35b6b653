"""The library's exception types: every user mistake raises one of these with a message naming the problem."""

from __future__ import annotations


def one_line(text: str) -> str:
    """``text`` on one line: its lines (stripped, blank ones dropped) joined by a space. A message that is already
    one line comes back unchanged."""
    if "\n" not in text and "\r" not in text:
        return text
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


class TextDistillError(Exception):
    """Base class for errors the command line reports as a one-line message (no traceback).

    The message is kept on one line (a library's multi-line text quoted in it is joined with spaces), so that the
    command line's ``textdistill: error: ...`` is always a single line.
    """

    def __init__(self, *args: object) -> None:
        if args and isinstance(args[0], str):
            args = (one_line(args[0]), *args[1:])
        super().__init__(*args)


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


class OutputError(TextDistillError, OSError):
    """An output cannot be written (a read-only or full folder, a file where a folder should be). It is an OSError
    too, so code that tolerates a failed write (a cache) still does."""
