"""The validity study: its statistics are right, a tiny study runs end to end, writes every result file with
Spearman figures recomputable from its points, resumes without redoing work, and refuses a changed study."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from textdistill.artifacts import atomic_write_json, read_json
from textdistill.config import DataSettings, EvalConfig, LoraSettings, TrainConfig
from textdistill.errors import ConfigError
from textdistill.experts import ExpertsConfig, make_experts
from textdistill.instrument import InstrumentConfig
from textdistill.matching import StudentSettings
from textdistill.validity import (ForkSettings, RecipeTuning, ValidityConfig, best_epochs, grid_stopped, noise_ceiling,
                                  run_validity, spearman, spearman_with_interval)


def test_spearman_matches_scipy_with_ties_and_its_interval_covers_it():
    from scipy import stats

    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (30,), generator=generator).tolist()          # many ties
    y = [v + float(e) for v, e in zip(x, torch.randn(30, generator=generator))]
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    rho, (low, high) = spearman_with_interval(x, y, resamples=2000)
    assert low <= rho <= high and high - low > 0.05
    _, (low, high) = spearman_with_interval(list(range(30)), [-v for v in range(30)], resamples=500)
    assert low == high == pytest.approx(-1.0)


def test_the_most_influential_subset_is_the_one_that_carries_the_correlation():
    from textdistill.validity import most_influential_point

    # no relation among the first eight points; one extreme point makes the correlation positive
    x = [1, 2, 3, 4, 5, 6, 7, 8, 0]
    y = [5, 3, 8, 1, 6, 2, 7, 4, -10]
    assert spearman(x, y) == pytest.approx(0.3) and spearman(x[:8], y[:8]) == pytest.approx(0.0)
    index, without = most_influential_point(x, y)
    assert index == 8 and without == pytest.approx(0.0)


def test_noise_ceiling_is_high_when_seeds_agree_and_zero_when_they_do_not():
    accuracies = [0.50, 0.55, 0.60, 0.65, 0.70]
    tight = [[0.500, 0.502, 0.498], [0.650, 0.652]]
    loose = [[0.45, 0.70, 0.55], [0.50, 0.72]]
    high = noise_ceiling(accuracies, tight)
    assert 0.99 < high["noise_ceiling"] <= 1.0 and high["seed_std"] == pytest.approx(0.0018, abs=2e-4)
    assert noise_ceiling(accuracies, loose)["noise_ceiling"] == 0.0
    assert math.isnan(noise_ceiling(accuracies, [[0.5]])["noise_ceiling"])


RECIPE = TrainConfig(optimizer="sgd", lr=0.5, schedule="constant", warmup_ratio=0.0, max_steps=4, batch_size=4,
                     max_grad_norm=None, precision="fp32", lora=LoraSettings(r=2, alpha=4),
                     data=DataSettings(max_length=48, limit=12))


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory, tiny_llama_dir):
    out = tmp_path_factory.mktemp("experts")
    make_experts(model_name=str(tiny_llama_dir), data="arc-easy:train", output=out, device="cpu", progress=False,
                 config=ExpertsConfig(num_experts=3, snapshot_every=2, train=RECIPE))
    return out


def _config(tiny_llama_dir, experts_dir, tmp_path, **changes) -> ValidityConfig:
    less = tmp_path / "less.json"
    less.write_text(json.dumps({"all_scores": [float((7 * i) % 12) for i in range(12)]}))
    config = ValidityConfig(
        pool="arc-easy:train", budget="4", models=(str(tiny_llama_dir),), recipes=("comparison", "tuned", "student"),
        student_models=(str(tiny_llama_dir),),
        accuracy=EvalConfig(task="arc-easy", split="validation", template="rc", offset=4, limit=6),
        objective_rows="arc-easy:validation", objective_offset=10, objective_limit=5,
        recipe=TrainConfig(lr=1e-2, epochs=1.0, batch_size=2, warmup_ratio=0.0, precision="fp32",
                           lora=LoraSettings(r=2, alpha=4), data=DataSettings(max_length=48, limit=12)),
        tuning=RecipeTuning(epochs=(1.0, 2.0), subsets=1,
                            validation=EvalConfig(task="arc-easy", split="validation", template="rc", limit=3)),
        experts=str(experts_dir), instrument=InstrumentConfig(draws=2, heldout_experts=1),
        student=StudentSettings(syn_steps=2, batch_size=2, lr=0.1), forks=ForkSettings(forks=2),
        less_scores=str(less), random_subsets=3, instrument_null=1, spread_draws=5, tm_spread_draws=2,
        noise_subsets=("null-0", "less-top"), noise_seeds=(0, 1), pm_seed=1, pm_student_draws=1, bootstrap=200)
    return dataclasses.replace(config, **changes)


def test_a_tiny_study_writes_every_result_and_resumes(tmp_path, tiny_llama_dir, experts_dir, monkeypatch):
    from textdistill import validity

    config = _config(tiny_llama_dir, experts_dir, tmp_path)
    out = tmp_path / "study"
    written = run_validity(config, out, device="cpu", progress=False, log=lambda *_: None)
    subsets = read_json(out / "subsets.json")["subsets"]
    assert len(subsets) == 3 + 4 + 2 and all(len(v) == 4 for v in subsets.values())
    assert subsets["less-top"] == [5, 10, 3, 8]   # (7 i) mod 12 = 11, 10, 9, 8 at i = 5, 10, 3, 8
    assert subsets["less-bottom"] == [9, 2, 7, 0]
    # every objective under comparison and tuned; under student, pm and pm-sum do not apply
    names = sorted(p.name for p in written)
    model = tiny_llama_dir.name
    for objective in ("tm", "tm-denoised", "pm", "pm-sum", "pm-student", "pm-margin", "pm-margin-capped",
                      "pm-margin-sum", "less"):
        for recipe in ("comparison", "tuned"):
            assert f"{objective}-{model}-4-{recipe}.json" in names
    assert f"pm-{model}-4-student.json" not in names and f"tm-{model}-4-student.json" in names
    result = read_json(out / "validity" / f"tm-{model}-4-comparison.json")
    assert result["n"] == len(result["points"]) == 9
    assert {"objective", "model", "budget", "recipe", "n", "spearman", "ci95", "noise_ceiling",
            "seconds_per_score", "points"} <= set(result)
    points = result["points"]
    assert {"set", "indices", "score", "acc", "acc_norm"} <= set(points[0])
    assert result["without_most_influential"]["set"] in subsets
    rho = validity.spearman([p["score"] for p in points], [p["acc"] for p in points])
    assert (math.isnan(rho) and math.isnan(result["spearman"])) or rho == pytest.approx(result["spearman"])
    # tm scores are minus the held-out matching loss of each subset
    scores = read_json(out / "scores" / "tm.json")
    assert all(scores["scores"][n] == -scores["raw"][n]["loss"] for n in subsets)
    # pm is minus the objective rows' loss of the independent seed-1 run, never the seed-0 run that gives acc
    pm = read_json(out / "validity" / f"pm-{model}-4-comparison.json")
    folder = str(tiny_llama_dir).strip("/").replace("/", "__")
    cell = read_json(out / "cells" / folder / "comparison" / "random-0" / "seed1" / "result.json")
    assert "acc" not in cell and next(p for p in pm["points"] if p["set"] == "random-0")["score"] == \
        -cell["objective_loss"]
    # pm-margin is the gold-minus-best-other margin on the objective rows' questions, from that same seed-1 run
    margin = read_json(out / "cells" / folder / "comparison" / "random-0" / "seed1" / "margin.json")
    assert margin["objective_loss"] == cell["objective_loss"] and margin["n"] == 5
    assert sum(m > 0 for m in margin["question_margins"]) / 5 == pytest.approx(margin["acc"]) and \
        sum(margin["question_margins"]) / 5 == pytest.approx(margin["gold_minus_best_other"])
    assert next(p for p in read_json(out / "validity" / f"pm-margin-{model}-4-comparison.json")["points"]
                if p["set"] == "random-0")["score"] == margin["gold_minus_best_other"]
    capped = read_json(out / "validity" / f"pm-margin-capped-{model}-4-comparison.json")
    assert capped["margin_cap"] == config.margin_cap and next(p for p in capped["points"] if p["set"] == "random-0")[
        "score"] == pytest.approx(sum(min(m, config.margin_cap) for m in margin["question_margins"]) / 5)
    tuned = read_json(out / "tuning" / f"{folder}.json")
    assert tuned["epochs"] in (1.0, 2.0)
    assert read_json(out / "validity" / f"tm-{model}-4-tuned.json")["recipe_config"]["epochs"] == tuned["epochs"]
    student = read_json(out / "cells" / folder / "student" / "null-0" / "seed0" / "result.json")
    assert student["train_steps"] == 2
    signal = read_json(out / "forks" / "signal.json")
    assert signal["forks"] == 2 and all(-1 <= v["fork_pairs_mean"] <= 1 for v in signal["by_start"].values())

    # a rerun does no work: every unit is done
    monkeypatch.setattr(validity._Study, "train_cell", lambda *a, **k: pytest.fail("a finished cell was redone"))
    monkeypatch.setattr(validity._Study, "score_objective", lambda *a, **k: pytest.fail("scores were redone"))
    again = run_validity(config, out, device="cpu", progress=False, log=lambda *_: None)
    assert sorted(p.name for p in again) == names
    # another study in the same folder is refused in one line; adding an objective or a recipe is not
    with pytest.raises(ConfigError, match="made with other settings .*budget"):
        run_validity(dataclasses.replace(config, budget="3"), out, device="cpu", progress=False)
    report = tmp_path / "elsewhere"
    moved = run_validity(dataclasses.replace(config, objectives=("tm", "less"), report=str(report)), out,
                         device="cpu", progress=False, log=lambda *_: None, report_only=True)
    assert sorted(p.name for p in moved) == sorted(n for n in names if n.split(f"-{model}")[0] in ("tm", "less")) and \
        all(p.parent == report for p in moved)

    # an objective's scoring interrupted after some subsets keeps them: only the others are scored again
    monkeypatch.undo()
    monkeypatch.setattr(validity._Study, "train_cell", lambda *a, **k: pytest.fail("a finished cell was redone"))
    before = read_json(out / "scores" / "tm.json")
    first, second = list(subsets)[:2]
    (out / "scores" / "tm.json").unlink()
    (out / "scores" / "tm.partial.json").write_text(json.dumps({
        "scores": {first: 123.0}, "raw": {first: {"loss": -123.0, "draws": []}}, "seconds": {first: 1.0}}))
    run_validity(config, out, device="cpu", progress=False, log=lambda *_: None)
    after = read_json(out / "scores" / "tm.json")
    assert after["scores"][first] == 123.0 and after["scores"][second] == before["scores"][second]
    assert not (out / "scores" / "tm.partial.json").exists()


def test_tuning_only_runs_the_rule_alone_and_needs_no_experts(tmp_path, tiny_llama_dir, monkeypatch):
    """``tuning_only`` trains the grid (seeded subsets of the budget's size, every count) and writes the choice,
    the count whose cells' mean validation acc is best; nothing of the study is made, and a rerun trains nothing."""
    from textdistill import validity
    from textdistill.selection import random_indices

    config = ValidityConfig(
        pool="arc-easy:train", budget="4", models=(str(tiny_llama_dir),), recipes=("tuned",), tuning_only=True,
        recipe=TrainConfig(lr=1e-2, epochs=1.0, batch_size=2, warmup_ratio=0.0, precision="fp32",
                           lora=LoraSettings(r=2, alpha=4), data=DataSettings(max_length=48, limit=12)),
        tuning=RecipeTuning(epochs=(1.0, 2.0), subsets=2, seed=40,
                            validation=EvalConfig(task="arc-easy", split="validation", template="rc", limit=3)))
    out = tmp_path / "tuning-only"
    lines: list[str] = []
    written = run_validity(config, out, device="cpu", progress=False, log=lines.append)
    folder = str(tiny_llama_dir).strip("/").replace("/", "__")
    assert written == [out / "tuning" / f"{folder}.json"]
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "study.json", "tuning"]   # no subsets or cells
    cells = {(e, k): read_json(out / "tuning" / folder / f"epochs{e:g}" / f"subset{k}" / "result.json")
             for e in (1.0, 2.0) for k in (0, 1)}
    assert all(c["indices"] == random_indices(12, 4, 40 + k) for (e, k), c in cells.items())
    assert [cells[(e, 0)]["train_steps"] for e in (1.0, 2.0)] == [2, 4]   # 4 rows, batch 2: 2 steps an epoch
    for cell in cells.values():   # per-question answers, for paired comparisons: they are the cell's accuracy
        assert len(cell["correct"]) == len(cell["correct_norm"]) == cell["n"]
        assert cell["correct"].count("1") / cell["n"] == pytest.approx(cell["acc"])
        assert cell["correct_norm"].count("1") / cell["n"] == pytest.approx(cell["acc_norm"])
    means = {e: (cells[(e, 0)]["acc"] + cells[(e, 1)]["acc"]) / 2 for e in (1.0, 2.0)}
    chosen = read_json(written[0])
    assert chosen["mean_validation_acc"] == pytest.approx({f"{e:g}": m for e, m in means.items()})
    assert chosen["epochs"] == (2.0 if means[2.0] > means[1.0] else 1.0)   # a tie goes to fewer epochs
    assert any(line.endswith(")") and f"{chosen['epochs']:g} epochs" in line for line in lines)

    monkeypatch.setattr(validity._Study, "tuning_cell", lambda *a, **k: pytest.fail("a finished cell was redone"))
    assert run_validity(config, out, device="cpu", progress=False, log=lambda *_: None) == written
    assert run_validity(config, out, device="cpu", progress=False, log=lambda *_: None, report_only=True) == written
    with pytest.raises(ConfigError, match="made with other settings"):
        run_validity(dataclasses.replace(config, budget="3"), out, device="cpu", progress=False)


def test_grid_stops_after_patience_counts_without_a_better_mean():
    assert not grid_stopped([0.5, 0.6, 0.55], None)
    assert grid_stopped([0.5, 0.6, 0.55], 1) and not grid_stopped([0.5, 0.6, 0.55], 2)
    assert grid_stopped([0.6, 0.5, 0.6], 2)   # an equal mean later does not beat the first best
    assert not grid_stopped([0.5, 0.55, 0.6], 1) and not grid_stopped([], 1)
    assert best_epochs({3.0: 0.5, 6.0: 0.6, 10.0: 0.6}) == 6.0   # a tie goes to fewer epochs


def test_tuning_with_patience_trains_no_count_after_the_stop(tmp_path, tiny_llama_dir, monkeypatch):
    """The stored 1% grids choose the same epochs with patience 2; here (fake training, fixed accuracies) the grid
    1, 2, 3, 4 with patience 1 stops after 3 (it did not beat 2), never trains 4 and chooses 2, though 4 would
    have been best: the rule is the rule."""
    import types

    import textdistill.evaluation as evaluation
    import textdistill.training as training

    accuracy = {1.0: 0.5, 2.0: 0.6, 3.0: 0.55, 4.0: 0.9}
    trained: list[float] = []

    def fake_train(**kw):
        trained.append(kw["config"].epochs)
        return types.SimpleNamespace(epochs=kw["config"].epochs), None, types.SimpleNamespace(steps=1, seconds=0.0)

    monkeypatch.setattr(training, "train_on_examples", fake_train)
    monkeypatch.setattr(evaluation, "evaluate_with_records", lambda model, *a, **k: (
        {"acc": accuracy[model.epochs], "acc_norm": 0.0, "n": 3, "seconds": 0.0}, [{"acc": 1, "acc_norm": 0}] * 3))
    config = ValidityConfig(
        pool="arc-easy:train", budget="4", models=(str(tiny_llama_dir),), tuning_only=True,
        recipe=TrainConfig(precision="fp32", data=DataSettings(max_length=48, limit=12)),
        tuning=RecipeTuning(epochs=(1.0, 2.0, 3.0, 4.0), subsets=2, patience=1))
    out = tmp_path / "patience"
    chosen = read_json(run_validity(config, out, device="cpu", progress=False, log=lambda *_: None)[0])
    assert sorted(trained) == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert chosen["epochs"] == 2.0 and chosen["not_trained"] == [4.0] and chosen["mean_validation_acc"] == {
        "1": 0.5, "2": 0.6, "3": 0.55}
    folder = str(tiny_llama_dir).strip("/").replace("/", "__")
    assert "skipped" in read_json(out / "tuning" / folder / "epochs4" / "subset1" / "result.json")
    with pytest.raises(ConfigError, match="increasing order"):
        RecipeTuning(epochs=(3.0, 1.0), patience=1)
    with pytest.raises(ConfigError, match="patience must be at least 1"):
        RecipeTuning(patience=0)


def test_bad_validity_configs_are_refused(tmp_path, tiny_llama_dir, experts_dir):
    with pytest.raises(ConfigError, match="unknown objective"):
        ValidityConfig(objectives=("tm", "vibes"))
    with pytest.raises(ConfigError, match="pm_seed must differ from 0"):
        ValidityConfig(pm_seed=0)
    with pytest.raises(ConfigError, match="set 'experts'"):
        run_validity(ValidityConfig(less_scores="x.json"), tmp_path / "a", device="cpu")
    with pytest.raises(ConfigError, match="noise_subsets names subsets the plan does not make: nope"):
        run_validity(_config(tiny_llama_dir, experts_dir, tmp_path, noise_subsets=("nope",), objectives=("less",),
                             recipes=("comparison",)), tmp_path / "b", device="cpu", progress=False,
                     log=lambda *_: None)


def test_a_recipe_identical_to_another_reuses_its_cells(tmp_path, tiny_llama_dir, experts_dir, monkeypatch):
    """When tuning chooses the comparison's own epochs, the tuned cells are the comparison's runs: copied (and
    marked same_as), not trained again."""
    import textdistill.training as training

    config = _config(tiny_llama_dir, experts_dir, tmp_path, recipes=("comparison", "tuned"), objectives=("less",),
                     tuning=RecipeTuning(epochs=(1.0,), subsets=1, validation=EvalConfig(
                         task="arc-easy", split="validation", template="rc", limit=3)))
    trained = []
    original = training.train_on_examples
    monkeypatch.setattr(training, "train_on_examples", lambda **kw: trained.append(kw["config"].epochs) or
                        original(**kw))
    out = tmp_path / "study"
    run_validity(config, out, device="cpu", progress=False, log=lambda *_: None)
    folder = str(tiny_llama_dir).strip("/").replace("/", "__")
    tuned = read_json(out / "cells" / folder / "tuned" / "null-0" / "seed0" / "result.json")
    compared = read_json(out / "cells" / folder / "comparison" / "null-0" / "seed0" / "result.json")
    assert tuned["same_as"] == "comparison null-0 seed 0" and tuned["acc"] == compared["acc"]
    assert tuned["key"] == compared["key"]
    cells = len(list((out / "cells").glob("**/comparison/**/result.json")))
    assert len(trained) == cells + 1          # every comparison cell and the one tuning cell; no tuned cell


def test_pm_margin_added_to_a_finished_study_repeats_the_pm_runs_exactly(tmp_path, tiny_llama_dir, experts_dir,
                                                                         monkeypatch):
    """A study made before pm-margin existed gets its margins by training each subset again with pm_seed: the same
    run (its objective loss equals the stored cell's), no cell redone."""
    from textdistill import validity

    config = _config(tiny_llama_dir, experts_dir, tmp_path, recipes=("comparison",), objectives=("pm",))
    out = tmp_path / "study"
    run_validity(config, out, device="cpu", progress=False, log=lambda *_: None)
    folder = str(tiny_llama_dir).strip("/").replace("/", "__")
    assert not list((out / "cells").glob("**/margin.json"))
    monkeypatch.setattr(validity._Study, "train_cell", lambda *a, **k: pytest.fail("a finished cell was redone"))
    written = run_validity(dataclasses.replace(config, objectives=("pm", "pm-margin")), out, device="cpu",
                           progress=False, log=lambda *_: None)
    assert f"pm-margin-{tiny_llama_dir.name}-4-comparison.json" in [p.name for p in written]
    for subset in read_json(out / "subsets.json")["subsets"]:
        cell = read_json(out / "cells" / folder / "comparison" / subset / "seed1" / "result.json")
        margin = read_json(out / "cells" / folder / "comparison" / subset / "seed1" / "margin.json")
        assert margin["objective_loss"] == cell["objective_loss"] and margin["indices"] == cell["indices"]

    # the cap may change between runs (it is computed from the stored margins); a margin file without them is
    # reported, not used
    messages = []
    margins = read_json(out / "cells" / folder / "comparison" / "null-0" / "seed1" / "margin.json")
    cap = sorted(margins["question_margins"])[2]   # the middle one of 5: the cap bites on two questions
    hinge = run_validity(dataclasses.replace(config, objectives=("pm-margin-capped",), margin_cap=cap), out,
                         device="cpu", progress=False, log=messages.append, report_only=True)
    capped_score = next(p for p in read_json(hinge[0])["points"] if p["set"] == "null-0")["score"]
    assert capped_score == pytest.approx(sum(min(m, cap) for m in margins["question_margins"]) / 5)
    assert capped_score < margins["gold_minus_best_other"]
    path = out / "cells" / folder / "comparison" / "null-0" / "seed1" / "margin.json"
    atomic_write_json(path, {k: v for k, v in margins.items() if k != "question_margins"})
    assert run_validity(dataclasses.replace(config, objectives=("pm-margin-capped",)), out, device="cpu",
                        progress=False, log=messages.append, report_only=True) == []
    assert any("lack question_margins" in m for m in messages)
    atomic_write_json(path, margins)

    # pm-sum sums every receiver whose cells the folder holds, also one a run's `models` leaves out
    import shutil

    shutil.copytree(out / "cells" / folder, out / "cells" / "another-receiver")
    written = run_validity(dataclasses.replace(config, objectives=("pm", "pm-sum")), out, device="cpu",
                           progress=False, log=lambda *_: None, report_only=True)
    by_name = {p.name.split("-" + tiny_llama_dir.name)[0]: read_json(p) for p in written}
    assert [2 * p["score"] for p in by_name["pm"]["points"]] == \
        pytest.approx([p["score"] for p in by_name["pm-sum"]["points"]])
    # pm-margin-sum likewise: each subset's margin summed over the receivers (the copy given margins of its own)
    other = {}
    for k, path in enumerate(sorted((out / "cells" / "another-receiver" / "comparison").glob("*/seed1/margin.json"))):
        other[path.parts[-3]] = 0.1 * k - 0.3
        atomic_write_json(path, {**read_json(path), "gold_minus_best_other": other[path.parts[-3]]})
    written = run_validity(dataclasses.replace(config, objectives=("pm-margin", "pm-margin-sum")), out, device="cpu",
                           progress=False, log=lambda *_: None, report_only=True)
    by_name = {p.name.split("-" + tiny_llama_dir.name)[0]: read_json(p) for p in written}
    own = {p["set"]: p["score"] for p in by_name["pm-margin"]["points"]}
    assert len(other) == len(own) and {p["set"]: p["score"] for p in by_name["pm-margin-sum"]["points"]} == \
        pytest.approx({n: own[n] + other[n] for n in own})
    # ... and waits while one receiver lacks a subset's margin
    path.unlink()
    assert run_validity(dataclasses.replace(config, objectives=("pm-margin-sum",)), out, device="cpu",
                        progress=False, log=lambda *_: None, report_only=True) == []
