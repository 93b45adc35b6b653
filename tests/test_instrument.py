"""The held-out instrument: fixed draws, identical losses for identical sets, every set on the same draws, paired
intervals, and a clear refusal of settings that cannot fit the trajectories."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from textdistill.errors import ConfigError
from textdistill.instrument import InstrumentConfig, heldout_report, paired_difference
from textdistill.matching import (Draw, ResolvedStudent, SampleSet, ScoreCache, Scorer, StudentSettings, make_draws,
                                  resolve_student)

STUDENT = ResolvedStudent(steps=3, batch_size=2, span=1, lr=0.1, min_start=0, max_start=2)


def test_draws_depend_only_on_experts_shape_size_and_seed():
    a = make_draws([2, 3], STUDENT, 5, 8, seed=0)
    assert a == make_draws([2, 3], STUDENT, 5, 8, seed=0)
    assert a == make_draws([2, 3], ResolvedStudent(3, 2, 1, 0.7, 0, 2), 5, 8, seed=0)   # not the lr
    assert a != make_draws([2, 3], STUDENT, 5, 8, seed=1)
    assert a != make_draws([2, 3], STUDENT, 6, 8, seed=0)
    assert a[:4] == make_draws([2, 3], STUDENT, 5, 4, seed=0)   # more draws extend the same sequence
    for draw in a:
        assert draw.expert in (2, 3) and 0 <= draw.start <= 2 and len(draw.batches) == 3
        assert all(len(set(b)) == len(b) == 2 and all(0 <= i < 5 for i in b) for b in draw.batches)


def test_first_use():
    draw = Draw(0, 0, ((0, 1), (2, 3), (1, 4)))
    assert [draw.first_use(i) for i in range(6)] == [0, 0, 1, 1, 2, None]


def test_paired_difference_is_a_t_interval():
    result = paired_difference([1.0, 2.0, 3.0], [0.0, 1.0, 1.0])
    assert result["mean"] == pytest.approx(4 / 3) and result["draws"] == [1.0, 1.0, 2.0]
    half = 4.302652729911275 * math.sqrt(1 / 3) / math.sqrt(3)   # t(0.975, 2) * sd / sqrt(n)
    assert result["ci95"] == pytest.approx([4 / 3 - half, 4 / 3 + half])
    with pytest.raises(ValueError, match="two equal-length lists"):
        paired_difference([1.0], [2.0])


class _RecordingScorer(Scorer):
    """Deterministic fake losses that record which set was scored on which draw."""

    def __init__(self, lr=None):
        self.student, self.calls = (STUDENT if lr is None else dataclasses.replace(STUDENT, lr=lr)), []

    def loss(self, samples, draw, *, lr=None):
        self.calls.append((id(samples), draw))
        return float(sum(p.sum() for p in samples.prompts)) + draw.start

    def floor_loss(self, pool, draw, embed_matrix):
        return 0.0


def _set(value: float, size: int = 3) -> SampleSet:
    return SampleSet([torch.full((2, 4), value) for _ in range(size)], [torch.tensor([1, 2])] * size)


def test_every_set_is_scored_on_the_same_draws_in_the_same_order():
    scorer = _RecordingScorer()
    draws = make_draws([0], STUDENT, 3, 5, seed=0)
    sets = {"init": _set(0.0), "projected": _set(0.1), "continuous": None, "less": _set(0.2)}
    null = [_set(0.3), _set(0.4)]
    report = heldout_report(scorer, draws, sets, null, pool=[], embed_matrix=torch.zeros(1), progress=False)
    per_set: dict[int, list[Draw]] = {}
    for set_id, draw in scorer.calls:
        per_set.setdefault(set_id, []).append(draw)
    assert len(per_set) == 5 and all(v == draws for v in per_set.values())
    assert report["continuous"] is None and set(report["compare"]) == {"less"}
    assert report["projected_minus_init"]["mean"] == pytest.approx(3 * 2 * 4 * 0.1)
    assert report["projected_rank_among_random"] == 1 and report["floor"]["loss"] == 0.0
    assert report["draws"] == [d.to_json() for d in draws]


def test_identical_sets_give_identical_losses_and_a_zero_paired_difference(tiny_llama_dir, tmp_path):
    from textdistill.config import DataSettings, LoraSettings, TrainConfig
    from textdistill.experts import ExpertsConfig, load_experts, make_experts
    from textdistill.matching import load_expert_pool, load_student_model
    from textdistill.projection import input_embedding_matrix

    recipe = TrainConfig(optimizer="sgd", lr=0.5, schedule="constant", warmup_ratio=0.0, max_steps=4, batch_size=2,
                         max_grad_norm=None, precision="fp32", lora=LoraSettings(r=2, alpha=4),
                         data=DataSettings(max_length=48, limit=8))
    make_experts(model_name=str(tiny_llama_dir), data="arc-easy:train", output=tmp_path, device="cpu",
                 progress=False, config=ExpertsConfig(num_experts=2, snapshot_every=2, train=recipe))
    trajectories = load_experts(tmp_path)
    model, tokenizer = load_student_model(trajectories, device="cpu")
    _, pool = load_expert_pool(tokenizer, trajectories.manifest)
    embed = input_embedding_matrix(model)
    student = resolve_student(StudentSettings(), trajectories)
    scorer = Scorer(model, trajectories, student, device="cpu")
    draws = make_draws([1], student, 3, 3, seed=0)
    one, again, other = (SampleSet.from_tokenized(rows, embed) for rows in (pool[:3], pool[:3], pool[3:6]))
    a, b, c = scorer.losses(one, draws), scorer.losses(again, draws), scorer.losses(other, draws)
    assert a == b and a != c and all(x > 0 for x in a)
    assert paired_difference(a, b)["ci95"] == [0.0, 0.0]


def test_student_settings_that_do_not_fit_are_refused():
    trajectories = SimpleNamespace(num_snapshots=3, root="experts", snapshot_every=5, samples_per_step=8,
                                   manifest={"lr": 0.1})
    resolved = resolve_student(StudentSettings(), trajectories)
    assert (resolved.steps, resolved.batch_size, resolved.lr, resolved.max_start) == (5, 8, 0.1, 1)
    with pytest.raises(ConfigError, match="does not fit trajectories of 3 snapshots"):
        resolve_student(StudentSettings(expert_epochs=3), trajectories)
    with pytest.raises(ConfigError, match="not both"):
        StudentSettings(lr=0.1, lr_grid=(0.1, 0.3))
    with pytest.raises(ConfigError, match="at least 2"):
        InstrumentConfig(draws=1)


def test_identical_sets_are_scored_once():
    scorer = _RecordingScorer()
    draws = make_draws([0], STUDENT, 3, 4, seed=0)
    init = _set(0.0)
    sets = {"init": init, "projected": _set(0.0), "match": _set(0.0), "less": _set(0.5)}
    report = heldout_report(scorer, draws, sets, [_set(0.3)], pool=[], embed_matrix=torch.zeros(1), progress=False)
    assert len(scorer.calls) == 3 * len(draws)   # {init = projected = match}, less, the random subset
    assert report["projected"] == report["init"] == report["compare"]["match"]
    assert report["projected_minus_init"]["mean"] == 0.0


def test_score_cache_reuses_losses_only_for_the_same_set_draws_lr_and_scope(tmp_path):
    draws = make_draws([0], STUDENT, 3, 4, seed=0)
    sets = {"init": _set(0.0), "projected": _set(0.1)}
    null = [_set(0.3), _set(0.4)]
    first = _RecordingScorer()
    cold = heldout_report(first, draws, sets, null, pool=[], embed_matrix=torch.zeros(1),
                          cache=ScoreCache(tmp_path, {"scope": 1}), progress=False)
    assert cold["cached_sets"] == 0 and len(first.calls) == 4 * len(draws)
    second = _RecordingScorer()
    warm = heldout_report(second, draws, sets, null, pool=[], embed_matrix=torch.zeros(1),
                          cache=ScoreCache(tmp_path, {"scope": 1}), progress=False)
    assert second.calls == [] and warm["cached_sets"] == 5   # 4 sets and the floor
    assert {k: v for k, v in warm.items() if k != "cached_sets"} == {k: v for k, v in cold.items()
                                                                     if k != "cached_sets"}
    # another set, other draws, another lr or another scope (other experts, student...) are computed afresh
    for scorer, kwargs in ((_RecordingScorer(), {"sets": {"init": _set(0.2)}}),
                           (_RecordingScorer(), {"draws": make_draws([0], STUDENT, 3, 4, seed=1)}),
                           (_RecordingScorer(lr=0.2), {}),
                           (_RecordingScorer(), {"scope": 2})):
        heldout_report(scorer, kwargs.get("draws", draws), kwargs.get("sets", {"init": sets["init"]}), [], pool=None,
                       cache=ScoreCache(tmp_path, {"scope": kwargs.get("scope", 1)}), progress=False)
        assert len(scorer.calls) == len(draws), kwargs


def test_score_cache_in_a_folder_that_cannot_be_written_warns_and_scores(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    scorer = _RecordingScorer()
    draws = make_draws([0], STUDENT, 3, 2, seed=0)
    with pytest.warns(UserWarning, match="cannot be written"):
        report = heldout_report(scorer, draws, {"init": _set(0.0)}, [], pool=None,
                                cache=ScoreCache(blocker / "cache", {}), progress=False)
    assert report["init"]["draws"] == [float(d.start) for d in draws] and len(scorer.calls) == 2
