"""Denoised targets: a fork on the expert's own batches lands on its next snapshot; a forks folder holds the mean of
its forks, resumes without redoing work and refuses other settings; the scorer, match-eval and the distillation
score against the forks' mean when student.targets names the folder, and against the expert's snapshot otherwise."""

from __future__ import annotations


import pytest
import torch

from textdistill import forks as forks_module
from textdistill.artifacts import load_tensors, read_json
from textdistill.errors import ConfigError, TrajectoryError
from textdistill.experts import load_experts
from textdistill.forks import (ForksConfig, expert_recipe, fork_path, fork_seed, load_fork_targets, make_forks,
                               mean_path, run_fork)
from textdistill.instrument import InstrumentConfig, match_eval
from textdistill.matching import (Draw, Scorer, StudentSettings, load_expert_pool, load_student_model,
                                  resolve_student)


@pytest.fixture(scope="module")
def forks_dir(tmp_path_factory, two_sgd_experts):
    out = tmp_path_factory.mktemp("forks")
    make_forks(experts=two_sgd_experts, output=out, config=ForksConfig(forks=3), device="cpu", progress=False,
               log=lambda *_: None)
    return out


def test_a_fork_on_the_experts_own_batches_lands_on_its_next_snapshot(two_sgd_experts, monkeypatch):
    # the fork's start, recipe and step count are the expert's: fed the rows the expert saw in that segment, in its
    # order, it reproduces the expert's next snapshot (fp32)
    from textdistill import training

    trajectories = load_experts(two_sgd_experts)
    model, tokenizer = load_student_model(trajectories, device="cpu")
    _, pool = load_expert_pool(tokenizer, trajectories.manifest)
    for start in (0, 1):
        segment = trajectories.segment_batches(1, start, 1)
        rows = [pool[i] for step in segment for i in step]
        monkeypatch.setattr(training, "epoch_order", lambda n, seed, epoch: list(range(n)))
        end = run_fork(model, trajectories.load(1, start), rows, expert_recipe(trajectories.manifest, 2),
                       tokenizer.pad_token_id)
        expected = trajectories.load(1, start + 1)
        moved = max(float((expected[k] - trajectories.load(1, start)[k]).abs().max()) for k in expected)
        assert moved > 1e-3   # the segment moves, so landing on its end is not trivial
        for name, tensor in expected.items():
            torch.testing.assert_close(end[name], tensor, rtol=1e-5, atol=1e-6)


def test_the_forks_folder_holds_their_mean_resumes_and_refuses_other_settings(forks_dir, two_sgd_experts, monkeypatch):
    manifest = read_json(forks_dir / "manifest.json")
    assert sorted(map(tuple, manifest["pairs"])) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert manifest["segment_steps"] == 2 and manifest["forks"] == 3
    for expert, start in manifest["pairs"]:
        ends = [load_tensors(fork_path(forks_dir, expert, start, f)) for f in range(3)]
        mean = load_tensors(mean_path(forks_dir, expert, start))
        for name in mean:
            torch.testing.assert_close(mean[name], sum(e[name] for e in ends) / 3)
        assert ends[0].keys() == mean.keys() and not torch.equal(ends[0][name], ends[1][name])   # other orders
    seeds = {fork_seed(ForksConfig(forks=3), e, t, f, 3) for e in (0, 1) for t in (0, 1) for f in range(3)}
    assert len(seeds) == 12 and fork_seed(ForksConfig(), 1, 2, 3, 5) == 7000 + 1000 + 200 + 3
    signal = read_json(forks_dir / "signal.json")["by_start"]
    assert set(signal) == {"0-0", "0-1", "1-0", "1-1"}
    assert all(-1 <= c <= 1 for v in signal.values() for c in v["expert_vs_forks"])

    # a rerun does no work; other settings in the same folder are refused in one line
    monkeypatch.setattr(forks_module, "run_fork", lambda *a, **k: pytest.fail("a finished fork was redone"))
    make_forks(experts=two_sgd_experts, output=forks_dir, config=ForksConfig(forks=3), device="cpu", progress=False,
               log=lambda *_: None)
    with pytest.raises(ConfigError, match="other settings \\(forks\\)"):
        make_forks(experts=two_sgd_experts, output=forks_dir, config=ForksConfig(forks=2), device="cpu", progress=False)
    with pytest.raises(ConfigError, match="does not fit"):
        make_forks(experts=two_sgd_experts, output=forks_dir, config=ForksConfig(forks=3, max_start=2), device="cpu")
    with pytest.raises(ConfigError, match="forks must be at least 1"):
        ForksConfig(forks=0)


def test_the_scorer_and_match_eval_score_against_the_forks_mean(forks_dir, two_sgd_experts, toy_rows, tmp_path):
    trajectories = load_experts(two_sgd_experts)
    student = resolve_student(StudentSettings(syn_steps=2, batch_size=2, lr=0.1), trajectories)
    model, _ = load_student_model(trajectories, device="cpu")
    targets = load_fork_targets(forks_dir, trajectories, student.span)
    draw = Draw(1, 1, ((0, 1), (1, 0)))
    plain = Scorer(model, trajectories, student, device="cpu")
    denoised = Scorer(model, trajectories, student, device="cpu", targets=targets)
    mean = load_tensors(mean_path(forks_dir, 1, 1))
    assert all(torch.equal(denoised.endpoints(draw)[1][k], mean[k]) for k in mean)
    assert all(torch.equal(plain.endpoints(draw)[1][k], trajectories.load(1, 2)[k]) for k in mean)
    assert denoised.loss_of(mean, draw) == 0.0 and plain.loss_of(mean, draw) > 0.0

    kwargs = dict(experts=two_sgd_experts, data=str(toy_rows), output=None, config=InstrumentConfig(draws=3, seed=0),
                  device="cpu", progress=False, floor=False)
    raw = match_eval(student=StudentSettings(syn_steps=2, batch_size=2, lr=0.1), **kwargs)
    against_forks = match_eval(student=StudentSettings(syn_steps=2, batch_size=2, lr=0.1, targets=str(forks_dir)),
                               **kwargs)
    assert raw["draw_specs"] == against_forks["draw_specs"] and raw["draws"] != against_forks["draws"]
    # a folder for another span, or one that lacks a start the run draws, is refused in one line
    with pytest.raises(ConfigError, match="expert_epochs is 2"):
        load_fork_targets(forks_dir, trajectories, 2)
    with pytest.raises(TrajectoryError, match="lacks denoised targets"):
        targets.check_covers([0, 1, 2], 0, 1)
    with pytest.raises(TrajectoryError, match="not a forks folder"):
        load_fork_targets(tmp_path, trajectories, 1)


def test_the_distillation_matches_denoised_targets_and_refuses_a_folder_that_lacks_its_starts(forks_dir,
                                                                                            two_sgd_experts,
                                                                                            tmp_path):
    from textdistill.distill import DistillConfig, TokenSearchSettings, distill

    student = StudentSettings(syn_steps=2, batch_size=2, targets=str(forks_dir))
    config = DistillConfig(budget="4", iterations=2, student=student, precision="fp32", lr_embeddings=1e-2,
                           instrument=InstrumentConfig(draws=2, random_subsets=1, heldout_experts=1),
                           search=TokenSearchSettings(top_k=8, candidates=2))
    summary = distill(experts=two_sgd_experts, output=tmp_path / "run", config=config, device="cpu", progress=False)
    assert read_json(tmp_path / "run" / "run.json")["config"]["student"]["targets"] == str(forks_dir)
    assert len(summary["heldout"]["projected"]["draws"]) == 2
    partial = tmp_path / "partial"
    make_forks(experts=two_sgd_experts, output=partial, config=ForksConfig(forks=1, max_start=0), device="cpu",
               progress=False, log=lambda *_: None)
    with pytest.raises(TrajectoryError, match="lacks denoised targets"):
        distill(experts=two_sgd_experts, output=tmp_path / "refused", device="cpu", progress=False,
                config=DistillConfig(budget="4", iterations=1, student=StudentSettings(targets=str(partial))))
