"""Typed configs: YAML + overrides, unknown keys and bad values rejected, frozen after loading."""

from __future__ import annotations

import dataclasses

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
