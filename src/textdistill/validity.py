"""The validity study: does an objective tell good training data from bad?

An objective (trajectory matching, performance matching, LESS's alignment...) is worth optimising only if the sets it
prefers train better models. This stage measures that directly. For one pool, budget and receiver models:

1. **Subsets.** K real subsets of the budget's size: random ones (the first ``instrument_null`` are the very null
   subsets of the distillation's held-out instrument), subsets that spread the scores out (the best and worst of
   many random draws under LESS and under trajectory matching, the LESS top and bottom rows) and the match
   selection. ``subsets.json`` holds their pool indices.
2. **Scores.** Every objective scores every subset (``scores/<objective>.json``; higher = the objective prefers the
   set; ``raw`` is the objective's own value, e.g. a matching loss).
3. **Accuracy.** Each receiver model is trained on each subset with each recipe (seed 0) and scored on a fixed slice
   of the test split that the reported comparison never uses (``accuracy``: ARC-Easy test questions 1000-1999), so
   that choosing an objective never touches the reported numbers. ``noise_subsets`` subsets are also trained with
   the other ``noise_seeds``: the noise ceiling. Performance matching (``pm``) is the loss of held-out validation
   rows after the receiver's own recipe, taken from an independent training seed (``pm_seed``) so that it shares
   no seed noise with the accuracy it is correlated with. ``pm-margin`` scores that same run by the held-out rows
   as multiple-choice questions: the mean margin of the gold choice's log-likelihood over the best other's
   (``margin.json`` beside the cell, with every question's margin), which text that makes every answer likelier
   cannot raise; ``pm-margin-capped`` is the mean of each question's margin capped at ``margin_cap``, which
   questions already answered right by that much cannot raise either.
4. **Recipes.** ``comparison`` is the comparison's recipe as it is; ``tuned`` is the same recipe with its number of
   epochs chosen per model on validation accuracy (``tuning``: a grid, a few random subsets, questions that are
   neither the accuracy slice nor the reported ones; with ``tuning.patience`` the grid stops once that many counts
   after the best have not beaten it; ``tuning_only`` runs this rule alone); ``student`` trains the way the
   distillation's student does (plain SGD at its lr for its N steps of its batch size), the cheap probe of the
   optimizer mismatch.
5. **Report.** ``validity/<objective>-<model>-<budget>-<recipe>.json`` per (objective, model, recipe): the Spearman
   correlation between score and accuracy over the subsets, its bootstrap 95% interval, the noise ceiling, the
   seconds one score costs, and every point.

Every unit of work (a subset plan, an objective's scores, a fork run, one trained cell) is written atomically under
the output folder and skipped on a rerun, so the study resumes; several processes (one per core) share a folder by
file locks, each taking the next unit nobody holds.

Entry of ``textdistill validity``: :func:`run_validity`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from .artifacts import atomic_write_json, read_json, sha256_json, to_jsonable, try_lock, write_run_info
from .config import (DataSettings, EvalConfig, TrainConfig, apply_overrides, build_dataclass, option,
                     read_yaml)
from .errors import ConfigError
from .instrument import InstrumentConfig
from .matching import StudentSettings

__all__ = ["RecipeTuning", "ValidityConfig", "ForkSettings", "load_validity_config", "noise_ceiling",
           "run_validity", "spearman_with_interval"]

OBJECTIVES = ("tm", "tm-denoised", "pm", "pm-sum", "pm-student", "pm-margin", "pm-margin-capped", "pm-margin-sum",
              "less")
# each reads the margin file of the pm_seed run (pm-margin-sum: every receiver's)
MARGIN_OBJECTIVES = ("pm-margin", "pm-margin-capped", "pm-margin-sum")
RECIPES = ("comparison", "tuned", "student")


@dataclass(frozen=True)
class RecipeTuning:
    """The rule that sets the ``tuned`` recipe's length once per model and budget: train ``subsets`` random subsets
    for each epoch count of ``epochs`` and keep the count with the best mean accuracy on ``validation``."""

    epochs: tuple[float, ...] = option((3.0, 6.0, 10.0, 15.0, 25.0), "the epoch counts tried")
    subsets: int = option(3, "random subsets trained per epoch count")
    seed: int = option(5000, "the subsets are seeded seed, seed + 1, ... (none of the study's)")
    patience: int | None = option(None, "stop the grid once this many consecutive counts after the best so far have "
                                        "not beaten it (the longer counts are not trained); null: every count")
    validation: EvalConfig = option(factory=lambda: EvalConfig(task="arc-easy", split="validation", template="rc",
                                                               limit=285),
                                    help="the questions the count is chosen on (neither the accuracy slice nor the "
                                         "reported ones)")

    def __post_init__(self) -> None:
        if not self.epochs or any(e <= 0 for e in self.epochs):
            raise ConfigError(f"tuning.epochs must be positive epoch counts, got {list(self.epochs)}")
        if self.subsets < 1:
            raise ConfigError(f"tuning.subsets must be at least 1, got {self.subsets}")
        if self.patience is not None:
            if self.patience < 1:
                raise ConfigError(f"tuning.patience must be at least 1 (or null), got {self.patience}")
            if list(self.epochs) != sorted(set(self.epochs)):
                raise ConfigError(f"tuning.patience needs tuning.epochs in increasing order, got {list(self.epochs)}")


def best_epochs(means: dict[float, float]) -> float:
    """The epoch count of the best mean validation accuracy (a tie goes to fewer epochs)."""
    return max(means, key=lambda e: (means[e], -e))


def grid_stopped(means: Sequence[float], patience: int | None) -> bool:
    """Whether a grid whose counts so far (in increasing order) gave ``means`` stops here: the last ``patience``
    counts all came after the best one (none of them beat it). Never with ``patience`` None."""
    if patience is None or not means:
        return False
    best = list(means).index(max(means))   # the first of equal bests, as best_epochs
    return len(means) - 1 - best >= patience


@dataclass(frozen=True)
class ForkSettings:
    """Denoised targets: from each start snapshot of the held-out experts, ``forks`` runs of one segment each (the
    experts' recipe, other data orders); the target is their mean end point."""

    forks: int = option(8, "fork runs per start snapshot")
    seed: int = option(7000, "seed of the forks' data orders")


@dataclass(frozen=True)
class ValidityConfig:
    """One validity study: pool, budget, receivers, recipes, subsets and objectives."""

    name: str = option("validity", "the study's name")
    pool: str = option("arc-easy:train", "the pool the subsets are drawn from")
    budget: str = option("1%", "subset size: a count or a percentage of the pool")
    models: tuple[str, ...] = option(("smollm2-135m", "gemma3-270m"), "the receivers")
    recipes: tuple[Literal["comparison", "tuned", "student"], ...] = option(
        ("comparison", "tuned"), "comparison: the recipe as it is; tuned: its epochs chosen on validation; "
                                 "student: plain SGD the way the distillation's student trains")
    student_models: tuple[str, ...] = option(("smollm2-135m",), "the receivers of the student recipe (the "
                                                                "distilling model's own mismatch)")
    accuracy: EvalConfig = option(factory=lambda: EvalConfig(task="arc-easy", split="test", template="rc",
                                                             offset=1000, limit=1000),
                                  help="the accuracy slice: disjoint from the comparison's questions (test 0-499)")
    objective_rows: str = option("arc-easy:validation", "performance matching's held-out rows (never the accuracy "
                                                        "slice, the reported questions or tuning's)")
    objective_offset: int = option(285, "first row of objective_rows used")
    objective_limit: int = option(285, "rows of objective_rows used")
    recipe: TrainConfig = option(factory=TrainConfig, help="the comparison's recipe")
    tuning: RecipeTuning = option(factory=RecipeTuning, help="the rule of the tuned recipe")
    experts: str = option("", "the experts folder (trajectory matching, the student; its last expert is held out)")
    instrument: InstrumentConfig = option(factory=InstrumentConfig, help="trajectory matching's held-out draws")
    student: StudentSettings = option(factory=lambda: StudentSettings(syn_steps=4, batch_size=8, lr=0.03),
                                      help="the student of trajectory matching")
    forks: ForkSettings = option(factory=ForkSettings, help="denoised targets")
    less_scores: str = option("", "a LESS selection file with all_scores over the pool")
    match_selection: str | None = option(None, "the match selection at this budget (a subset of its own)")
    random_subsets: int = option(18, "random subsets")
    instrument_null: int = option(10, "the first random subsets are the distillation instrument's null subsets")
    random_seed: int = option(9100, "seed of the other random subsets and of the spread draws")
    spread_draws: int = option(200, "random draws whose best and worst under LESS become subsets")
    tm_spread_draws: int = option(40, "random draws whose best and worst under trajectory matching become subsets "
                                      "(each costs a score)")
    noise_subsets: tuple[str, ...] = option(("null-0", "random-0", "less-top", "less-bottom"),
                                            "subsets also trained with the other noise_seeds (the noise ceiling)")
    noise_seeds: tuple[int, ...] = option((0, 1, 2), "training seeds of the noise subsets (seed 0 is every "
                                                     "subset's)")
    pm_seed: int = option(1, "the training seed whose run gives performance matching's score (not 0: it would "
                             "share the accuracy's seed noise)")
    pm_student_draws: int = option(4, "held-out draws the pm-student objective averages over")
    objectives: tuple[str, ...] = option(("tm", "tm-denoised", "pm", "pm-sum", "pm-student", "pm-margin",
                                          "pm-margin-capped", "pm-margin-sum", "less"),
                                         f"objectives, among {', '.join(OBJECTIVES)}")
    margin_cap: float = option(1.0, "pm-margin-capped: each question's margin counts up to this value, so that "
                                    "questions already answered right by that much cannot raise the score",
                               acts=lambda *configs: "pm-margin-capped" in configs[-1].objectives)
    tuning_only: bool = option(False, "run only the tuned recipe's rule (its grid and the chosen epochs, for every "
                                      "model) and stop: the recipe of a new budget or model without the study; "
                                      "needs no experts or LESS scores")
    bootstrap: int = option(10000, "bootstrap resamples of each interval")
    report: str | None = option(None, "folder of the result files (<objective>-<model>-<budget>-<recipe>.json); "
                                      "null: <output>/validity")

    def __post_init__(self) -> None:
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown:
            raise ConfigError(f"unknown objective(s) {', '.join(unknown)}; known: {', '.join(OBJECTIVES)}")
        bad = [r for r in self.recipes if r not in RECIPES]
        if bad:
            raise ConfigError(f"unknown recipe(s) {', '.join(bad)}; known: {', '.join(RECIPES)}")
        if not self.models:
            raise ConfigError("list at least one receiver under 'models'")
        if self.instrument_null > self.random_subsets:
            raise ConfigError(f"instrument_null ({self.instrument_null}) cannot exceed random_subsets "
                              f"({self.random_subsets})")
        if 0 not in self.noise_seeds or len(self.noise_seeds) < 2:
            raise ConfigError(f"noise_seeds must hold seed 0 and at least one other, got {list(self.noise_seeds)}")
        if self.pm_seed == 0:
            raise ConfigError("pm_seed must differ from 0: the accuracy's seed (pm would share its seed noise)")


def load_validity_config(path: str, overrides: dict[str, Any] | None = None) -> ValidityConfig:
    """A validity config from a YAML file (a ``validity:`` section or the bare mapping) and dotted overrides."""
    values = read_yaml(path)
    values = apply_overrides(values.get("validity", values), overrides, skip_none=False)
    return build_dataclass(ValidityConfig, values, "validity")


# --------------------------------------------------------------------------------------------------------------------
# Statistics (pure)
# --------------------------------------------------------------------------------------------------------------------

def _ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (1-based; ties share the mean of their ranks)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's of the average ranks); NaN when either side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two equal-length lists of >= 2 values, got {len(x)} and {len(y)}")
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def spearman_with_interval(x: Sequence[float], y: Sequence[float], *, resamples: int = 10000,
                           seed: int = 0) -> tuple[float, list[float]]:
    """Spearman's rho and a percentile bootstrap 95% interval over the points (pairs resampled with replacement;
    resamples where a side is constant are dropped)."""
    rho = spearman(x, y)
    generator = torch.Generator().manual_seed(seed)
    n = len(x)
    draws = torch.randint(n, (resamples, n), generator=generator).tolist()
    values = sorted(v for v in (spearman([x[i] for i in d], [y[i] for i in d]) for d in draws) if not math.isnan(v))
    if not values:
        return rho, [math.nan, math.nan]
    low = values[int(math.floor(0.025 * (len(values) - 1)))]
    high = values[int(math.ceil(0.975 * (len(values) - 1)))]
    return rho, [low, high]


def most_influential_point(x: Sequence[float], y: Sequence[float]) -> tuple[int, float]:
    """(index, Spearman without it) of the point whose removal moves the correlation furthest towards (or past)
    zero: how much of a correlation one subset carries."""
    sign = 1.0 if not spearman(x, y) < 0 else -1.0
    without = [spearman([v for j, v in enumerate(x) if j != i], [v for j, v in enumerate(y) if j != i])
               for i in range(len(x))]
    index = min((i for i in range(len(x)) if not math.isnan(without[i])), key=lambda i: sign * without[i],
                default=0)
    return index, without[index]


def noise_ceiling(accuracies: Sequence[float], replicates: Sequence[Sequence[float]]) -> dict[str, float]:
    """The highest correlation with accuracy that seed noise allows: ``sqrt(1 - within / total)``, where
    ``within`` is the pooled variance of accuracy over training seeds of one subset (``replicates``: one list of
    accuracies per subset trained with several seeds) and ``total`` the variance of the study's accuracies (one
    seed per subset). A perfect objective (one that knows each subset's expected accuracy) correlates with a single
    seed's accuracy at about this value."""
    def variance(values: Sequence[float]) -> float:
        mean = sum(values) / len(values)
        return sum((v - mean) ** 2 for v in values) / (len(values) - 1)

    groups = [list(g) for g in replicates if len(g) >= 2]
    if not groups or len(accuracies) < 2:
        return {"noise_ceiling": math.nan, "seed_std": math.nan, "total_std": math.nan}
    within = sum(variance(g) * (len(g) - 1) for g in groups) / sum(len(g) - 1 for g in groups)
    total = variance(accuracies)
    ceiling = math.sqrt(max(0.0, 1.0 - within / total)) if total > 0 else 0.0
    return {"noise_ceiling": ceiling, "seed_std": math.sqrt(within), "total_std": math.sqrt(total)}


# --------------------------------------------------------------------------------------------------------------------
# Work units, shared by several processes through file locks
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class _Unit:
    name: str
    output: Path                       # its completion mark (written last, atomically)
    run: Callable[[], None]
    needs: tuple[str, ...] = ()        # names of units that must be done first


def _run_units(units: list[_Unit], *, log: Callable[[str], None], poll_seconds: float = 20.0) -> None:
    """Run every unit whose output is missing, in order, skipping ones another process holds or whose needs are
    not done yet; return once every unit is done (waiting for other processes' units at the end)."""
    by_name = {u.name: u for u in units}
    done = lambda u: u.output.is_file()   # noqa: E731
    announced: set[str] = set()
    while True:
        pending = [u for u in units if not done(u)]
        if not pending:
            return
        progressed = False
        for unit in pending:
            if done(unit) or not all(done(by_name[n]) for n in unit.needs):
                continue
            lock = try_lock(unit.output)
            if lock is None:
                continue
            try:
                if not done(unit):
                    log(f"[{len(units) - len([u for u in units if not done(u)]) + 1}/{len(units)}] {unit.name}")
                    start = time.time()
                    unit.run()
                    log(f"    done in {time.time() - start:.0f} s")
            finally:
                lock.release()
            progressed = True
            break   # start again from the top: earlier units may have become runnable
        if not progressed:
            waiting = sorted(u.name for u in pending)[:3]
            key = ",".join(waiting)
            if key not in announced:
                log(f"    waiting for {len(pending)} unit(s) held by another process or not yet runnable "
                    f"({', '.join(waiting)}{', ...' if len(pending) > 3 else ''})")
                announced.add(key)
            time.sleep(poll_seconds)


# --------------------------------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------------------------------

class _Study:
    """Everything one process needs to run units of the study in ``root``."""

    def __init__(self, config: ValidityConfig, root: Path, *, device: str, progress: bool, log):
        from .data import load_examples
        from .selection import resolve_budget

        self.config, self.root, self.device, self.progress, self.log = config, root, device, progress, log
        self.pool = load_examples(config.pool, config.recipe.data)
        self.count = resolve_budget(config.budget, len(self.pool))
        self._scorer = None

    # ---- paths ----------------------------------------------------------------------------------------------------
    @property
    def subsets_path(self) -> Path:
        return self.root / "subsets.json"

    def subsets(self) -> dict[str, list[int]]:
        return read_json(self.subsets_path)["subsets"]

    def score_path(self, objective: str) -> Path:
        return self.root / "scores" / f"{objective}.json"

    def recipe_config(self, model: str, recipe: str) -> TrainConfig:
        """The training recipe of ``recipe`` for ``model`` (``tuned`` needs the tuning result)."""
        config = self.config
        if recipe == "comparison":
            return config.recipe
        if recipe == "tuned":
            chosen = read_json(self.tuning_path(model))["epochs"]
            return dataclasses.replace(config.recipe, epochs=float(chosen), max_steps=None)
        if recipe == "student":   # plain SGD at the student's lr for its N steps of its batch size
            from .experts import load_experts
            from .matching import resolve_student

            student = resolve_student(config.student, load_experts(config.experts))
            return dataclasses.replace(config.recipe, optimizer="sgd", lr=student.lr, schedule="constant",
                                       warmup_ratio=0.0, batch_size=student.batch_size, max_steps=student.steps,
                                       max_grad_norm=None, weight_decay=0.0, momentum=0.0)
        raise ConfigError(f"unknown recipe {recipe!r}")

    def cell_path(self, model: str, recipe: str, subset: str, seed: int) -> Path:
        return (self.root / "cells" / model.strip("/").replace("/", "__") / recipe / subset / f"seed{seed}" /
                "result.json")

    def tuning_path(self, model: str) -> Path:
        return self.root / "tuning" / f"{model.strip('/').replace('/', '__')}.json"

    def tuning_cell_path(self, model: str, epochs: float, k: int) -> Path:
        return (self.root / "tuning" / model.strip("/").replace("/", "__") / f"epochs{epochs:g}" / f"subset{k}" /
                "result.json")

    # ---- shared pieces --------------------------------------------------------------------------------------------
    def scorer(self):
        """The trajectory-matching scorer on the held-out experts (model, draws, pool tokenized as the experts)."""
        if self._scorer is None:
            from .experts import load_experts
            from .matching import Scorer, load_expert_pool, load_student_model, make_draws, resolve_student
            from .models import resolve_device
            from .projection import input_embedding_matrix

            trajectories = load_experts(self.config.experts)
            model, tokenizer = load_student_model(trajectories, device=self.device)
            student = resolve_student(self.config.student, trajectories)
            _, heldout = trajectories.split(self.config.instrument.heldout_experts)
            draws = make_draws(heldout, student, self.count, self.config.instrument.draws, self.config.instrument.seed)
            _, tokenized = load_expert_pool(tokenizer, trajectories.manifest)
            embed = input_embedding_matrix(model).float()
            scorer = Scorer(model, trajectories, student, device=resolve_device(self.device))
            self._scorer = {"scorer": scorer, "draws": draws, "tokenized": tokenized, "embed": embed,
                            "trajectories": trajectories, "heldout": heldout, "tokenizer": tokenizer,
                            "model": model, "student": student}
        return self._scorer

    def sample_set(self, indices: Sequence[int]):
        from .matching import SampleSet

        s = self.scorer()
        return SampleSet.from_tokenized([s["tokenized"][i] for i in indices], s["embed"])

    def tm_loss(self, indices: Sequence[int], targets: dict | None = None) -> list[float]:
        """The held-out matching loss of a subset on every instrument draw (``targets``: (expert, start) ->
        replacement end point, for denoised targets)."""
        from .unroll import matching_loss

        s = self.scorer()
        samples = self.sample_set(indices)
        losses = []
        for draw in s["draws"]:
            end, _ = s["scorer"].unroll(samples, draw)
            start, target = s["scorer"].endpoints(draw)
            if targets is not None:
                target = targets[(draw.expert, draw.start)]
            losses.append(float(matching_loss(end, start, target)))
        return losses

    # ---- units ----------------------------------------------------------------------------------------------------
    def make_subsets(self) -> None:
        from .distill import NULL_SEED_OFFSET
        from .selection import random_indices, read_selection

        config, n, count = self.config, len(self.pool), self.count
        less = read_json(config.less_scores)
        scores = less.get("all_scores")
        if not scores or len(scores) != n:
            raise ConfigError(f"{config.less_scores} has no all_scores over the {n} pool rows")
        row_score = [(-math.inf if s is None else float(s)) for s in scores]
        subsets: dict[str, list[int]] = {}
        info: dict[str, Any] = {}
        for r in range(config.random_subsets):
            if r < config.instrument_null:   # the distillation's null subsets (distill.py), seed 0
                subsets[f"null-{r}"] = random_indices(n, count, NULL_SEED_OFFSET + r)
            else:
                subsets[f"random-{r - config.instrument_null}"] = random_indices(n, count, config.random_seed + r)
        ranked = sorted(range(n), key=lambda i: (-row_score[i], i))
        subsets["less-top"] = ranked[:count]
        subsets["less-bottom"] = [i for i in ranked if math.isfinite(row_score[i])][-count:]
        draws = [random_indices(n, count, config.random_seed + 10_000 + r) for r in range(config.spread_draws)]
        mean_less = [sum(row_score[i] for i in d) / count for d in draws]
        best = max(range(len(draws)), key=lambda k: mean_less[k])
        worst = min(range(len(draws)), key=lambda k: mean_less[k])
        subsets[f"less-best-of-{len(draws)}"], subsets[f"less-worst-of-{len(draws)}"] = draws[best], draws[worst]
        if config.tm_spread_draws:
            candidates = [random_indices(n, count, config.random_seed + 20_000 + r)
                          for r in range(config.tm_spread_draws)]
            from tqdm.auto import tqdm

            losses = [sum(self.tm_loss(c)) / self.config.instrument.draws
                      for c in tqdm(candidates, desc="tm spread draws", disable=not self.progress)]
            best = min(range(len(candidates)), key=lambda k: losses[k])
            worst = max(range(len(candidates)), key=lambda k: losses[k])
            subsets[f"tm-best-of-{len(candidates)}"] = candidates[best]
            subsets[f"tm-worst-of-{len(candidates)}"] = candidates[worst]
            info["tm_spread_losses"] = losses
        if config.match_selection:
            picked = read_selection(config.match_selection)["indices"][:count]
            if len(picked) < count:
                raise ConfigError(f"{config.match_selection} holds {len(picked)} rows, fewer than the budget {count}")
            subsets["match"] = picked
        missing = [s for s in config.noise_subsets if s not in subsets]
        if missing:
            raise ConfigError(f"noise_subsets names subsets the plan does not make: {', '.join(missing)}")
        atomic_write_json(self.subsets_path, {"budget": config.budget, "count": count, "pool_size": n,
                                              "subsets": subsets, **info})

    def forks_config(self):
        from .forks import ForksConfig

        s = self.scorer()
        return ForksConfig(forks=self.config.forks.forks, seed=self.config.forks.seed,
                           expert_epochs=s["student"].span, expert_runs=tuple(s["heldout"]),
                           min_start=s["student"].min_start, max_start=s["student"].max_start)

    def make_forks(self) -> None:
        """Fork runs of the held-out experts: ``forks`` segments from each start snapshot with other data orders
        (:func:`forks.make_forks`, which also writes their signal)."""
        from .forks import make_forks

        make_forks(experts=self.config.experts, output=self.root / "forks", config=self.forks_config(),
                   device=self.device, progress=self.progress, log=self.log)

    def fork_targets(self) -> dict:
        """(expert, start) -> the mean end point of its forks, for every held-out draw's segment."""
        from .forks import load_fork_targets

        s = self.scorer()
        targets = load_fork_targets(self.root / "forks", s["trajectories"], s["student"].span)
        return {(e, t): targets.target(e, t) for e in s["heldout"]
                for t in range(s["student"].min_start, s["student"].max_start + 1)}

    def score_objective(self, objective: str) -> None:
        """Scores of every subset under a model-independent objective (tm, tm-denoised, pm-student, less)."""
        subsets = self.subsets()
        # subsets scored before an interruption are kept in a partial file beside the scores (written after each)
        partial_path = self.score_path(objective).with_suffix(".partial.json")
        partial = read_json(partial_path) if partial_path.is_file() else {}
        scores, raw, seconds = (dict(partial.get(k, {})) for k in ("scores", "raw", "seconds"))
        targets = self.fork_targets() if objective == "tm-denoised" else None
        less = read_json(self.config.less_scores)["all_scores"] if objective == "less" else None
        from tqdm.auto import tqdm

        for name, indices in tqdm(subsets.items(), desc=objective, disable=not self.progress):
            if name in scores:
                continue
            start = time.time()
            if objective in ("tm", "tm-denoised"):
                losses = self.tm_loss(indices, targets)
                raw[name] = {"loss": sum(losses) / len(losses), "draws": losses}
                scores[name] = -raw[name]["loss"]
            elif objective == "less":
                values = [float(less[i]) for i in indices if less[i] is not None]
                raw[name] = sum(values) / len(values)
                scores[name] = raw[name]
            elif objective == "pm-student":
                losses = self.pm_student(indices)
                raw[name] = {"loss_change": sum(losses) / len(losses), "draws": losses}
                scores[name] = -raw[name]["loss_change"]
            else:
                raise ConfigError(f"{objective} is not scored on its own")
            seconds[name] = time.time() - start
            atomic_write_json(partial_path, {"scores": scores, "raw": raw, "seconds": seconds})
        atomic_write_json(self.score_path(objective), {
            "objective": objective, "scores": {n: scores[n] for n in subsets}, "raw": {n: raw[n] for n in subsets},
            "seconds_per_score": sum(seconds.values()) / len(seconds), "higher_is_better": True})
        partial_path.unlink(missing_ok=True)

    def objective_examples(self, tokenizer: Any, data: DataSettings) -> list:
        """Performance matching's held-out rows, tokenized by ``tokenizer`` as ``data`` says (read once)."""
        from .data import tokenize_examples
        from .performance_selection import held_out_rows

        if not hasattr(self, "_objective_rows"):
            self._objective_rows = held_out_rows(self.config.objective_rows, self.config.objective_offset,
                                                 self.config.objective_limit, data)
        return tokenize_examples(tokenizer, self._objective_rows, max_length=data.max_length,
                                 append_eos=data.append_eos)

    def pm_student(self, indices: Sequence[int]) -> list[float]:
        """Performance matching under the student's unroll: from each of the first ``pm_student_draws`` held-out
        draws' start snapshot, the student's N SGD steps on the subset, then the change of the mean response loss
        of the objective rows (negative = the set lowered it)."""
        s = self.scorer()
        if "objective_rows" not in s:
            from .config import DataSettings as Settings

            s["objective_rows"] = self.objective_examples(
                s["tokenizer"], Settings(**s["trajectories"].manifest["data_settings"]))
        samples = self.sample_set(indices)
        pad = s["tokenizer"].pad_token_id
        starts = s.setdefault("pm_student_start_loss", {})   # a draw's start loss is every subset's
        changes = []
        for index, draw in enumerate(s["draws"][: self.config.pm_student_draws]):
            if index not in starts:
                starts[index] = _rows_loss(s["model"], s["objective_rows"], s["scorer"].endpoints(draw)[0], pad)
            end, _ = s["scorer"].unroll(samples, draw)
            changes.append(_rows_loss(s["model"], s["objective_rows"], end, pad) - starts[index])
        return changes

    def train_cell(self, model_name: str, recipe_name: str, indices: Sequence[int], seed: int, *,
                   evaluate: EvalConfig | None, out: Path) -> None:
        """Train ``model_name`` on the subset with the recipe and seed; record the objective rows' loss and, with
        ``evaluate``, the accuracy (and, at ``pm_seed`` with ``pm-margin`` among the objectives, its margin file)."""
        from .evaluation import evaluate_model
        from .training import mean_response_loss, train_on_examples

        key = self.cell_key(model_name, recipe_name, seed, indices, evaluate)
        twin = self._twin(model_name, recipe_name, out.parent.parent.name, seed, key, evaluate is not None)
        if twin is not None:   # another recipe that is this one (tuning chose the comparison's epochs): its run
            atomic_write_json(out, twin)
            return
        recipe = dataclasses.replace(self.recipe_config(model_name, recipe_name), seed=seed)
        examples = [self.pool[i] for i in indices]
        model, tokenizer, result = train_on_examples(model_name=model_name, examples=examples, config=recipe,
                                                     device=self.device, progress=False)
        row: dict[str, Any] = {"model": model_name, "recipe": recipe_name, "seed": seed, "indices": list(indices),
                               "train_steps": result.steps, "train_seconds": round(result.seconds, 1),
                               "train_last_loss": result.losses[-1], "epochs": recipe.epochs}
        if seed == self.config.pm_seed:   # performance matching's score comes from this seed's run only
            start = time.time()
            rows = self.objective_examples(tokenizer, recipe.data)
            row.update({"objective_loss": mean_response_loss(model, rows, tokenizer.pad_token_id),
                        "objective_rows": len(rows), "objective_seconds": round(time.time() - start, 1)})
            if _wants_margins(self.config) and recipe_name != "student" and \
                    not self.margin_path(model_name, recipe_name, out.parent.parent.name).is_file():
                self.write_margin(model, tokenizer, model_name, recipe_name, indices,
                                  {**row, "subset": out.parent.parent.name})
        if evaluate is not None:
            metrics = evaluate_model(model, tokenizer, evaluate, progress=False)
            row.update({"acc": metrics["acc"], "acc_norm": metrics["acc_norm"], "n": metrics["n"],
                        "eval_seconds": metrics["seconds"]})
        row["key"] = key
        atomic_write_json(out, row)

    def margin_path(self, model: str, recipe: str, subset: str) -> Path:
        return self.cell_path(model, recipe, subset, self.config.pm_seed).with_name("margin.json")

    def margin_questions(self) -> EvalConfig:
        from .performance_selection import held_out_questions

        return held_out_questions(self.config.objective_rows, self.config.objective_offset,
                                  self.config.objective_limit)

    def write_margin(self, model: torch.nn.Module, tokenizer: Any, model_name: str, recipe_name: str,
                     indices: Sequence[int], trained: dict[str, Any]) -> None:
        """``pm-margin``'s score of a subset from its receiver trained with ``pm_seed`` (``trained``: that run's
        row): the objective rows as multiple-choice questions, the gold choice's mean log-likelihood margin over
        the best other choice (and the other figures of :func:`evaluation.choice_figures`)."""
        from .evaluation import choice_figures, evaluate_with_records, question_margins

        start = time.time()
        _, records = evaluate_with_records(model, tokenizer, self.margin_questions())
        atomic_write_json(self.margin_path(model_name, recipe_name, trained["subset"]), {
            **{k: trained[k] for k in ("model", "recipe", "seed", "indices", "train_steps", "train_seconds",
                                        "objective_loss")},
            **choice_figures(records), "question_margins": question_margins(records),
            "margin_seconds": round(time.time() - start, 1),
            "key": self.cell_key(model_name, recipe_name, self.config.pm_seed, indices, None)})

    def margin_cell(self, model_name: str, recipe_name: str, subset: str) -> None:
        """``pm-margin``'s score of ``subset`` where its ``pm_seed`` cell exists without one: the run repeated
        (same recipe, seed and rows: the same training), its objective loss checked against the cell's."""
        from .training import mean_response_loss, train_on_examples

        indices = self.subsets()[subset]
        key = self.cell_key(model_name, recipe_name, self.config.pm_seed, indices, None)
        for other in RECIPES:   # another recipe that is this one (tuning chose the comparison's epochs)
            path = self.margin_path(model_name, other, subset)
            if other != recipe_name and path.is_file() and read_json(path)["key"] == key:
                atomic_write_json(self.margin_path(model_name, recipe_name, subset),
                                  {**read_json(path), "recipe": recipe_name, "same_as": f"{other} {subset}"})
                return
        recipe = dataclasses.replace(self.recipe_config(model_name, recipe_name), seed=self.config.pm_seed)
        model, tokenizer, result = train_on_examples(model_name=model_name, examples=[self.pool[i] for i in indices],
                                                     config=recipe, device=self.device, progress=False)
        loss = mean_response_loss(model, self.objective_examples(tokenizer, recipe.data), tokenizer.pad_token_id)
        cell = self.cell_path(model_name, recipe_name, subset, self.config.pm_seed)
        stored = read_json(cell).get("objective_loss") if cell.is_file() else None
        if stored is not None and abs(stored - loss) > 1e-3:
            self.log(f"    note: {model_name} {recipe_name} {subset}: the repeated run's objective loss {loss:.6f} "
                     f"differs from the cell's {stored:.6f} (not the same training)")
        self.write_margin(model, tokenizer, model_name, recipe_name, indices, {
            "model": model_name, "recipe": recipe_name, "seed": self.config.pm_seed, "indices": list(indices),
            "subset": subset, "train_steps": result.steps, "train_seconds": round(result.seconds, 1),
            "objective_loss": loss})

    def _twin(self, model: str, recipe: str, subset: str, seed: int, key: str,
              evaluate: bool) -> dict[str, Any] | None:
        """The finished cell of another recipe with the same key (the same training config, seed, subset and
        scoring), as this recipe's row; None if there is none."""
        for other in RECIPES:
            path = self.cell_path(model, other, subset, seed)
            if other == recipe or not path.is_file():
                continue
            row = read_json(path)
            if row.get("key") == key and (not evaluate or "acc" in row):
                return {**row, "recipe": recipe, "same_as": f"{other} {subset} seed {seed}"}
        return None

    def cell_key(self, model: str, recipe: str, seed: int, indices: Sequence[int], evaluate: EvalConfig | None) -> str:
        recipe_config = self.recipe_config(model, recipe) if recipe != "tuned" or self.tuning_path(model).is_file() \
            else None
        return sha256_json(to_jsonable([model, recipe_config, seed, list(indices), evaluate, self.config.pool,
                                        self.config.objective_rows, self.config.objective_offset,
                                        self.config.objective_limit]))[:12]

    def grid_means(self, model: str, counts: Sequence[float] | None = None) -> dict[float, float]:
        """Mean validation acc of each epoch count of ``counts`` (default: the grid) whose cells were trained (the
        counts the grid stopped before are left out; every cell must be done)."""
        means = {}
        for epochs in self.config.tuning.epochs if counts is None else counts:
            cells = [read_json(self.tuning_cell_path(model, epochs, k)) for k in range(self.config.tuning.subsets)]
            if not any("skipped" in c for c in cells):
                means[epochs] = sum(c["acc"] for c in cells) / len(cells)
        return means

    def choose_epochs(self, model: str) -> None:
        means = self.grid_means(model)
        not_trained = [e for e in self.config.tuning.epochs if e not in means]
        atomic_write_json(self.tuning_path(model), {
            "model": model, "epochs": best_epochs(means), "mean_validation_acc": {f"{e:g}": m for e, m in means.items()},
            **({"not_trained": not_trained, "patience": self.config.tuning.patience} if not_trained else {}),
            "validation": to_jsonable(self.config.tuning.validation)})

    def tuning_cell(self, model: str, epochs: float, k: int) -> None:
        from .selection import random_indices

        grid = self.config.tuning.epochs
        earlier = grid[:grid.index(epochs)]   # all trained or skipped: the unit's needs
        means = self.grid_means(model, earlier)
        if len(means) < len(earlier) or grid_stopped([means[e] for e in earlier], self.config.tuning.patience):
            atomic_write_json(self.tuning_cell_path(model, epochs, k), {
                "model": model, "epochs": epochs, "subset": k,
                "skipped": f"the grid stopped: no count after {best_epochs(means):g} epochs beat it in "
                           f"{self.config.tuning.patience} consecutive counts"})
            return
        indices = random_indices(len(self.pool), self.count, self.config.tuning.seed + k)
        config = dataclasses.replace(self.config.recipe, epochs=float(epochs), max_steps=None)
        from .evaluation import evaluate_with_records
        from .training import train_on_examples

        model_obj, tokenizer, result = train_on_examples(model_name=model, examples=[self.pool[i] for i in indices],
                                                         config=config, device=self.device, progress=False)
        metrics, records = evaluate_with_records(model_obj, tokenizer, self.config.tuning.validation, progress=False)
        atomic_write_json(self.tuning_cell_path(model, epochs, k), {
            "model": model, "epochs": epochs, "subset": k, "indices": indices, "train_steps": result.steps,
            "acc": metrics["acc"], "acc_norm": metrics["acc_norm"], "n": metrics["n"],
            "train_seconds": round(result.seconds, 1), "eval_seconds": metrics["seconds"],
            # per validation question, 1 = right (paired comparisons of counts, or against the untrained model)
            "correct": "".join(str(r["acc"]) for r in records),
            "correct_norm": "".join(str(r["acc_norm"]) for r in records)})


def _rows_loss(model: torch.nn.Module, rows: Sequence[Any], params: dict[str, torch.Tensor], pad_id: int) -> float:
    """Token-mean response loss of ``rows`` with the model's LoRA tensors set to ``params`` (restored after)."""
    from .training import mean_response_loss

    named = dict(model.named_parameters())
    saved = {name: named[name].detach().clone() for name in params}
    try:
        with torch.no_grad():
            for name, value in params.items():
                named[name].copy_(value)
        return mean_response_loss(model, rows, pad_id)
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                named[name].copy_(value)


def _units(study: _Study) -> list[_Unit]:
    """Every unit of the study, in the order processes take them: the subsets and the matching scores first, then
    the comparison recipe's cells (the reference correlations), pm-student's scores, the tuned and student recipes.
    A unit whose needs are not done is passed over for the next (the tuning grid needs nothing)."""
    config = study.config
    units: list[_Unit] = [_Unit("subsets", study.subsets_path, study.make_subsets)]
    if "tm-denoised" in config.objectives:
        units.append(_Unit("forks", study.root / "forks" / "signal.json", study.make_forks))

    def scores(objectives: Sequence[str]) -> list[_Unit]:
        return [_Unit(f"scores {o}", study.score_path(o), lambda o=o: study.score_objective(o),
                      needs=("subsets",) + (("forks",) if o == "tm-denoised" else ()))
                for o in objectives if o in config.objectives]

    # the forks' end points are large files a later session may not have: their scores come early
    units += scores(("less", "tm", "tm-denoised"))
    planned = _planned_subset_names(config)
    for recipe in config.recipes:
        if recipe == "tuned":
            units += scores(("pm-student",))
        for model in config.models:
            if recipe == "student" and model not in config.student_models:
                continue
            needs = ("subsets",)
            if recipe == "tuned":
                units += _tuning_units(study, [model])
                needs = ("subsets", f"tuning {model}")
            performance = recipe != "student" and any(o in config.objectives for o in ("pm", "pm-sum",
                                                                                          *MARGIN_OBJECTIVES))
            for subset in planned:
                seeds = config.noise_seeds if subset in config.noise_subsets else (0,)
                for seed in seeds:
                    units.append(_cell_unit(study, model, recipe, subset, seed, True, needs))
                if performance and config.pm_seed not in seeds:
                    units.append(_cell_unit(study, model, recipe, subset, config.pm_seed, False, needs))
                if performance and _wants_margins(config):
                    # after the pm_seed cell, which writes the margin file itself (this unit repeats the run only
                    # for a cell made before pm-margin was an objective)
                    pm_cell = next(u.name for u in reversed(units) if u.output == study.cell_path(
                        model, recipe, subset, config.pm_seed))
                    units.append(_Unit(f"{model} {recipe} {subset} margin", study.margin_path(model, recipe, subset),
                                       lambda m=model, r=recipe, s=subset: study.margin_cell(m, r, s),
                                       needs + (pm_cell,)))
    units += scores(("pm-student",))   # when no recipe is "tuned"
    seen: set[str] = set()
    return [u for u in units if not (u.name in seen or seen.add(u.name))]


def _tuning_units(study: _Study, models: Sequence[str]) -> list[_Unit]:
    """The tuned recipe's rule for ``models``: its grid cells, then each model's choice once its cells are done."""
    config = study.config
    grid = {model: [] for model in models}
    units: list[_Unit] = []
    for epochs in config.tuning.epochs:   # epoch-major: an interrupted grid has the short counts of every model
        for model in models:
            # with patience, whether a count is trained depends on every shorter count's cells
            needs = tuple(grid[model]) if config.tuning.patience is not None else ()
            names = [f"tuning {model} epochs {epochs:g} subset {k}" for k in range(config.tuning.subsets)]
            units += [_Unit(name, study.tuning_cell_path(model, epochs, k),
                            lambda m=model, e=epochs, k=k: study.tuning_cell(m, e, k), needs)
                      for k, name in enumerate(names)]
            grid[model] += names
    units += [_Unit(f"tuning {model}", study.tuning_path(model), lambda m=model: study.choose_epochs(m),
                    needs=tuple(grid[model])) for model in models]
    return units


def _report_tuning(study: _Study, log) -> list[Path]:
    """``tuning_only``'s result: the paths of the models whose epochs are chosen, each choice logged."""
    written = [study.tuning_path(m) for m in study.config.models if study.tuning_path(m).is_file()]
    for path in written:
        chosen = read_json(path)
        means = ", ".join(f"{e}: {a:.3f}" for e, a in chosen["mean_validation_acc"].items())
        log(f"{chosen['model']}: {chosen['epochs']:g} epochs (mean validation acc by epochs: {means})")
    return written


def _wants_margins(config: ValidityConfig) -> bool:
    return any(o in config.objectives for o in MARGIN_OBJECTIVES)


def _cell_unit(study: _Study, model: str, recipe: str, subset: str, seed: int, evaluate: bool,
               needs: tuple[str, ...]) -> _Unit:
    out = study.cell_path(model, recipe, subset, seed)

    def run() -> None:
        indices = study.subsets()[subset]
        study.train_cell(model, recipe, indices, seed, evaluate=study.config.accuracy if evaluate else None, out=out)

    return _Unit(f"{model} {recipe} {subset} seed {seed}{'' if evaluate else ' (objective rows only)'}", out, run,
                 needs)


def _planned_subset_names(config: ValidityConfig) -> list[str]:
    """The names :meth:`_Study.make_subsets` gives, in its order (known before the subsets are made)."""
    names = [f"null-{r}" if r < config.instrument_null else f"random-{r - config.instrument_null}"
             for r in range(config.random_subsets)]
    names += ["less-top", "less-bottom", f"less-best-of-{config.spread_draws}", f"less-worst-of-{config.spread_draws}"]
    if config.tm_spread_draws:
        names += [f"tm-best-of-{config.tm_spread_draws}", f"tm-worst-of-{config.tm_spread_draws}"]
    if config.match_selection:
        names.append("match")
    # the noise subsets first, so that the ceiling is known early
    return [n for n in names if n in config.noise_subsets] + [n for n in names if n not in config.noise_subsets]


def write_report(study: _Study, output: Path) -> list[Path]:
    """Write ``output/<objective>-<model>-<budget>-<recipe>.json`` for every combination whose cells are all done
    (partial combinations are skipped); returns the written paths."""
    config = study.config
    subsets = study.subsets()
    written = []
    budget = config.budget.replace("%", "pct")
    for recipe in config.recipes:
        for model in config.models:
            if recipe == "student" and model not in config.student_models:
                continue
            cells = {}
            for name in subsets:
                path = study.cell_path(model, recipe, name, 0)
                if path.is_file():
                    cells[name] = read_json(path)
            if len(cells) < len(subsets):
                continue
            replicates = []
            for name in config.noise_subsets:
                accs = [read_json(study.cell_path(model, recipe, name, s))["acc"] for s in config.noise_seeds
                        if study.cell_path(model, recipe, name, s).is_file()]
                replicates.append(accs)
            ceiling = noise_ceiling([cells[n]["acc"] for n in subsets], replicates)
            for objective in config.objectives:
                scores, seconds = _objective_scores(study, objective, model, recipe, subsets)
                if scores is None:
                    continue
                points = [{"set": n, "indices": subsets[n], "score": scores[n], "acc": cells[n]["acc"],
                           "acc_norm": cells[n]["acc_norm"]} for n in subsets]
                rho, ci = spearman_with_interval([p["score"] for p in points], [p["acc"] for p in points],
                                                 resamples=config.bootstrap)
                rho_norm, ci_norm = spearman_with_interval([p["score"] for p in points],
                                                           [p["acc_norm"] for p in points],
                                                           resamples=config.bootstrap)
                influence = most_influential_point([p["score"] for p in points], [p["acc"] for p in points])
                path = output / f"{objective}-{_short(model)}-{budget}-{recipe}.json"
                atomic_write_json(path, {
                    "objective": objective, "model": model, "budget": config.budget, "recipe": recipe,
                    "recipe_config": to_jsonable(study.recipe_config(model, recipe)), "n": len(points),
                    "spearman": rho, "ci95": ci, "spearman_acc_norm": rho_norm, "ci95_acc_norm": ci_norm,
                    "without_most_influential": {"set": points[influence[0]]["set"], "spearman": influence[1]},
                    "noise_ceiling": ceiling["noise_ceiling"], "seed_std": ceiling["seed_std"],
                    "acc_std": ceiling["total_std"], "noise_replicates": dict(zip(config.noise_subsets, replicates)),
                    "seconds_per_score": seconds, "accuracy": to_jsonable(config.accuracy),
                    "score_means": "higher = the objective prefers the set", "points": points,
                    **({"margin_cap": config.margin_cap} if objective == "pm-margin-capped" else {})})
                written.append(path)
    return written


def _short(model: str) -> str:
    return {"smollm2-135m": "smollm2", "gemma3-270m": "gemma3"}.get(model, Path(model).name)


def _objective_scores(study: _Study, objective: str, model: str, recipe: str,
                      subsets: dict[str, list[int]]) -> tuple[dict[str, float] | None, float | None]:
    config = study.config
    if objective in ("pm", "pm-sum"):
        if recipe == "student":
            return None, None
        folders = ([study.cell_path(model, recipe, "x", 0).parents[3]] if objective == "pm" else
                   _receiver_folders(study, recipe))
        scores = {n: 0.0 for n in subsets}
        seconds = 0.0
        for folder in folders:
            for n in subsets:
                path = folder / recipe / n / f"seed{config.pm_seed}" / "result.json"
                if not path.is_file():
                    return None, None
                cell = read_json(path)
                scores[n] -= cell["objective_loss"]
                seconds += cell["train_seconds"] + cell["objective_seconds"]
        return scores, seconds / len(subsets)
    if objective in MARGIN_OBJECTIVES:
        from .evaluation import mean_margin

        if recipe == "student":
            return None, None
        if objective == "pm-margin-sum":
            return _margin_sum(study, recipe, subsets)
        paths = {n: study.margin_path(model, recipe, n) for n in subsets}
        if not all(p.is_file() for p in paths.values()):
            return None, None
        rows = {n: read_json(p) for n, p in paths.items()}
        if objective == "pm-margin-capped":
            old = [n for n, r in rows.items() if "question_margins" not in r]
            if old:   # written before margin files kept each question's margin
                study.log(f"  pm-margin-capped {model} {recipe}: {len(old)} margin files lack question_margins "
                          f"(e.g. {paths[old[0]]}); delete them and rerun to repeat those runs")
                return None, None
            scores = {n: mean_margin(r["question_margins"], config.margin_cap) for n, r in rows.items()}
        else:
            scores = {n: r["gold_minus_best_other"] for n, r in rows.items()}
        return scores, sum(r["train_seconds"] + r["margin_seconds"] for r in rows.values()) / len(rows)
    path = study.score_path(objective)
    if not path.is_file():
        return None, None
    stored = read_json(path)
    return stored["scores"], stored["seconds_per_score"]


def _receiver_folders(study: _Study, recipe: str) -> list[Path]:
    """The cell folder of every receiver a sum over receivers (pm-sum, pm-margin-sum) covers under ``recipe``: the
    study's models, then any other whose cells the folder holds (one a run limited with --models leaves out)."""
    named = [study.cell_path(m, recipe, "x", 0).parents[3] for m in study.config.models]
    return named + sorted({p.parent for p in (study.root / "cells").glob(f"*/{recipe}")} - set(named))


def _margin_sum(study: _Study, recipe: str, subsets: dict[str, list[int]]) -> tuple[dict[str, float] | None,
                                                                                     float | None]:
    """``pm-margin-sum``: each subset's held-out margin summed over every receiver of the study folder under
    ``recipe`` (the score of text chosen for all of them at once, as ``distill-pm --co_receivers`` scores it), and
    the seconds of all their runs per subset; None while any receiver lacks a subset's margin."""
    scores = {n: 0.0 for n in subsets}
    seconds = 0.0
    for folder in _receiver_folders(study, recipe):
        for n in subsets:
            path = folder / recipe / n / f"seed{study.config.pm_seed}" / "margin.json"
            if not path.is_file():
                if any(folder.glob(f"{recipe}/*/seed*/result.json")):   # a receiver begun, not only planned
                    study.log(f"  pm-margin-sum {recipe}: {path} is missing; the sum waits for every receiver")
                return None, None
            row = read_json(path)
            scores[n] += row["gold_minus_best_other"]
            seconds += row["train_seconds"] + row["margin_seconds"]
    return scores, seconds / len(subsets)


def summary_table(paths: Sequence[Path]) -> str:
    """A Markdown table of result files: objective, model, recipe, n, Spearman, interval, noise ceiling."""
    lines = ["| objective | model | recipe | n | Spearman (acc) | 95% interval | without its most influential subset "
             "| noise ceiling | s / score |",
             "|---|---|---|---:|---:|---|---|---:|---:|"]
    for path in sorted(paths):
        r = read_json(path)
        seconds = "" if r["seconds_per_score"] is None else f"{r['seconds_per_score']:.1f}"
        without = r.get("without_most_influential")
        dropped = "" if without is None else f"{without['spearman']:+.2f} (no {without['set']})"
        lines.append(f"| {r['objective']} | {r['model']} | {r['recipe']} | {r['n']} | {r['spearman']:+.2f} | "
                     f"[{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}] | {dropped} | {r['noise_ceiling']:.2f} | "
                     f"{seconds} |")
    return "\n".join(lines)


#: Settings that may change between runs on one folder (they add work or only change the report); any other change
#: would mix cells made under two settings, so it is refused.
# settings that change no stored unit (margin_cap: the capped score is computed from the stored margins)
_EXTENSIBLE = ("name", "models", "recipes", "objectives", "margin_cap", "bootstrap", "report", "tuning_only")


def _check_same_study(root: Path, config: ValidityConfig) -> None:
    """Refuse to run a study in a folder made with other settings (the keyed settings, unset options left out, so
    that an option added later keeps a folder usable)."""
    from .keys import without_none, keyed

    settings = without_none({k: v for k, v in keyed(config).items() if k not in _EXTENSIBLE})
    path = root / "study.json"
    if path.is_file():
        before = without_none(read_json(path)["settings"])
        if before != settings:
            changed = sorted(k for k in set(settings) | set(before) if before.get(k) != settings.get(k))
            raise ConfigError(f"{root} holds a validity study made with other settings ({', '.join(changed)}); use "
                              f"another --output (only {', '.join(_EXTENSIBLE)} may change between runs)")
    else:
        atomic_write_json(path, {"settings": settings})


def run_validity(config: ValidityConfig, output: str | Path, *, device: str = "auto", progress: bool = True,
                 log=print, report_only: bool = False) -> list[Path]:
    """Entry of ``textdistill validity``: run every unit of the study not done yet (sharing the folder with other
    processes), then write the per-(objective, model, recipe) result files under ``config.report`` (default
    ``output/validity/``). Returns
    their paths. ``report_only`` runs nothing and reports what is done. With ``tuning_only``, only the tuned
    recipe's rule runs, and the paths returned are ``tuning/<model>.json`` (the chosen epochs)."""
    if not config.tuning_only and not config.experts:
        raise ConfigError("set 'experts' to an experts folder (trajectory matching scores against it)")
    if not config.tuning_only and not config.less_scores:
        raise ConfigError("set 'less_scores' to a LESS selection file with all_scores (textdistill select "
                          "--method less)")
    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)
    _check_same_study(root, config)
    if not report_only:   # the record of the runs that made the folder, not of a report
        write_run_info(root, command="validity", config=config)
    study = _Study(config, root, device=device, progress=progress, log=log)
    if not report_only:
        _run_units(_tuning_units(study, config.models) if config.tuning_only else _units(study), log=log)
    if config.tuning_only:
        return _report_tuning(study, log)
    if not study.subsets_path.is_file():
        return []
    return write_report(study, Path(config.report) if config.report else root / "validity")
