"""The suite on every kind of CPU, from one machine.

Each kind of CPU (AVX2 only, AVX512, AVX512-BF16 without AMX, AMX) once broke the suite through a precision
assumption. Here one machine runs the paths of each kind: the probe (``TEXTDISTILL_CPU_KIND``) is set to every kind
in this process, and, in a new process per kind, the kernel libraries are also held at that kind's instruction set
(``hardware.kernel_env``; a kind above the machine's changes only the probe), while an exactness test, the precision
tests and the key test run there. No GPU is needed: CUDA-less is every kind here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from textdistill.hardware import CPU_KIND_VARIABLE, CPU_KINDS, _probed_kind, kernel_env

ROOT = Path(__file__).parents[1]
#: Every cell and stage key of every committed config and shipped preset, as the code that made results/ printed it
#: (``python bench/cell_keys.py``).
PINNED_KEYS = json.loads((Path(__file__).parent / "data" / "cell_keys.json").read_text())


def committed_cell_keys() -> dict[str, dict[str, str]]:
    """What the pinned file holds, computed by this code."""
    import runpy

    return runpy.run_path(str(ROOT / "bench" / "cell_keys.py"))["all_keys"]()


@pytest.mark.parametrize("kind", CPU_KINDS)
def test_every_kind_resolves_fp32_and_keeps_every_committed_key(monkeypatch, kind):
    """``precision: auto`` resolves to fp32 on each kind, so a cell's key (which holds the resolved precision) and
    the finished work it names are the same on every CPU: the keys of every committed config and preset."""
    from textdistill.artifacts import machine_description
    from textdistill.models import resolve_precision

    monkeypatch.setenv(CPU_KIND_VARIABLE, kind)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert machine_description()["cpu_kind"] == kind
    assert committed_cell_keys() == PINNED_KEYS


# the precision tests, a bf16 base model trained (bf16 matmuls: AMX, AVX512-BF16 or emulated, by kind), one exactness
# test of the distillation (layer-by-layer replay vs recompute, 2 iterations) and the pinned key: about 12 s per kind
_UNDER_EACH_KIND = [
    "tests/test_models.py",
    "tests/test_training.py::test_a_bf16_base_trains_fp32_lora_and_bad_dtypes_are_refused",
    "tests/test_distill.py::test_checkpointed_layers_learn_what_the_recompute_mode_learns",
    "tests/test_experiment.py::test_checkpointed_layers_key_only_the_distilled_cells_and_only_when_on",
]


@pytest.mark.slow
@pytest.mark.parametrize("kind", [k for k in CPU_KINDS if k != _probed_kind()])
def test_exactness_and_keys_hold_with_the_kernels_of_each_other_kind(kind):
    """The same tests in a fresh process whose probe says ``kind`` and whose kernels are held at it (the machine's
    own kind is the rest of the suite). Precision-dependent tests pin fp32, so they pass on each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **kernel_env(kind)}
    if kind == "avx2":   # the caps act: torch itself, not only the probe, computes at AVX2 there
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                               env=env, capture_output=True, text=True, check=True)
        assert probe.stdout.strip() == "AVX2"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *_UNDER_EACH_KIND],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"under {kind}:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout and "failed" not in proc.stdout
