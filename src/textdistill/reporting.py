"""Live curves where people look for them: ``report_to: [tensorboard]`` writes the scalars of a training loop or a
distillation as TensorBoard event files under ``<output>/runs/``, as transformers' Trainer does
(``tensorboard --logdir <output>/runs``). ``metrics.jsonl`` stays the record; this only mirrors it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError

REPORTERS = ("tensorboard",)


def check_report_to(report_to: Sequence[str]) -> None:
    """Refuse an unknown reporter by name."""
    unknown = [r for r in report_to if r not in REPORTERS]
    if unknown:
        raise ConfigError(f"report_to: unknown reporter(s) {', '.join(unknown)}; known: {', '.join(REPORTERS)}")


class LiveCurves:
    """Scalars by step for the reporters of ``report_to`` (none: every call does nothing). Only the process that
    writes the run's folder should make one (``active=False`` on the others)."""

    def __init__(self, report_to: Sequence[str], folder: str | Path, *, active: bool = True):
        check_report_to(report_to)
        self._writer = None
        if active and "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("report_to: tensorboard needs the tensorboard package: pip install "
                                  "'textdistill[tensorboard]'") from None
            self._writer = SummaryWriter(log_dir=str(Path(folder) / "runs"))

    def log(self, step: int, scalars: dict[str, Any]) -> None:
        """Write every finite number of ``scalars`` at ``step`` (None and text are skipped)."""
        if self._writer is None:
            return
        for name, value in scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                self._writer.add_scalar(name, float(value), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
