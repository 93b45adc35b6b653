"""Data loaders, templates, user files and tokenization."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import mc_rows, requires_data, write_jsonl
from textdistill import data
from textdistill.config import DataSettings, EvalConfig, TaskFields
from textdistill.errors import ConfigError, DataError, TextDistillError


@requires_data
def test_arc_easy_and_mmlu_split_sizes_are_the_official_ones():
    assert [len(data.load_task("arc-easy", s)) for s in ("train", "validation", "test")] == [2251, 570, 2376]
    assert len(data.load_task("mmlu", "test")) == 14042
    assert len(data.load_task("mmlu", "dev")) == 285
    assert len(data.mmlu_subjects()) == 57


@requires_data
def test_arc_items_are_well_formed():
    items = data.load_task("arc-easy", "validation")
    assert len({i.id for i in items}) == len(items)
    for item in items[:50]:
        assert 0 <= item.gold < len(item.choices)
        assert item.query == f"Question: {item.question}\nAnswer:"


@requires_data
def test_mmlu_subject_filter_and_limit():
    items = data.load_task("mmlu", "test", subjects=["anatomy"])
    assert len(items) == 135 and {i.subject for i in items} == {"anatomy"}
    assert len(data.load_task("mmlu", "test", subjects=["anatomy"], limit=7)) == 7
    with pytest.raises(DataError, match="unknown MMLU subject"):
        data.load_task("mmlu", "test", subjects=["astrology"])


@requires_data
def test_pool_contains_no_eval_question_and_reports_removals():
    items, report = data.load_mcqa_pool(["arc-easy", "arc-challenge", "openbookqa"])
    banned = data.eval_question_keys()
    assert not [i for i in items if data._question_key(i.question) in banned]
    assert report.removed > 0  # ARC train splits do overlap the eval splits a little
    assert report.total == len(items)
    assert len({i.id for i in items}) == len(items)


@requires_data
def test_wrong_split_and_unknown_task_raise_clear_errors():
    with pytest.raises(DataError, match="has no split 'dev'"):
        data.load_task("arc-easy", "dev")
    with pytest.raises(DataError, match="unknown task"):
        data.load_task("arc-medium", "test")


def test_named_tasks_are_one_registry():
    assert list(data.TASKS) == ["arc-easy", "arc-challenge", "mmlu"]
    assert [(t.fewshot_split, t.template, t.by_subject) for t in data.TASKS.values()] == [
        ("train", "rc", False), ("train", "rc", False), ("dev", "rc", True)]
    assert EvalConfig(task="mmlu").template is None
    assert data.with_task_template(EvalConfig(task="mmlu")).template == "rc"
    assert data.with_task_template(EvalConfig(template="mc")).template == "mc"
    with pytest.raises(DataError, match=r"unknown task 'gsm8k'; named tasks: arc-easy, arc-challenge, mmlu, or give"):
        data.get_task("gsm8k")
    with pytest.raises(ConfigError, match="field names only apply to a task read from a file"):
        data.get_task("arc-easy", TaskFields(question="q"))


def test_file_task_reads_jsonl_csv_parquet_and_datasets_folders_alike(tmp_path):
    import datasets

    rows = mc_rows(10)
    items = data.load_task(str(write_jsonl(tmp_path / "mc.jsonl", rows)), "test")
    assert [(i.id, i.question, len(i.choices), i.gold) for i in items[:2]] == [
        ("0", "Which thing did child number 0 pick?", 3, 0), ("1", "Which thing did child number 1 pick?", 4, 3)]
    assert items[0].query == "Question: Which thing did child number 0 pick?\nAnswer:"
    assert data.item_continuations(items[0], "rc") == (" red ball", " green ball", " blue ball")
    # a CSV cell holds the choices as a JSON list and the answer as text
    csv_file = tmp_path / "mc.csv"
    csv_file.write_text("question,choices,answer\n" + "".join(
        f'"{r["question"]}","{json.dumps(r["choices"]).replace(chr(34), chr(34) * 2)}",{r["answer"]}\n' for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "mc.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "folder"))
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "splits"))
    for source in ("mc.csv", "mc.parquet", "folder"):
        assert data.load_task(str(tmp_path / source), "test") == [
            dataclasses.replace(i, source=str(tmp_path / source)) for i in items], source
    assert len(data.load_task(str(tmp_path / "splits"), "validation")) == 10
    with pytest.raises(DataError, match="has no split 'test'; splits: validation"):
        data.load_task(str(tmp_path / "splits"), "test")
    # the answer as an index, a letter or the choice's text gives the same items; other field names
    for answer_as in ("letter", "text"):
        other = data.load_task(str(write_jsonl(tmp_path / f"{answer_as}.jsonl", mc_rows(10, answer_as))), "test")
        assert [i.gold for i in other] == [i.gold for i in items]
    renamed = [{"q": r["question"], "options": r["choices"], "label": r["answer"]} for r in rows]
    fields = TaskFields(question="q", choices="options", answer="label")
    assert [i.gold for i in data.load_task(str(write_jsonl(tmp_path / "renamed.jsonl", renamed)), "test",
                                           fields=fields)] == [i.gold for i in items]


@pytest.mark.parametrize("row, message", [
    ({"choices": ["a", "b"], "answer": 0},
     r"row 1: missing field 'question' \(fields present: choices, answer; name it with --question-field, or "
     r"question: under fields \(eval, target\) or target_fields \(less\) in a config\)"),
    ({"question": "Q?", "choices": ["a", "b"], "answer": 2},
     r"row 1: field 'answer' 2 is out of range for 2 choices; give a 0-based index \(0-1\), a letter \(A-B\) or "
     r"the text of a choice"),
    ({"question": "Q?", "choices": ["a", "b"], "answer": "C"}, r"row 1: field 'answer' 'C' is out of range"),
    ({"question": "Q?", "choices": ["red", "blue"], "answer": "green"},
     r"row 1: field 'answer' 'green' is not among the choices \['red', 'blue'\]; give a 0-based index"),
    ({"question": "Q?", "choices": ["only"], "answer": 0},
     r"row 1: field 'choices' has 1 choice\(s\); a multiple-choice question needs at least 2: add choices or "
     r"drop the row"),
    ({"question": "Q?", "choices": "red or blue", "answer": 0},
     r"row 1: field 'choices' must be a list of choices \(in a CSV file a JSON list"),
    ({"question": "Q?", "choices": ["B", "A"], "answer": "A"},
     r"row 1: field 'answer' 'A' is ambiguous \(as text: choice 1, as letter: choice 0\); write it as a 0-based "
     r"index"),
])
def test_bad_task_files_give_one_line_errors_naming_file_row_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [mc_rows(1)[0], row])
    with pytest.raises(DataError, match=message) as caught:
        data.load_task(str(path), "test")
    assert str(caught.value).startswith(f"{path}: row 1: ") and "\n" not in str(caught.value)


def test_empty_or_missing_task_file_is_one_line_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl: no rows; a multiple-choice task needs rows with the fields "
                                         r"question, choices and answer"):
        data.load_task(str(empty), "test")
    with pytest.raises(TextDistillError, match="task file not found"):
        data.with_task_template(EvalConfig(task=str(tmp_path / "missing.jsonl")))


def _item():
    return data.MultipleChoiceItem(id="q1", question="What is 2+2?", choices=("3", "4"), gold=1,
                                   query="Question: What is 2+2?\nAnswer:", source="toy")


def test_templates():
    item = _item()
    assert data.item_to_example(item, "rc") == data.Example("Question: What is 2+2?\nAnswer:", " 4", "q1", "toy")
    assert data.item_prompt(item, "mc") == "Question: What is 2+2?\nA. 3\nB. 4\nAnswer:"
    assert data.item_continuations(item, "mc") == (" A", " B")
    ctx = data.build_context(item, "rc", [item])
    assert ctx == "Question: What is 2+2?\nAnswer: 4\n\nQuestion: What is 2+2?\nAnswer:"


def test_fewshot_is_seeded_and_excludes_the_question():
    pool = [data.MultipleChoiceItem(id=str(i), question=str(i), choices=("a", "b"), gold=0, query=str(i),
                                    source="toy") for i in range(20)]
    a = data.fewshot_examples(pool, 5, seed=3, exclude_id="4")
    assert a == data.fewshot_examples(pool, 5, seed=3, exclude_id="4")
    assert "4" not in {x.id for x in a}
    with pytest.raises(DataError, match="few-shot"):
        data.fewshot_examples(pool, 25, seed=0)


def test_user_jsonl_csv_and_messages(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"q": "Hi?", "a": "Hello"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Yo"}]}) + "\n")
    rows = data.load_examples(str(jsonl), DataSettings(prompt_field="q", response_field="a"))
    assert rows[0].prompt == "Hi?" and rows[0].response == "Hello"
    assert rows[1].prompt == "User: Hey\nAssistant:" and rows[1].response == " Yo"
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("prompt,response\nA?,B\n")
    assert data.load_examples(str(csv_file))[0].response == "B"


def test_bad_user_data_raises_one_clear_error_each(tmp_path):
    with pytest.raises(DataError, match="dataset not found"):
        data.load_examples(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        data.load_examples(str(empty))
    missing = tmp_path / "missing_field.jsonl"
    missing.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"row 0: missing field\(s\) response"):
        data.load_examples(str(missing))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "x", "response": "y"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: malformed JSON"):
        data.load_examples(str(broken))


def test_tokenization_masks_prompt_and_keeps_boundary(smollm_tokenizer, gemma_tokenizer):
    example = data.Example(prompt="Question: What is 2+2?\nAnswer:", response=" 4")
    for tok in (smollm_tokenizer, gemma_tokenizer):
        t = data.tokenize_example(tok, example, max_length=64)
        assert t.labels[: len(t.prompt_ids)] == [-100] * len(t.prompt_ids)
        assert t.labels[len(t.prompt_ids):] == list(t.response_ids)
        assert t.response_ids[-1] == tok.eos_token_id
        assert tok.decode(t.response_ids[:-1]) == " 4"
    # Gemma prepends BOS, SmolLM2 does not
    assert data.tokenize_example(gemma_tokenizer, example, max_length=64).prompt_ids[0] == gemma_tokenizer.bos_token_id
    assert data.tokenize_example(smollm_tokenizer, example, max_length=64).prompt_ids[0] != smollm_tokenizer.bos_token_id


def test_truncation_cuts_prompt_from_the_left(smollm_tokenizer):
    example = data.Example(prompt="word " * 100, response=" end")
    t = data.tokenize_example(smollm_tokenizer, example, max_length=16)
    assert len(t.input_ids) == 16
    assert smollm_tokenizer.decode(t.response_ids[:-1]) == " end"


def test_truncation_keeps_gemma_bos(gemma_tokenizer):
    example = data.Example(prompt="word " * 100, response=" end")
    t = data.tokenize_example(gemma_tokenizer, example, max_length=16)
    assert len(t.input_ids) == 16 and t.prompt_ids[0] == gemma_tokenizer.bos_token_id


def test_sample_is_a_seeded_subset_in_dataset_order(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f" a{i}", "id": str(i)}) + "\n"
                            for i in range(50)))
    full = data.load_examples(str(path))
    first = data.load_examples(str(path), DataSettings(sample=10))
    again = data.load_examples(str(path), DataSettings(sample=10))
    other = data.load_examples(str(path), DataSettings(sample=10, sample_seed=1))
    ids = [int(e.id) for e in first]
    assert ids == [int(e.id) for e in again] and ids == sorted(ids) and len(set(ids)) == 10
    assert ids != [int(e.id) for e in other] and ids != list(range(10))
    assert {e.id for e in first} <= {e.id for e in full}
    assert [e.id for e in data.load_examples(str(path), DataSettings(sample=10, limit=3))] == [e.id for e in first[:3]]
    with pytest.raises(DataError, match="data.sample asks for 51 rows"):
        data.load_examples(str(path), DataSettings(sample=51))
    with pytest.raises(ConfigError, match="data.sample must be a positive number"):
        DataSettings(sample=0)
