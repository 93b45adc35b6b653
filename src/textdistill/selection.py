"""Data selection baselines at a budget, and selection files that training and distillation accept.

A selection file is JSON: ``{"method", "data", "budget", "seed", "pool_size", "indices", "ids", "scores"}``;
``indices`` point into the examples of ``data`` in load order and ``ids`` double-check them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

from .artifacts import atomic_write_json, read_json
from .data import Example
from .errors import ConfigError, DataError


def resolve_budget(budget: str | int | float, pool_size: int) -> int:
    """A budget given as a count (``113``) or a percentage of the pool (``"5%"``) as a count of samples.

    Raises ConfigError when it is not positive or larger than the pool.
    """
    text = str(budget).strip()
    try:
        if text.endswith("%"):
            fraction = float(text[:-1]) / 100.0
            if not 0 < fraction <= 1:
                raise ConfigError(f"budget {text} must be in (0%, 100%]")
            count = max(1, int(round(fraction * pool_size)))
        else:
            value = float(text)
            if value != int(value):
                raise ConfigError(f"budget {text} must be a whole count or a percentage like 5%")
            count = int(value)
    except ValueError:
        raise ConfigError(f"budget '{budget}' is neither a count nor a percentage like 5%") from None
    if count <= 0:
        raise ConfigError(f"budget must be positive, got {budget}")
    if count > pool_size:
        raise ConfigError(f"budget {budget} ({count} samples) is larger than the pool ({pool_size} samples)")
    return count


def random_indices(pool_size: int, count: int, seed: int) -> list[int]:
    """``count`` distinct pool indices drawn with ``seed`` (sorted)."""
    return sorted(random.Random(seed).sample(range(pool_size), count))


def write_selection(path: str | Path, *, method: str, data: str, budget: str | int, seed: int,
                    examples: Sequence[Example], indices: Sequence[int], scores: Sequence[float] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a selection file atomically."""
    record = {"method": method, "data": data, "budget": str(budget), "seed": seed, "pool_size": len(examples),
              "count": len(indices), "indices": list(map(int, indices)), "ids": [examples[i].id for i in indices],
              "scores": list(map(float, scores)) if scores is not None else None}
    if extra:
        record.update(extra)
    return atomic_write_json(path, record)


def read_selection(path: str | Path) -> dict[str, Any]:
    """Read and validate a selection file."""
    record = read_json(path)
    for key in ("indices", "ids"):
        if key not in record or not isinstance(record[key], list):
            raise DataError(f"{path} is not a selection file: missing '{key}'")
    if len(record["indices"]) != len(record["ids"]):
        raise DataError(f"{path}: 'indices' and 'ids' have different lengths")
    return record


def apply_selection(examples: Sequence[Example], selection: str | Path) -> list[Example]:
    """The examples a selection file lists, checking that its ids match this dataset."""
    record = read_selection(selection)
    chosen = []
    for index, expected_id in zip(record["indices"], record["ids"]):
        if not 0 <= index < len(examples):
            raise DataError(f"{selection}: index {index} is outside the dataset ({len(examples)} rows)")
        if str(examples[index].id) != str(expected_id):
            raise DataError(f"{selection}: row {index} has id '{examples[index].id}', the selection expects "
                            f"'{expected_id}' (was it made for another dataset?)")
        chosen.append(examples[index])
    if not chosen:
        raise DataError(f"{selection} selects no rows")
    return chosen


def select(*, method: str, data: str, budget: str | int, output: str | Path, seed: int = 0,
           examples: Sequence[Example] | None = None, **less_kwargs: Any) -> dict[str, Any]:
    """Entry of ``textdistill select``: choose ``budget`` rows of ``data`` by ``method`` and write a selection file."""
    from .data import load_examples

    if method not in ("random", "less"):
        raise ConfigError(f"unknown selection method '{method}'; use random or less")
    pool = list(examples) if examples is not None else load_examples(data)
    count = resolve_budget(budget, len(pool))
    if method == "random":
        indices = random_indices(len(pool), count, seed)
        write_selection(output, method=method, data=data, budget=budget, seed=seed, examples=pool, indices=indices)
        return {"count": count, "indices": indices}
    raise ConfigError("LESS selection is not implemented yet")
