"""Typed configs: YAML + overrides, unknown keys and bad values rejected, frozen after loading."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from textdistill.config import TrainConfig, load_config
from textdistill.errors import ConfigError


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 0.001\n  lora: {r: 4, target_modules: [q_proj]}\n  data: {max_length: 64}\n")
    config = load_config(TrainConfig, path=path, section="train", overrides={"lora.alpha": 8, "seed": None})
    assert config.lr == 0.001 and config.lora.r == 4 and config.lora.alpha == 8
    assert config.lora.target_modules == ("q_proj",) and config.data.max_length == 64 and config.seed == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0  # type: ignore[misc]


def test_unknown_keys_and_bad_values_are_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lr: 0.1\nlearning_rate: 3\n")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) learning_rate"):
        load_config(TrainConfig, path=path)
    with pytest.raises(ConfigError, match="optimizer: must be one of"):
        load_config(TrainConfig, overrides={"optimizer": "lion"})
    with pytest.raises(ConfigError, match="lr must be positive"):
        load_config(TrainConfig, overrides={"lr": -1})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(TrainConfig, path=tmp_path / "nope.yaml")


def test_partial_nested_override_keeps_the_nested_default():
    from textdistill.experts import ExpertsConfig

    config = load_config(ExpertsConfig, overrides={"train.lr": 0.3, "train.data.limit": 10})
    assert (config.train.optimizer, config.train.schedule, config.train.max_grad_norm) == ("sgd", "constant", None)
    assert config.train.lr == 0.3 and config.train.data.limit == 10


def test_mmlu_comparison_keeps_its_splits_apart():
    """configs/mmlu-rc*.yaml: the recipe is chosen on MMLU validation, LESS and `performance` select for MMLU dev, and
    only the whole test split is reported; the tuning trains on the same pool sample the comparison's cells use."""
    from textdistill.experiment import load_experiment_config
    from textdistill.validity import load_validity_config

    root = Path(__file__).parents[1] / "configs"
    comparison = load_experiment_config(str(root / "mmlu-rc.yaml"))
    tuning = load_validity_config(str(root / "mmlu-rc-tuning.yaml"))
    target = comparison.target
    assert (target.task, target.split, target.template) == ("mmlu", "test", "rc")
    assert (target.limit, target.offset, target.item_set, target.per_subject_limit, target.subjects) == (None,) * 5
    validation = tuning.tuning.validation
    assert (validation.task, validation.split, validation.template, validation.limit) == ("mmlu", "validation", "rc",
                                                                                          None)
    assert comparison.less.target == comparison.performance.rows == "mmlu:dev"
    assert tuning.recipes == ("tuned",) and tuning.tuning_only
    assert tuning.pool == comparison.pool and tuning.recipe == comparison.recipe
    assert comparison.recipe.data.sample == 10000 and comparison.budgets == ("1%", "5%")
