"""A distillation iteration on 2 processes (torchrun, gloo) against 1 process over the same segments.

    python bench/bench_ddp.py [--experts results/arc-easy-cpu-v2/experts-64d7a4f3] [--budget 1%] [--iterations 3]
                              [--segments 2] [--out results/bench_ddp.md]

Runs the distillation of configs/arc-easy-cpu-v2.yaml (SmolLM2-135M, gcg with paired confirmation, the student lr
fixed so that no line search runs) twice on the same expert trajectories: once in one process, once under
``torchrun --nproc-per-node 2`` (each rank one thread, gloo). Both match ``--segments`` segments per iteration, so
they do the same work and should end with the same synthetic set. ``ddp_ratio`` = seconds per iteration on 2
processes / on 1 process, after the first iteration (which loads snapshots). On a machine with 2 free cores the
ideal is 0.5; what stays above it is the work every rank repeats (the candidate search, re-tokenizing, the
draw-independent parts) and the communication.

The last line prints ``key=value`` figures; the Markdown file names the machine and the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    """One rank of a measured run (started by the parent, alone or under torchrun)."""
    import torch

    from textdistill.distill import distill
    from textdistill.experiment import load_experiment_config
    from textdistill.instrument import InstrumentConfig

    torch.set_num_threads(1)
    base = load_experiment_config(str(ROOT / "configs" / "arc-easy-cpu-v2.yaml")).distill
    config = dataclasses.replace(
        base, budget=args.budget, iterations=args.iterations, segments=args.segments, checkpoint_every=args.iterations,
        student=dataclasses.replace(base.student, lr_grid=()),
        instrument=InstrumentConfig(draws=2, random_subsets=1, heldout_experts=base.instrument.heldout_experts))
    distill(experts=args.experts, output=args.output, config=config, device="cpu", progress=False)


def _experts_copy(experts: Path, work: Path) -> Path:
    """The trajectories by symlink, without their instrument cache (the runs must not write into results/)."""
    target = work / "experts"
    target.mkdir(parents=True, exist_ok=True)
    for entry in experts.iterdir():
        if entry.name != "instrument_cache" and not (target / entry.name).exists():
            (target / entry.name).symlink_to(entry.resolve())
    return target


def _per_iteration(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return (rows[-1]["seconds"] - rows[0]["seconds"]) / (len(rows) - 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=Path, default=ROOT / "results/arc-easy-cpu-v2/experts-64d7a4f3")
    parser.add_argument("--budget", default="1%")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--segments", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_ddp"))
    parser.add_argument("--out", type=Path, default=ROOT / "results/bench_ddp.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.iterations < 2:
        parser.error("--iterations must be at least 2 (the first one is not timed)")
    from textdistill.artifacts import load_tensors, machine_description

    shutil.rmtree(args.work, ignore_errors=True)
    experts = _experts_copy(args.experts, args.work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    common = [__file__, "--child", "--experts", str(experts), "--budget", args.budget, "--iterations",
              str(args.iterations), "--segments", str(args.segments)]
    load_start = os.getloadavg()
    runs = {"one": [sys.executable, *common, "--output", str(args.work / "one")],
            "two": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                    f"--master-port={_free_port()}", *common, "--output", str(args.work / "two")]}
    walls = {}
    for name, cmd in runs.items():
        start = time.time()
        subprocess.run(cmd, check=True, env=env)
        walls[name] = time.time() - start
    one, two = (_per_iteration(args.work / n) for n in ("one", "two"))
    a, b = (load_tensors(args.work / n / "state.safetensors") for n in ("one", "two"))
    agree = bool((a["token_ids"] == b["token_ids"]).all()) and float((a["log_lr"] - b["log_lr"]).abs()) < 1e-6
    figures = {"ddp_ratio": round(two / one, 3), "one_process_s_per_iteration": round(one, 2),
               "two_process_s_per_iteration": round(two, 2), "segments": args.segments, "same_result": int(agree)}
    line = " ".join(f"{k}={v}" for k, v in figures.items())
    machine = {**machine_description(), "torch_threads": "1 per process (OMP_NUM_THREADS=1)"}
    machine["load_average_1_5_15_min_at_start"] = " / ".join(f"{x:.2f}" for x in load_start)
    machine["load_average_1_5_15_min_at_end"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    command = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    model = json.loads((experts / "manifest.json").read_text())["model"]["name"]
    text = [
        "# Distillation on 2 processes against 1 (ddp_ratio)", "",
        f"Model {model}: the gcg distillation of configs/arc-easy-cpu-v2.yaml at budget {args.budget} (student lr "
        f"fixed), {args.segments} expert segments per iteration, {args.iterations} iterations; seconds per iteration "
        f"after the first. One process, 1 thread, against `torchrun --nproc-per-node 2` (gloo), 1 thread per rank.", "",
        "| run | s / iteration | wall s (incl. loading and the instrument) |", "|---|---:|---:|",
        f"| 1 process | {one:.1f} | {walls['one']:.0f} |", f"| 2 processes | {two:.1f} | {walls['two']:.0f} |", "",
        f"Same synthetic set at the end (token ids equal, lr within 1e-6): {'yes' if agree else 'NO'}.", "",
        f"ddp_ratio = {two / one:.3f} (ideal 0.5 with 2 free cores). An iteration waits for its slowest rank: the "
        "draws cost differently (a candidate's replay starts at the first step that uses its sample), and both "
        "processes share the memory bandwidth; the search's own bookkeeping (ranking, re-tokenizing candidates) is "
        "repeated on every rank.", "",
        "## Machine", "", *[f"- {k}: {v}" for k, v in machine.items()], "",
        "## Command", "", f"    {command}", "", "## Figures", "", f"    {line}", ""]
    args.out.write_text("\n".join(text))
    print(line)


if __name__ == "__main__":
    main()
