"""Smoke test of bench/bench_inner_loop.py: ``--quick`` (tiny random model) runs in a subprocess and its last line
is ``key=value`` figures with the expected keys."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {"ratio_n10", "mem_ratio_n20", "recompute_time_ratio_n20", "proj_ratio_49k", "proj_ratio_262k",
            "keep_mem_n1_mb", "keep_mem_n20_mb", "recompute_mem_n1_mb", "recompute_mem_n20_mb", "wall_s"}


@pytest.mark.slow
def test_quick_bench_prints_figures(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "bench_inner_loop.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_inner_loop.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    figures = dict(item.split("=", 1) for item in last.split())
    assert set(figures) == EXPECTED, last
    values = {k: float(v) for k, v in figures.items()}   # every value parses as a number
    # the memory figures of the tiny model are allocator noise (and may be nan); the times must be real
    for key in ("ratio_n10", "recompute_time_ratio_n20", "proj_ratio_49k", "proj_ratio_262k", "wall_s"):
        assert math.isfinite(values[key]) and values[key] > 0, last
    text = out.read_text()
    assert "## Machine" in text and "--quick" in text
