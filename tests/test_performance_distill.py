"""Token search on performance matching: edits are fluent, in distinct rows, off the scaffolding; a set's score is
its receiver's held-out loss after training; an edit is kept only when that loss drops; a rerun continues exactly."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from textdistill.config import DataSettings, LoraSettings, TrainConfig
from textdistill.data import load_examples
from textdistill.errors import ConfigError
from textdistill.performance_distill import (PerformanceDistillConfig, apply_edit, distill_by_performance,
                                             editable_positions, held_out_score, propose_edit)
from textdistill.selection import write_selection

# fp32 on every CPU kind: scores are compared for equality with a recomputation
RECIPE = TrainConfig(max_steps=2, batch_size=2, lr=5e-2, precision="fp32", lora=LoraSettings(r=2, alpha=4),
                     data=DataSettings(max_length=64, limit=16))


def test_edits_change_fluent_tokens_of_distinct_rows_off_the_scaffolding(smollm_tokenizer):
    prompts = ["Question: Which gas do plants take in?\nAnswer:", "Question: What melts ice?\nAnswer:",
               "Question: Why is the sky blue?\nAnswer:"]
    ids, editable = zip(*(editable_positions(smollm_tokenizer, p) for p in prompts))
    for p, row, positions in zip(prompts, ids, editable):
        text = [smollm_tokenizer.decode([row[k]]) for k in positions]
        assert "Question" not in "".join(text) and "Answer" not in "".join(text)
        assert positions and 0 not in positions and max(positions) < len(row) - 2   # "\nAnswer:" stays
    fluent_ids = smollm_tokenizer(" the a water light", add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    for swaps in (1, 2, 3, 5):
        edit = propose_edit([list(r) for r in ids], editable, lambda r, p: fluent_ids, swaps, rng, lambda _: True)
        assert len(edit) == min(swaps, 3) and len({r for r, _, _ in edit}) == len(edit)
        for r, p, t in edit:
            assert p in editable[r] and t in fluent_ids and t != ids[r][p]
    # an edit that never reads back is not made; a row with no editable position is skipped
    assert propose_edit([list(r) for r in ids], editable, lambda r, p: fluent_ids, 2, rng, lambda _: False) == []
    edit = propose_edit([list(r) for r in ids], [[], [], list(editable[2])], lambda r, p: fluent_ids, 3, rng,
                        lambda _: True)
    assert [r for r, _, _ in edit] == [2]
    assert apply_edit([[1, 2], [3, 4]], [(1, 0, 9)]) == [[1, 2], [9, 4]]


@pytest.mark.parametrize("bad, message", [({"iterations": 0}, "iterations must be positive"),
                                          ({"swaps": 0}, "swaps must be positive"),
                                          ({"rows_limit": 0}, "rows_limit must be positive"),
                                          ({"instrument_rows_offset": -1}, "must be >= 0"),
                                          ({"score": "accuracy"}, "unknown score"),
                                          ({"margin_cap": 1.0}, "margin score only")])
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        PerformanceDistillConfig(**bad)


def _selection(tmp_path, indices):
    pool = load_examples("arc-easy:train", RECIPE.data)
    path = tmp_path / "start.json"
    write_selection(path, method="random", data="arc-easy:train", budget=len(indices), seed=0, examples=pool,
                    indices=indices)
    return path, [pool[i] for i in indices]


def _run(tmp_path, name, config, selection):
    return distill_by_performance(data="arc-easy:train", selection=selection, output=tmp_path / name, config=config,
                                  recipe=RECIPE, device="cpu", progress=False, log=lambda *_: None)


def test_an_edit_is_kept_only_when_the_trained_receivers_held_out_score_drops_and_a_rerun_continues_exactly(
        tmp_path, tiny_llama_dir, monkeypatch):
    from textdistill import performance_distill

    model = str(tiny_llama_dir)
    selection, start = _selection(tmp_path, [0, 3, 5, 9])
    config = PerformanceDistillConfig(model=model, iterations=4, candidates=2, swaps=2, fluent_top_k=50,
                                      rows_offset=2, rows_limit=4, instrument_seeds=(2,), instrument_rows_offset=6,
                                      instrument_rows_limit=3, seed=5)
    whole = _run(tmp_path, "whole", config, selection)
    metrics = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and whole["iteration"] == 4
    rows = ("arc-easy:validation", 2, 4)
    # the start's score is the held-out loss of the receiver trained on the selection's rows at train_seed
    assert whole["start_loss"] == held_out_score(model, start, RECIPE, rows, seed=1, device="cpu")
    current = whole["start_loss"]
    for record in metrics:
        assert record["current_loss"] == current
        assert record["accepted"] == (min(record["candidate_losses"]) < current)
        current = min(current, *record["candidate_losses"])
    assert whole["final_loss"] == current and whole["accepted"] == sum(r["accepted"] for r in metrics)
    # the text a user loads scores what the search recorded
    distilled = load_examples(str(tmp_path / "whole" / "distilled.jsonl"), RECIPE.data)
    assert held_out_score(model, distilled, RECIPE, rows, seed=1, device="cpu") == whole["final_loss"]
    changed = sum(a.prompt != b.prompt for a, b in zip(distilled, start))
    assert (changed > 0) == (whole["accepted"] > 0) and [d.response for d in distilled] == [s.response for s in start]
    instrument = whole["instrument"]
    assert instrument["start"] == [held_out_score(model, start, RECIPE, ("arc-easy:validation", 6, 3), seed=2,
                                                 device="cpu")]

    # interrupted after 2 iterations, then continued to 4: the same run; a rerun of a finished run trains nothing
    _run(tmp_path, "resumed", dataclasses.replace(config, iterations=2), selection)
    resumed = _run(tmp_path, "resumed", config, selection)
    assert (tmp_path / "resumed" / "distilled.jsonl").read_text() == (tmp_path / "whole" / "distilled.jsonl").read_text()
    assert {k: v for k, v in resumed.items() if "seconds" not in k and k != "iterations_per_hour"} == \
        {k: v for k, v in whole.items() if "seconds" not in k and k != "iterations_per_hour"}
    trained = []
    monkeypatch.setattr(performance_distill, "held_out_score", lambda **kw: trained.append(kw) or 0.0)
    _run(tmp_path, "whole", config, selection)
    assert trained == []
    with pytest.raises(ConfigError, match="other settings"):
        _run(tmp_path, "whole", dataclasses.replace(config, swaps=1), selection)


def test_the_margin_score_is_the_negated_margin_of_the_held_out_questions_and_drives_acceptance(
        tmp_path, tiny_llama_dir):
    from textdistill.evaluation import choice_figures, evaluate_with_records
    from textdistill.performance_selection import held_out_questions, held_out_rows
    from textdistill.training import train_on_examples

    model = str(tiny_llama_dir)
    selection, start = _selection(tmp_path, [0, 3, 5])
    config = PerformanceDistillConfig(model=model, score="margin", iterations=2, candidates=2, swaps=2,
                                      fluent_top_k=50, rows_offset=2, rows_limit=4, instrument_seeds=(), seed=5)
    run = _run(tmp_path, "margin", config, selection)
    # the questions are the held-out rows themselves, in order
    questions = held_out_questions("arc-easy:validation", 2, 4)
    rows = held_out_rows("arc-easy:validation", 2, 4, RECIPE.data)
    _, records = evaluate_with_records(*train_on_examples(model_name=model, examples=start, config=dataclasses.replace(
        RECIPE, seed=1), device="cpu", progress=False)[:2], questions)
    assert [r["prompt"] for r in records] == [e.prompt for e in rows] and \
        [r["continuations"][r["gold"]].strip() for r in records] == [e.response.strip() for e in rows]
    assert run["start_loss"] == -choice_figures(records)["gold_minus_best_other"]
    assert run["score"].startswith("margin")
    metrics = [json.loads(line) for line in (tmp_path / "margin" / "metrics.jsonl").read_text().splitlines()]
    current = run["start_loss"]
    for record in metrics:
        assert record["accepted"] == (min(record["candidate_losses"]) < current)
        current = min(current, *record["candidate_losses"])
    assert run["final_loss"] == current
    # a score that is not a task's questions is refused before any training
    with pytest.raises(ConfigError, match="multiple-choice task split"):
        _run(tmp_path, "bad", dataclasses.replace(config, rows=str(tmp_path / "rows.jsonl")), selection)


def test_co_receivers_score_a_set_by_the_sum_of_every_receivers_score_on_the_decoded_text(
        tmp_path, tiny_llama_dir, tiny_gemma_dir):
    from textdistill.keys import resume_settings

    model, other = str(tiny_llama_dir), str(tiny_gemma_dir)
    selection, start = _selection(tmp_path, [0, 3, 5])
    config = PerformanceDistillConfig(model=model, co_receivers=(other,), score="margin", iterations=2, candidates=2,
                                      swaps=2, fluent_top_k=50, rows_offset=2, rows_limit=3, instrument_seeds=(2,),
                                      instrument_rows_offset=6, instrument_rows_limit=2, seed=5)
    run = _run(tmp_path, "both", config, selection)
    rows = ("arc-easy:validation", 2, 3)
    own = {m: held_out_score(m, start, RECIPE, rows, seed=1, score="margin", device="cpu") for m in (model, other)}
    state = json.loads((tmp_path / "both" / "state.json").read_text())
    assert state["start_loss_by_model"] == own and run["start_loss"] == own[model] + own[other]
    metrics = [json.loads(line) for line in (tmp_path / "both" / "metrics.jsonl").read_text().splitlines()]
    current = run["start_loss"]
    for record in metrics:   # acceptance by the sum, each candidate's parts recorded
        assert record["candidate_losses"] == [sum(p.values()) for p in record["candidate_losses_by_model"]]
        assert record["accepted"] == (min(record["candidate_losses"]) < current)
        current = min(current, *record["candidate_losses"])
    # the co-receiver trains on the text a user loads, through its own tokenizer
    distilled = load_examples(str(tmp_path / "both" / "distilled.jsonl"), RECIPE.data)
    final = {m: held_out_score(m, distilled, RECIPE, rows, seed=1, score="margin", device="cpu") for m in (model, other)}
    assert run["final_loss_by_model"] == pytest.approx(final, abs=1e-6) and run["start_loss_by_model"] == own
    assert run["final_loss"] == pytest.approx(sum(final.values()), abs=1e-6) and run["receivers"] == [model, other]
    instrument = run["instrument"]
    assert set(instrument["by_model"]) == {model, other} and instrument["sum_over"] == [model, other]
    parts = instrument["by_model"]
    assert instrument["start"] == [parts[model]["start"][0] + parts[other]["start"][0]]
    assert run["score"].startswith(f"the sum over {model}, {other}")
    # a single receiver keeps the fingerprint its runs had before co-receivers existed (lists from Python too)
    before = {"model", "iterations", "candidates", "swaps", "fluent_top_k", "score", "train_seed", "rows",
              "rows_offset", "rows_limit", "instrument_seeds", "instrument_rows_offset", "instrument_rows_limit",
              "seed"} - {"iterations"}
    assert set(resume_settings(dataclasses.replace(config, co_receivers=[], co_receiver_epochs=[]))) == before
    assert set(resume_settings(PerformanceDistillConfig())) == before - {"score"}


def test_each_receiver_trains_with_its_own_epochs_and_its_part_of_every_score_is_kept(tmp_path, tiny_llama_dir,
                                                                                     tiny_gemma_dir, monkeypatch):
    from textdistill import performance_distill

    model, other = str(tiny_llama_dir), str(tiny_gemma_dir)
    selection, _ = _selection(tmp_path, [0, 3, 5])
    calls = []

    def fake_score(*, model, examples, recipe, rows, seed, **_):   # distinct per receiver, set and seed
        calls.append((model, recipe.epochs, seed))
        return (1.0 if model == other else 0.0) + 0.01 * len(calls)

    monkeypatch.setattr(performance_distill, "held_out_score", fake_score)
    recipe = dataclasses.replace(RECIPE, max_steps=None, epochs=2.0)
    config = PerformanceDistillConfig(model=model, co_receivers=(other,), co_receiver_epochs=(5.0,), iterations=2,
                                      candidates=2, swaps=1, fluent_top_k=50, rows_limit=2, instrument_seeds=(7,))
    run = distill_by_performance(data="arc-easy:train", selection=selection, output=tmp_path / "fake", config=config,
                                 recipe=recipe, device="cpu", progress=False, log=lambda *_: None)
    assert {(m, e) for m, e, _ in calls} == {(model, 2.0), (other, 5.0)}
    assert [m for m, _, _ in calls] == [model, other] * (len(calls) // 2)   # each set on both, model first
    assert {s for _, _, s in calls[:-4]} == {1} and {s for _, _, s in calls[-4:]} == {7}
    metrics = [json.loads(line) for line in (tmp_path / "fake" / "metrics.jsonl").read_text().splitlines()]
    for record in metrics:
        assert all(set(p) == {model, other} and p[other] > 1 > p[model] for p in record["candidate_losses_by_model"])
    assert sum(run["final_loss_by_model"].values()) == pytest.approx(run["final_loss"])
    # the epochs of a co-receiver cannot act under a step count, and saying so beats ignoring them
    with pytest.raises(ConfigError, match="does not act while the recipe sets max_steps"):
        config.receivers(RECIPE)
    with pytest.raises(Exception, match="not found|unknown model"):
        distill_by_performance(data="arc-easy:train", selection=selection, output=tmp_path / "typo", recipe=recipe,
                               config=dataclasses.replace(config, co_receivers=(str(tmp_path / "no-such-model"),)),
                               device="cpu", progress=False, log=lambda *_: None)
    assert not (tmp_path / "typo" / "state.json").exists()


@pytest.mark.parametrize("bad, message", [({"co_receivers": ("m",)}, "distinct models other than model"),
                                          ({"co_receivers": ("a", "a")}, "distinct models"),
                                          ({"co_receivers": ("a",), "co_receiver_epochs": (3, 4)}, "one count per"),
                                          ({"co_receivers": ("a",), "co_receiver_epochs": (0,)}, "must be positive"),
                                          ({"co_receivers": ("",)}, "empty model name")])
def test_bad_co_receivers_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        PerformanceDistillConfig(model="m", **bad)


def test_the_command_line_builds_both_configs_and_refuses_a_training_seed(tmp_path, tiny_llama_dir, capsys):
    from textdistill.cli import main

    selection, _ = _selection(tmp_path, [1, 2])
    common = ["distill-pm", "--data", "arc-easy:train", "--selection", str(selection), "--output",
              str(tmp_path / "cli"), "--model", str(tiny_llama_dir), "--iterations", "1", "--candidates", "1",
              "--rows_limit", "2", "--instrument_seeds", "[]", "--recipe.max_steps", "1", "--recipe.batch_size", "2",
              "--recipe.precision", "fp32", "--recipe.data.max_length", "64", "--recipe.data.limit", "16",
              "--device", "cpu", "--no-progress"]
    assert main(common) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["iteration"] == 1 and summary["instrument"] is None and summary["rows"] == 2
    run = json.loads((tmp_path / "cli" / "run.json").read_text())
    assert run["config"]["distill_pm"]["candidates"] == 1 and run["config"]["recipe"]["max_steps"] == 1
    assert main([*common, "--recipe.seed", "3"]) == 2
    assert "--recipe.seed does not act here" in capsys.readouterr().err
    # the co-receiver flags parse (a list or one value); their epochs cannot act beside --recipe.max_steps
    assert main([*common, "--co_receivers", str(tiny_llama_dir) + "-copy", "--co_receiver_epochs", "3"]) == 2
    assert "co_receiver_epochs does not act while the recipe sets max_steps" in capsys.readouterr().err


def _without_times(record: dict) -> dict:
    return {k: v for k, v in record.items() if "seconds" not in k and k != "iterations_per_hour"}


def test_two_ranks_share_the_training_runs_and_make_the_one_process_run(tmp_path, tiny_llama_dir, smollm_tokenizer):
    """Under torchrun each rank trains its share of every iteration's runs (candidates x receivers, then the
    instrument's) and every rank takes the same decisions from the gathered scores: the text, the state, every
    iteration's scores and the summary are the one-process run's, exactly (fp32, one thread per process), and only
    rank 0 writes and reports. (The co-receiver is another tiny Llama, of other weights: a tiny Gemma's 262k-row
    embedding would double the test's time, and the tokenizers are not what is tested here.)"""
    from conftest import _save_tiny
    from launch import torchrun
    from tiny import make_tiny_llama

    other = _save_tiny(tmp_path / "other-llama", make_tiny_llama(len(smollm_tokenizer), seed=1), smollm_tokenizer)
    selection, _ = _selection(tmp_path, [0, 3, 5])
    config = tmp_path / "pm.yaml"
    config.write_text(json.dumps({   # JSON is YAML
        "distill_pm": {"model": str(tiny_llama_dir), "co_receivers": [str(other)], "score": "margin",
                       "iterations": 2, "candidates": 2, "swaps": 2, "fluent_top_k": 50, "rows_offset": 2,
                       "rows_limit": 3, "instrument_seeds": [2], "instrument_rows_offset": 6,
                       "instrument_rows_limit": 2, "seed": 5},
        "recipe": {"max_steps": 2, "batch_size": 2, "lr": 5e-2, "precision": "fp32", "lora": {"r": 2, "alpha": 4},
                   "data": {"max_length": 64, "limit": 16}}}))
    runs, stdout = {}, {}
    for nproc in (1, 2):
        out = tmp_path / f"ranks{nproc}"
        proc = torchrun("textdistill.cli", "distill-pm", "--data", "arc-easy:train", "--selection", selection,
                        "--config", config, "--output", out, "--device", "cpu", "--no-progress", nproc=nproc,
                        module=True, timeout=280)
        runs[nproc], stdout[nproc] = out, json.loads(proc.stdout)   # one summary: only rank 0 prints it
    one, two = runs[1], runs[2]
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    assert (two / "distilled.jsonl").read_text() == (one / "distilled.jsonl").read_text()
    assert (two / "diagnostics.jsonl").read_text() == (one / "diagnostics.jsonl").read_text()
    states = [json.loads((run / "state.json").read_text()) for run in (one, two)]
    assert _without_times(states[1]) == _without_times(states[0]) and states[0]["iteration"] == 2
    assert states[0]["accepted"] > 0   # the text changed, so the ranks agreed on an edit too
    metrics = [[_without_times(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (one, two)]
    assert len(metrics[0]) == 2 and metrics[1] == metrics[0]   # one line per iteration: rank 1 appends nothing
    summaries = [json.loads((run / "summary.json").read_text()) for run in (one, two)]
    assert _without_times(summaries[1]) == _without_times(summaries[0]) == _without_times(stdout[2])
    assert summaries[0]["instrument"]["by_model"][str(other)]["start"]   # the instrument ran on both ranks
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    # a rerun of the finished run on 2 ranks (rank 0 reads the stored instrument and sends it on) adds nothing
    proc = torchrun("textdistill.cli", "distill-pm", "--data", "arc-easy:train", "--selection", selection, "--config",
                    config, "--output", two, "--device", "cpu", "--no-progress", nproc=2, module=True, timeout=120)
    assert _without_times(json.loads(proc.stdout)) == _without_times(summaries[1])
    assert [_without_times(json.loads(line)) for line in (two / "metrics.jsonl").read_text().splitlines()] == metrics[1]


def test_workers_are_refused_under_a_launcher(tmp_path, tiny_llama_dir, monkeypatch):
    from textdistill import distributed

    selection, _ = _selection(tmp_path, [0, 3])
    monkeypatch.setattr(distributed, "world_size", lambda: 2)   # as under torchrun with 2 processes
    config = PerformanceDistillConfig(model=str(tiny_llama_dir), workers=2, iterations=1)
    with pytest.raises(ConfigError, match="every process is one worker"):
        _run(tmp_path, "launched", config, selection)
    assert not (tmp_path / "launched" / "state.json").exists()


def test_each_rank_is_dealt_runs_of_every_receiver_and_every_score_lands_on_its_run(monkeypatch):
    """2 candidates x 2 receivers on 2 ranks: rank 0 trains one run of each receiver (not one receiver's runs, which
    would leave the faster rank idle), and the gathered scores land on their own (set, receiver)."""
    from textdistill import distributed, performance_distill

    trained = []
    monkeypatch.setattr(performance_distill, "held_out_score",
                        lambda **kw: trained.append((kw["model"], kw["seed"])) or float(len(trained)))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "all_gather_objects", lambda mine: [mine, [-1.0] * len(mine)])   # rank 1's
    scorer = performance_distill._Scorer(1, [("a", RECIPE), ("b", RECIPE)])
    rows = ("arc-easy:validation", 0, 2)
    assert scorer.by_model([([], rows, 10), ([], rows, 11)]) == [{"a": 1.0, "b": 2.0}, {"a": -1.0, "b": -1.0}]
    assert trained == [("a", 10), ("b", 10)]
