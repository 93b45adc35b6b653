"""Artifacts people can reuse: every trained experiment cell keeps its LoRA adapter, which reloads with peft and
scores as the trained model did; `export` merges it into its base model as a plain Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from textdistill.cli import main
from textdistill.experiment import _cell_dir, load_experiment_config, run_experiment
from textdistill.models import load_model


@pytest.fixture(scope="module")
def cell(tmp_path_factory, tiny_llama_dir):
    """One trained `random` cell, and the log-likelihoods its in-memory model gave a few target items."""
    import textdistill.evaluation as evaluation

    body = {"pool": "arc-easy:train", "pool_limit": 16, "target": {"task": "arc-easy", "split": "validation",
                                                                   "limit": 4},
            "distill_model": str(tiny_llama_dir), "models": [str(tiny_llama_dir)], "budgets": ["4"],
            "methods": ["random"], "seeds": [0],
            # a large lr, so that the adapter moves the logits far more than the tolerances below
            "recipe": {"max_steps": 3, "lr": 0.05, "batch_size": 2, "lora": {"r": 2, "alpha": 4},
                       "data": {"max_length": 64}}}
    path = tmp_path_factory.mktemp("cell") / "exp.yaml"
    path.write_text(yaml.safe_dump({"experiment": body}))
    config = load_experiment_config(str(path))
    requests = evaluation.build_requests(config.target)
    trained: list = []
    original = evaluation.evaluate_with_records   # what a cell scores its trained model with

    def scoring(model, tokenizer, eval_config, progress=False):
        trained.extend(evaluation.score_requests(model, tokenizer, requests, progress=False))
        return original(model, tokenizer, eval_config, progress=progress)

    out = path.parent / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation, "evaluate_with_records", scoring)
        (row,) = run_experiment(config, out, device="cpu", progress=False)
    assert trained, "the cell did not score its model through evaluate_with_records"
    return {"row": row, "adapter": out / row["adapter"], "requests": requests, "trained": trained}


def test_a_cell_keeps_its_adapter_and_it_scores_as_the_trained_model(cell, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import textdistill.evaluation as evaluation
    from textdistill.models import load_tokenizer

    adapter = cell["adapter"]
    assert cell["row"]["adapter"] == str(_cell_dir(Path(), str(tiny_llama_dir), "random", "4", 0) / "adapter")
    assert (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama_dir.resolve())
    assert json.loads((adapter / "base_model.json").read_text())["path"] == str(tiny_llama_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    scores = evaluation.score_requests(reloaded, load_tokenizer(str(tiny_llama_dir)), cell["requests"],
                                       progress=False)
    for got, want in zip(scores, cell["trained"], strict=True):
        assert got.loglik == pytest.approx(want.loglik, rel=1e-5, abs=1e-5)


def test_export_writes_a_plain_model_with_the_adapters_logits(cell, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["export", "--model", str(tiny_llama_dir), "--adapter", str(cell["adapter"]), "--output", str(out),
                 "--device", "cpu"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer("Question: Which gas do plants take in?\nAnswer: carbon dioxide")["input_ids"]])
    with torch.no_grad():
        want = load_model(str(tiny_llama_dir), device="cpu", adapter=cell["adapter"])(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        base = load_model(str(tiny_llama_dir), device="cpu")(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - base).abs().max() > 1e-3   # the adapter really changes the model


def test_bad_exports_fail_in_one_line_and_write_nothing(cell, tiny_llama_dir, tiny_gemma_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    cases = [
        (["--model", str(tiny_llama_dir), "--adapter", str(tmp_path / "missing"), "--output", str(out)],
         "adapter folder not found"),
        (["--model", str(tiny_llama_dir), "--adapter", str(empty), "--output", str(out)], "no adapter_config.json"),
        (["--model", str(tiny_gemma_dir), "--adapter", str(cell["adapter"]), "--output", str(out)],
         f"is an adapter for '{tiny_llama_dir.resolve()}', not for"),
        (["--model", str(tiny_llama_dir), "--adapter", str(cell["adapter"]), "--output", str(taken)],
         "exists and is not empty"),
        (["--distilled", str(empty), "--output", str(out)], "has no distilled.jsonl"),
        (["--adapter", str(cell["adapter"]), "--output", str(out)], "export takes --model M --adapter DIR"),
    ]
    for args, message in cases:
        assert main(["export", *args]) == 2
        error = capsys.readouterr().err
        assert error.startswith("textdistill: error: ") and message in error and error.count("\n") == 1, error
    assert not out.exists() and [p.name for p in taken.iterdir()] == ["keep.txt"]
