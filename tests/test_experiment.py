"""The experiment runner: bad configs fail before any work, finished cells are skipped, results are written."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest

from conftest import mc_rows, write_jsonl
from textdistill.errors import ConfigError, DataError
from textdistill.experiment import (_cell_dir, _pool_settings, cell_key, load_experiment_config, run_experiment,
                                    settings_key, stage_settings, validate)
from textdistill.less import LessConfig
from textdistill.report import (comparison_table, paired_accuracy_difference, paired_comparisons, paired_table,
                               summarize)


def _config(tmp_path, tiny_llama_dir, **extra):
    body = {
        "name": "t", "pool": "arc-easy:train", "pool_limit": 16,
        "target": {"task": "arc-easy", "split": "validation", "limit": 6},
        "distill_model": str(tiny_llama_dir), "models": [str(tiny_llama_dir)],
        "budgets": ["4"], "methods": ["base", "random"], "seeds": [0, 1],
        "recipe": {"max_steps": 2, "batch_size": 2, "lora": {"r": 2, "alpha": 4}, "data": {"max_length": 64}},
    }
    body.update(extra)
    import yaml

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"experiment": body}))
    return load_experiment_config(str(path))


def test_bad_configs_fail_before_any_work(tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError, match="unknown method"):
        _config(tmp_path, tiny_llama_dir, methods=["random", "magic"])
    with pytest.raises(ConfigError, match="paired_reference 'less' is not one of the arms run"):
        _config(tmp_path, tiny_llama_dir, paired_reference="less")
    with pytest.raises(ConfigError, match="paired_reference must be an arm trained at a budget, not 'base'"):
        _config(tmp_path, tiny_llama_dir, paired_reference="base")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="larger than the pool"):
        run_experiment(_config(tmp_path, tiny_llama_dir, budgets=["17"]), out, device="cpu", progress=False)
    with pytest.raises(DataError, match="has no split 'dev'"):
        run_experiment(_config(tmp_path, tiny_llama_dir, target={"task": "arc-easy", "split": "dev"}), out,
                       device="cpu", progress=False)
    assert not out.exists()


@pytest.mark.parametrize("name", ["arc-easy-cpu-v2.yaml", "arc-easy-cpu.yaml"])
def test_less_block_loads_as_less_config_and_keeps_the_keys_of_finished_selections(name):
    path = str(Path(__file__).parents[1] / "configs" / name)
    config = load_experiment_config(path)
    assert config.less == LessConfig(target="arc-easy:validation", projection_dim=8192, warmup_fraction=0.05,
                                     warmup_epochs=4, max_val_examples=64)
    # results/<run>/selections/less-*-seed0-10392c72.json were made under this key
    assert settings_key([config.pool, _pool_settings(config), *stage_settings(config, "less")])[:8] == "10392c72"
    # and results/arc-easy-cpu-v2/cells/*/{base,less}/ under these; an unset target template is the task's default
    assert (cell_key(config, "base"), cell_key(config, "less")) == ("5aa7bb19241b", "2965ae7ebd0d")
    unset = dataclasses.replace(config, target=dataclasses.replace(config.target, template=None))
    assert unset.target.template == "rc" and cell_key(unset, "base") == "5aa7bb19241b"
    spelled_out = dataclasses.replace(config, less=dataclasses.replace(config.less, projection="rademacher",
                                                                       batch_size=8, bias_correction=False))
    assert cell_key(spelled_out, "less") == cell_key(config, "less")
    gaussian = dataclasses.replace(config, less=dataclasses.replace(config.less, projection="gaussian"))
    assert cell_key(gaussian, "less") != cell_key(config, "less")
    with pytest.raises(ConfigError, match="projection_dim must be a positive integer, got 0"):
        load_experiment_config(path, sets={"less.projection_dim": 0})


def test_checkpointed_layers_key_only_the_distilled_cells_and_only_when_on():
    """checkpoint_layers and micro_batch (added later, off by default) leave the keys of finished cells as they were;
    turned on they change the keys of the distilled cells and no other."""
    from textdistill.experiment import METHODS, resolve_precisions

    config = resolve_precisions(load_experiment_config(str(Path(__file__).parents[1] / "configs" /
                                                           "arc-easy-cpu-v2.yaml")), "cpu")
    # results/arc-easy-cpu-v2/cells/*/distilled/ were made under this key
    assert cell_key(config, "distilled") == "18f52da5cd9f"
    recompute = dataclasses.replace(config, distill=dataclasses.replace(config.distill, recompute=True))
    layered = dataclasses.replace(recompute, distill=dataclasses.replace(recompute.distill, checkpoint_layers=True))
    changed = {m for m in METHODS if cell_key(layered, m) != cell_key(recompute, m)}
    assert changed == {"distill-init", "distilled", "continuous"}
    grouped = dataclasses.replace(recompute, distill=dataclasses.replace(recompute.distill, micro_batch=1))
    assert {m for m in METHODS if cell_key(grouped, m) != cell_key(recompute, m)} == changed


def test_cells_run_once_and_results_are_written(tmp_path, tiny_llama_dir):
    config = _config(tmp_path, tiny_llama_dir)
    out = tmp_path / "out"
    logs: list[str] = []
    rows = run_experiment(config, out, device="cpu", progress=False, log=logs.append)
    assert len(rows) == 3  # base + random x 2 seeds
    with open(out / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert {"model", "method", "budget", "seed", "task", "acc"} <= set(table[0])
    assert sorted(r["method"] for r in table) == ["base", "random", "random"]
    assert (out / "report.md").read_text().count("| random |") == 3   # acc and acc_norm by budget, every arm
    assert (out / "accuracy_vs_budget.png").stat().st_size > 1000
    # every cell keeps its per-question answers: they are its acc and acc_norm, question by question
    for row in rows:
        assert len(row["correct"]) == len(row["correct_norm"]) == row["n"] == 6
        assert sum(map(int, row["correct"])) / 6 == pytest.approx(row["acc"])
        assert sum(map(int, row["correct_norm"])) / 6 == pytest.approx(row["acc_norm"])
    # the report pairs the default reference (random: no distilled arm) with base, seed by seed
    assert config.paired_reference_arm() == "random"
    import json

    (paired,) = json.loads((out / "results.json").read_text())["paired"]
    base = next(r for r in rows if r["method"] == "base")
    randoms = [r for r in rows if r["method"] == "random"]
    assert (paired["reference"], paired["arm"], paired["n"], paired["pair_seeds"]) == ("random", "base", 6, [0, 1])
    # the mean of per-question differences is the difference of the mean accuracies
    assert paired["mean_difference"] == pytest.approx(sum(r["acc"] for r in randoms) / 2 - base["acc"])
    assert "Paired differences: `random` against every other arm" in (out / "report.md").read_text()
    results = sorted(out.rglob("result.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    logs.clear()
    run_experiment(config, out, device="cpu", progress=False, log=logs.append)
    assert [p.stat().st_mtime_ns for p in results] == stamps
    assert sum("skipped" in line for line in logs) == 3
    # another recipe: the cells are redone, not reused
    import dataclasses

    changed = dataclasses.replace(config, recipe=dataclasses.replace(config.recipe, lr=1e-3))
    logs.clear()
    run_experiment(changed, out, device="cpu", progress=False, log=logs.append)
    assert sum("redone" in line for line in logs) == 3


def test_a_multiple_choice_file_is_an_experiment_target_and_a_less_target(tmp_path, tiny_llama_dir):
    rows = [{"q": r["question"], "options": r["choices"], "label": r["answer"]} for r in mc_rows(10, "text")]
    target = str(write_jsonl(tmp_path / "mc.jsonl", rows))
    fields = {"question": "q", "choices": "options", "answer": "label"}
    config = _config(tmp_path, tiny_llama_dir, target={"task": target, "limit": 6, "fields": fields},
                     methods=["base", "less"], less={"target": target, "target_fields": fields})
    assert len(validate(config)) == 16
    assert cell_key(config, "base") != cell_key(_config(tmp_path, tiny_llama_dir), "base")
    out = tmp_path / "out"
    rows = run_experiment(dataclasses.replace(config, methods=("base",)), out, device="cpu", progress=False)
    assert [(r["method"], r["task"], r["n"]) for r in rows] == [("base", f"{target}:test", 6)]
    with pytest.raises(DataError, match=r"mc.jsonl: row 0: missing field 'question'"):
        validate(_config(tmp_path, tiny_llama_dir, target={"task": target}))
    with pytest.raises(DataError, match=r"mc.jsonl: row 0: missing field 'question'"):
        validate(dataclasses.replace(config, less=dataclasses.replace(config.less, target_fields=None)))


def test_summary_mean_and_std():
    rows = [{"model": "m", "method": "random", "budget": "5%", "acc": a} for a in (0.5, 0.7)]
    (s,) = summarize(rows)
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1414213562)
    assert "0.6000 ± 0.1414" in comparison_table(rows)


def test_distilled_arms_share_one_distillation_and_transfer_by_text(tmp_path, tiny_llama_dir, tiny_gemma_dir):
    config = _config(
        tmp_path, tiny_llama_dir, methods=["random", "match", "distill-init", "distilled", "continuous"], seeds=[0, 1],
        distill_per_seed=False, models=[str(tiny_llama_dir), str(tiny_gemma_dir)], pool_limit=12,
        experts={"num_experts": 2, "snapshot_every": 2, "train": {"max_steps": 4, "batch_size": 4, "lr": 0.5,
                                                                  "lora": {"r": 2, "alpha": 4},
                                                                  "data": {"max_length": 64}}},
        match={"segments": 2, "sketch_dim": 64},
        distill={"iterations": 2, "student": {"syn_steps": 2, "batch_size": 2}, "checkpoint_every": 2,
                 "search": {"top_k": 8, "candidates": 2}, "instrument": {"draws": 2, "random_subsets": 1}})
    out = tmp_path / "out"
    rows = run_experiment(config, out, device="cpu", progress=False, log=lambda _: None)
    # 4 methods x 2 seeds x 2 models, and the continuous arm for the distilling model only
    assert len(rows) == 18 and {r["model"] for r in rows if r["method"] == "continuous"} == {str(tiny_llama_dir)}
    assert len(list((out / "distill").glob("*/distilled.jsonl"))) == 1  # shared across seeds
    # the distillation started from the match selection: its starting samples are that arm's data, reused
    init = {r["seed"]: r for r in rows if r["method"] == "distill-init" and r["model"] == str(tiny_llama_dir)}
    assert all(r["same_data_as"].startswith("match 4 seed") for r in init.values())
    gemma_distilled = [r for r in rows if r["method"] == "distilled" and "gemma" in r["model"]]
    assert all(r["prompt_tokens_mean"] > 0 and r["train_examples"] == 4 for r in gemma_distilled)
    report = (out / "report.md").read_text()
    assert "Held-out matching loss" in report and "| match selection |" in report
    assert "Prompts after distillation" in report and (out / "matching_loss.png").is_file()
    # distilled is the paired reference on both models; continuous (the distilling model's only) pairs on that one
    import json

    paired = json.loads((out / "results.json").read_text())["paired"]
    assert {(c["model"], c["arm"]) for c in paired} == {(m, a) for m in config.models for a in
                                                         ("random", "match", "distill-init")} | {
        (str(tiny_llama_dir), "continuous")}
    assert all(c["n"] == 6 and c["pair_seeds"] == [0, 1] for c in paired)
    # changing the distillation redoes its cells only: random and match are kept
    import dataclasses

    logs: list[str] = []
    changed = dataclasses.replace(config, distill=dataclasses.replace(config.distill, iterations=3))
    run_experiment(changed, out, device="cpu", progress=False, log=logs.append)
    assert sum("skipped" in line for line in logs) == 8 and sum("redone" in line for line in logs) == 10


def test_paired_accuracy_difference_counts_questions_and_its_interval_is_the_questions_sampling():
    # B gets right every question A gets right, and 30 of the other 200 - 1 seed, 400 questions
    a = [[1] * 200 + [0] * 200]
    b = [[1] * 230 + [0] * 170]
    result = paired_accuracy_difference(a, b, resamples=4000)
    assert result["mean_difference"] == pytest.approx(30 / 400)
    assert (result["b_only_right"], result["a_only_right"]) == ([30], [0])
    # per-question differences are 0/1 with p = 0.075: the interval is about +-1.96 sqrt(p (1 - p) / n) around p
    half = 1.96 * (0.075 * 0.925 / 400) ** 0.5
    low, high = result["ci95"]
    assert low == pytest.approx(0.075 - half, abs=0.006) and high == pytest.approx(0.075 + half, abs=0.006)
    # identical arms: no difference and no width; the same answers in another order: the same difference
    assert paired_accuracy_difference(a, a)["ci95"] == [0.0, 0.0]
    assert paired_accuracy_difference([a[0][::-1]], [b[0][::-1]], resamples=4000)["mean_difference"] == pytest.approx(0.075)
    # two seeds: the mean over seeds of the per-question difference (a seed where B loses 10 questions)
    two = paired_accuracy_difference(a + a, b + [[1] * 190 + [0] * 210], resamples=1000)
    assert two["mean_difference"] == pytest.approx((30 - 10) / 2 / 400)
    assert (two["b_only_right"], two["a_only_right"]) == ([30, 0], [0, 10])
    with pytest.raises(ValueError, match="same number of runs"):
        paired_accuracy_difference(a + a, b)
    with pytest.raises(ValueError, match="same questions"):
        paired_accuracy_difference(a, [b[0][:399]])


def test_paired_comparisons_pair_seeds_broadcast_base_and_say_what_is_missing():
    def row(method, budget, seed, correct):
        return {"model": "m", "method": method, "budget": budget, "seed": seed, "correct": correct}

    rows = [row("base", "", "", "0000"), row("full", "100%", 0, "1111"),
            row("distilled", "1%", 1, "1100"), row("distilled", "1%", 0, "1110"),
            row("random", "1%", 0, "1000"), row("random", "1%", 1, "0000"), row("random", "5%", 0, "1111"),
            {**row("less", "1%", 0, "1"), "correct": None}]
    by_arm = {(c["arm"], c["arm_budget"]): c for c in paired_comparisons(rows, "distilled", resamples=200)}
    # random 5% is another budget: not compared with distilled 1%; base and full are compared at every budget
    assert set(by_arm) == {("base", ""), ("full", "100%"), ("random", "1%"), ("less", "1%")}
    # seed 0 with seed 0 and seed 1 with seed 1, whatever the rows' order: (2 + 2) / 2 questions of 4
    assert by_arm[("random", "1%")]["mean_difference"] == pytest.approx(0.5)
    assert by_arm[("random", "1%")]["reference_only_right"] == [2, 2]
    assert by_arm[("base", "")]["pair_seeds"] == [0, 1]
    assert by_arm[("base", "")]["mean_difference"] == pytest.approx((3 + 2) / 2 / 4)
    # full has seed 0 only: only the common seed counts
    assert by_arm[("full", "100%")]["pair_seeds"] == [0]
    assert by_arm[("full", "100%")]["mean_difference"] == pytest.approx(-1 / 4)
    assert (by_arm[("less", "1%")]["n"], by_arm[("less", "1%")]["reason"]) == (0, "the arm has no per-question records")
    # seeds in numeric order (2 before 10), and runs of different lengths are not compared
    rows += [row("distilled", "1%", 10, "0000"), row("distilled", "1%", 2, "0000"),
             row("random", "1%", 10, "1111"), row("random", "1%", 2, "111")]
    by_arm = {(c["arm"], c["arm_budget"]): c for c in paired_comparisons(rows, "distilled", resamples=200)}
    assert by_arm[("base", "")]["pair_seeds"] == [0, 1, 2, 10]
    assert by_arm[("random", "1%")]["reason"] == "the runs scored different numbers of questions"
    # acc_norm pairs correct_norm; a table lists the compared pairs and names the others
    norm_rows = [{**r, "correct_norm": r["correct"]} for r in rows[:6]]
    (norm,) = [c for c in paired_comparisons(norm_rows, "distilled", "acc_norm", resamples=200) if c["arm"] == "random"]
    assert norm["metric"] == "acc_norm" and norm["mean_difference"] == pytest.approx(0.5)
    table = paired_table(paired_comparisons(rows, "distilled", resamples=200))
    assert "| m | 1% | distilled - base | **+0.3125** |" in table
    assert "Not compared: m 1% distilled - random (the runs scored different numbers of questions); m 1% distilled" \
           " - less (the arm has no per-question records)." in table
    assert paired_table([c for c in paired_comparisons(rows, "distilled") if not c["n"]]) == ""


def test_cells_with_identical_training_data_reuse_one_run(tmp_path, tiny_llama_dir):
    """A random subset of the whole pool (sorted indices) is the pool itself: the same deterministic run as ``full``
    with the same seed, so it is reused and marked; a smaller budget is trained for real."""
    config = _config(tmp_path, tiny_llama_dir, methods=["full", "random"], budgets=["100%", "8"], seeds=[0])
    out = tmp_path / "out"
    logs: list[str] = []
    rows = run_experiment(config, out, device="cpu", progress=False, log=logs.append)
    by_cell = {(r["method"], r["budget"]): r for r in rows}
    full, same, smaller = by_cell[("full", "100%")], by_cell[("random", "100%")], by_cell[("random", "8")]
    assert same["same_data_as"] == "full 100% seed 0" and same["data_key"] == full["data_key"]
    assert (same["acc"], same["acc_norm"], same["train_steps"]) == (full["acc"], full["acc_norm"], full["train_steps"])
    assert (same["correct"], same["correct_norm"]) == (full["correct"], full["correct_norm"])
    assert "same_data_as" not in smaller and smaller["data_key"] != full["data_key"]
    assert sum("its run is reused" in line for line in logs) == 1
    assert "random (same as full 100%)" in (out / "report.md").read_text()
    # the reused run's adapter is the `full` cell's, not a copy; the smaller budget has its own
    assert same["adapter"] == full["adapter"] == str(_cell_dir(Path(), str(tiny_llama_dir), "full", "100%", 0) /
                                                     "adapter")
    assert (out / full["adapter"] / "adapter_model.safetensors").is_file()
    assert not (_cell_dir(out, str(tiny_llama_dir), "random", "100%", 0) / "adapter").exists()
    assert (out / smaller["adapter"] / "adapter_model.safetensors").is_file() and smaller["adapter"] != full["adapter"]
    # a later call that runs only `random` (e.g. a worker given a subset of the methods) still finds its twin among
    # the `full` cells it was not asked to run
    import dataclasses
    import shutil

    for folder in (out / "cells").glob("*/random"):
        shutil.rmtree(folder)
    logs.clear()
    alone = run_experiment(dataclasses.replace(config, methods=("random",), budgets=("100%",)), out, device="cpu",
                           progress=False, log=logs.append)
    assert alone[0]["same_data_as"] == "full 100% seed 0" and alone[0]["acc"] == full["acc"]
    assert alone[0]["adapter"] == full["adapter"]
    assert sum("its run is reused" in line for line in logs) == 1


def test_report_only_runs_nothing_and_reports_finished_cells(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    run_experiment(_config(tmp_path, tiny_llama_dir, seeds=[0]), out, device="cpu", progress=False,
                   log=lambda _: None)
    before = sorted(out.rglob("result.json"))
    logs: list[str] = []
    rows = run_experiment(_config(tmp_path, tiny_llama_dir, seeds=[0, 1]), out, device="cpu", progress=False,
                          log=logs.append, report_only=True)
    assert sorted(out.rglob("result.json")) == before
    assert [line.endswith("not run") for line in logs].count(True) == 1 and len(rows) == 2
    with open(out / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2


def test_stage_lock_waits_for_a_live_owner_and_not_for_a_dead_one(tmp_path):
    import subprocess
    import threading
    import time

    from textdistill.experiment import stage_lock

    target = tmp_path / "distill" / "5pct-seed0-abc"
    events: list[str] = []

    def other_process():
        with stage_lock(target, poll_seconds=0.01, log=lambda _: None):
            events.append("other in")
            time.sleep(0.3)
            events.append("other out")

    thread = threading.Thread(target=other_process)
    thread.start()
    while not events:
        time.sleep(0.01)
    logs: list[str] = []
    with stage_lock(target, poll_seconds=0.01, log=logs.append):
        events.append("me in")
    thread.join()
    assert events == ["other in", "other out", "me in"]
    assert logs and "waiting for another process" in logs[0]
    # the lock file a process that has exited left behind (the old PID-file locks wrote their PID into it) does not
    # hold anything: taken at once
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "distill" / "5pct-seed0-abc.lock").write_text(str(dead.pid))
    with stage_lock(target, poll_seconds=60, log=logs.append):
        events.append("after stale")
    assert events[-1] == "after stale"


def test_budget_table_puts_budgets_in_columns():
    from textdistill.report import budget_table

    rows = [{"model": "m", "method": "base", "budget": "", "acc": 0.5},
            {"model": "m", "method": "full", "budget": "100%", "acc": 0.7},
            *({"model": "m", "method": "random", "budget": b, "acc": a} for b, a in
              (("5%", 0.6), ("5%", 0.62), ("5%", 0.64), ("1%", 0.55), ("1%", 0.57)))]
    lines = budget_table(rows).splitlines()
    assert lines[0] == "| model | method | no training | 1% | 5% | 100% |"
    assert lines[2] == "| m | base | 0.500 |  |  |  |"
    assert lines[3] == "| m | full |  |  |  | 0.700 (1) |"
    assert lines[4] == "| m | random |  | 0.560 ± 0.014 (2) | 0.620 ± 0.020 |  |"


def test_a_cell_held_by_another_process_is_deferred_not_duplicated(tmp_path, tiny_llama_dir, monkeypatch):
    """Two processes sharing a run folder: a cell the other one holds is left for later (the rest runs first) and,
    once the other process has written it, is taken as done instead of being run again."""
    import json
    import threading

    import textdistill.experiment as experiment

    monkeypatch.setattr(experiment, "CELL_POLL_SECONDS", 0.05)
    config = _config(tmp_path, tiny_llama_dir, seeds=[0])
    out = tmp_path / "out"
    held = experiment._cell_dir(out, str(tiny_llama_dir), "base", "none", None)
    other = experiment.try_lock(held)                    # "the other process" is running the base cell
    assert other is not None and experiment.try_lock(held) is None
    logs: list[str] = []
    cell_key = None

    def other_process_finishes():
        while not any("random" in line and "acc" not in line for line in logs):
            threading.Event().wait(0.01)                  # until this process has moved on to the random cell
        while not (out / "cells").exists() or not list((out / "cells").glob("**/random/**/result.json")):
            threading.Event().wait(0.01)
        # and until it has come back to the held cell and is waiting for it (so that a loaded machine, where this
        # thread can be scheduled first, cannot release the cell before this process looks at it again)
        while not any("being run by another process" in line for line in logs):
            threading.Event().wait(0.01)
        written = json.loads(next((out / "cells").glob("**/random/**/result.json")).read_text())
        held.mkdir(parents=True, exist_ok=True)
        (held / "result.json").write_text(json.dumps(dict(written, method="base", budget="", seed="", acc=0.123)))
        other.release()

    thread = threading.Thread(target=other_process_finishes)
    thread.start()
    rows = run_experiment(config, out, device="cpu", progress=False, log=logs.append)
    thread.join()
    assert sorted(r["method"] for r in rows) == ["base", "random"]
    assert next(r for r in rows if r["method"] == "base")["acc"] == 0.123      # the other process's result
    assert any("being run by another process" in line for line in logs)
    assert any(line.endswith("done by another process, skipped") or line.endswith("done earlier, skipped")
               for line in logs)
    assert cell_key is None
    # nothing is left held (lock files stay behind, empty of meaning: an OS lock dies with its holder)
    for path in out.rglob("*.lock"):
        lock = experiment.try_lock(path.with_suffix(""))
        assert lock is not None, path
        lock.release()


def test_a_lock_dies_with_its_process(tmp_path):
    """A run killed while it holds a cell leaves no stale lock: the next process takes it at once."""
    import signal
    import subprocess
    import sys

    import textdistill.experiment as experiment

    target = tmp_path / "cell"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from textdistill.experiment import try_lock; "
        f"lock = try_lock(Path({str(target)!r})); print('held' if lock else 'busy', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert experiment.try_lock(target) is None       # held by a live process
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = experiment.try_lock(target)
    assert lock is not None
    lock.release()


def test_distillation_folders_leave_out_the_lock_files_beside_them(tmp_path):
    from textdistill.experiment import try_lock
    from textdistill.report import distillation_folders

    run = tmp_path / "distill" / "1pct-seed0-abc"
    run.mkdir(parents=True)
    try_lock(run).release()                              # leaves distill/1pct-seed0-abc.lock behind
    assert (tmp_path / "distill" / "1pct-seed0-abc.lock").exists()
    assert distillation_folders(tmp_path) == [run] and distillation_folders(tmp_path / "none") == []


def test_stages_made_by_another_package_version_or_stage_code_are_not_reused(monkeypatch):
    """Keys name the code: another package version changes every key (nothing made before is reused); a bumped
    stage version changes the keys of that stage and of the cells built on it, and no other."""
    import textdistill
    from textdistill import keys as keys_module
    from textdistill.experiment import METHODS, cell_key, load_experiment_config, resolve_precisions

    config = resolve_precisions(load_experiment_config("demo"), "cpu")
    before = {m: cell_key(config, m) for m in METHODS}
    monkeypatch.setattr(textdistill, "__version__", "0.2.0")
    assert all(cell_key(config, m) != before[m] for m in METHODS)
    monkeypatch.setattr(textdistill, "__version__", "0.1.0")
    assert {m: cell_key(config, m) for m in METHODS} == before
    monkeypatch.setitem(keys_module.STAGE_CODE_VERSIONS, "distill", 2)
    after = {m: cell_key(config, m) for m in METHODS}
    changed = {m for m in METHODS if after[m] != before[m]}
    assert changed == {"distill-init", "distilled", "continuous"}


def test_ranks_of_a_launcher_share_out_the_cells(tmp_path, tiny_llama_dir):
    """Under torchrun each rank is a worker: every cell runs once (on some rank), and each rank returns all."""
    import json
    import textwrap

    from launch import torchrun

    config = _config(tmp_path, tiny_llama_dir)
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys
        from textdistill.experiment import load_experiment_config, run_experiment
        rank = os.environ["RANK"]
        lines = []
        rows = run_experiment(load_experiment_config(sys.argv[1]), sys.argv[2], device="cpu", progress=False,
                              log=lines.append)
        json.dump({"log": lines, "acc": sorted((r["method"], r.get("seed"), r["acc"]) for r in rows)},
                  open(f"{sys.argv[2]}-rank{rank}.json", "w"))
    """))
    out = tmp_path / "two"
    torchrun(script, tmp_path / "exp.yaml", out, nproc=2, timeout=300)
    ranks = [json.loads((tmp_path / f"two-rank{r}.json").read_text()) for r in (0, 1)]
    ran = [line for r in ranks for line in r["log"] if line.lstrip().startswith("acc ")]
    assert len(ran) == 3, ranks   # base, random seed 0, random seed 1: each trained and scored exactly once
    assert ranks[0]["acc"] == ranks[1]["acc"] and len(ranks[0]["acc"]) == 3
    alone = run_experiment(config, tmp_path / "one", device="cpu", progress=False, log=lambda *_: None)
    assert sorted((r["method"], r.get("seed"), r["acc"]) for r in alone) == [tuple(x) for x in ranks[0]["acc"]]


def test_the_match_selection_and_the_instrument_hold_out_the_same_experts(tmp_path, tiny_llama_dir):
    """One held-out expert set: a config whose match selection would train on the expert the instrument holds out is
    refused in one line; without distillation (no instrument) or without match the two never meet."""
    with pytest.raises(ConfigError, match=r"match.heldout_experts \(0\) and distill.instrument.heldout_experts "
                                          r"\(1\) differ"):
        _config(tmp_path, tiny_llama_dir, methods=["match", "distilled"], distill_init="match",
                match={"heldout_experts": 0}, distill={"instrument": {"heldout_experts": 1}})
    _config(tmp_path, tiny_llama_dir, methods=["match"], match={"heldout_experts": 0})
    _config(tmp_path, tiny_llama_dir, methods=["distilled"], distill_init="random", match={"heldout_experts": 0})
    _config(tmp_path, tiny_llama_dir, methods=["match", "distilled"], distill_init="match",
            match={"heldout_experts": 2}, distill={"instrument": {"heldout_experts": 2}})


def test_a_bumped_key_schema_changes_every_key_and_each_field_says_if_it_is_keyed(monkeypatch):
    """What enters a key is decided by the fields' metadata (keys.py): a field marked keyed=False never changes a
    key, one that does not act where it stands (the confirmation draws outside gcg) drops out, and a bumped
    KEY_SCHEMA changes every key."""
    from textdistill import keys as keys_module
    from textdistill.experiment import METHODS, resolve_precisions

    config = resolve_precisions(load_experiment_config("demo"), "cpu")
    before = {m: cell_key(config, m) for m in METHODS}
    buffered = dataclasses.replace(config, less=dataclasses.replace(config.less, buffer_size=7, batch_size=3,
                                                                    keep_checkpoints=True))
    assert {m: cell_key(buffered, m) for m in METHODS} == before
    def draws(base, mode, count):
        search = dataclasses.replace(base.distill.search, confirm=True, confirm_draws=count)
        return dataclasses.replace(base, distill=dataclasses.replace(base.distill, mode=mode, search=search))

    # no effect outside gcg: no key change
    assert cell_key(draws(config, "continuous", 9), "distilled") == cell_key(draws(config, "continuous", 6),
                                                                              "distilled")
    assert cell_key(draws(config, "gcg", 9), "distilled") != cell_key(draws(config, "gcg", 6), "distilled")
    monkeypatch.setattr(keys_module, "KEY_SCHEMA", 2)
    assert all(cell_key(config, m) != before[m] for m in METHODS)


def test_the_paired_script_reads_an_experiments_arm_by_seed_from_its_results(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("paired_accuracy",
                                                  Path(__file__).parents[1] / "bench" / "paired_accuracy.py")
    paired = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired)
    rows = [{"model": "/m/smollm2-135m", "method": "match", "budget": "5%", "seed": seed, "correct": bits}
            for seed, bits in ((2, "001"), (0, "101"), (1, "011"))]
    rows += [{"model": "/m/gemma3-270m", "method": "match", "budget": "5%", "seed": 0, "correct": "111"},
             {"model": "/m/smollm2-135m", "method": "match", "budget": "1%", "seed": 0, "correct": "000"},
             {"model": "/m/smollm2-135m", "method": "less", "budget": "5%", "seed": 0}]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"rows": rows}))
    assert paired.read_arm(f"@{results}:match/5%/smollm2-135m") == [[1, 0, 1], [0, 1, 1], [0, 0, 1]]
    with pytest.raises(SystemExit, match="no cells with per-question answers"):
        paired.read_arm(f"@{results}:less/5%/smollm2-135m")
    arm = tmp_path / "arms" / "smollm2-135m" / "distilled"   # bench/text_arm.py's cells, seed 10 after seed 2
    arm.mkdir(parents=True)
    for seed, bits in ((10, "110"), (2, "010")):
        (arm / f"seed{seed}.json").write_text(json.dumps({"seed": seed, "correct": bits}))
    assert paired.read_arm(f"@{arm}") == [[0, 1, 0], [1, 1, 0]]
    # samples files: acc or acc_norm per question, slices joined with +; stored outputs keep acc only
    for name, records in (("a", [(1, 0), (0, 1)]), ("b", [(0, 0)])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "samples_mmlu.jsonl").write_text(
            "".join(json.dumps({"acc": acc, "acc_norm": norm}) + "\n" for acc, norm in records))
    assert paired.read_arm(f"{tmp_path / 'a'}+{tmp_path / 'b'}") == [[1, 0, 0]]
    assert paired.read_arm(f"{tmp_path / 'a'}+{tmp_path / 'b'}", "acc_norm") == [[0, 1, 0]]
    with pytest.raises(SystemExit, match="only samples folders keep acc_norm"):
        paired.read_arm(f"@{arm}", "acc_norm")
