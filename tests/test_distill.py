"""The distillation run: token search keeps only swaps that lower the scored loss, the scaffolding never changes,
the held-out instrument is paired and scores the decoded text, resume is exact, bad inputs are refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from textdistill.artifacts import load_tensors, read_json
from textdistill.config import DataSettings, LoraSettings, TrainConfig
from textdistill.distill import (DistillConfig, read_distilled_rows, RegularizerSettings, Swap, TokenSearchSettings, distill,
                                 sample_swaps, top_k_swaps)
from textdistill.errors import ConfigError, TrainingError, TrajectoryError
from textdistill.experts import ExpertsConfig, load_experts, make_experts
from textdistill.instrument import InstrumentConfig
from textdistill.matching import StudentSettings

# fp32 experts, so that replaying an expert's own batches reproduces its snapshots exactly
RECIPE = TrainConfig(optimizer="sgd", lr=0.5, schedule="constant", warmup_ratio=0.0, max_steps=4, batch_size=4,
                     max_grad_norm=None, precision="fp32", lora=LoraSettings(r=2, alpha=4),
                     data=DataSettings(max_length=48, limit=12))
INSTRUMENT = InstrumentConfig(draws=3, random_subsets=2, heldout_experts=1)
FAST = DistillConfig(budget="4", iterations=4, student=StudentSettings(syn_steps=2, batch_size=2), checkpoint_every=2,
                     precision="fp32",   # exact comparisons below: never bf16 autocast, whatever the CPU
                     lr_embeddings=1e-2, instrument=INSTRUMENT, search=TokenSearchSettings(top_k=8, candidates=3))


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory, tiny_llama_dir):
    out = tmp_path_factory.mktemp("experts")
    make_experts(model_name=str(tiny_llama_dir), data="arc-easy:train", output=out, device="cpu", progress=False,
                 config=ExpertsConfig(num_experts=3, snapshot_every=2, train=RECIPE))
    return out


@pytest.fixture(scope="module")
def gcg_run(tmp_path_factory, experts_dir):
    out = tmp_path_factory.mktemp("distill-gcg")
    config = dataclasses.replace(FAST, iterations=6, search=TokenSearchSettings(top_k=16, candidates=4))
    summary = distill(experts=experts_dir, output=out, config=config, device="cpu", progress=False)
    return out, summary


def _rows(out):
    return read_distilled_rows(out)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_folder_dataset_and_summary(gcg_run):
    out, summary = gcg_run
    import datasets

    table = datasets.load_dataset("json", data_files=str(out / "distilled.jsonl"), split="train")
    assert len(table) == 4 and set(table.column_names) == {"prompt", "response"}   # only what a user trains on
    diagnostics = datasets.load_dataset("json", data_files=str(out / "diagnostics.jsonl"), split="train")
    assert {"index", "prompt_token_ids", "changed_positions", "marked_prompt"} <= set(diagnostics.column_names)
    assert [m["iteration"] for m in _metrics(out)] == list(range(1, 7))
    assert read_json(out / "run.json")["config"]["mode"] == "gcg"
    heldout = summary["heldout"]
    assert 0.0 <= summary["tokens_changed_fraction"] <= 1.0
    assert {"init", "continuous", "projected", "random", "floor", "projected_minus_init"} <= set(heldout)
    assert heldout["continuous"] is None   # gcg has no vectors apart from its tokens
    assert len(heldout["random"]) == 2 and len(heldout["projected"]["draws"]) == 3
    low, high = heldout["projected_minus_init"]["ci95"]
    assert low <= heldout["projected_minus_init"]["mean"] <= high
    card = (out / "README.md").read_text()
    assert "Held-out matching loss" in card and "Text minus starting samples" in card


def test_gcg_keeps_a_swap_only_when_the_scored_loss_falls(gcg_run):
    out, summary = gcg_run
    metrics = _metrics(out)
    scored = [m for m in metrics if "best_candidate_loss" in m]
    assert scored, "no iteration scored a candidate"
    for m in metrics:
        if m["accepted"]:
            assert m["proposal_loss"] <= m["best_candidate_loss"] < m["current_loss"]
            assert m["confirm_candidate_loss"] < m["confirm_current_loss"]
        elif "confirm_candidate_loss" in m:
            assert m["confirm_candidate_loss"] >= m["confirm_current_loss"]
        elif "best_candidate_loss" in m:
            assert m["best_candidate_loss"] >= m["current_loss"]
    # the text holds the accepted swaps and nothing else (a position swapped twice counts once)
    accepted = {(w["sample"], w["position"]) for m in metrics if m["accepted"] for w in m["swaps"]}
    rows = _rows(out)
    assert summary["swaps_accepted"] == sum(len(m["swaps"]) for m in metrics if m["accepted"])
    changed = {(i, p) for i, r in enumerate(rows) for p in r["changed_positions"]}
    assert accepted >= changed  # BOS-free tiny tokenizer: positions in the text are positions in the prompt
    assert all(r["retokenizes_exactly"] for r in rows)


def test_a_worse_swap_is_never_accepted(experts_dir, tmp_path, monkeypatch):
    import textdistill.distill as module

    def worse(context, synthetic, draw, proposals, lr, base=None):
        return 1.0, [1.5] * len(proposals), (1.0, [])   # every candidate scores above the current set

    monkeypatch.setattr(module, "_score_proposals", worse)
    config = dataclasses.replace(FAST, iterations=3)
    summary = distill(experts=experts_dir, output=tmp_path / "d", config=config, device="cpu", progress=False)
    assert summary["swaps_accepted"] == 0 and summary["tokens_changed_fraction"] == 0.0
    assert all(not r["changed_positions"] for r in _rows(tmp_path / "d"))


def test_a_fresh_confirmation_draw_per_proposal_keeps_only_what_it_confirms(experts_dir, tmp_path):
    """search.confirm_draws: null (the runs made before the paired default): each proposal is judged on a fresh
    draw that uses its samples."""
    config = dataclasses.replace(FAST, iterations=4, search=TokenSearchSettings(top_k=16, candidates=4,
                                                                                  confirm_draws=None))
    distill(experts=experts_dir, output=tmp_path / "fresh", config=config, device="cpu", progress=False)
    confirmed = [m for m in _metrics(tmp_path / "fresh") if "confirm_current_loss" in m]
    assert confirmed
    for m in confirmed:
        assert m["accepted"] == (m["confirm_candidate_loss"] < m["confirm_current_loss"])


def test_fixed_confirmation_draws_judge_every_proposal_alike(experts_dir, tmp_path):
    """search.confirm_draws: the current set's loss on the fixed draws changes only when a swap was accepted
    (the same draws judge every proposal), an accepted proposal lowered their mean, and resuming mid-run (the
    cache of the current set's unrolls is rebuilt) gives the uninterrupted run's tokens."""
    search = TokenSearchSettings(top_k=16, candidates=4, confirm_draws=2)
    config = dataclasses.replace(FAST, iterations=6, search=search, lr_lr=0.0)   # a fixed lr, as on ARC-Easy
    out = tmp_path / "fixed"
    distill(experts=experts_dir, output=out, config=config, device="cpu", progress=False)
    confirmed = [m for m in _metrics(out) if "confirm_current_loss" in m]
    assert len(confirmed) >= 2, "too few proposals reached the confirmation to test it"
    for m in confirmed:
        assert m["accepted"] == (m["confirm_candidate_loss"] < m["confirm_current_loss"])
    # every accepted proposal was confirmed, so between two confirmations only the first can have changed the set
    for before, after in zip(confirmed, confirmed[1:]):
        if before["accepted"]:   # the new set, unrolled in full, scores what the proposal scored from a snapshot
            assert after["confirm_current_loss"] == pytest.approx(before["confirm_candidate_loss"], rel=1e-5)
        else:                    # same set, same draws: the same number
            assert after["confirm_current_loss"] == before["confirm_current_loss"]
    half = tmp_path / "half"
    distill(experts=experts_dir, output=half, config=dataclasses.replace(config, iterations=3), device="cpu",
            progress=False)
    distill(experts=experts_dir, output=half, config=config, resume=True, device="cpu", progress=False)
    assert [r["prompt_token_ids"] for r in _rows(out)] == [r["prompt_token_ids"] for r in _rows(half)]
    with pytest.raises(ConfigError, match="needs search.confirm"):
        TokenSearchSettings(confirm=False, confirm_draws=2)


@pytest.mark.parametrize("mode", ["gcg", "continuous"])
def test_a_nan_in_the_inner_loop_skips_that_iteration_and_changes_nothing(experts_dir, tmp_path, monkeypatch, mode):
    import textdistill.distill as module

    real, calls = module._meta_loss, []

    def nan_at_second(context, synthetic, prompts, draw, lr):
        calls.append(1)
        loss = real(context, synthetic, prompts, draw, lr)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(module, "_meta_loss", nan_at_second)
    config = dataclasses.replace(FAST, mode=mode, iterations=3, checkpoint_every=1, sample_every=1,
                                 regularizer=RegularizerSettings(refresh_every=1))
    out = tmp_path / mode
    with pytest.warns(UserWarning, match="iteration 2 skipped: non-finite"):
        summary = distill(experts=experts_dir, output=out, config=config, device="cpu", progress=False)
    metrics = _metrics(out)
    assert [("fault" in m) for m in metrics] == [False, True, False]
    assert metrics[1]["matching_loss"] is None and not metrics[1]["accepted"]
    assert metrics[1]["tokens_changed_fraction"] == metrics[0]["tokens_changed_fraction"]
    assert summary["iterations_skipped_for_faults"] == 1
    assert all(torch.isfinite(t).all() for t in load_tensors(out / "state.safetensors").values()
               if t.is_floating_point())


def test_repeated_faults_stop_the_run_with_the_last_checkpoint_intact(experts_dir, tmp_path, monkeypatch):
    import textdistill.distill as module

    real, calls = module._meta_loss, []

    def nan_from_third(context, synthetic, prompts, draw, lr):
        calls.append(1)
        loss = real(context, synthetic, prompts, draw, lr)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(module, "_meta_loss", nan_from_third)
    config = dataclasses.replace(FAST, mode="continuous", iterations=8, checkpoint_every=2)
    out = tmp_path / "stops"
    with pytest.warns(UserWarning), pytest.raises(TrainingError, match="3 iterations in a row .* checkpoint of "
                                                                       "iteration 4 is intact"):
        distill(experts=experts_dir, output=out, config=config, device="cpu", progress=False)
    state = load_tensors(out / "state.safetensors")
    assert read_json(out / "state.json")["iteration"] == 4 and torch.isfinite(state["prompt_embeds"]).all()
    assert [("fault" in m) for m in _metrics(out)] == [False, False, True, True, True]
    assert not (out / "summary.json").exists()


def test_continuing_from_a_snapshot_equals_a_full_unroll(experts_dir, tiny_llama_dir):
    # _score_proposals scores a swap in sample i from i's first minibatch on; that must equal scoring from scratch
    from textdistill.matching import Draw, SampleSet, Scorer, load_student_model, resolve_student
    from textdistill.projection import input_embedding_matrix

    trajectories = load_experts(experts_dir)
    model, _ = load_student_model(trajectories, device="cpu")
    student = resolve_student(StudentSettings(syn_steps=3, batch_size=2), trajectories)
    scorer = Scorer(model, trajectories, student, device="cpu")
    embed = input_embedding_matrix(model)
    gen = torch.Generator().manual_seed(0)
    samples = SampleSet.from_token_ids([torch.randint(100, 1000, (6,), generator=gen).tolist() for _ in range(4)],
                                       [[5, 6, 7]] * 4, embed)
    draw = Draw(0, 0, ((0, 1), (2, 3), (1, 2)))
    _, snapshots = scorer.unroll(samples, draw, keep_snapshots=True)
    changed = SampleSet(list(samples.prompts), samples.responses)
    changed.prompts[2] = changed.prompts[2].clone()
    changed.prompts[2][3] = embed[4242]
    step = draw.first_use(2)
    assert step == 1
    continued, _ = scorer.unroll(changed, draw, from_step=step, from_params=snapshots[step])
    assert scorer.loss_of(continued, draw) == pytest.approx(scorer.loss(changed, draw), rel=1e-6)
    assert scorer.loss(changed, draw) != scorer.loss(samples, draw)


def test_scaffolding_never_changes(experts_dir, tmp_path):
    # a large straight-through step moves every learnable vector across cells; the template must survive
    config = dataclasses.replace(FAST, mode="straight_through", iterations=3, lr_embeddings=2.0)
    distill(experts=experts_dir, output=tmp_path / "st", config=config, device="cpu", progress=False)
    rows = _rows(tmp_path / "st")
    assert any(r["changed_positions"] for r in rows)
    for row in rows:
        assert row["prompt"].startswith("Question:") and row["prompt"].endswith("\nAnswer:")
        ids, init = row["prompt_token_ids"], row["init_token_ids"]
        assert ids[:2] == init[:2] and ids[-3:] == init[-3:]   # "Question", ":" ... "\n", "Answer", ":"


def test_projected_text_is_scored_after_decoding_and_retokenizing(gcg_run, experts_dir, tmp_path):
    # match-eval sees only the decoded text; with the same draws it must give the distillation's own numbers
    from textdistill.instrument import match_eval

    out, summary = gcg_run
    result = match_eval(experts=experts_dir, data=str(out / "distilled.jsonl"), output=tmp_path / "m.json",
                        config=INSTRUMENT, student=FAST.student, device="cpu", progress=False)
    assert result["draws"] == pytest.approx(summary["heldout"]["projected"]["draws"], rel=1e-6)
    assert result["draw_specs"] == read_json(out / "heldout.json")["draws"]
    assert read_json(tmp_path / "m.json")["loss"] == pytest.approx(result["loss"])


def test_floor_replays_the_expert_exactly(experts_dir, tmp_path):
    # a student that repeats the expert's own steps (its batch, lr and step count) lands on its snapshot
    from textdistill.instrument import match_eval

    (tmp_path / "any.jsonl").write_text(json.dumps({"prompt": "Question: Why?\nAnswer:", "response": " Yes"}) + "\n")
    result = match_eval(experts=experts_dir, data=str(tmp_path / "any.jsonl"), output=None,
                        config=dataclasses.replace(INSTRUMENT, draws=4), student=StudentSettings(), device="cpu",
                        progress=False)
    assert result["student"]["steps"] == 2 and result["student"]["batch_size"] == 4
    assert max(result["floor"]["draws"]) < 1e-6
    assert min(result["draws"]) > 1e-3


def test_continuous_mode_and_its_heldout_vectors(experts_dir, tmp_path):
    config = dataclasses.replace(FAST, mode="continuous", iterations=2, regularizer=RegularizerSettings(weight=0.1))
    summary = distill(experts=experts_dir, output=tmp_path / "c", config=config, device="cpu", progress=False)
    assert summary["heldout"]["continuous"] is not None and "continuous_minus_init" in summary["heldout"]
    assert "mean_token_distance" in summary


def test_checkpointed_layers_learn_what_the_recompute_mode_learns(experts_dir, tmp_path, monkeypatch):
    """--recompute --checkpoint_layers true goes layer by layer and gives the recompute mode's vectors and lr
    (continuous mode, 2 iterations; the meta-gradients agree to rounding), also one sample at a time (--micro_batch
    1); the settings are recorded in the run."""
    import textdistill.unroll as unroll_module

    layerwise_calls = []
    real_layerwise = unroll_module._layerwise
    monkeypatch.setattr(unroll_module, "_layerwise",
                        lambda *args, **kwargs: layerwise_calls.append(1) or real_layerwise(*args, **kwargs))
    runs = {}
    for checkpointed, micro_batch in ((False, None), (True, None), (True, 1)):
        layerwise_calls.clear()
        config = dataclasses.replace(FAST, mode="continuous", iterations=2, recompute=True,
                                     checkpoint_layers=checkpointed, micro_batch=micro_batch)
        out = tmp_path / f"ckpt-{checkpointed}-{micro_batch}"
        distill(experts=experts_dir, output=out, config=config, device="cpu", progress=False)
        runs[checkpointed, micro_batch] = load_tensors(out / "embeddings.safetensors")
        settings = read_json(out / "run.json")["config"]
        assert (settings["checkpoint_layers"], settings["micro_batch"]) == (checkpointed, micro_batch)
        assert bool(layerwise_calls) is checkpointed
    reference = runs[False, None]
    for key in ((True, None), (True, 1)):
        torch.testing.assert_close(runs[key]["prompt_embeds"], reference["prompt_embeds"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(runs[key]["lr"], reference["lr"], rtol=1e-5, atol=0)
    with pytest.raises(ConfigError, match="needs recompute"):
        DistillConfig(checkpoint_layers=True)
    with pytest.raises(ConfigError, match="micro_batch must be a positive number of samples and needs recompute"):
        DistillConfig(micro_batch=2)


def test_resume_gives_the_same_result(gcg_run, experts_dir, tmp_path):
    out, _ = gcg_run
    half = tmp_path / "half"
    config = dataclasses.replace(FAST, iterations=6, search=TokenSearchSettings(top_k=16, candidates=4))
    distill(experts=experts_dir, output=half, config=dataclasses.replace(config, iterations=2), device="cpu",
            progress=False)
    distill(experts=experts_dir, output=half, config=config, resume=True, device="cpu", progress=False)
    assert [r["prompt_token_ids"] for r in _rows(out)] == [r["prompt_token_ids"] for r in _rows(half)]
    a, b = load_tensors(out / "state.safetensors"), load_tensors(half / "state.safetensors")
    assert torch.equal(a["token_ids"], b["token_ids"]) and torch.equal(a["log_lr"], b["log_lr"])
    assert len(_metrics(half)) == 6
    seconds = [m["seconds"] for m in _metrics(half)]   # time counts on across the resume
    assert seconds == sorted(seconds) and seconds[2] >= seconds[1]


def test_existing_run_needs_resume_and_bad_budget_fails_early(gcg_run, experts_dir, tmp_path):
    out, _ = gcg_run
    with pytest.raises(ConfigError, match="pass --resume"):
        distill(experts=experts_dir, output=out, config=FAST, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="larger than the pool"):
        distill(experts=experts_dir, output=tmp_path / "x", config=DistillConfig(budget="500"), device="cpu",
                progress=False)
    assert not (tmp_path / "x" / "state.json").exists()


def test_resume_does_not_depend_on_how_the_selection_path_is_written(experts_dir, tmp_path, monkeypatch):
    from textdistill.selection import select_random

    select_random(data="arc-easy:train", budget=4, output=tmp_path / "sel.json", seed=3,
           data_settings=DataSettings(max_length=48, limit=12))
    config = dataclasses.replace(FAST, iterations=2, init="selection", selection=str(tmp_path / "sel.json"))
    distill(experts=experts_dir, output=tmp_path / "run", config=config, device="cpu", progress=False)
    monkeypatch.chdir(tmp_path)
    relative = dataclasses.replace(config, iterations=3, selection="sel.json")
    summary = distill(experts=experts_dir, output="run", config=relative, resume=True, device="cpu", progress=False)
    assert summary["iterations"] == 3


def test_resume_with_other_settings_is_refused(gcg_run, experts_dir):
    out, _ = gcg_run
    with pytest.raises(ConfigError, match="other settings or samples"):
        distill(experts=experts_dir, output=out, config=dataclasses.replace(FAST, seed=1, iterations=8),
                resume=True, device="cpu", progress=False)


@pytest.mark.parametrize("change, message", [
    ({"optimizer": "adamw"}, "optimizer adamw"),
    ({"momentum": 0.9}, "momentum 0.9"),
    ({"max_grad_norm": 1.0}, "gradient clipping"),
    ({"schedule": "linear"}, "linear lr schedule"),
])
def test_trajectories_from_another_optimizer_are_refused(experts_dir, tmp_path, change, message):
    import shutil

    copy = tmp_path / "experts"
    shutil.copytree(experts_dir, copy)
    manifest = read_json(copy / "manifest.json")
    manifest["recipe"].update(change)
    manifest.update({k: v for k, v in change.items() if k in manifest})
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrajectoryError, match=message):
        distill(experts=copy, output=tmp_path / "d", config=FAST, device="cpu", progress=False)


def test_pool_changed_since_experts_is_refused(experts_dir, tmp_path):
    import shutil

    copy = tmp_path / "experts"
    shutil.copytree(experts_dir, copy)
    manifest = read_json(copy / "manifest.json")
    manifest["pool_sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrajectoryError, match="differs from the one the experts were trained on"):
        distill(experts=copy, output=tmp_path / "d", config=FAST, device="cpu", progress=False)


def test_top_k_swaps_rank_by_first_order_gain():
    embed = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [2.0, 2.0]])
    grads = torch.tensor([[1.0, 0.0]])       # the loss grows along x: tokens with small x are best
    allowed = torch.tensor([True, True, True, True, False])
    ids, gains = top_k_swaps(grads, torch.tensor([1]), embed, allowed, k=3, chunk_size=2)
    assert ids.tolist() == [[3, 0, 2]]        # gains -2, -1, -1 (ties by id); never the current token 1 or 4
    assert gains.tolist() == [[-2.0, -1.0, -1.0]]
    swaps = sample_swaps(torch.tensor([[0, 5]]), ids, gains, count=3, generator=torch.Generator().manual_seed(0))
    assert len(swaps) == 3 and {s.token for s in swaps} == {0, 2, 3} and all(s == Swap(0, 5, s.token) for s in swaps)


def test_gemma_bos_row_stays_fixed_and_is_not_in_the_text(tmp_path, tiny_gemma_dir):
    experts = tmp_path / "experts"
    make_experts(model_name=str(tiny_gemma_dir), data="arc-easy:train", output=experts, device="cpu", progress=False,
                 config=ExpertsConfig(num_experts=2, snapshot_every=2, train=RECIPE))
    out = tmp_path / "d"
    distill(experts=experts, output=out, config=dataclasses.replace(FAST, iterations=2), device="cpu",
            progress=False)
    tensors = load_tensors(out / "embeddings.safetensors")
    assert (tensors["fixed_prefix"] == 1).all() and not tensors["learnable"][:, 0].any()
    assert all(not r["prompt"].startswith("<bos>") for r in _rows(out))


def test_initial_samples_differ_from_the_random_baseline_of_the_same_seed(gcg_run):
    from textdistill.selection import random_indices

    out, _ = gcg_run
    init = read_json(out / "init.json")["indices"]
    assert sorted(init) != random_indices(12, 4, FAST.seed)


def test_fluent_candidates_are_the_models_own_next_tokens(experts_dir):
    from textdistill.distill import _fluent_allowed

    trajectories = load_experts(experts_dir)
    from textdistill.matching import load_student_model

    model, _ = load_student_model(trajectories, device="cpu")
    ids = torch.tensor([[5, 17, 300, 42], [7, 8, -1, -1]])
    synthetic = type("S", (), {"prompt_ids": lambda self, s: [t for t in ids[s].tolist() if t >= 0]})()
    context = type("C", (), {"model": model, "embed_matrix": torch.zeros(1, 1)})()
    fluent = _fluent_allowed(context, synthetic, [0, 1], k=3)
    assert fluent[0].shape == (4, 3) and fluent[1].shape == (2, 3)
    assert (fluent[0][0] == -1).all()   # nothing predicts the first position
    logits = model.get_base_model()(input_ids=ids[:1]).logits[0]
    assert set(fluent[0][2].tolist()) == set(logits[1].topk(3).indices.tolist())   # position 2 from position 1


def test_dataset_card_has_hugging_face_front_matter(gcg_run):
    import yaml
    from huggingface_hub import DatasetCard

    out, _ = gcg_run
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "cc-by-sa-4.0" and meta["language"] == ["en"] and meta["size_categories"] == ["n<1K"]
    assert meta["task_categories"] == ["text-generation"] and meta["source_datasets"] == ["allenai/ai2_arc"]
    assert meta["tags"] == ["dataset-distillation", "trajectory-matching"] and "4 samples" in meta["pretty_name"]
    assert meta["configs"] == [{"config_name": "default",
                                "data_files": [{"split": "train", "path": "distilled.jsonl"}]}]
    assert DatasetCard(card).data.license == "cc-by-sa-4.0"   # the Hub's own parser reads it
    assert "# Distilled dataset (textdistill)" in card and "Licence: cc-by-sa-4.0" in card


def test_distilled_set_exports_as_a_datasets_folder(gcg_run, tmp_path):
    import datasets

    from textdistill.cli import main
    from textdistill.data import load_examples

    out, _ = gcg_run
    saved = tmp_path / "distilled"
    assert main(["export", "--distilled", str(out), "--output", str(saved)]) == 0
    table = datasets.load_from_disk(str(saved))
    assert table.to_list() == [{"prompt": r["prompt"], "response": r["response"]} for r in _rows(out)]
    assert [e.prompt for e in load_examples(str(saved))] == [r["prompt"] for r in _rows(out)]


def test_resuming_a_finished_run_changes_nothing_and_says_so(gcg_run, experts_dir):
    out, summary = gcg_run
    config = dataclasses.replace(FAST, iterations=6, search=TokenSearchSettings(top_k=16, candidates=4))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.warns(UserWarning, match="finished distillation of 6 iterations; nothing to resume"):
        again = distill(experts=experts_dir, output=out, config=config, resume=True, device="cpu", progress=False)
    assert again == json.loads((out / "summary.json").read_text())
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_report_to_tensorboard_mirrors_the_search(experts_dir, tmp_path):
    """The matching loss, lr and changed tokens of every iteration also go to TensorBoard (<output>/runs/)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    distill(experts=experts_dir, output=out, config=dataclasses.replace(FAST, iterations=2, report_to=("tensorboard",)),
            device="cpu", progress=False)
    events = EventAccumulator(str(out / "runs")).Reload()
    assert {"distill/matching_loss", "distill/lr", "distill/tokens_changed_fraction"} <= set(events.Tags()["scalars"])
    logged = [m["matching_loss"] for m in _metrics(out)]
    assert [e.value for e in events.Scalars("distill/matching_loss")] == pytest.approx(logged)
