"""Expert trajectories: snapshots, manifest, skipping finished experts, compatibility checks."""

from __future__ import annotations

import dataclasses

import pytest

from textdistill.config import DataSettings, LoraSettings, TrainConfig
from textdistill.errors import TrajectoryError
from textdistill.experts import ExpertsConfig, check_compatible, load_experts, make_experts
from textdistill.models import load_model, load_tokenizer, model_identity

TINY_RECIPE = TrainConfig(optimizer="sgd", lr=0.5, schedule="constant", warmup_ratio=0.0, max_steps=4, batch_size=4,
                          max_grad_norm=None, lora=LoraSettings(r=2, alpha=4),
                          data=DataSettings(max_length=64, limit=16))


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory, tiny_llama_dir):
    out = tmp_path_factory.mktemp("experts")
    make_experts(model_name=str(tiny_llama_dir), data="arc-easy:train", output=out, device="cpu", progress=False,
                 config=ExpertsConfig(num_experts=2, snapshot_every=2, train=TINY_RECIPE))
    return out


def test_snapshots_and_manifest(experts_dir, tiny_llama_dir):
    trajectories = load_experts(experts_dir)
    manifest = trajectories.manifest
    assert manifest["snapshot_steps"] == [0, 2, 4]
    assert len(trajectories.snapshots) == 2 and trajectories.num_snapshots == 3
    for key in ("model", "lora", "pool_sha256", "optimizer", "lr", "batch_size", "data"):
        assert key in manifest
    assert manifest["pool_size"] == 16 and manifest["optimizer"] == "sgd"
    first, last = trajectories.load(0, 0), trajectories.load(0, 2)
    assert set(first) == set(last) and all("lora_" in k for k in first)
    # the trajectory moves; the two experts differ (seeds)
    assert any((first[k] - last[k]).abs().max() > 0 for k in first)
    other = trajectories.load(1, 2)
    assert any((other[k] - last[k]).abs().max() > 0 for k in first)


def test_rerun_skips_finished_experts(experts_dir, tiny_llama_dir):
    files = sorted(p for p in experts_dir.rglob("*") if p.is_file() and p.name != ".lock")
    before = {p: p.stat().st_mtime_ns for p in files}
    with pytest.warns(UserWarning, match="all 2 experts are finished; nothing to do"):
        make_experts(model_name=str(tiny_llama_dir), data="arc-easy:train", output=experts_dir, device="cpu",
                     progress=False, config=ExpertsConfig(num_experts=2, snapshot_every=2, train=TINY_RECIPE))
    assert {p: p.stat().st_mtime_ns for p in files} == before   # nothing rewritten, run.json included


def test_rerun_with_another_recipe_is_refused(experts_dir, tiny_llama_dir):
    with pytest.raises(TrajectoryError, match="different 'lr'"):
        make_experts(model_name=str(tiny_llama_dir), data="arc-easy:train", output=experts_dir, device="cpu",
                     progress=False, config=ExpertsConfig(num_experts=2, snapshot_every=2,
                                                          train=dataclasses.replace(TINY_RECIPE, lr=0.1)))


def test_mismatched_model_tokenizer_or_lora_is_refused(experts_dir, tiny_llama_dir, tiny_gemma_dir):
    trajectories = load_experts(experts_dir)
    from textdistill.models import add_lora
    from textdistill.unroll import lora_parameters

    gemma = load_model(str(tiny_gemma_dir), device="cpu")
    gemma_identity = model_identity("gemma", gemma, load_tokenizer(str(tiny_gemma_dir)))
    llama = load_model(str(tiny_llama_dir), device="cpu")
    identity = model_identity("llama", llama, load_tokenizer(str(tiny_llama_dir)))
    shapes = {k: tuple(v.shape) for k, v in lora_parameters(add_lora(llama, LoraSettings(r=2, alpha=4))).items()}
    check_compatible(trajectories, identity, shapes)  # the right model passes
    with pytest.raises(TrajectoryError, match="another base model"):
        check_compatible(trajectories, gemma_identity, shapes)
    with pytest.raises(TrajectoryError, match="another tokenizer"):
        check_compatible(trajectories, dataclasses.replace(identity, tokenizer_fingerprint="0" * 16), shapes)
    wider = {k: (v[0] * 2, v[1]) if "lora_A" in k else (v[0], v[1] * 2) for k, v in shapes.items()}
    with pytest.raises(TrajectoryError, match="do not match this model's LoRA"):
        check_compatible(trajectories, identity, wider)


def test_not_an_experts_folder(tmp_path):
    with pytest.raises(TrajectoryError, match="no manifest.json"):
        load_experts(tmp_path)
