"""The command line: each subcommand on a tiny local model folder, and one-line errors for user mistakes."""

from __future__ import annotations

import json

from textdistill.cli import main


def test_unknown_named_model_is_one_line_error(capsys):
    assert main(["assets", "path", "llama-9000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("textdistill: error: unknown named model 'llama-9000'") and err.count("\n") == 1


def test_eval_writes_json_with_top_level_metrics(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_llama_dir), "--task", "arc-easy", "--split", "validation",
                 "--limit", "4", "--num-fewshot", "1", "--output", str(out), "--no-progress", "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 4 and 0 <= result["acc"] <= 1 and 0 <= result["acc_norm"] <= 1
    assert "arc-easy:validation (rc, 1-shot)" in capsys.readouterr().out


def test_eval_wrong_split_is_one_line_error(tiny_llama_dir, capsys):
    assert main(["eval", "--model", str(tiny_llama_dir), "--task", "mmlu", "--split", "train"]) == 2
    assert "has no split 'train'" in capsys.readouterr().err


def test_train_select_and_missing_data(tiny_llama_dir, tmp_path, capsys):
    selection = tmp_path / "sel.json"
    assert main(["select", "--method", "random", "--data", "arc-easy:train", "--budget", "1%", "--seed", "3",
                 "--output", str(selection)]) == 0
    assert len(json.loads(selection.read_text())["indices"]) == 23
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", "arc-easy:train", "--selection", str(selection),
                 "--max-steps", "2", "--batch-size", "4", "--output", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["examples"] == 23
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(tmp_path / "nope.jsonl"),
                 "--output", str(tmp_path / "x")]) == 2
    assert "dataset not found" in capsys.readouterr().err


def test_experiment_set_overrides_and_bad_set_is_one_line_error(tmp_path, capsys):
    from textdistill.cli import _parse_sets

    assert _parse_sets(["seeds=[0]", "target.limit=100", "models=[a, b]"]) == {
        "seeds": [0], "target.limit": 100, "models": ["a", "b"]}
    assert main(["experiment", "demo", "--output", str(tmp_path / "o"), "--set", "seeds"]) == 2
    assert "--set expects KEY=VALUE" in capsys.readouterr().err
    assert main(["experiment", "demo", "--output", str(tmp_path / "o"), "--set", "methods=[magic]"]) == 2
    assert "unknown method(s) magic" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_demo_dispatches_the_demo_preset(tmp_path, monkeypatch, capsys):
    import textdistill.assets as assets
    import textdistill.experiment as experiment

    calls = []
    monkeypatch.setattr(assets, "is_converted", lambda name: True)
    monkeypatch.setattr(experiment, "run_experiment", lambda config, output, **kw: calls.append((config, output, kw))
                        or [{"model": "m", "method": "base", "budget": "", "acc": 0.5, "acc_norm": 0.4}])
    assert main(["demo", "--output", str(tmp_path / "d"), "--no-progress"]) == 0
    (config, output, kw), = calls
    assert config.name == "demo" and str(output) == str(tmp_path / "d") and kw["progress"] is False
    assert "| m | base | - | 0.5000 | 0.4000 | 1 |" in capsys.readouterr().out
