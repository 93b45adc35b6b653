"""Several processes through torch.distributed, launched by ``torchrun`` or ``accelerate launch``.

Both launchers start one process per device and describe it in the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); :func:`init` reads it and joins the process group: NCCL when
the rank has a CUDA device, gloo on CPU (gloo also lets the tests run several processes on one machine). Without
a launcher (``WORLD_SIZE`` unset or 1) every function here is a no-op on one process, so the stages call them
unconditionally.

How each stage uses the ranks (the stage's module says the details):

* experts: expert ``i`` runs on rank ``i % world``; rank 0 writes the manifest after a barrier;
* train: each rank computes the gradients of its share of every batch; they are summed (all-reduce), so the
  adapter is that of one process, to float tolerance;
* eval: each rank scores its share of the questions; rank 0 gathers them and writes the results;
* distill: every rank draws the same segments and computes the meta-gradient of its share of them; meta-gradients
  and candidate losses are summed, so every rank holds the same synthetic set; rank 0 writes the run folder;
* LESS: the gradient features of the pool are sharded by rows and gathered on every rank;
* distill-pm: each rank trains its share of every iteration's scoring runs (candidates x receivers) on its own and
  every rank gathers every score; rank 0 proposes the edits and writes the run folder;
* select --method performance: each rank trains its share of the draws into the shared cache; rank 0 writes the
  selection;
* experiment: the ranks do not form a group (:func:`independent`); each is a worker on its own device that takes
  the next cell (or shared stage) no other process holds, by file lock, as separate processes sharing a run folder
  always have.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["all_gather_objects", "all_reduce_sum", "barrier", "broadcast_object", "independent", "init",
           "is_launched", "is_main",
           "local_device", "main_first", "merge_shards", "rank", "shard_indices", "world_size"]

T = TypeVar("T")

# set by independent(): this process works alone even under a launcher
_alone = False


def is_launched() -> bool:
    """Whether this process was started by a launcher with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def local_device(device: str | torch.device | None = "auto") -> torch.device:
    """The device of this rank: ``auto`` is CUDA when it is there (``cuda:LOCAL_RANK`` under a launcher, plain
    ``cuda`` otherwise), else the CPU; an explicit device is kept (under a launcher ``cuda`` alone means this rank's
    GPU)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None or device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device(f"cuda:{local}") if is_launched() else torch.device("cuda")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and is_launched():
        return torch.device(f"cuda:{local}")
    return device


def init(device: str | torch.device | None = "auto", *, timeout_minutes: float = 60.0) -> torch.device:
    """Join the process group when launched with several processes (idempotent) and return this rank's device.

    NCCL for CUDA devices, gloo otherwise. Without a launcher nothing is initialised."""
    target = local_device(device)
    if is_launched() and target.type == "cuda":
        torch.cuda.set_device(target)   # also for independent workers: "cuda" without an index means this rank's GPU
    if is_launched() and not _alone and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        # leave the group before the interpreter tears down: a gloo process that exits while still in its group
        # sometimes aborts ("terminate called without an active exception") after all its work is done
        atexit.register(_leave)
    return target



@contextlib.contextmanager
def main_process_owns(lock_path: str | os.PathLike, what: str, device: str | torch.device | None = "auto"
                      ) -> Iterator[torch.device]:
    """The entry of a command that writes one output (``distill``, ``experts``, ``train``, LESS): join the launch's
    process group, if any, and hold the output's lock (``artifacts.exclusive``) on rank 0 alone (the other ranks of
    the same run would find it taken) while the body runs; yields this rank's device."""
    from .artifacts import exclusive

    target = init(device)
    with exclusive(lock_path, what) if is_main() else contextlib.nullcontext():
        yield target

def _leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def independent() -> Iterator[None]:
    """Within the block :func:`init` joins no process group, so the stages run as one process each (on this rank's
    device): for work handed out by file locks rather than collectives (the experiment runner's cells)."""
    global _alone
    if _active():
        raise RuntimeError("independent(): this process already belongs to a process group")
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """Whether this process writes shared files (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if _active():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a cache), the others after it (and read what it wrote)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def shard_indices(count: int) -> list[int]:
    """This rank's share of ``range(count)``: every ``world``-th index from ``rank`` (balanced to within one)."""
    return list(range(rank(), count, world_size()))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks in place (and return it); unchanged on one process.

    gloo reduces only CPU tensors and NCCL only CUDA ones, so the tensor travels to the group's device and back."""
    if not _active():
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buffer = tensor.detach().to(device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    with torch.no_grad():
        tensor.copy_(buffer)
    return tensor


def all_gather_objects(value: T) -> list[T]:
    """Every rank's ``value`` (picklable, small), in rank order, on every rank; ``[value]`` on one process."""
    if not _active():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: T, src: int = 0) -> T:
    """Rank ``src``'s ``value`` on every rank."""
    if not _active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def merge_shards(shards: Sequence[Sequence[T]], count: int) -> list[T]:
    """Undo :func:`shard_indices`: rank r's list holds items r, r + world, ...; returns the ``count`` items in
    order."""
    world = len(shards)
    out: list[Any] = [None] * count
    for r, items in enumerate(shards):
        for j, item in enumerate(items):
            out[r + j * world] = item
    return out
