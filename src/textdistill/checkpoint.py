"""Resumable training state: everything a training loop needs to continue exactly where it stopped.

A checkpoint folder holds ``state.json`` (loop position, losses, scheduler, RNG of python and numpy, which tensor file
to read, a fingerprint of the settings) and one ``step_NNNNNN.safetensors`` (trainable parameters, optimizer state,
torch RNG). The tensor file is written first and ``state.json`` last, both atomically, so a kill at any moment leaves
either the previous checkpoint or the new one, never a mixture; older tensor files are removed after.

A resumed run gives bit-identical parameters on CPU to an uninterrupted one: the data order is a function of
(seed, epoch), and every source of randomness (torch, python, numpy, CUDA) is restored.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .artifacts import atomic_write_json, load_tensors, read_json, save_tensors
from .errors import ConfigError

STATE_FILE = "state.json"
FORMAT_VERSION = 1


@dataclass
class LoopPosition:
    """Where a training loop stands after ``step`` optimizer steps (everything that is not a tensor)."""

    step: int = 0
    epoch: int = 0
    cursor: int = 0                       # next position in the epoch's shuffled order
    tokens: int = 0
    faults_in_a_row: int = 0
    seconds: float = 0.0                  # training time spent before this process started
    losses: list[float] = field(default_factory=list)
    batch_indices: list[list[int]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)   # metrics rows written so far


def _python_rng_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng_state() -> list[Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _restore_rngs(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng/torch"])
    # by device index as a number: as strings "rng/cuda/10" would come before "rng/cuda/2"
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


class TrainCheckpointer:
    """Saves and restores a training loop's full state in ``folder``.

    ``fingerprint`` is any JSON value describing the settings (recipe, model, data); a checkpoint made with another
    fingerprint is refused rather than continued. A checkpoint is written every ``every_steps`` optimizer steps and,
    independently, whenever ``every_seconds`` have passed since the last one (``None`` disables either)."""

    def __init__(self, folder: str | Path, *, fingerprint: Any, every_steps: int | None = None,
                 every_seconds: float | None = 300.0) -> None:
        if every_steps is not None and every_steps <= 0:
            raise ConfigError(f"checkpoint_every must be a positive number of steps, got {every_steps}")
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self._last_save = time.monotonic()

    @property
    def exists(self) -> bool:
        return (self.folder / STATE_FILE).is_file()

    def discard_if_stale(self) -> bool:
        """Remove a checkpoint made with another fingerprint (for callers that own the folder, like an experiment
        cell redone with other settings, where refusing would stop the whole run); True when one was removed."""
        if self.exists and read_json(self.folder / STATE_FILE).get("fingerprint") != self.fingerprint:
            self.remove()
            return True
        return False

    def due(self, step: int) -> bool:
        """Whether a checkpoint should be written after optimizer step ``step``."""
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        return self.every_seconds is not None and time.monotonic() - self._last_save >= self.every_seconds

    def save(self, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, scheduler: Any,
             position: LoopPosition) -> Path:
        """Write the state after ``position.step`` steps (tensors first, then ``state.json``)."""
        optim_state = optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {f"param/{name}": p.detach() for name, p in params.items()}
        empty: list[str] = []   # optimizer entries that are None (SGD without momentum keeps momentum_buffer None)
        for index, entry in optim_state["state"].items():
            for key, value in entry.items():
                if value is None:
                    empty.append(f"{index}/{key}")
                elif isinstance(value, torch.Tensor):
                    tensors[f"optim/{index}/{key}"] = value
                else:
                    tensors[f"optim/{index}/{key}"] = torch.tensor(value)
        tensors["rng/torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, rng in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda/{i}"] = rng
        name = f"step_{position.step:06d}.safetensors"
        save_tensors(self.folder / name, tensors)
        state = {"format_version": FORMAT_VERSION, "fingerprint": self.fingerprint, "tensors": name,
                 "position": position.__dict__, "optimizer_empty": empty,
                 "param_group_lrs": [g["lr"] for g in optim_state["param_groups"]],
                 "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
                 "python_rng": _python_rng_state(), "numpy_rng": _numpy_rng_state()}
        atomic_write_json(self.folder / STATE_FILE, state)
        for old in self.folder.glob("step_*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        self._last_save = time.monotonic()
        return self.folder / name

    def restore(self, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                scheduler: Any) -> LoopPosition:
        """Load the checkpoint into ``params`` (in place), ``optimizer``, ``scheduler`` and the RNGs; return where
        the loop stands. Refuses a checkpoint of other settings or of another parameter layout."""
        state = read_json(self.folder / STATE_FILE)
        if state.get("fingerprint") != self.fingerprint:
            raise ConfigError(f"the checkpoint in {self.folder} was made with other settings, model or data; "
                              f"delete it to start over, or resume with the settings it was made with")
        tensors = load_tensors(self.folder / state["tensors"])
        saved = {k.removeprefix("param/") for k in tensors if k.startswith("param/")}
        if saved != set(params):
            raise ConfigError(f"the checkpoint in {self.folder} holds other trainable parameters than this model "
                              f"(e.g. {sorted(saved ^ set(params))[:2]}); delete it to start over")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[f"param/{name}"])
        optim_state = optimizer.state_dict()
        entries: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim/"):
                _, index, slot = key.split("/", 2)
                entries.setdefault(int(index), {})[slot] = value
        for item in state["optimizer_empty"]:
            index, slot = item.split("/", 1)
            entries.setdefault(int(index), {})[slot] = None
        optim_state["state"] = entries
        for group, lr in zip(optim_state["param_groups"], state["param_group_lrs"]):
            group["lr"] = lr
        optimizer.load_state_dict(optim_state)
        scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
        _restore_rngs(state, tensors)
        self._last_save = time.monotonic()
        return LoopPosition(**state["position"])

    def remove(self) -> None:
        """Delete the checkpoint folder (after the run's final outputs are written), with any temporary file a kill
        in the middle of a write left behind."""
        shutil.rmtree(self.folder, ignore_errors=True)
