"""Selection at a budget: random rows, budgets, selection files (LESS has tests/test_less.py)."""

from __future__ import annotations

import json

import pytest

from textdistill.data import Example
from textdistill.errors import ConfigError, DataError
from textdistill.selection import (apply_selection, random_indices, read_selection, resolve_budget, select_random,
                                   write_selection)


def _rows(n: int) -> list[dict]:
    return [{"id": f"row{i}", "prompt": f"Question: what is the thing number {i}?\nAnswer:", "response": " this"}
            for i in range(n)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_random_selection_is_seeded_and_respects_budget(tmp_path):
    data = _write_jsonl(tmp_path / "pool.jsonl", _rows(20))
    first = select_random(data=data, budget="25%", output=tmp_path / "a.json", seed=5)
    again = select_random(data=data, budget="25%", output=tmp_path / "b.json", seed=5)
    other = select_random(data=data, budget="25%", output=tmp_path / "c.json", seed=6)
    assert first["count"] == 5 and first["indices"] == again["indices"] != other["indices"]
    assert len(set(first["indices"])) == 5 and all(0 <= i < 20 for i in first["indices"])
    counted = select_random(data=data, budget=7, output=tmp_path / "d.json", seed=5)
    assert counted["count"] == 7 == len(set(counted["indices"]))
    record = read_selection(tmp_path / "a.json")
    assert record["method"] == "random" and record["ids"] == [f"row{i}" for i in first["indices"]]
    assert random_indices(20, 20, 1) == list(range(20))
    assert resolve_budget("5%", 113) == 6 and resolve_budget(113, 113) == 113
    with pytest.raises(ConfigError, match="larger than the pool"):
        resolve_budget(114, 113)
    with pytest.raises(ConfigError, match="neither a count nor a percentage"):
        resolve_budget("lots", 10)


def test_apply_selection_refuses_another_dataset(tmp_path):
    pool = [Example(r["prompt"], r["response"], r["id"]) for r in _rows(10)]
    path = write_selection(tmp_path / "s.json", method="random", data="pool.jsonl", budget=3, seed=0,
                           examples=pool, indices=[1, 4, 7])
    assert [e.id for e in apply_selection(pool, path)] == ["row1", "row4", "row7"]
    other = [Example(e.prompt, e.response, f"other{i}") for i, e in enumerate(pool)]
    with pytest.raises(DataError, match="another dataset"):
        apply_selection(other, path)
    with pytest.raises(DataError, match="outside the dataset"):
        apply_selection(pool[:5], path)
