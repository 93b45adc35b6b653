"""Memory and time of one student step's meta-gradient with checkpointed layers (``unroll(..., recompute=True,
checkpoint_layers=True)``) against the recompute mode's double backward, over the sequence length.

    OMP_NUM_THREADS=1 python bench/bench_checkpoint_layers.py [--lengths 128 256 512 1024] [--out results/...md]
    OMP_NUM_THREADS=1 python bench/bench_checkpoint_layers.py --quick      # tiny random model, < 1 min

Workload: bench/bench_inner_loop.py's (SmolLM2-135M fp32, eager attention, LoRA r=8 on q/k/v/o, batch 4 real
ARC-Easy rows), with each pseudo prompt tiled to T - 8 rows so that every sample is ~T tokens long. One outer
iteration = ``unroll`` with N student steps on that batch, ``matching_loss``, ``backward()`` to the prompts and lr.

Every (mode, T, N) runs in a fresh subprocess, which first warms up with the same mode at T=64, then measures one
outer iteration: peak RSS growth (max RSS sampled every 1 ms, minus RSS just before, with glibc's mmap / trim
thresholds at 128 KiB so that freed tensors leave RSS) and its CPU time. Modes: ``keep`` (the keep-graph default),
``recompute`` (replay with a double backward) and ``checkpoint`` (``checkpoint_layers``: each step differentiated
decoder layer by decoder layer); ``recompute_mb1`` / ``checkpoint_mb1``: the same with ``micro_batch=1`` (one sample of the batch
differentiated at a time), at the middle T. In the parent process, the two recompute modes' meta-gradients of the lr
and the prompts are compared at the shortest T (fp32).

Figures on the last line (``key=value``): ``mem_ratio_T<T>`` = checkpoint peak / recompute peak and
``time_ratio_T<T>`` = checkpoint time / recompute time, for each T; ``<mode>_mb_per_token`` = the slope of the peak
over the tokens of the batch between the shortest and the longest T; ``ckpt_mem_n<N>_ratio`` = checkpoint peak at N
/ at N=1 (flat in N) at the middle T; ``<mode>_mb1_mem_ratio`` = peak with one sample at a time / with the batch
of 4 at the middle T; ``lr_grad_rel_err``, ``prompt_grad_rel_err``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inner_loop import (MALLOC_ENV, PeakSampler, _mem_available_mb, _rss_bytes,  # noqa: E402
                              machine_description, make_setup)

RESPONSE_ROOM = 8        # tokens of the longest response in the batch (the prompt is tiled to T - this)
WARMUP_LENGTH = 64
MODES = ("keep", "recompute", "checkpoint")


def tile_prompts(setup, length: int) -> list:
    """The setup's prompts (P_b, H) repeated along the rows to ``length - RESPONSE_ROOM`` rows, as new leaves."""
    rows = max(1, length - RESPONSE_ROOM)
    return [p.detach().repeat(math.ceil(rows / p.shape[0]), 1)[:rows].clone().requires_grad_(True)
            for p in setup.prompts]


def outer_iteration(setup, prompts: list, mode: str, steps: int) -> tuple[float, torch.Tensor, list]:
    """One outer iteration; returns its CPU seconds, the lr's and the prompts' gradients."""
    from textdistill.unroll import SyntheticBatch, matching_loss, unroll

    lr = setup.lr.detach().clone().requires_grad_(True)
    for p in prompts:
        p.grad = None
    start = time.process_time()
    batch = SyntheticBatch.from_samples(prompts, setup.responses)
    base, _, group = mode.partition("_mb")      # e.g. "checkpoint_mb1": one sample at a time
    student = unroll(setup.model, setup.start, [batch] * steps, lr, recompute=base != "keep",
                     checkpoint_layers=base == "checkpoint", micro_batch=int(group) if group else None)
    matching_loss(student, setup.start, setup.target).backward()
    return time.process_time() - start, lr.grad, [p.grad for p in prompts]


def run_worker(spec: dict) -> int:
    torch.set_num_threads(spec["threads"])
    setup = make_setup(spec["quick"])
    mode, length, steps = spec["mode"], spec["length"], spec["steps"]
    outer_iteration(setup, tile_prompts(setup, WARMUP_LENGTH), mode, 1)
    prompts = tile_prompts(setup, length)
    gc.collect()
    before = _rss_bytes()
    with PeakSampler() as sampler:
        seconds, _, _ = outer_iteration(setup, prompts, mode, steps)
    print(json.dumps({"mode": mode, "length": length, "steps": steps, "seconds": seconds,
                      "peak_growth_mb": (sampler.peak - before) / 2**20, "samples": sampler.samples}))
    return 0


def spawn_worker(mode: str, length: int, steps: int, quick: bool, threads: int) -> dict:
    spec = json.dumps({"mode": mode, "length": length, "steps": steps, "quick": quick, "threads": threads})
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", spec], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {mode} T={length} N={steps} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gradient_agreement(quick: bool, length: int) -> dict:
    """Relative max-abs errors of the checkpoint mode's lr and prompt gradients against the recompute mode's."""
    setup = make_setup(quick)
    prompts = tile_prompts(setup, length)
    _, lr_ref, prompts_ref = outer_iteration(setup, prompts, "recompute", 2)
    _, lr_ck, prompts_ck = outer_iteration(setup, prompts, "checkpoint", 2)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    return {"lr_grad_rel_err": rel(lr_ck, lr_ref),
            "prompt_grad_rel_err": max(rel(a, b) for a, b in zip(prompts_ck, prompts_ref))}


def report(rows: list, figures: dict, machine: dict, command: str, wall: float, quick: bool) -> str:
    lines = ["# Checkpointed layers inside a student step: memory and time over the sequence length", "",
             "One outer iteration (unroll, matching loss, backward to the prompts and the lr) per fresh process; "
             "peak RSS growth and CPU time. `keep`: keep-graph (default); `recompute`: `--recompute` (each step "
             "replayed with a double backward); `checkpoint`: `--recompute --checkpoint_layers true` (each step "
             "differentiated decoder layer by decoder layer). Workload: "
             + ("tiny 2-layer Llama (--quick: figures are allocator noise)" if quick else
                "SmolLM2-135M fp32, eager attention, LoRA r=8 on q/k/v/o, batch 4 ARC-Easy rows, prompts tiled to "
                "T - 8 rows"), "",
             "| mode | T (tokens per sample) | N | peak RSS growth (MB) | CPU seconds |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        peak = "skipped" if r.get("skipped") else f"{r['peak_growth_mb']:.0f}"
        secs = "" if r.get("skipped") else f"{r['seconds']:.1f}"
        lines.append(f"| {r['mode']} | {r['length']} | {r['steps']} | {peak} | {secs} |")
    lines += ["", "Figures: `" + " ".join(f"{k}={v}" for k, v in figures.items()) + "`", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += ["", "## Command", "", f"    {command}", "", f"Wall time: {wall:.0f} s.", ""]
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "nan"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model (a smoke test)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="tokens per sample (default 128 256 512 "
                        "1024; --quick: 32 96)")
    parser.add_argument("--long-steps", type=int, default=4, help="N of the flat-in-N check (middle length)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="Markdown report (default results/bench_checkpoint_layers.md; "
                        "with --quick, only printed unless given)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(json.loads(args.worker))
    torch.set_num_threads(args.threads)
    lengths = sorted(args.lengths or ([32, 96] if args.quick else [128, 256, 512, 1024]))
    wall_start, load = time.perf_counter(), os.getloadavg()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    peaks: dict = {}
    for length in lengths:
        for mode in MODES:
            if mode != "checkpoint" and (mode, lengths[0]) in peaks and not args.quick:
                # a whole-model double graph grows faster than T (eager attention keeps (T, T) matrices): make sure
                # it fits beside the other work on the machine
                need = 1.5 * peaks[(mode, lengths[0])] * (length / lengths[0]) ** 1.5 + 2048
                if _mem_available_mb() < need:
                    rows.append({"mode": mode, "length": length, "steps": 1, "skipped": True})
                    log(f"{mode} T={length} skipped: {_mem_available_mb():.0f} MB available < {need:.0f} MB")
                    continue
            row = spawn_worker(mode, length, 1, args.quick, args.threads)
            rows.append(row)
            peaks[(mode, length)] = row["peak_growth_mb"]
            log(f"{mode} T={length} N=1: peak growth {row['peak_growth_mb']:.0f} MB, {row['seconds']:.1f} s CPU")
    middle = lengths[len(lengths) // 2]
    for mode in ("recompute_mb1", "checkpoint_mb1"):    # one sample of the batch at a time
        row = spawn_worker(mode, middle, 1, args.quick, args.threads)
        rows.append(row)
        peaks[(mode, middle)] = row["peak_growth_mb"]
        log(f"{mode} T={middle} N=1: peak growth {row['peak_growth_mb']:.0f} MB, {row['seconds']:.1f} s CPU")
    for mode in ("recompute", "checkpoint"):
        row = spawn_worker(mode, middle, args.long_steps, args.quick, args.threads)
        rows.append(row)
        peaks[(mode, middle, args.long_steps)] = row["peak_growth_mb"]
        log(f"{mode} T={middle} N={args.long_steps}: peak growth {row['peak_growth_mb']:.0f} MB, "
            f"{row['seconds']:.1f} s CPU")
    seconds = {(r["mode"], r["length"]): r["seconds"] for r in rows if r["steps"] == 1 and not r.get("skipped")}
    figures: dict = {}
    for length in lengths:
        if ("recompute", length) in peaks:
            figures[f"mem_ratio_T{length}"] = _fmt(peaks[("checkpoint", length)] / peaks[("recompute", length)])
            figures[f"time_ratio_T{length}"] = _fmt(seconds[("checkpoint", length)] / seconds[("recompute", length)])
    for mode in MODES:   # slope between the shortest and the longest T measured for the mode (batch 4)
        longest = max(length for length in lengths if (mode, length) in peaks)
        if longest > lengths[0]:
            slope = (peaks[(mode, longest)] - peaks[(mode, lengths[0])]) / (4 * (longest - lengths[0]))
            figures[f"{mode}_mb_per_token"] = _fmt(slope)
    figures[f"ckpt_mem_n{args.long_steps}_ratio"] = _fmt(peaks[("checkpoint", middle, args.long_steps)]
                                                         / peaks[("checkpoint", middle)])
    for mode in ("recompute", "checkpoint"):   # one sample at a time / the whole batch of 4
        figures[f"{mode}_mb1_mem_ratio"] = _fmt(peaks[(f"{mode}_mb1", middle)] / peaks[(mode, middle)])
    figures.update({k: _fmt(v) for k, v in gradient_agreement(args.quick, lengths[0]).items()})
    wall = time.perf_counter() - wall_start
    figures["wall_s"] = f"{wall:.0f}"
    command = "OMP_NUM_THREADS=1 python bench/bench_checkpoint_layers.py " + shlex.join(argv or sys.argv[1:])
    out = args.out or (None if args.quick else "results/bench_checkpoint_layers.md")
    if out:
        Path(out).write_text(report(rows, figures, machine_description(args.threads, load), command.strip(), wall,
                                    args.quick))
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
