"""The distillation run: it learns, resumes exactly, refuses bad inputs, and writes a loadable dataset."""

from __future__ import annotations

import json

import pytest
import torch

from textdistill.artifacts import load_tensors, read_json
from textdistill.config import DataSettings, LoraSettings, TrainConfig
from textdistill.distill import DistillConfig, RegularizerSettings, distill
from textdistill.errors import ConfigError, TrajectoryError
from textdistill.experts import ExpertsConfig, make_experts

RECIPE = TrainConfig(optimizer="sgd", lr=0.5, schedule="constant", warmup_ratio=0.0, max_steps=4, batch_size=4,
                     max_grad_norm=None, lora=LoraSettings(r=2, alpha=4), data=DataSettings(max_length=48, limit=12))
FAST = DistillConfig(budget="4", iterations=4, syn_steps=2, batch_size=2, checkpoint_every=2, lr_embeddings=1e-2)


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory, tiny_llama_dir):
    out = tmp_path_factory.mktemp("experts")
    make_experts(model_name=str(tiny_llama_dir), data="arc-easy:train", output=out, device="cpu", progress=False,
                 config=ExpertsConfig(num_experts=2, snapshot_every=2, train=RECIPE))
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, experts_dir):
    out = tmp_path_factory.mktemp("distill-full")
    summary = distill(experts=experts_dir, output=out, config=FAST, device="cpu", progress=False)
    return out, summary


def test_run_folder_and_dataset(full_run):
    out, summary = full_run
    import datasets

    table = datasets.load_dataset("json", data_files=str(out / "distilled.jsonl"), split="train")
    assert len(table) == 4 and {"prompt", "response", "prompt_token_ids", "token_distance"} <= set(table.column_names)
    assert all(r.strip() for r in table["response"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["lr"] > 0 for m in metrics)
    assert read_json(out / "run.json")["config"]["budget"] == "4"
    assert "Distilled dataset" in (out / "README.md").read_text()
    tensors = load_tensors(out / "embeddings.safetensors")
    assert tensors["prompt_embeds"].shape[0] == 4 and float(tensors["lr"]) > 0


def test_embeddings_and_lr_actually_move(full_run, experts_dir):
    out, _ = full_run
    learned = load_tensors(out / "state.safetensors")
    init = read_json(out / "init.json")
    assert len(init["indices"]) == 4
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["lr"] != metrics[0]["lr"]
    assert metrics[-1]["nearest_distance"] > metrics[0]["nearest_distance"]  # prompts left the token grid
    assert torch.isfinite(learned["prompt_embeds"]).all()


def test_resume_gives_the_same_embeddings(full_run, experts_dir, tmp_path):
    out, _ = full_run
    half = tmp_path / "half"
    distill(experts=experts_dir, output=half, config=DistillConfig(**{**FAST.__dict__, "iterations": 2}),
            device="cpu", progress=False)
    distill(experts=experts_dir, output=half, config=FAST, resume=True, device="cpu", progress=False)
    a = load_tensors(out / "embeddings.safetensors")
    b = load_tensors(half / "embeddings.safetensors")
    assert torch.equal(a["prompt_embeds"], b["prompt_embeds"]) and torch.equal(a["lr"], b["lr"])
    assert (half / "metrics.jsonl").read_text() .count("\n") == 4


def test_existing_run_needs_resume_and_bad_budget_fails_early(full_run, experts_dir, tmp_path):
    out, _ = full_run
    with pytest.raises(ConfigError, match="pass --resume"):
        distill(experts=experts_dir, output=out, config=FAST, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="larger than the pool"):
        distill(experts=experts_dir, output=tmp_path / "x", config=DistillConfig(budget="500"), device="cpu",
                progress=False)
    assert not (tmp_path / "x" / "state.json").exists()


def test_straight_through_and_no_regularizer_run(experts_dir, tmp_path):
    for mode in ("straight_through", "off"):
        config = DistillConfig(**{**FAST.__dict__, "iterations": 1, "regularizer": RegularizerSettings(mode=mode)})
        summary = distill(experts=experts_dir, output=tmp_path / mode, config=config, device="cpu", progress=False)
        assert summary["samples"] == 4


def test_pool_changed_since_experts_is_refused(experts_dir, tmp_path):
    import shutil

    copy = tmp_path / "experts"
    shutil.copytree(experts_dir, copy)
    manifest = read_json(copy / "manifest.json")
    manifest["pool_sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrajectoryError, match="differs from the one the experts were trained on"):
        distill(experts=copy, output=tmp_path / "d", config=FAST, device="cpu", progress=False)


def test_rerank_with_top_1_equals_plain_projection(experts_dir, tmp_path):
    # re-ranking among the single nearest token must give exactly the plain nearest-token projection
    for name, k in (("plain", None), ("top1", 1)):
        config = DistillConfig(**{**FAST.__dict__, "iterations": 1, "rerank_top_k": k})
        distill(experts=experts_dir, output=tmp_path / name, config=config, device="cpu", progress=False)
    plain, top1 = ([json.loads(x)["prompt_token_ids"] for x in (tmp_path / n / "distilled.jsonl").read_text().splitlines()]
                   for n in ("plain", "top1"))
    assert plain == top1


def test_resume_with_other_settings_is_refused(full_run, experts_dir):
    out, _ = full_run
    with pytest.raises(ConfigError, match="other settings or samples"):
        distill(experts=experts_dir, output=out, config=DistillConfig(**{**FAST.__dict__, "seed": 1, "iterations": 6}),
                resume=True, device="cpu", progress=False)


def test_gemma_bos_row_stays_fixed_and_is_not_in_the_text(tmp_path, tiny_gemma_dir):
    experts = tmp_path / "experts"
    make_experts(model_name=str(tiny_gemma_dir), data="arc-easy:train", output=experts, device="cpu", progress=False,
                 config=ExpertsConfig(num_experts=1, snapshot_every=2, train=RECIPE))
    out = tmp_path / "d"
    distill(experts=experts, output=out, config=DistillConfig(**{**FAST.__dict__, "iterations": 2}), device="cpu",
            progress=False)
    from textdistill.models import load_model
    from textdistill.projection import input_embedding_matrix

    model = load_model(str(tiny_gemma_dir), device="cpu")
    bos_row = input_embedding_matrix(model)[model.config.bos_token_id]
    tensors = load_tensors(out / "embeddings.safetensors")
    assert (tensors["fixed_prefix"] == 1).all()
    assert torch.equal(tensors["prompt_embeds"][:, 0], bos_row.expand_as(tensors["prompt_embeds"][:, 0]))
    rows = [json.loads(x) for x in (out / "distilled.jsonl").read_text().splitlines()]
    assert all(not r["prompt"].startswith("<bos>") for r in rows)


def test_initial_samples_differ_from_the_random_baseline_of_the_same_seed(full_run):
    from textdistill.selection import random_indices

    out, _ = full_run
    init = read_json(out / "init.json")["indices"]
    assert sorted(init) != random_indices(12, 4, FAST.seed)
