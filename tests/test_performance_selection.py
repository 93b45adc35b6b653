"""Selection by performance matching: the best of random subsets by the receivers' held-out loss after training."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from textdistill.config import DataSettings, LoraSettings, TrainConfig
from textdistill.data import load_examples, tokenize_examples
from textdistill.errors import ConfigError
from textdistill.performance_selection import (PerformanceSelectionConfig, best_draw, draw_indices,
                                               select_by_performance)
from textdistill.selection import random_indices, read_selection

# fp32 on every CPU kind: the scores are compared for equality with a recomputation
RECIPE = TrainConfig(max_steps=2, batch_size=2, lr=5e-3, precision="fp32", lora=LoraSettings(r=2, alpha=4),
                     data=DataSettings(max_length=64, limit=16))
CONFIG = PerformanceSelectionConfig(draws=3, seed=11, train_seed=1, rows="arc-easy:validation", rows_offset=2,
                                    rows_limit=4)


def test_best_draw_is_the_lowest_summed_loss_and_ties_go_to_the_earlier_draw():
    assert best_draw({"a": [3.0, 1.0, 2.0]}) == (1, [3.0, 1.0, 2.0])
    assert best_draw({"a": [1.0, 2.0, 0.5], "b": [1.0, 0.5, 2.0]}) == (0, [2.0, 2.5, 2.5])
    assert best_draw({"a": [2.0, 1.0], "b": [0.0, 1.0]})[0] == 0   # 2.0 against 2.0: the earlier
    with pytest.raises(ValueError, match="a loss per draw"):
        best_draw({"a": [1.0, 2.0], "b": [1.0]})


def test_draws_are_the_random_selections_of_consecutive_seeds():
    assert draw_indices(50, 5, CONFIG) == [random_indices(50, 5, 11 + k) for k in range(3)]


@pytest.mark.parametrize("bad, message", [({"draws": 0}, "draws must be positive"),
                                          ({"rows_limit": 0}, "rows_limit positive"),
                                          ({"models": ()}, "models is empty"),
                                          ({"score": "accuracy"}, "unknown score 'accuracy'"),
                                          ({"margin_cap": 1.0}, "margin score only"),
                                          ({"score": "margin", "margin_cap": float("inf")}, "finite")])
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(CONFIG, **bad)


def test_the_best_draw_is_chosen_by_the_trained_receivers_held_out_loss_and_a_rerun_trains_nothing(
        tmp_path, tiny_llama_dir, tiny_gemma_dir, monkeypatch):
    from textdistill import training
    from textdistill.training import mean_response_loss, train_on_examples

    llama, gemma = str(tiny_llama_dir), str(tiny_gemma_dir)
    out = tmp_path / "sel.json"
    result = select_by_performance(data="arc-easy:train", budget=4, output=out, config=CONFIG, recipe=RECIPE,
                                   models=[llama], device="cpu", progress=False, log=lambda *_: None)
    record = read_selection(out)
    pool = load_examples("arc-easy:train", RECIPE.data)
    draws = draw_indices(len(pool), 4, CONFIG)
    assert record["indices"] == draws[result["draw"]] == result["indices"]
    losses = record["draw_losses"][llama]
    assert len(losses) == 3 and result["draw"] == min(range(3), key=lambda k: losses[k])

    # each loss is the held-out loss of the receiver trained on that draw with the recipe at train_seed
    model, tokenizer, _ = train_on_examples(model_name=llama, examples=[pool[i] for i in draws[2]],
                                            config=dataclasses.replace(RECIPE, seed=1), device="cpu", progress=False)
    rows = load_examples("arc-easy:validation", RECIPE.data)[2:6]
    held_out = tokenize_examples(tokenizer, rows, max_length=64, append_eos=RECIPE.data.append_eos)
    assert losses[2] == pytest.approx(mean_response_loss(model, held_out, tokenizer.pad_token_id), abs=1e-6)

    # a rerun, and a selection summing two models, train only what is not cached (here: Gemma's three draws)
    trained = []
    monkeypatch.setattr(training, "train_on_examples",
                        lambda **kw: trained.append(kw["model_name"]) or train_on_examples(**kw))
    again = select_by_performance(data="arc-easy:train", budget=4, output=tmp_path / "again.json", config=CONFIG,
                                  recipe=RECIPE, models=[llama], device="cpu", progress=False,
                                  cache_dir=out.with_name("sel.draws"), log=lambda *_: None)
    assert trained == [] and again["indices"] == result["indices"]
    both = select_by_performance(data="arc-easy:train", budget=4, output=tmp_path / "both.json", config=CONFIG,
                                 recipe=RECIPE, models=[llama, gemma], device="cpu", progress=False,
                                 cache_dir=out.with_name("sel.draws"), log=lambda *_: None)
    assert trained == [gemma] * 3
    summed = read_selection(tmp_path / "both.json")
    assert summed["draw_losses"][llama] == losses
    assert both["losses"] == [a + b for a, b in zip(losses, summed["draw_losses"][gemma])]


def test_a_selection_by_the_capped_margin_scores_each_draw_by_its_held_out_questions_and_keeps_its_own_cache(
        tmp_path, tiny_llama_dir):
    from textdistill.evaluation import evaluate_with_records, mean_margin, question_margins
    from textdistill.performance_selection import held_out_questions, score_cache_path
    from textdistill.selection import pool_ids_hash
    from textdistill.training import train_on_examples

    llama = str(tiny_llama_dir)
    capped = dataclasses.replace(CONFIG, draws=2, score="margin", margin_cap=-0.05)
    out = tmp_path / "capped.json"
    result = select_by_performance(data="arc-easy:train", budget=4, output=out, config=capped, recipe=RECIPE,
                                   models=[llama], device="cpu", progress=False, log=lambda *_: None)
    record = read_selection(out)
    assert record["score"] == "margin" and record["margin_cap"] == -0.05
    pool = load_examples("arc-easy:train", RECIPE.data)
    draws = draw_indices(len(pool), 4, capped)
    model, tokenizer, _ = train_on_examples(model_name=llama, examples=[pool[i] for i in draws[1]],
                                            config=dataclasses.replace(RECIPE, seed=1), device="cpu", progress=False)
    _, records = evaluate_with_records(model, tokenizer, held_out_questions("arc-easy:validation", 2, 4))
    margins = question_margins(records)
    assert len(margins) == 4 and min(margins) < -0.05 < max(margins)   # the cap bites on some, not all
    assert record["draw_losses"][llama][1] == pytest.approx(-mean_margin(margins, -0.05), abs=1e-9)
    assert result["draw"] == min(range(2), key=lambda k: (record["draw_losses"][llama][k], k))
    # another score or cap is another cache file; the loss keeps the file name it had before the margin existed
    ids = pool_ids_hash(pool)
    names = {score_cache_path("c", llama, RECIPE, c, ids, 4).name for c in (
        CONFIG, capped, dataclasses.replace(capped, margin_cap=None), dataclasses.replace(capped, margin_cap=1.0))}
    assert len(names) == 4
    from textdistill.artifacts import sha256_json
    from textdistill.keys import keyed

    before = sha256_json([llama, keyed(dataclasses.replace(RECIPE, seed=1)), "arc-easy:validation", 2, 4, ids, 4])
    assert score_cache_path("c", llama, RECIPE, CONFIG, ids, 4).name == f"{tiny_llama_dir.name}-{before[:12]}.json"
    assert [p.name for p in out.with_name("capped.draws").glob("*.json")] == \
        [score_cache_path("c", llama, RECIPE, capped, ids, 4).name]


def test_an_experiment_arm_where_each_receiver_scores_its_own_selection(tmp_path, tiny_llama_dir):
    import yaml

    from textdistill.experiment import load_experiment_config, run_experiment

    body = {"name": "t", "pool": "arc-easy:train", "pool_limit": 16,
            "target": {"task": "arc-easy", "split": "validation", "limit": 4},
            "distill_model": str(tiny_llama_dir), "models": [str(tiny_llama_dir)], "budgets": ["4"],
            "methods": ["performance"], "seeds": [0],
            "recipe": {"max_steps": 2, "batch_size": 2, "precision": "fp32", "lora": {"r": 2, "alpha": 4},
                       "data": {"max_length": 64}},
            "performance": {"draws": 2, "seed": 3, "rows": "arc-easy:validation", "rows_offset": 4, "rows_limit": 3}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"experiment": body}))
    config = load_experiment_config(str(path))
    rows = run_experiment(config, tmp_path / "out", device="cpu", progress=False, log=lambda *_: None)
    assert len(rows) == 1 and rows[0]["method"] == "performance"
    selection = tmp_path / "out" / "selections" / rows[0]["selection"]
    record = read_selection(selection)
    assert record["scoring_models"] == [str(tiny_llama_dir)] and tiny_llama_dir.name in selection.name
    assert record["indices"] == draw_indices(16, 4, config.performance)[record["draw"]]


def test_the_select_command_reads_the_recipe_from_an_experiment_config_and_refuses_a_seed_that_does_not_act(
        tmp_path, tiny_llama_dir, capsys):
    import yaml

    from textdistill.cli import main

    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"experiment": {"recipe": {
        "max_steps": 1, "batch_size": 2, "precision": "fp32", "lora": {"r": 2, "alpha": 4},
        "data": {"max_length": 64, "limit": 12}}}}))
    args = ["select", "--method", "performance", "--data", "arc-easy:train", "--budget", "3", "--config", str(config),
            "--performance.models", f"[{tiny_llama_dir}]", "--performance.draws", "2", "--performance.rows_limit",
            "2", "--no-progress"]
    assert main(args + ["--output", str(tmp_path / "sel.json")]) == 0
    record = read_selection(tmp_path / "sel.json")
    assert record["method"] == "performance" and record["count"] == 3 and len(record["summed_losses"]) == 2
    draws = json.loads(next((tmp_path / "sel.draws").glob("*.json")).read_text())["draws"]
    assert [d["train_steps"] for d in draws.values()] == [1, 1]   # the config's recipe (max_steps 1) was used
    assert main(args + ["--output", str(tmp_path / "x.json"), "--recipe.seed", "3"]) == 2
    assert "--recipe.seed does not act here" in capsys.readouterr().err


def test_two_ranks_train_each_draw_once_and_select_what_one_process_selects(tmp_path, tiny_llama_dir):
    """Under torchrun each rank trains its share of the draws into the shared cache: every draw is trained once (one
    log line each, from the rank that trained it), the cached scores are the one-process scores exactly (fp32, one
    thread per process) and rank 0 writes the same selection."""
    import yaml
    from launch import torchrun

    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"experiment": {"recipe": {
        "max_steps": 2, "batch_size": 2, "lr": 5e-3, "precision": "fp32", "lora": {"r": 2, "alpha": 4},
        "data": {"max_length": 64, "limit": 16}}}}))
    args = ["select", "--method", "performance", "--data", "arc-easy:train", "--budget", "4", "--config", config,
            "--performance.models", f"[{tiny_llama_dir}]", "--performance.draws", "5", "--performance.seed", "11",
            "--performance.rows_offset", "2", "--performance.rows_limit", "4", "--device", "cpu", "--no-progress"]
    records, logs = {}, {}
    for nproc in (1, 2):
        out = tmp_path / f"ranks{nproc}.json"
        proc = torchrun("textdistill.cli", *args, "--output", out, nproc=nproc, module=True, timeout=240)
        records[nproc] = read_selection(out)
        logs[nproc] = proc.stdout
    for nproc in (1, 2):   # every draw trained once, and the selection reported once
        assert sorted(line.split(":")[0].strip() for line in logs[nproc].splitlines() if line.startswith("  draw ")) \
            == [f"draw {k}" for k in range(5)], logs[nproc]
        assert logs[nproc].count("selected 4 rows") == 1
    drop = ("seconds", "created", "argv")
    assert {k: v for k, v in records[2].items() if k not in drop} == {k: v for k, v in records[1].items() if k not in drop}
    caches = [json.loads(next(tmp_path.glob(f"ranks{n}.draws/*.json")).read_text())["draws"] for n in (1, 2)]
    assert {k: v["loss"] for k, v in caches[1].items()} == {k: v["loss"] for k, v in caches[0].items()}


def _fake_runs(monkeypatch, trained: list, seconds: float = 0.2):
    """Training replaced by a short sleep that records which thread trained which draw; a draw's score is the sum
    of its row numbers (so every process computes the same loss for it)."""
    import threading
    import time
    from types import SimpleNamespace

    from textdistill import performance_selection, training

    def train(**kw):
        trained.append((threading.current_thread().name, tuple(kw["examples"])))
        time.sleep(seconds)
        return list(kw["examples"]), None, SimpleNamespace(steps=1)

    monkeypatch.setattr(training, "train_on_examples", train)
    monkeypatch.setattr(performance_selection, "score_trained", lambda trained, *a: float(sum(trained)))


def test_processes_sharing_a_cache_split_its_draws_and_train_none_twice(tmp_path, monkeypatch):
    import threading

    from textdistill.performance_selection import score_draws

    trained: list = []
    _fake_runs(monkeypatch, trained)
    pool = list(range(100))
    draws = [[k, k + 10] for k in range(6)]
    cache = tmp_path / "draws" / "model.json"
    results: dict[str, list[float]] = {}

    def score(name: str) -> None:   # two threads hold separate file locks, as two processes would
        results[name] = score_draws(pool=pool, draws=draws, model="m", recipe=RECIPE, config=CONFIG, cache=cache,
                                    device="cpu", progress=False, log=lambda *_: None)

    threads = [threading.Thread(target=score, args=(name,), name=name) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    expected = [float(2 * k + 10) for k in range(6)]
    assert results == {"a": expected, "b": expected}
    assert sorted(rows for _, rows in trained) == [tuple(d) for d in draws]   # each draw trained once
    assert {name for name, _ in trained} == {"a", "b"}                        # by both
    assert len(json.loads(cache.read_text())["draws"]) == 6


def test_a_draw_whose_claimer_dies_without_scoring_it_is_trained_by_the_waiting_process(tmp_path, monkeypatch):
    import threading
    import time

    from filelock import FileLock

    from textdistill.performance_selection import score_draws

    trained: list = []
    _fake_runs(monkeypatch, trained, seconds=0.0)
    draws = [[1, 2], [3, 4], [5, 6]]
    cache = tmp_path / "model.json"
    held = threading.Event()

    def other_process() -> None:   # holds draw 1's claim, then ends without writing its score
        with FileLock(f"{cache}.draw1.lock", thread_local=False):
            held.set()
            time.sleep(0.5)

    holder = threading.Thread(target=other_process)
    holder.start()
    held.wait(timeout=10)
    logs: list[str] = []
    losses = score_draws(pool=list(range(10)), draws=draws, model="m", recipe=RECIPE, config=CONFIG, cache=cache,
                         device="cpu", progress=False, log=logs.append)
    holder.join()
    assert losses == [3.0, 7.0, 11.0]
    assert [rows for _, rows in trained] == [(1, 2), (5, 6), (3, 4)]   # draw 1 last, after its holder let go
    assert any("draw 1: m waiting for the process that trains it" in line for line in logs)


def test_two_experiment_processes_needing_one_selection_both_train_its_draws(tmp_path, tiny_llama_dir):
    """The experiment runner's second process used to wait on the selection's stage lock while the first trained
    every draw; now each takes the draws the other has not claimed. Two real processes (models do not load
    safely in two threads of one process), each draw's run slowed down so that both reach the selection."""
    import subprocess
    import sys

    import yaml

    body = {"name": "t", "pool": "arc-easy:train", "pool_limit": 16,
            "target": {"task": "arc-easy", "split": "validation", "limit": 2},
            "distill_model": str(tiny_llama_dir), "models": [str(tiny_llama_dir)], "budgets": ["4"],
            "methods": ["performance"], "seeds": [0, 1],
            "recipe": {"max_steps": 1, "batch_size": 2, "precision": "fp32", "lora": {"r": 2, "alpha": 4},
                       "data": {"max_length": 64}},
            "performance": {"draws": 4, "seed": 3, "rows": "arc-easy:validation", "rows_offset": 4, "rows_limit": 2}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"experiment": body}))
    script = f"""
import time
from textdistill import performance_selection
from textdistill.experiment import load_experiment_config, run_experiment

original = performance_selection._train_and_store
def slowed(pool, draws, k, *args):
    print("trains draw", k, flush=True)
    time.sleep(1.5)
    return original(pool, draws, k, *args)
performance_selection._train_and_store = slowed
rows = run_experiment(load_experiment_config({str(path)!r}), {str(tmp_path / "out")!r}, device="cpu",
                      progress=False, log=lambda *_: None)
print("selections", sorted(r["selection"] for r in rows), flush=True)
"""
    processes = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert all(process.returncode == 0 for process in processes), outputs
    trained = [[int(line.split()[-1]) for line in out.splitlines() if line.startswith("trains draw")]
               for out in outputs]
    assert sorted(trained[0] + trained[1]) == [0, 1, 2, 3], trained   # every draw trained once
    assert trained[0] and trained[1], trained                         # by both processes
    selections = [line for out in outputs for line in out.splitlines() if line.startswith("selections")]
    assert len(selections) == 2 and selections[0] == selections[1]
