"""Selection by performance matching: the best of many random subsets, each trained the way the receivers train.

Performance matching scores a set S by what training on it does: a receiver is fine-tuned on S with the comparison's
recipe and the token-mean response loss of held-out rows of the target task (never its reported questions) is
measured; lower is better. Of the objectives of the validity study (results/README.md section 11) it is the only
one whose correlation with accuracy lies above zero on both SmolLM2-135M and Gemma-3-270M, so it is the objective by
which this arm picks "the top subset": ``draws`` seeded random subsets of the budget are scored, the best is kept.

``score: margin`` scores a draw instead by the held-out rows as multiple-choice questions after training: the mean
margin of the gold choice's log-likelihood over the best other choice's (``pm-margin`` of the validity study, the
most predictive objective measured there, results/README.md section 15), each question's margin counted up to
``margin_cap`` when one is set. Every stored and compared loss is then the negated score, so lower is better
throughout.

Each (model, draw) score is one training run: it is cached in a JSON file per scoring model (written after every
draw), so an interrupted selection continues, a larger ``draws`` reuses the smaller run's draws, and the selection
that sums several models' losses reuses the runs of the selections scored by one of them.

Entry: :func:`select_by_performance` (``textdistill select --method performance``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from .artifacts import atomic_write_json, read_json, sha256_json, try_lock
from .config import DataSettings, EvalConfig, TrainConfig, option
from .errors import ConfigError, DataError

__all__ = ["PerformanceSelectionConfig", "SCORES", "best_draw", "check_score", "draw_indices", "held_out_questions",
           "held_out_rows", "draw_key", "score_draws", "score_trained", "select_by_performance"]

SCORES = ("loss", "margin")


def score_option() -> Any:
    """The ``score`` field of the configs that score sets by performance (selection, distill-pm)."""
    return option("loss", "loss: token-mean response loss of the held-out rows (lower = better); margin: the held-out "
                          "rows as multiple-choice questions, the mean log-likelihood margin of the gold choice over "
                          "the best other (higher = better; stored negated, so lower is better throughout)",
                  omit_when="loss")


def margin_cap_option() -> Any:
    """The ``margin_cap`` field beside :func:`score_option`."""
    return option(None, "margin score: each question's margin counts up to this value (mean of min(margin, cap)), "
                        "so that questions already answered right by that much cannot raise it; null: uncapped",
                  omit_when=None, acts=lambda *configs: configs[-1].score == "margin")


def check_score(score: str, margin_cap: float | None) -> float | None:
    """A clear error for an unknown score, or a cap on a score that has no margin (before any training run); returns
    the cap as a float (1 and 1.0 are one setting, and one cache file)."""
    if score not in SCORES:
        raise ConfigError(f"unknown score {score!r}; known: {', '.join(SCORES)}")
    if margin_cap is not None and score != "margin":
        raise ConfigError(f"margin_cap ({margin_cap}) applies to the margin score only, and the score is {score!r}: "
                          f"set score: margin (--score margin, --performance.score margin), or leave the cap unset")
    if margin_cap is not None and not math.isfinite(margin_cap):
        raise ConfigError(f"margin_cap must be a finite number (or null: uncapped), got {margin_cap}")
    return None if margin_cap is None else float(margin_cap)


@dataclass(frozen=True)
class PerformanceSelectionConfig:
    """The best of ``draws`` random subsets under performance matching (the receivers' held-out loss, or margin)."""

    draws: int = option(16, "random subsets scored (one training run per subset and scoring model)")
    seed: int = option(0, "draw k is the random subset of seed + k (select --method random --seed seed+k)")
    train_seed: int = option(1, "training seed of every scoring run")
    rows: str = option("arc-easy:validation", "the held-out rows (dataset or task:split; a task split for the "
                                              "margin) that score a subset; never the reported questions")
    rows_offset: int = option(0, "first row of `rows` used")
    rows_limit: int | None = option(None, "rows of `rows` used (None: all from rows_offset)")
    models: tuple[str, ...] | None = option(None, "scoring models, whose losses are summed; None: in an experiment, "
                                                  "each receiver scores its own selection (select needs a list)")
    score: Literal["loss", "margin"] = score_option()
    margin_cap: float | None = margin_cap_option()

    def __post_init__(self) -> None:
        object.__setattr__(self, "margin_cap", check_score(self.score, self.margin_cap))
        if self.draws <= 0:
            raise ConfigError(f"performance.draws must be positive, got {self.draws}")
        if self.rows_offset < 0 or (self.rows_limit is not None and self.rows_limit <= 0):
            raise ConfigError(f"performance.rows_offset must be >= 0 and rows_limit positive, got "
                              f"{self.rows_offset} and {self.rows_limit}")
        if self.models is not None and not self.models:
            raise ConfigError("performance.models is empty: name at least one scoring model, or leave it unset")


def draw_indices(pool_size: int, count: int, config: PerformanceSelectionConfig) -> list[list[int]]:
    """The ``config.draws`` candidate subsets: draw k is :func:`selection.random_indices` with seed ``seed + k``."""
    from .selection import random_indices

    return [random_indices(pool_size, count, config.seed + k) for k in range(config.draws)]


def best_draw(losses: dict[str, Sequence[float]]) -> tuple[int, list[float]]:
    """The draw with the lowest summed loss over the scoring models (``losses``: model -> loss per draw, all of one
    length), and the summed loss per draw. Ties go to the earlier draw."""
    lengths = {len(v) for v in losses.values()}
    if len(lengths) != 1:
        raise ValueError(f"every scoring model needs a loss per draw, got lengths {sorted(lengths)}")
    summed = [sum(values) for values in zip(*losses.values())]
    return min(range(len(summed)), key=lambda k: (summed[k], k)), summed


def held_out_rows(source: str, offset: int, limit: int | None, data: DataSettings) -> list[Any]:
    """Rows ``offset .. offset + limit`` of ``source`` (all from ``offset`` when ``limit`` is None): the held-out rows
    whose response loss performance matching measures (also the validity study's). ``data``'s template and length
    apply; its ``limit`` and ``sample``, which cut a training pool, do not."""
    from .data import load_examples

    examples = load_examples(source, dataclasses.replace(data, limit=None, sample=None))
    end = None if limit is None else offset + limit
    rows = examples[offset:end]
    if not rows:
        raise DataError(f"held-out rows {source}[{offset}:{end}] are empty ({len(examples)} rows in all)")
    return rows


def held_out_questions(source: str, offset: int, limit: int | None) -> EvalConfig:
    """The held-out rows ``offset .. offset + limit`` of ``source`` as multiple-choice questions (each choice's text
    scored as the continuation, fp32 so that a score does not depend on the CPU): what the ``margin`` score
    evaluates. ``source`` must be a named task's split (``arc-easy:validation``)."""
    from .data import parse_dataset_spec

    parsed = parse_dataset_spec(source)
    if parsed.kind != "task":
        raise ConfigError(f"the margin score needs a multiple-choice task split as its held-out rows (e.g. "
                          f"arc-easy:validation), got {source!r}")
    return EvalConfig(task=parsed.name, split=parsed.split, template="rc", offset=offset or None, limit=limit,
                      precision="fp32")


_TOKENIZED_ROWS: dict[tuple, list] = {}   # held-out rows tokenized once per process, per scoring model


def score_trained(model: Any, tokenizer: Any, model_name: str, rows: tuple[str, int, int | None], data: DataSettings,
                  score: str = "loss", margin_cap: float | None = None) -> float:
    """Performance matching's score of a receiver already trained on a set, lower = better: on the held-out ``rows``
    (source, offset, limit), the token-mean response loss (``score`` "loss"; ``data`` gives the template), or the
    negated mean margin of the gold choice over the best other, each counted up to ``margin_cap`` (``score``
    "margin", fp32)."""
    from .data import tokenize_examples
    from .evaluation import evaluate_with_records, mean_margin, question_margins
    from .training import mean_response_loss

    check_score(score, margin_cap)
    if score == "margin":
        _, records = evaluate_with_records(model, tokenizer, held_out_questions(*rows))
        return -mean_margin(question_margins(records), margin_cap)
    key = (model_name, rows, data)
    if key not in _TOKENIZED_ROWS:
        _TOKENIZED_ROWS[key] = tokenize_examples(tokenizer, held_out_rows(*rows, data), max_length=data.max_length,
                                                 append_eos=data.append_eos)
    return mean_response_loss(model, _TOKENIZED_ROWS[key], tokenizer.pad_token_id)


def score_cache_path(cache_dir: str | Path, model: str, recipe: TrainConfig, config: PerformanceSelectionConfig,
                     pool_ids: str, count: int) -> Path:
    """The cache file of one scoring model: its name holds a hash of everything a score depends on but the draw."""
    from .keys import keyed

    parts = [model, keyed(dataclasses.replace(recipe, seed=config.train_seed)), config.rows, config.rows_offset,
             config.rows_limit, pool_ids, count]
    if config.score != "loss":   # the loss's caches keep the names they had before the margin existed
        parts += [config.score, config.margin_cap]
    key = sha256_json(parts)[:12]
    return Path(cache_dir) / f"{Path(model.rstrip('/')).name}-{key}.json"


def draw_key(indices: Sequence[int]) -> str:
    """A draw's key in a score cache: its rows, sorted (two draws of the same rows share one entry)."""
    return str(sorted(indices))


def score_draws(*, pool: Sequence[Any], draws: Sequence[Sequence[int]], model: str, recipe: TrainConfig,
                config: PerformanceSelectionConfig, cache: Path, device: str = "auto", progress: bool = True,
                trust_remote_code: bool = False, log=print, share: Sequence[int] | None = None) -> list[float]:
    """The held-out loss (``config.score``; the negated margin for "margin") of ``model`` trained (``recipe``, seed
    ``config.train_seed``) on each draw's rows of ``pool``; draws already in ``cache`` (same rows) are read, the
    others trained and written there one by one. ``share``: only these draws (by number), e.g. a rank's.

    Processes that score the same draws into the same cache split them: each draw is claimed by a lock of its own
    (``<cache>.draw<k>.lock``), a process skips the draws another holds and takes the next free one, and once its
    pass is done it waits for those (or trains one itself if its holder died without writing it). So two
    ``experiment`` processes that both need a selection both train its draws, none twice."""
    from filelock import FileLock
    from tqdm.auto import tqdm

    recipe = dataclasses.replace(recipe, seed=config.train_seed)
    rows = (config.rows, config.rows_offset, config.rows_limit)
    if config.score == "margin":   # a clear error now rather than after the first training run
        held_out_questions(*rows)
    cache.parent.mkdir(parents=True, exist_ok=True)

    def cached(k: int) -> dict[str, Any] | None:
        with FileLock(str(cache) + ".lock"):   # processes scoring other draws of this model share the file
            stored = read_json(cache)["draws"] if cache.is_file() else {}
        return stored.get(draw_key(draws[k]))

    entries: dict[int, dict[str, Any]] = {}
    held_elsewhere: list[int] = []
    numbers = list(range(len(draws)) if share is None else share)
    bar = tqdm(total=len(numbers), desc=f"performance draws ({Path(model).name})", disable=not progress)
    for k in numbers:
        entry = cached(k)
        if entry is None:
            claim = try_lock(cache.with_name(f"{cache.name}.draw{k}"))   # <cache>.draw<k>.lock
            if claim is None:   # another process is training this draw: take the next one, come back at the end
                held_elsewhere.append(k)
                continue
            try:
                entry = cached(k) or _train_and_store(pool, draws, k, model, recipe, config, rows, cache, device,
                                                      trust_remote_code, log)
            finally:
                claim.release()
        entries[k] = entry
        bar.update()
    for k in held_elsewhere:
        log(f"  draw {k}: {Path(model).name} waiting for the process that trains it")
        with FileLock(f"{cache}.draw{k}.lock", thread_local=False):   # returns when its holder ends, done or dead
            entries[k] = cached(k) or _train_and_store(pool, draws, k, model, recipe, config, rows, cache, device,
                                                       trust_remote_code, log)
        bar.update()
    bar.close()
    return [float(entries[k]["loss"]) for k in numbers]


def _train_and_store(pool: Sequence[Any], draws: Sequence[Sequence[int]], k: int, model: str, recipe: TrainConfig,
                     config: PerformanceSelectionConfig, rows: tuple, cache: Path, device: str,
                     trust_remote_code: bool, log) -> dict[str, Any]:
    """Train ``model`` on draw ``k`` (``recipe`` already at the training seed), score it, add it to ``cache``."""
    from filelock import FileLock

    from .training import train_on_examples

    start = time.time()
    trained, tokenizer, result = train_on_examples(   # this process's own run (other ranks: other draws)
        model_name=model, examples=[pool[i] for i in draws[k]], config=recipe, device=device,
        progress=False, trust_remote_code=trust_remote_code, data_parallel=False)
    loss = score_trained(trained, tokenizer, model, rows, recipe.data, config.score, config.margin_cap)
    entry = {"loss": loss, "train_steps": result.steps, "seconds": round(time.time() - start, 1)}
    with FileLock(str(cache) + ".lock"):   # re-read: other processes may have added draws meanwhile
        stored = read_json(cache)["draws"] if cache.is_file() else {}
        stored[draw_key(draws[k])] = entry
        atomic_write_json(cache, {"model": model, "recipe": recipe, "rows": config.rows,
                                  "rows_offset": config.rows_offset, "rows_limit": config.rows_limit,
                                  "score": config.score, "margin_cap": config.margin_cap, "draws": stored})
    label = "held-out loss" if config.score == "loss" else "negated held-out margin"
    log(f"  draw {k}: {Path(model).name} {label} {entry['loss']:.4f} ({entry['seconds']:.0f} s)")
    return entry


def select_by_performance(*, data: str, budget: str | int, output: str | Path, config: PerformanceSelectionConfig,
                          recipe: TrainConfig, models: Sequence[str] | None = None,
                          examples: Sequence[Any] | None = None, cache_dir: str | Path | None = None,
                          device: str = "auto", progress: bool = True, trust_remote_code: bool = False,
                          log=print) -> dict[str, Any]:
    """Entry of ``textdistill select --method performance``: score ``config.draws`` random subsets of ``data`` by
    the summed held-out loss (``config.score``; for the margin, the negated margin) of ``models`` (default ``config.models``) after training each with ``recipe``, and
    write the best as a selection file (with every draw's losses). ``cache_dir`` (default: beside ``output``)
    keeps the per-draw runs. Under ``torchrun`` / ``accelerate launch`` each rank trains its share of the draws
    (:func:`distributed.shard_indices`) on its own device into the shared cache, then every rank reads them all and
    rank 0 writes the selection: the one-process selection, sooner. Returns ``{"count", "indices", "scores": None,
    "draw", "losses"}``."""
    from . import distributed
    from .data import load_examples
    from .selection import pool_ids_hash, resolve_budget, write_selection

    scoring = tuple(models) if models is not None else config.models
    if not scoring:
        raise ConfigError("select --method performance needs scoring models: --performance.models '[smollm2-135m]'")
    pool = list(examples) if examples is not None else load_examples(data, recipe.data)
    if not pool:
        raise DataError(f"dataset '{data}' is empty")
    count = resolve_budget(budget, len(pool))
    draws = draw_indices(len(pool), count, config)
    output = Path(output)
    cache_dir = Path(cache_dir) if cache_dir is not None else output.with_name(output.stem + ".draws")
    pool_ids = pool_ids_hash(pool)
    start = time.time()
    device = str(distributed.init(device))
    caches = {m: score_cache_path(cache_dir, m, recipe, config, pool_ids, count) for m in scoring}
    if distributed.world_size() > 1:
        # draws of the same rows share a cache entry: only the first of them is dealt out, so none trains twice
        first: dict[str, int] = {}
        for k, indices in enumerate(draws):
            first.setdefault(draw_key(indices), k)
        distinct = sorted(first.values())
        for m in scoring:
            score_draws(pool=pool, draws=draws, model=m, recipe=recipe, config=config, cache=caches[m], device=device,
                        progress=progress and distributed.is_main(), trust_remote_code=trust_remote_code, log=log,
                        share=[distinct[k] for k in distributed.shard_indices(len(distinct))])
        distributed.barrier()   # every draw is in the cache now: the pass below reads them
    losses = {m: score_draws(pool=pool, draws=draws, model=m, recipe=recipe, config=config, cache=caches[m],
                             device=device, progress=progress and distributed.is_main(),
                             trust_remote_code=trust_remote_code, log=log)
              for m in scoring}
    best, summed = best_draw(losses)
    if distributed.is_main():
        write_selection(output, method="performance", data=data, budget=budget, seed=config.seed, examples=pool,
                        indices=draws[best], extra={
                            "draw": best, "draw_seed": config.seed + best, "scoring_models": list(scoring),
                            "held_out_loss": summed[best], "draw_losses": losses, "summed_losses": summed,
                            "score": config.score, "margin_cap": config.margin_cap,
                            "rows": config.rows, "rows_offset": config.rows_offset,
                            "rows_limit": config.rows_limit, "seconds": round(time.time() - start, 1)})
    distributed.barrier()   # no rank returns before the selection file is there
    return {"count": count, "indices": draws[best], "scores": None, "draw": best, "losses": summed}
