"""Atomic file writes, safetensors + JSON manifests, run folders with resolved config and versions.

Every artifact is written to a temporary name beside its destination and renamed into place, so an interrupted
run never leaves a half-written file where a finished one is expected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ConfigError, OutputError


def output_error(path: str | os.PathLike, exc: OSError) -> OutputError:
    """An :class:`~textdistill.errors.OutputError` for a failed write of ``path``: what the system said and the fix
    (a full disk, a read-only folder, a file or folder in the way)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        hint = "free some disk space or choose another output folder"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "the folder is read-only: fix its permissions or choose another output folder"
    elif exc.errno in (errno.EEXIST, errno.ENOTDIR):
        hint = "a file stands where a folder is needed: move it or choose another output folder"
    elif exc.errno == errno.EISDIR:
        hint = "a folder has that name: move it or choose another output"
    else:
        hint = "choose another output folder"
    return OutputError(f"cannot write {path}: {reason}; {hint} (files already there are unchanged)")


def _temporary_beside(path: Path) -> tuple[int, str]:
    """Create ``path``'s folder and a temporary file in it (OutputError when the folder cannot be written)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise output_error(path, exc) from exc


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename.

    A failed write (full disk, read-only folder) raises :class:`~textdistill.errors.OutputError` and leaves an
    earlier file at ``path`` as it was.
    """
    path = Path(path)
    fd, tmp = _temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise output_error(path, exc) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text (UTF-8) atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(value: Any) -> Any:
    """Turn dataclasses, paths, tuples and tensors into plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[Mapping[str, Any]]) -> Path:
    """Write rows as JSON lines atomically."""
    text = "".join(json.dumps(to_jsonable(r), ensure_ascii=False) + "\n" for r in rows)
    return atomic_write_text(path, text)


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Save tensors as safetensors atomically (contiguous CPU copies; never pickles)."""
    path = Path(path)
    fd, tmp = _temporary_beside(path)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata=dict(metadata) if metadata else None)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise output_error(path, exc) from exc
    except SafetensorError as exc:
        Path(tmp).unlink(missing_ok=True)
        if "os error" not in str(exc).lower() and "ioerror" not in str(exc).lower():
            raise
        raise output_error(path, OSError(str(exc))) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file, with a clear error when it is missing."""
    from .errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"tensor file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise DataError(f"{path} is not a complete safetensors file ({exc}); it was cut short or damaged "
                        f"(a full disk, an interrupted copy): make it again") from exc


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, naming the file in any error."""
    from .errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}; fix it, or make it again if it was cut short") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at offset "
                        f"{exc.start}); save it as UTF-8") from exc


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable content hash of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(to_jsonable(obj), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def environment_versions() -> dict[str, str]:
    """Versions of Python and the libraries whose behaviour changes results."""
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("torch", "transformers", "peft", "datasets", "accelerate", "safetensors", "textdistill"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # not installed: record the absence rather than fail the run
            versions[name] = "not installed"
    return versions


def machine_description() -> dict[str, Any]:
    """What a run's speed and low-precision numerics depend on: CPU model, its bf16 support, torch's kernel level
    and thread count, and the CUDA devices (empty when there are none)."""
    from .hardware import cpu_kind

    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    cpu_name = capabilities.get("cpu_name") or platform.processor() or "unknown"
    try:  # lscpu's model name is more specific than torch's
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cuda = []
    if torch.cuda.is_available():
        cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": cpu_name, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": bool(capabilities.get("avx512_bf16")), "amx_bf16": bool(capabilities.get("amx_bf16")),
            "cpu_kind": cpu_kind(), "cuda_devices": cuda}


def write_run_info(run_dir: str | os.PathLike, *, command: str, config: Any, seeds: Mapping[str, int] | None = None,
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``run_dir/run.json``: the command, resolved config, seeds, library versions and the machine."""
    info = {"command": command, "config": to_jsonable(config), "seeds": dict(seeds or {}),
            "versions": environment_versions(), "machine": machine_description(), "argv": sys.argv}
    if extra:
        info.update(to_jsonable(dict(extra)))
    return atomic_write_json(Path(run_dir) / "run.json", info)


def _lock_now(lock_path: Path) -> FileLock | None:
    """The operating-system lock ``lock_path`` (``filelock``) taken without waiting, or None when another process
    holds it. It dies with its process, so a killed run never leaves a stale lock."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(lock_path.parent, exc) from exc
    lock = FileLock(str(lock_path), thread_local=False)   # one holder per call, whichever thread releases it
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the operating-system lock ``lock_path`` (``filelock``) while a command writes ``what``; another process
    already holding it makes this one stop at once with a one-line error, so two runs never interleave their writes
    into one output. The lock dies with its process (a killed run leaves no stale lock)."""
    lock = _lock_now(Path(lock_path))
    if lock is None:
        raise ConfigError(f"{what} is being written by another textdistill process; wait for it to finish or "
                          f"choose another output")
    try:
        yield
    finally:
        lock.release()


def try_lock(target: Path) -> FileLock | None:
    """Take ``<target>.lock`` for this process without waiting: the held lock (``.release()`` it), or None when
    another process holds it; there is no window in which two processes both take it."""
    return _lock_now(target.with_name(target.name + ".lock"))
