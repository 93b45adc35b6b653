"""What kind of CPU this process runs on, as the rest of the code sees it; tests and benchmarks can set it.

The machines this project runs on differ in how they compute bfloat16, and each kind has once broken the suite
through a precision assumption. Four kinds matter:

* ``avx2``: AVX2 only; bf16 is emulated (about 20x slower than fp32).
* ``avx512``: AVX512 without bf16 instructions.
* ``avx512_bf16``: AVX512-BF16 but no AMX; a bf16 matmul ran at half the fp32 rate here (torch 2.13).
* ``amx``: AMX tiles (``amx_bf16``) with torch's kernels at the AVX512 level.

:func:`cpu_kind` reads the kind from torch, or from ``TEXTDISTILL_CPU_KIND`` when that is set, so that one machine
can run the code paths of every kind. :func:`kernel_env` gives the environment that also holds torch's, oneDNN's and
MKL's kernels at a lower kind (in a new process: the variables are read when the libraries load), so that an AMX
machine computes as an AVX512 or an AVX2 one would.
"""

from __future__ import annotations

import os

import torch

CPU_KINDS = ("avx2", "avx512", "avx512_bf16", "amx")
#: Environment variable that overrides what :func:`cpu_kind` reports.
CPU_KIND_VARIABLE = "TEXTDISTILL_CPU_KIND"

# Kernel caps per kind (oneDNN's ISA names; MKL's instruction sets; ATen's dispatch level). A cap above what the
# machine has is ignored by the libraries, so asking for a higher kind than the machine's only changes the probe.
_KERNEL_CAPS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"DNNL_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx512_bf16": {"DNNL_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "amx": {},
}


def _probed_kind() -> str:
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    level = torch.backends.cpu.get_cpu_capability()   # "AVX2" when ATEN_CPU_CAPABILITY holds kernels there
    if level in ("DEFAULT", "NO AVX", "AVX2", "ZVECTOR") or not level.startswith("AVX512"):
        return "avx2"
    if capabilities.get("amx_bf16"):
        return "amx"
    return "avx512_bf16" if capabilities.get("avx512_bf16") else "avx512"


def cpu_kind() -> str:
    """This CPU's kind (one of :data:`CPU_KINDS`): ``TEXTDISTILL_CPU_KIND`` when set, else what torch reports."""
    forced = os.environ.get(CPU_KIND_VARIABLE)
    if forced:
        if forced not in CPU_KINDS:
            raise ValueError(f"{CPU_KIND_VARIABLE}={forced!r} is not a CPU kind; use one of {', '.join(CPU_KINDS)}")
        return forced
    return _probed_kind()


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 matmuls in hardware at a useful rate (AMX). Informational: ``precision: auto``
    is fp32 on every CPU (see :func:`textdistill.models.resolve_precision`)."""
    return cpu_kind() == "amx"


def kernel_env(kind: str) -> dict[str, str]:
    """Environment for a new process that computes as a ``kind`` CPU would: the probe set to ``kind`` and the
    kernel libraries held at its instruction set (no cap for ``amx``, the highest)."""
    if kind not in CPU_KINDS:
        raise ValueError(f"unknown CPU kind {kind!r}; use one of {', '.join(CPU_KINDS)}")
    return {CPU_KIND_VARIABLE: kind, **_KERNEL_CAPS[kind]}
