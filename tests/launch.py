"""Run a script under ``torchrun`` with several CPU processes (gloo), for the distributed tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: float = 300, env: dict | None = None,
             cwd: str | Path | None = None, module: bool = False) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node N [-m] script args`` on this machine's CPU, one thread per
    process (``module``: ``script`` is a module name, e.g. ``textdistill.cli``); raises AssertionError with both
    output streams when it fails."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false",
                **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", *(["-m"] if module else []), str(script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc
