"""Fault injection: a subprocess running a stage is killed with SIGKILL at random moments, several times, and then
resumed; the final artifacts equal those of an uninterrupted run bit for bit (CPU, one thread in every process).

Kept short for CI (tiny models, three kills per stage); ``bench/fault_injection.py`` runs the same tests with more
kills and other random moments (``TEXTDISTILL_FAULT_KILLS``, ``TEXTDISTILL_FAULT_SEED``)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import mc_rows, write_jsonl

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
KILLS = int(os.environ.get("TEXTDISTILL_FAULT_KILLS", "3"))      # kills per stage
SEED = int(os.environ.get("TEXTDISTILL_FAULT_SEED", "0"))        # shifts the random kill moments


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "textdistill.cli", *args, "--threads", "1", "--no-progress", "--device", "cpu"]


def _newest_mtime(folder: Path, pattern: str) -> float:
    times = [p.stat().st_mtime for p in folder.glob(pattern)]
    return max(times, default=0.0)


def kill_and_resume(args: list[str], resume_args: list[str], folder: Path, marker: str, *, kills: int, seed: int,
                    max_delay: float = 0.4) -> int:
    """Run ``args`` in a subprocess and SIGKILL it a random moment after it writes a new ``marker`` file (a glob
    under ``folder``: its checkpoint); relaunch with ``resume_args`` and kill again, ``kills`` times; then let it
    finish. Returns how many kills landed while the stage was still running."""
    rng = random.Random(seed)
    landed = 0
    command = args
    for _ in range(kills):
        before = _newest_mtime(folder, marker)
        process = subprocess.Popen(_command(command), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while process.poll() is None and _newest_mtime(folder, marker) <= before and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, max_delay))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            landed += 1
        else:
            assert process.returncode == 0, process.stderr.read().decode()[-2000:]
        command = resume_args
    finished = subprocess.run(_command(resume_args), env=ENV, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    return landed


def _run(args: list[str]) -> None:
    finished = subprocess.run(_command(args), env=ENV, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]


def _assert_same_tensors(a: Path, b: Path) -> None:
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), f"{a.name}: {name}"


def _losses(path: Path) -> list:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    rows = [{"prompt": f"Question: {r['question']}\nAnswer:", "response": " " + r["choices"][r["answer"]]}
            for r in mc_rows(24)]
    return write_jsonl(tmp_path_factory.mktemp("pool") / "pool.jsonl", rows)


def test_train_killed_at_random_moments_resumes_bit_identically(tiny_llama_dir, pool, tmp_path):
    recipe = ["--model", str(tiny_llama_dir), "--data", str(pool), "--max-steps", "150", "--batch-size", "4",
              "--lr", "3e-3", "--checkpoint-every", "1"]
    _run(["train", *recipe, "--output", str(tmp_path / "reference")])
    killed = tmp_path / "killed"
    landed = kill_and_resume(["train", *recipe, "--output", str(killed)],
                             ["train", *recipe, "--output", str(killed), "--resume"],
                             killed, "checkpoint/state.json", kills=KILLS, seed=SEED + 0)
    assert landed >= 1   # at least one kill interrupted a run (otherwise the test proves nothing)
    _assert_same_tensors(tmp_path / "reference" / "adapter_model.safetensors", killed / "adapter_model.safetensors")
    assert _losses(killed / "metrics.jsonl") == _losses(tmp_path / "reference" / "metrics.jsonl")
    assert not (killed / "checkpoint").exists()
    reference = json.loads((tmp_path / "reference" / "summary.json").read_text())
    summary = json.loads((killed / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k != "train_seconds"} == \
        {k: v for k, v in reference.items() if k != "train_seconds"}


def test_experts_killed_at_random_moments_resume_bit_identically(tiny_llama_dir, pool, tmp_path):
    recipe = ["--model", str(tiny_llama_dir), "--data", str(pool), "--num-experts", "2", "--max-steps", "60",
              "--snapshot-every", "20", "--batch-size", "4", "--lr", "0.05", "--checkpoint-every", "1"]
    _run(["experts", *recipe, "--output", str(tmp_path / "reference")])
    killed = tmp_path / "killed"
    landed = kill_and_resume(["experts", *recipe, "--output", str(killed)],
                             ["experts", *recipe, "--output", str(killed)],
                             killed, "expert_*/checkpoint/state.json", kills=KILLS, seed=SEED + 1)
    assert landed >= 1
    reference_files = sorted(p.relative_to(tmp_path / "reference")
                             for p in (tmp_path / "reference").glob("expert_*/*.safetensors"))
    assert reference_files == sorted(p.relative_to(killed) for p in killed.glob("expert_*/*.safetensors"))
    assert len(reference_files) == 2 * 4
    for name in reference_files:
        _assert_same_tensors(tmp_path / "reference" / name, killed / name)
    for expert in ("expert_00", "expert_01"):
        assert (killed / expert / "data_order.json").read_text() == \
            (tmp_path / "reference" / expert / "data_order.json").read_text()
        assert not (killed / expert / "checkpoint").exists()


@pytest.fixture(scope="module")
def experts(tiny_llama_dir, pool, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("experts")
    _run(["experts", "--model", str(tiny_llama_dir), "--data", str(pool), "--num-experts", "3", "--max-steps", "8",
          "--snapshot-every", "2", "--batch-size", "4", "--lr", "0.5", "--output", str(out)])
    return out


def test_distill_killed_at_random_moments_resumes_bit_identically(experts, tmp_path):
    settings = ["distill", "--experts", str(experts), "--budget", "4", "--iterations", "8", "--syn-steps", "2",
                "--batch-size", "2", "--precision", "fp32"]
    for pair in ("checkpoint_every=1", "search.top_k=8", "search.candidates=3", "search.confirm_draws=2",
                 "instrument.draws=2", "instrument.random_subsets=2", "student.lr_grid=[]"):
        key, value = pair.split("=")
        settings += [f"--{key}", value]
    _run([*settings, "--output", str(tmp_path / "reference")])
    killed = tmp_path / "killed"
    landed = kill_and_resume([*settings, "--output", str(killed)], [*settings, "--output", str(killed), "--resume"],
                             killed, "state.json", kills=KILLS, seed=SEED + 2)
    assert landed >= 1
    assert (killed / "distilled.jsonl").read_text() == (tmp_path / "reference" / "distilled.jsonl").read_text()
    _assert_same_tensors(tmp_path / "reference" / "embeddings.safetensors", killed / "embeddings.safetensors")
    reference = json.loads((tmp_path / "reference" / "summary.json").read_text())["heldout"]
    resumed = json.loads((killed / "summary.json").read_text())["heldout"]
    assert resumed["projected"] == reference["projected"] and resumed["init"] == reference["init"]


def test_experiment_killed_at_random_moments_resumes_bit_identically(tiny_llama_dir, pool, tmp_path):
    target = write_jsonl(tmp_path / "target.jsonl", mc_rows(8))
    config = tmp_path / "experiment.yaml"
    config.write_text(json.dumps({"experiment": {
        "pool": str(pool), "target": {"task": str(target), "split": "test"}, "models": [str(tiny_llama_dir)],
        "distill_model": str(tiny_llama_dir), "budgets": ["50%"], "methods": ["random"], "seeds": [0, 1],
        "recipe": {"max_steps": 60, "batch_size": 4, "lr": 3e-3, "precision": "fp32",
                   "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}}}}))
    run = ["experiment", str(config), "--checkpoint-every", "1"]
    _run([*run, "--output", str(tmp_path / "reference")])
    killed = tmp_path / "killed"
    landed = kill_and_resume([*run, "--output", str(killed)], [*run, "--output", str(killed)],
                             killed, "cells/**/checkpoint/state.json", kills=KILLS, seed=SEED + 3)
    assert landed >= 1
    adapters = sorted(p.relative_to(killed) for p in killed.glob("cells/**/adapter_model.safetensors"))
    assert len(adapters) == 2
    for name in adapters:
        _assert_same_tensors(tmp_path / "reference" / name, killed / name)
    columns = ("model", "method", "budget", "seed", "acc", "acc_norm", "train_last_loss")
    reference = json.loads((tmp_path / "reference" / "results.json").read_text())["rows"]
    resumed = json.loads((killed / "results.json").read_text())["rows"]
    assert [[r[c] for c in columns] for r in resumed] == [[r[c] for c in columns] for r in reference]
    assert not list(killed.glob("cells/**/checkpoint"))


def test_less_selection_killed_at_random_moments_resumes_to_the_same_selection(tiny_llama_dir, pool, tmp_path):
    target = write_jsonl(tmp_path / "target.jsonl", mc_rows(6))
    # the warm-up (checkpointed every step) runs 4 epochs of 8 rows, then the scores of each epoch's checkpoint
    settings = ["select", "--method", "less", "--model", str(tiny_llama_dir), "--data", str(pool), "--budget", "6",
                "--target", str(target), "--warmup-fraction", "0.34", "--warmup-epochs", "4",
                "--projection-dim", "64", "--checkpoint-every", "1"]
    _run([*settings, "--output", str(tmp_path / "reference.json")])
    killed = tmp_path / "killed.json"
    landed = kill_and_resume([*settings, "--output", str(killed)], [*settings, "--output", str(killed)],
                             tmp_path, ".killed.json.partial/*", kills=KILLS, seed=SEED + 4, max_delay=0.8)
    assert landed >= 1
    reference = json.loads((tmp_path / "reference.json").read_text())
    resumed = json.loads(killed.read_text())
    for key in ("indices", "scores"):
        assert resumed[key] == reference[key]
    assert resumed["all_scores"] == reference["all_scores"] and resumed["checkpoint_lrs"] == reference["checkpoint_lrs"]
    assert not (tmp_path / ".killed.json.partial").exists()
