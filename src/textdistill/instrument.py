"""The paired held-out instrument: the matching loss of any training set on fixed, held-out expert segments.

Trajectory matching asks of a training set: if a student starts at an expert's snapshot theta*_t and takes N SGD
steps on this set, how close does it land to the expert's theta*_{t+M}? This module answers that question for any
set (real rows, the distillation's continuous vectors, its decoded text, random subsets, a selection), on draws
that every set shares, so that two sets can be compared draw by draw (a paired difference) instead of through
different random draws:

* a *draw* is (expert, start snapshot t, the student's minibatch order over set positions 0..S-1); draws come from
  the **held-out** experts (the last ``heldout_experts`` runs), which the distillation never sees, and depend only
  on the experts, the student settings, the set size S and the seed;
* the student takes plain SGD steps in fp32 without any graph (first-order: :func:`unroll.first_order_unroll`);
* the loss of a draw is ``||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2`` (1 = no closer than the
  start; 0 = on the target);
* the *floor* of a draw replays the real rows the expert trained on in that very segment, in its order.

Entry of ``textdistill match-eval``: :func:`match_eval`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import Tensor

from . import distributed
from .artifacts import atomic_write_json, environment_versions, machine_description, to_jsonable
from .config import option
from .errors import ConfigError
from .forks import resolve_targets
from .matching import (Draw, SampleSet, Scorer, ScoreCache, StudentSettings, load_expert_pool, load_objective_rows,
                       load_student_model, make_draws, resolve_student, tokenize_for_experts)

__all__ = ["InstrumentConfig", "MatchEvalConfig", "heldout_report", "match_eval", "paired_difference",
           "summarize_losses"]


@dataclass(frozen=True)
class InstrumentConfig:
    """The held-out instrument: which draws, how many, and the null distribution's size."""

    draws: int = option(12, "held-out (expert, start, minibatch order) draws shared by every scored set")
    seed: int = option(0, "seed of the draws")
    heldout_experts: int = option(1, "the last K expert runs are held out from distillation and used here")
    random_subsets: int = option(10, "random real subsets of the same size scored as the null distribution")

    def __post_init__(self) -> None:
        if self.draws < 2:
            raise ConfigError(f"instrument.draws must be at least 2 (a paired interval needs two), got {self.draws}")
        if self.random_subsets < 0:
            raise ConfigError(f"instrument.random_subsets must be >= 0, got {self.random_subsets}")


@dataclass(frozen=True)
class MatchEvalConfig:
    """What ``textdistill match-eval`` scores with: the instrument's draws and the student that follows them
    (``student.lr_grid`` also reports the mean loss at each of those learning rates)."""

    instrument: InstrumentConfig = option(factory=InstrumentConfig, help="the held-out draws")
    student: StudentSettings = option(factory=StudentSettings, help="how the student follows a segment")


# ----------------------------------------------------------------------------------------------------------------
# Paired statistics
# ----------------------------------------------------------------------------------------------------------------

def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Mean of the per-draw differences a - b with a 95% t-interval (two numbers) over the draws."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired difference needs two equal-length lists of >= 2 draws, got {len(a)}, {len(b)}")
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n, "draws": diffs}


def summarize_losses(losses: Sequence[float]) -> dict[str, Any]:
    return {"loss": sum(losses) / len(losses), "draws": list(losses)}


def heldout_report(scorer: Scorer, draws: Sequence[Draw], sets: Mapping[str, SampleSet | None],
                   null: Sequence[SampleSet], *, pool: Sequence[Any] | None = None, embed_matrix: Tensor | None = None,
                   cache: ScoreCache | None = None, progress: bool = True) -> dict[str, Any]:
    """Score named sets, a null distribution of random subsets and the floor on the same draws.

    ``sets`` may hold ``init`` (the starting samples), ``continuous`` (learned vectors), ``projected`` (the text)
    and any other named set (reported under ``compare``); ``None`` values are skipped. The floor needs the
    tokenized ``pool`` and ``embed_matrix``. Paired differences (mean, 95% interval) compare the text and the
    vectors with the starting samples, and the floor with the mean random subset. With a ``cache``, losses an
    earlier run computed for the same set, draws and lr are read instead of recomputed (``cached_sets`` counts
    them).

    Under ``torchrun`` / ``accelerate launch`` every rank calls it with the same arguments: each scores its share of
    the draws, the losses are gathered in order on every rank, and rank 0 alone reads and writes the cache (its
    hits are broadcast, so that every rank takes the same path).
    """
    from tqdm.auto import tqdm

    named = {name: s for name, s in sets.items() if s is not None}
    lr = scorer.student.lr
    main = distributed.is_main()
    # identical sets (e.g. a distillation that changed nothing, next to its starting samples) are scored once
    scored: dict[str, list[float]] = {}
    distinct = {s.fingerprint() for s in [*named.values(), *null]}
    bar = tqdm(total=(len(distinct) + 1) * len(draws), desc="held-out instrument", disable=not progress or not main,
               dynamic_ncols=True)
    hits_before = cache.hits if cache is not None else 0

    def cached(kind: str, key: str) -> list[float] | None:
        return distributed.broadcast_object(cache.get(kind, key, draws, lr) if cache is not None and main else None)

    def over_draws(loss_of) -> list:
        """``loss_of(draw)`` for every draw, each rank its share, gathered in draw order."""
        mine = []
        for index in distributed.shard_indices(len(draws)):
            mine.append(loss_of(draws[index]))
            bar.update(distributed.world_size())
        return distributed.merge_shards(distributed.all_gather_objects(mine), len(draws))

    def score(samples: SampleSet) -> list[float]:
        key = samples.fingerprint()
        if key not in scored:
            stored = cached("set", key)
            if stored is not None:
                bar.update(len(draws))
            else:
                stored = over_draws(lambda draw: scorer.loss(samples, draw))
                if cache is not None and main:
                    cache.put("set", key, draws, lr, stored)
            scored[key] = stored
        return list(scored[key])

    losses = {name: score(s) for name, s in named.items()}
    random_losses = [score(s) for s in null]
    floors: list[float | None] | None = cached("floor", "") if pool is not None else None
    if floors is not None:
        bar.update(len(draws))
    else:
        floors = (over_draws(lambda draw: scorer.floor_loss(pool, draw, embed_matrix)) if pool is not None
                  else [None] * len(draws))
        if cache is not None and main and pool is not None and all(f is not None for f in floors):
            cache.put("floor", "", draws, lr, floors)
    bar.close()
    report: dict[str, Any] = {"lr": lr, "draws": [d.to_json() for d in draws],
                              "cached_sets": (cache.hits - hits_before) if cache is not None else 0}
    for name in ("init", "continuous", "projected"):
        report[name] = summarize_losses(losses[name]) if name in losses else None
    report["compare"] = {name: summarize_losses(v) for name, v in losses.items()
                         if name not in ("init", "continuous", "projected")}
    report["random"] = [summarize_losses(v) for v in random_losses]
    report["floor"] = None if any(f is None for f in floors) else summarize_losses(floors)
    if "init" in losses:
        for name in ("projected", "continuous"):
            if name in losses:
                report[f"{name}_minus_init"] = paired_difference(losses[name], losses["init"])
    if "projected" in losses and random_losses:
        mine = report["projected"]["loss"]
        report["projected_rank_among_random"] = 1 + sum(r["loss"] < mine for r in report["random"])
    if report["floor"] is not None and random_losses:
        null_mean = [sum(col) / len(col) for col in zip(*random_losses)]
        report["floor_minus_random_mean"] = paired_difference(floors, null_mean)
    return report


def match_eval(*, experts: str | Path, data: str, output: str | Path | None, config: InstrumentConfig,
               student: StudentSettings, prompt_field: str = "prompt", response_field: str = "response", floor: bool = True,
               device: str = "auto", trust_remote_code: bool = False, progress: bool = True) -> dict[str, Any]:
    """Entry of ``textdistill match-eval``: the matching loss of the dataset ``data`` (any prompt/response
    dataset, e.g. a ``distilled.jsonl``, tokenized as the experts' pool was) on the held-out draws.

    Returns (and writes to ``output``) ``loss`` (mean over the draws), ``draws`` (one loss per draw, in the fixed
    draw order), the draw specifications, the floor of each draw and, with ``student.lr_grid``, the mean loss at each
    of its learning rates (``lr_sweep``; the draws' losses are at ``student.lr``, else the experts' lr).
    """
    from tqdm.auto import tqdm

    from .config import DataSettings
    from .data import load_examples
    from .experts import load_experts
    from .models import resolve_device
    from .projection import input_embedding_matrix

    started = time.time()
    trajectories = load_experts(experts)
    manifest = trajectories.manifest
    model, tokenizer = load_student_model(trajectories, device=device, trust_remote_code=trust_remote_code)
    sweep = student.lr_grid
    resolved = resolve_student(dataclasses.replace(student, lr_grid=()), trajectories)
    _, heldout = trajectories.split(config.heldout_experts)
    settings = DataSettings(prompt_field=prompt_field, response_field=response_field,
                            max_length=manifest["data_settings"]["max_length"])
    examples = load_examples(data, settings, tokenizer=tokenizer)
    embed_matrix = input_embedding_matrix(model).float()
    samples = SampleSet.from_tokenized(tokenize_for_experts(tokenizer, examples, manifest), embed_matrix)
    draws = make_draws(heldout, resolved, len(samples), config.draws, config.seed)
    scorer = Scorer(model, trajectories, resolved, device=resolve_device(device),
                    targets=resolve_targets(student.targets, trajectories, resolved, heldout),
                    rows=load_objective_rows(student, tokenizer, manifest, embed_matrix))
    losses = [scorer.loss(samples, d) for d in tqdm(draws, desc="match-eval", disable=not progress)]
    result: dict[str, Any] = {
        "data": data, "experts": str(experts), "size": len(samples), "heldout_experts": heldout,
        "student": dataclasses.asdict(resolved), "seed": config.seed, **summarize_losses(losses),
        "draw_specs": [d.to_json() for d in draws]}
    if floor:
        _, pool = load_expert_pool(tokenizer, manifest)
        floors = [scorer.floor_loss(pool, d, embed_matrix) for d in draws]
        result["floor"] = None if any(f is None for f in floors) else summarize_losses(floors)
    if sweep:
        result["lr_sweep"] = {str(lr): sum(scorer.losses(samples, draws, lr=lr)) / len(draws) for lr in sweep}
    result["seconds"] = round(time.time() - started, 1)
    # a single result file: it carries its own provenance instead of a run.json that could clobber a run folder's
    result.update({"config": to_jsonable({"instrument": config, "student": student}),
                   "versions": environment_versions(),
                   "machine": machine_description()})
    if output is not None:
        atomic_write_json(output, result)
    return result
