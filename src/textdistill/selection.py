"""Selection at a budget: budgets, random rows, ranking by score, and the selection files that training and
distillation accept.

A selection file is JSON: ``{"method", "data", "budget", "seed", "pool_size", "indices", "ids", "scores"}``;
``indices`` point into the examples of ``data`` in load order and ``ids`` double-check them.

Methods: ``random`` (``budget`` distinct rows drawn with ``seed``, indices sorted; :func:`select_random`, the entry
of ``textdistill select --method random``), ``less`` (:func:`textdistill.less.select_less`) and ``match``
(:func:`textdistill.match_selection.select_by_matching`). Training reads selection files from here and LESS trains,
so this module imports neither (no import cycle).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor

from .artifacts import atomic_write_json, read_json, sha256_json
from .data import Example
from .errors import ConfigError, DataError


def resolve_budget(budget: str | int | float, pool_size: int) -> int:
    """A budget given as a count (``113``) or a percentage of the pool (``"5%"``) as a count of samples.

    Raises ConfigError when it is not positive or larger than the pool.
    """
    text = str(budget).strip()
    try:
        value = float(text[:-1] if text.endswith("%") else text)
    except ValueError:
        raise ConfigError(f"budget '{budget}' is neither a count nor a percentage like 5%; give e.g. 113 or "
                          f"5%") from None
    if not math.isfinite(value):
        raise ConfigError(f"budget '{budget}' is neither a count nor a percentage like 5%; give e.g. 113 or 5%")
    if text.endswith("%"):
        fraction = value / 100.0
        if not 0 < fraction <= 1:
            raise ConfigError(f"budget {text} must be in (0%, 100%]; give a percentage such as 5%")
        count = max(1, int(round(fraction * pool_size)))
    else:
        if value != int(value):
            raise ConfigError(f"budget {text} must be a whole count or a percentage like 5%; round it, e.g. "
                              f"{max(1, round(value))}, or add %")
        count = int(value)
    if count <= 0:
        raise ConfigError(f"budget must be positive, got {budget}; give a count of at least 1 or a percentage "
                          f"like 5%")
    if count > pool_size:
        raise ConfigError(f"budget {budget} ({count} samples) is larger than the pool ({pool_size} samples); give "
                          f"at most {pool_size} or a percentage like 5%")
    return count


def random_indices(pool_size: int, count: int, seed: int) -> list[int]:
    """``count`` distinct pool indices drawn with ``seed`` (sorted)."""
    return sorted(random.Random(seed).sample(range(pool_size), count))


def select_random(*, data: str, budget: str | int, output: str | Path, seed: int = 0,
                  examples: Sequence[Example] | None = None, data_settings: Any | None = None) -> dict[str, Any]:
    """Entry of ``textdistill select --method random``: ``budget`` distinct rows of ``data`` drawn with ``seed``,
    written as a selection file. ``examples`` are the already loaded rows of ``data`` (else it is loaded with
    ``data_settings``). Returns ``{"count", "indices", "scores": None}``."""
    from .data import load_examples

    pool = list(examples) if examples is not None else load_examples(data, data_settings)
    if not pool:
        raise DataError(f"dataset '{data}' is empty")
    count = resolve_budget(budget, len(pool))
    indices = random_indices(len(pool), count, seed)
    write_selection(output, method="random", data=data, budget=budget, seed=seed, examples=pool, indices=indices)
    return {"count": count, "indices": indices, "scores": None}


def pool_ids_hash(examples: Sequence[Example]) -> str:
    """Hash of the ordered ids of a whole pool: tells whether a selection file was made on this very pool."""
    return sha256_json([str(e.id) for e in examples])


def write_selection(path: str | Path, *, method: str, data: str, budget: str | int, seed: int,
                    examples: Sequence[Example], indices: Sequence[int], scores: Sequence[float] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a selection file atomically."""
    record = {"method": method, "data": data, "budget": str(budget), "seed": seed, "pool_size": len(examples),
              "pool_ids_sha256": pool_ids_hash(examples),
              "count": len(indices), "indices": list(map(int, indices)), "ids": [examples[i].id for i in indices],
              "scores": list(map(float, scores)) if scores is not None else None}
    if extra:
        record.update(extra)
    return atomic_write_json(path, record)


def read_selection(path: str | Path) -> dict[str, Any]:
    """Read and validate a selection file: ``indices`` (distinct whole numbers) and ``ids`` of the same length."""
    record = read_json(path)
    remake = "make it again with textdistill select"
    if not isinstance(record, dict):
        raise DataError(f"{path} is not a selection file (a JSON object with 'indices' and 'ids'); {remake}")
    for key in ("indices", "ids"):
        if key not in record or not isinstance(record[key], list):
            raise DataError(f"{path} is not a selection file: missing '{key}'; {remake}")
    if len(record["indices"]) != len(record["ids"]):
        raise DataError(f"{path}: 'indices' and 'ids' have different lengths; {remake}")
    first: dict[int, int] = {}
    for position, index in enumerate(record["indices"]):
        if isinstance(index, bool) or not isinstance(index, int):
            raise DataError(f"{path}: indices[{position}] is {index!r}, not a row number; {remake}")
        if index in first:
            raise DataError(f"{path}: index {index} is listed twice (indices[{first[index]}] and "
                            f"indices[{position}]); a selection lists each row once: {remake}")
        first[index] = position
    return record


def apply_selection(examples: Sequence[Example], selection: str | Path) -> list[Example]:
    """The examples a selection file lists, checking that its ids match this dataset and, when the file records
    them, that it was made on this very pool (its size and row ids)."""
    record = read_selection(selection)
    chosen = []
    for index, expected_id in zip(record["indices"], record["ids"]):
        if not 0 <= index < len(examples):
            raise DataError(f"{selection}: index {index} is outside the dataset ({len(examples)} rows; was it "
                            f"made for another dataset?): select again on this one")
        if str(examples[index].id) != str(expected_id):
            raise DataError(f"{selection}: row {index} has id '{examples[index].id}', the selection expects "
                            f"'{expected_id}' (was it made for another dataset?); select again on this one")
        chosen.append(examples[index])
    if not chosen:
        raise DataError(f"{selection} selects no rows; select again with a positive budget")
    made_on = f"'{record['data']}'" if record.get("data") else "another pool"
    if isinstance(record.get("pool_size"), int) and record["pool_size"] != len(examples):
        raise DataError(f"{selection} was made on a pool of {record['pool_size']} rows ({made_on}), this dataset "
                        f"has {len(examples)}: select again on this dataset, or use the data it was made on")
    if isinstance(record.get("pool_ids_sha256"), str) and record["pool_ids_sha256"] != pool_ids_hash(examples):
        raise DataError(f"{selection} was made on another pool of {len(examples)} rows ({made_on}; the row ids "
                        f"differ): select again on this dataset, or use the data it was made on")
    return chosen


def reselect(source: str | Path, budget: str | int, output: str | Path, examples: Sequence[Example]) -> dict[str, Any]:
    """A LESS selection at another ``budget``, cut from the ``all_scores`` of an earlier LESS selection file.

    LESS scores do not depend on the budget, so one scoring run serves every budget (the costly part is the
    gradients). ``examples`` are the pool rows the source was scored on: their count and ids must match, and the
    rows the source excluded as evaluation overlap stay excluded. Writes ``output`` (with ``reselected_from``) and
    returns ``{"count", "indices", "scores"}``.
    """
    record = read_selection(source)
    scores = record.get("all_scores")
    if record.get("method") != "less" or not isinstance(scores, list):
        raise DataError(f"{source} is not a LESS selection with 'all_scores'; it cannot be cut to another budget")
    if len(scores) != len(examples) or record.get("pool_size") != len(examples):
        raise DataError(f"{source} scored {len(scores)} rows, the pool has {len(examples)}: another dataset?")
    if record.get("pool_ids_sha256", pool_ids_hash(examples)) != pool_ids_hash(examples):
        raise DataError(f"{source} was scored on another pool of {len(examples)} rows (its row ids differ)")
    for index, expected_id in zip(record["indices"], record["ids"]):
        if str(examples[index].id) != str(expected_id):
            raise DataError(f"{source}: row {index} has id '{examples[index].id}', the scores expect '{expected_id}'")
    # rows excluded as evaluation overlap, and rows without a score (NaN/inf gradients), stay excluded
    excluded_ids = {str(i) for i in record.get("excluded_eval_overlap", [])}
    exclude = [i for i, example in enumerate(examples) if str(example.id) in excluded_ids or scores[i] is None]
    count = resolve_budget(budget, len(examples))
    if count > len(examples) - len(exclude):
        raise ConfigError(f"budget {budget} ({count} rows) is larger than the {len(examples) - len(exclude)} pool rows "
                          f"left after removing {len(exclude)} that repeat evaluation prompts or have no score; give "
                          f"at most {len(examples) - len(exclude)}")
    indices = top_indices(scores, count, exclude=exclude)
    kept = {k: v for k, v in record.items()
            if k not in ("method", "data", "budget", "seed", "pool_size", "count", "indices", "ids", "scores")}
    kept["reselected_from"] = str(source)
    write_selection(output, method="less", data=record.get("data", ""), budget=budget, seed=record.get("seed", 0),
                    examples=examples, indices=indices, scores=[scores[i] for i in indices], extra=kept)
    return {"count": count, "indices": indices, "scores": [scores[i] for i in indices]}


def top_indices(scores: Tensor | Sequence[float], count: int, *, exclude: Sequence[int] = ()) -> list[int]:
    """The ``count`` highest-scoring indices, best first (ties: lower index first), never one in ``exclude``."""
    # a missing (None) or NaN score ranks last; callers exclude those rows anyway
    values = [float(s) if s is not None and not math.isnan(float(s)) else -math.inf
              for s in (scores.tolist() if isinstance(scores, Tensor) else scores)]
    banned = set(exclude)
    ranked = sorted((i for i in range(len(values)) if i not in banned), key=lambda i: (-values[i], i))
    if len(ranked) < count:
        raise ConfigError(f"only {len(ranked)} rows can be selected, {count} requested")
    return ranked[:count]

