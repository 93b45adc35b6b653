"""The performance objective (student.objective: performance): after the student's steps, the response loss of
held-out rows relative to the start's. The scorer computes it as the receivers' training loss does, the
distillation's differentiable meta-loss and the scorer's first-order score agree on it, match-eval and distill run
on it, and settings that cannot act are refused."""

from __future__ import annotations

import json

import pytest
import torch

from textdistill.artifacts import read_json
from textdistill.config import DataSettings
from textdistill.errors import ConfigError
from textdistill.experts import load_experts
from textdistill.instrument import InstrumentConfig, match_eval
from textdistill.match_selection import MatchSelectionConfig
from textdistill.matching import (Draw, SampleSet, Scorer, StudentSettings, load_expert_pool, load_objective_rows,
                                  load_student_model, resolve_student)
from textdistill.projection import input_embedding_matrix

PERFORMANCE = dict(objective="performance", objective_rows="arc-easy:validation", objective_offset=3,
                   objective_limit=20)


def test_the_objective_is_the_receivers_loss_of_the_rows_relative_to_the_start(two_sgd_experts):
    from textdistill.data import load_examples
    from textdistill.matching import tokenize_for_experts
    from textdistill.training import collate, response_loss

    trajectories = load_experts(two_sgd_experts)
    settings = StudentSettings(syn_steps=2, batch_size=2, lr=0.3, **PERFORMANCE)
    student = resolve_student(settings, trajectories)
    model, tokenizer = load_student_model(trajectories, device="cpu")
    embed = input_embedding_matrix(model).float()
    rows = load_objective_rows(settings, tokenizer, trajectories.manifest, embed)
    assert len(rows) == 20    # 20 rows from row 3 on, in more than one chunk of the scorer's
    scorer = Scorer(model, trajectories, student, device="cpu", rows=rows)
    assert scorer.objective == "performance" and len(scorer.row_batches) == 2
    _, pool = load_expert_pool(tokenizer, trajectories.manifest)
    draw = Draw(0, 1, ((0, 1), (2, 3)))
    samples = SampleSet.from_tokenized(pool[:4], embed)
    start, _ = scorer.endpoints(draw)
    end, _ = scorer.unroll(samples, draw, lr=20.0)   # a large step: the rows' loss moves well past float noise
    assert scorer.loss_of(start, draw) == pytest.approx(1.0, abs=1e-7)

    # the same rows tokenized and scored the way a receiver's training loss is (collate + response_loss)
    # (the experts' template; their pool's limit of 12 rows is not the objective rows')
    data = DataSettings(**{**trajectories.manifest["data_settings"], "limit": None})
    tokenized = tokenize_for_experts(tokenizer, load_examples("arc-easy:validation", data, tokenizer=tokenizer)[3:23],
                                     trajectories.manifest)
    assert len(tokenized) == 20

    def receivers_loss(params):
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in params.items():
                named[name].copy_(value)
            batch = collate(tokenized, tokenizer.pad_token_id, torch.device("cpu"))
            loss, _ = response_loss(model, batch)
        return float(loss)

    expected = receivers_loss(end) / receivers_loss(start)
    assert scorer.loss_of(end, draw) == pytest.approx(expected, rel=1e-5)
    assert abs(expected - 1.0) > 1e-3   # the steps changed the rows' loss


def test_match_eval_and_distill_run_on_it_and_the_meta_loss_is_the_scored_loss(two_sgd_experts, toy_rows, tmp_path):
    from textdistill.distill import DistillConfig, TokenSearchSettings, distill

    kwargs = dict(experts=two_sgd_experts, data=str(toy_rows), output=None, config=InstrumentConfig(draws=3, seed=0),
                  device="cpu", progress=False, floor=False)
    trajectory = match_eval(student=StudentSettings(syn_steps=2, batch_size=2, lr=0.3), **kwargs)
    performance = match_eval(student=StudentSettings(syn_steps=2, batch_size=2, lr=0.3, **PERFORMANCE), **kwargs)
    assert trajectory["draw_specs"] == performance["draw_specs"] and trajectory["draws"] != performance["draws"]

    config = DistillConfig(budget="4", iterations=2, precision="fp32", lr_embeddings=1e-2,
                           student=StudentSettings(syn_steps=2, batch_size=2, lr=0.3, **PERFORMANCE),
                           instrument=InstrumentConfig(draws=2, random_subsets=1, heldout_experts=1),
                           search=TokenSearchSettings(top_k=8, candidates=2, confirm=False, confirm_draws=None))
    out = tmp_path / "run"
    distill(experts=two_sgd_experts, output=out, config=config, device="cpu", progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the meta-gradient's loss (through the differentiable unroll) and the scorer's loss of the same set on the
    # same draw are one number
    for record in records:
        assert record["matching_loss"] == pytest.approx(record["current_loss"], rel=1e-5)
    assert read_json(out / "run.json")["config"]["student"]["objective"] == "performance"


def test_settings_that_cannot_act_are_refused():
    with pytest.raises(ConfigError, match="needs student.objective_rows"):
        StudentSettings(objective="performance")
    with pytest.raises(ConfigError, match="has no effect with student.objective performance"):
        StudentSettings(targets="forks", **PERFORMANCE)
    with pytest.raises(ConfigError, match="read only with student.objective performance"):
        StudentSettings(objective_rows="arc-easy:validation")
    with pytest.raises(ConfigError, match="select --method match matches"):
        MatchSelectionConfig(student=StudentSettings(**PERFORMANCE))
