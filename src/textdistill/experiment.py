"""The experiment runner: every (method, budget, seed) cell, for every evaluated model, trained with one recipe.

Methods:

* ``base``: the model as it is (no training).
* ``full``: the whole pool.
* ``random``: a random subset at the budget (seeded).
* ``less``: the LESS selection at the budget.
* ``match``: the rows whose gradients best reproduce the experts' segments (selection by the matching objective).
* ``distilled``: the text of the distillation (initialised as ``distill_init`` says: random rows, LESS or match).
* ``distill-init``: the real samples that distillation started from (the control for ``distilled``).
* ``continuous``: the distillation's learned prompt vectors themselves (input embeddings + response tokens); the
  distilling model only (another tokenizer cannot read vectors).

Every stage's output is kept under the run folder and every finished cell writes ``cells/.../result.json``, so a
rerun skips what is done; a trained LoRA cell also keeps its adapter in ``cells/.../adapter/`` (its row's ``adapter``
names it, relative to the run folder). Results: ``results.csv``/``results.json``, ``report.md`` and PNG plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import distributed
from .artifacts import atomic_write_json, read_json, sha256_json, try_lock, write_run_info
from .config import (DataSettings, EvalConfig, TrainConfig, apply_overrides, build_dataclass, option, read_preset,
                     read_yaml)
from .data import Example, load_examples, load_task, rows_to_examples, with_task_template
from .distill import DistillConfig
from .errors import ConfigError, TextDistillError
from .keys import code_identity, settings_key
from .experts import ExpertsConfig
from .less import LessConfig, parse_target, select_less
from .match_selection import MatchSelectionConfig
from .performance_selection import PerformanceSelectionConfig
from .report import CellResult

METHODS = ("base", "full", "random", "less", "match", "performance", "distill-init", "distilled", "continuous")
#: Methods whose data come from the distillation run.
DISTILL_METHODS = ("distill-init", "distilled", "continuous")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole comparison: pool, target, models, budgets, methods, seeds and the one training recipe."""

    name: str = option("experiment", "the comparison's name (reports)", keyed=False)
    pool: str = option("arc-easy:train", "the pool every arm selects from or distils")
    pool_limit: int | None = option(None, "keep the first N pool rows")
    target: EvalConfig = option(factory=EvalConfig, help="the task split every cell is scored on")
    distill_model: str = option("smollm2-135m", "the model that makes the experts, LESS, match and the distillation")
    models: tuple[str, ...] = option(("smollm2-135m", "gemma3-270m"), "the receivers: trained and scored per arm",
                                     keyed=False)
    budgets: tuple[str, ...] = option(("5%",), "budgets: counts or percentages of the pool", keyed=False)
    methods: tuple[str, ...] = option(("base", "full", "random", "less", "distilled"),
                                      f"arms, among {', '.join(METHODS)}", keyed=False)
    seeds: tuple[int, ...] = option((0, 1, 2), "training seeds (a random subset is redrawn per seed)", keyed=False)
    recipe: TrainConfig = option(factory=TrainConfig, help="the one training recipe of every cell")
    experts: ExpertsConfig = option(factory=ExpertsConfig, help="the expert runs (match, distillation)")
    distill: DistillConfig = option(factory=DistillConfig, help="the distillation")
    less: LessConfig = option(factory=lambda: LessConfig(target="arc-easy:validation"),
                              help="LESS on distill_model's gradients, for ARC-Easy's validation split unless set")
    match: MatchSelectionConfig = option(factory=MatchSelectionConfig, help="selection by the matching objective")
    performance: PerformanceSelectionConfig = option(
        factory=PerformanceSelectionConfig, help="selection by performance matching: the best of random subsets "
                                                 "trained with `recipe`, by the held-out loss of the receivers")
    distill_init: Literal["random", "less", "match"] = option("match", "the distillation's starting samples")
    distill_per_seed: bool = option(True, "false: one distillation (seed 0) shared by all training seeds")
    paired_reference: str | None = option(
        None, "the arm the report compares question by question with every other arm (the same questions and "
              "training seeds; a bootstrap 95% interval over questions); default: distilled if run, else random, "
              "else none", keyed=False)

    def __post_init__(self) -> None:
        # the target's template is part of every cell key: an unset one becomes the task's default, as it always was
        object.__setattr__(self, "target", with_task_template(self.target))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
        if not self.models:
            raise ConfigError("list at least one model under 'models'")
        if not self.seeds:
            raise ConfigError("list at least one seed under 'seeds'")
        if self.paired_reference in ("base", "full"):
            raise ConfigError(f"paired_reference must be an arm trained at a budget, not '{self.paired_reference}' "
                              f"(base and full are compared with it at every budget)")
        if self.paired_reference is not None and self.paired_reference not in self.methods:
            raise ConfigError(f"paired_reference '{self.paired_reference}' is not one of the arms run "
                              f"({', '.join(self.methods)})")
        distilling = bool(set(self.methods) & set(DISTILL_METHODS))
        matching = "match" in self.methods or (distilling and self.distill_init == "match")
        held_by_match, held_by_instrument = self.match.heldout_experts, self.distill.instrument.heldout_experts
        if distilling and matching and held_by_match != held_by_instrument:
            raise ConfigError(f"match.heldout_experts ({held_by_match}) and distill.instrument.heldout_experts "
                              f"({held_by_instrument}) differ: the match selection (the distillation's start) would "
                              f"see experts the instrument holds out, or skip ones it could use; give both the same "
                              f"value")

    def paired_reference_arm(self) -> str | None:
        """The arm the report's paired differences are taken against (``paired_reference``, else its default)."""
        if self.paired_reference is not None:
            return self.paired_reference
        return next((m for m in ("distilled", "random") if m in self.methods), None)


def load_experiment_config(path_or_preset: str, overrides: dict[str, Any] | None = None,
                           sets: dict[str, Any] | None = None) -> ExperimentConfig:
    """An experiment config from a YAML file or a shipped preset name (``demo``, ``arc-easy``, ``mmlu``).

    ``overrides`` are dotted keys from flags (``None`` = flag not given, skipped); ``sets`` are explicit
    ``--set KEY=VALUE`` values, applied last, where ``None`` (YAML ``null``) really sets ``None``."""
    path = Path(path_or_preset)
    values = read_yaml(path) if path.suffix in (".yaml", ".yml") or path.exists() else read_preset(path_or_preset)
    values = apply_overrides(values.get("experiment", values), overrides)
    return build_dataclass(ExperimentConfig, apply_overrides(values, sets, skip_none=False), "experiment")


def _pool_settings(config: ExperimentConfig) -> DataSettings:
    return dataclasses.replace(config.recipe.data, limit=config.pool_limit)


def resolve_precisions(config: ExperimentConfig, device: str) -> ExperimentConfig:
    """Replace ``precision: auto`` of the recipe, the experts and the distillation by what it means on ``device``
    (bf16 where it is native, else fp32)."""
    from .models import resolve_precision

    experts = config.experts
    return dataclasses.replace(
        config, recipe=dataclasses.replace(config.recipe, precision=resolve_precision(config.recipe.precision, device)),
        experts=dataclasses.replace(experts, train=dataclasses.replace(
            experts.train, precision=resolve_precision(experts.train.precision, device))),
        distill=dataclasses.replace(config.distill, precision=resolve_precision(config.distill.precision, device)))


def validate(config: ExperimentConfig) -> list[Example]:
    """Check everything that can be checked before any model is loaded; returns the pool examples."""
    from .selection import resolve_budget

    target = config.target
    load_task(target.task, target.split, subjects=target.subjects, limit=1, fields=target.fields)
    if "less" in config.methods or (config.distill_init == "less" and set(config.methods) & set(DISTILL_METHODS)):
        task, split = parse_target(config.less.target)
        load_task(task, split, limit=1, fields=config.less.target_fields)
    pool = load_examples(config.pool, _pool_settings(config))
    for budget in config.budgets:
        resolve_budget(budget, len(pool))
    return pool


def _cell_dir(root: Path, model: str, method: str, budget: str, seed: int | None) -> Path:
    safe_model = model.strip("/").replace("/", "__")
    budget_name = budget.replace("%", "pct")
    return root / "cells" / safe_model / method / budget_name / (f"seed{seed}" if seed is not None else "none")


@contextlib.contextmanager
def stage_lock(target: Path, *, poll_seconds: float = 10.0, log=print):
    """Hold ``<target>.lock`` while a stage output is made, so that two ``experiment`` processes sharing a run
    folder (e.g. one per model) never make the same stage twice or write into each other's files: the second
    waits, then finds the output done."""
    announced = False
    while (lock := try_lock(target)) is None:
        if not announced:
            log(f"    waiting for another process to finish {target.name}")
            announced = True
        time.sleep(poll_seconds)
    try:
        yield
    finally:
        lock.release()


class _Stages:
    """Produces (and caches on disk) the training data of each (method, budget, seed)."""

    def __init__(self, config: ExperimentConfig, root: Path, pool: list[Example], device: str, progress: bool,
                 log=print, trust_remote_code: bool = False, checkpoint_every: int | None = None,
                 checkpoint_seconds: float | None = 300.0):
        self.config, self.root, self.pool, self.device, self.progress = config, root, pool, device, progress
        self.log = log
        self.trust_remote_code = trust_remote_code
        # when the training loops of experts and cells write their full state (for resuming after a kill)
        self.checkpoint_every, self.checkpoint_seconds = checkpoint_every, checkpoint_seconds
        self.seconds: dict[str, float] = {}

    def _timed(self, key: str, fn):
        start = time.time()
        value = fn()
        self.seconds[key] = self.seconds.get(key, 0.0) + time.time() - start
        return value

    def key(self, *parts: Any) -> str:
        """Short hash of the settings a stage depends on: a changed config gets a new folder, never a stale one."""
        return settings_key([self.config.pool, _pool_settings(self.config), *parts])[:8]

    def experts_dir(self) -> Path:
        from .experts import make_experts

        key = self.key(self.config.distill_model, self.config.experts, *code_identity("experts"))
        folder = self.root / f"experts-{key}"
        if self._experts_done(folder):
            return folder
        with stage_lock(folder, log=self.log):
            if self._experts_done(folder):
                return folder
            experts_config = dataclasses.replace(self.config.experts, train=dataclasses.replace(
                self.config.experts.train, data=_pool_settings(self.config)))
            self._timed("experts", lambda: make_experts(model_name=self.config.distill_model, data=self.config.pool,
                                                        output=folder, config=experts_config, device=self.device,
                                                        progress=self.progress,
                                                        trust_remote_code=self.trust_remote_code,
                                                        checkpoint_every=self.checkpoint_every,
                                                        checkpoint_seconds=self.checkpoint_seconds))
        return folder

    def _experts_done(self, folder: Path) -> bool:
        from .experts import load_experts

        if not (folder / "manifest.json").is_file():
            return False
        try:
            return len(load_experts(folder).snapshots) >= self.config.experts.num_experts
        except (TextDistillError, OSError):   # unfinished or damaged: make_experts continues or reports it
            return False

    def scoring_models(self, model: str | None) -> tuple[str, ...]:
        """The models whose held-out loss picks the ``performance`` selection that ``model`` trains on."""
        if self.config.performance.models is not None:
            return tuple(self.config.performance.models)
        if model is None:
            raise ConfigError("performance.models is unset: each receiver scores its own selection, so name the model")
        return (model,)

    def selection(self, method: str, budget: str, seed: int, model: str | None = None) -> Path:
        """The selection file of a (method, budget, seed); made (once, under a lock) if missing. ``model``: the
        receiver, for a ``performance`` selection that each receiver scores for itself."""
        settings = stage_settings(self.config, method)
        scored_by = ""
        if method == "performance":
            scoring = self.scoring_models(model)
            settings = [*settings, list(scoring)]
            scored_by = "-" + "+".join(Path(m.rstrip("/")).name for m in scoring)
        key = self.key(*settings)
        name = f"{method}-{budget.replace('%', 'pct')}-seed{seed if method == 'random' else 0}{scored_by}-{key}.json"
        path = self.root / "selections" / name
        if path.is_file():
            return path
        if method == "performance":
            # no stage lock: each of its training runs is claimed on its own (performance_selection.score_draws),
            # so every process that needs this selection trains a share of the draws instead of waiting for one
            # process to train them all; each then writes the same selection, atomically
            self._make_selection(method, budget, seed, key, path, model)
            return path
        with stage_lock(path, log=self.log):
            if not path.is_file():
                self._make_selection(method, budget, seed, key, path, model)
        return path

    def _make_selection(self, method: str, budget: str, seed: int, key: str, path: Path,
                        model: str | None = None) -> None:
        from .selection import reselect, select_random

        # LESS scores do not depend on the budget: cut this budget from another budget's scores when there are any
        scored = sorted(path.parent.glob(f"less-*-seed0-{key}.json")) if method == "less" else []
        if method == "random":
            self._timed("select-random", lambda: select_random(data=self.config.pool, budget=budget, output=path,
                                                               seed=seed, examples=self.pool))
        elif method == "match":
            from .match_selection import cut_selection, select_by_matching
            from .selection import resolve_budget

            # greedy choices are prefix-consistent: make the largest budget once, cut the others from it
            largest = budget
            if self.config.match.greedy:
                largest = max(self.config.budgets, key=lambda b: resolve_budget(b, len(self.pool)))
            source = path.with_name(path.name.replace(f"-{budget.replace('%', 'pct')}-",
                                                      f"-{largest.replace('%', 'pct')}-"))

            def make_source() -> None:
                experts = self.experts_dir()
                self._timed("select-match", lambda: select_by_matching(
                    experts=experts, budget=largest, output=source, config=self.config.match, device=self.device,
                    progress=self.progress, trust_remote_code=self.trust_remote_code))

            if source == path:
                make_source()
            else:
                with stage_lock(source, log=self.log):
                    if not source.is_file():
                        make_source()
                cut_selection(source, budget, path, self.pool)
        elif method == "performance":
            from .performance_selection import select_by_performance

            # the per-draw runs are shared by every performance selection of this pool and recipe
            self._timed("select-performance", lambda: select_by_performance(
                data=self.config.pool, budget=budget, output=path, config=self.config.performance,
                recipe=self.config.recipe, models=self.scoring_models(model), examples=self.pool,
                cache_dir=self.root / "selections" / "performance-draws", device=self.device,
                progress=self.progress, trust_remote_code=self.trust_remote_code, log=self.log))
        elif scored:
            reselect(scored[0], budget, path, self.pool)
        else:
            self._timed("select-less", lambda: select_less(
                data=self.config.pool, budget=budget, output=path, seed=0, examples=self.pool,
                model=self.config.distill_model, config=self.config.less, device=self.device, progress=self.progress,
                data_settings=_pool_settings(self.config), trust_remote_code=self.trust_remote_code))

    def distilled(self, budget: str, seed: int) -> Path:
        """The distillation run folder of a (budget, seed); made (once, under a lock) if missing. The LESS and
        match selections of the experiment are made first, so its held-out report scores them too."""
        from .distill import distill

        config = self.config
        key = self.key(*stage_settings(config, "distilled"))
        folder = self.root / "distill" / f"{budget.replace('%', 'pct')}-seed{seed}-{key}"
        if (folder / "distilled.jsonl").is_file() and (folder / "summary.json").is_file():
            return folder
        experts = self.experts_dir()
        compare = {m: str(self.selection(m, budget, 0)) for m in ("less", "match")
                   if m in config.methods or m == config.distill_init}
        distill_config = dataclasses.replace(config.distill, budget=budget, seed=seed)
        if config.distill_init != "random":
            distill_config = dataclasses.replace(distill_config, init="selection",
                                                 selection=compare[config.distill_init])
        with stage_lock(folder, log=self.log):
            if not (folder / "summary.json").is_file():
                resume = (folder / "state.json").is_file()   # an interrupted run continues exactly
                self._timed("distill", lambda: distill(experts=experts, output=folder, config=distill_config,
                                                       resume=resume, compare=compare, device=self.device,
                                                       progress=self.progress,
                                                       trust_remote_code=self.trust_remote_code))
        return folder

    def examples(self, method: str, budget: str, seed: int,
                 model: str | None = None) -> tuple[list[Example], dict[str, Any]]:
        """Training examples of a cell of receiver ``model`` and what to record about them (``continuous`` has none:
        see :meth:`distilled`)."""
        from .selection import apply_selection

        if method == "full":
            return list(self.pool), {}
        if method in ("random", "less", "match"):
            return apply_selection(self.pool, self.selection(method, budget, seed)), {}
        if method == "performance":
            path = self.selection(method, budget, seed, model)
            return apply_selection(self.pool, path), {"selection": path.name}
        folder = self.distilled(budget, seed if self.config.distill_per_seed else 0)
        if method == "distill-init":
            init = read_json(folder / "init.json")
            return [self.pool[i] for i in init["indices"]], {"distill_run": str(folder)}
        rows = [json.loads(line) for line in (folder / "distilled.jsonl").read_text().splitlines() if line.strip()]
        return rows_to_examples(rows, origin=str(folder / "distilled.jsonl")), {"distill_run": str(folder)}


def stage_settings(config: ExperimentConfig, method: str) -> list[Any]:
    """Every setting the data of a ``method`` cell depend on, beyond the pool, and the version of the code that makes
    them (a cell or stage is reused only when these are unchanged, so changing the distillation never redoes the
    random or LESS cells)."""
    if method in ("base", "full"):
        return []
    if method == "random":
        return code_identity("random")
    if method == "less":
        return [config.distill_model, config.less, *code_identity("less")]
    if method == "match":
        return [config.distill_model, config.experts, config.match, *code_identity("experts", "match")]
    if method == "performance":
        return [config.recipe, config.performance, *code_identity("performance")]
    if method in DISTILL_METHODS:
        init = {"random": None, "less": config.less, "match": (config.experts, config.match)}[config.distill_init]
        init_stages = {"random": ("random",), "less": ("less",), "match": ("match",)}[config.distill_init]
        return [config.distill_model, config.experts, config.distill, config.distill_init, init,
                config.distill_per_seed, *code_identity("experts", "distill", *init_stages)]
    raise ConfigError(f"unknown method '{method}'")


def cell_key(config: ExperimentConfig, method: str) -> str:
    """Key of a finished cell: the pool, target, training recipe, the stage settings of its method and the version of
    the code that trains and scores it."""
    return settings_key([config.pool, _pool_settings(config), config.target, config.recipe,
                         *stage_settings(config, method), *code_identity("cell")])[:12]


def training_data_key(examples: list[Example]) -> str:
    """Hash of what training sees of a cell's data: the ordered (prompt, response) pairs."""
    return sha256_json([[e.prompt, e.response] for e in examples])[:16]


def run_cell(config: ExperimentConfig, stages: _Stages, model_name: str, method: str, budget: str,
             seed: int | None, progress: bool, same_data: dict[tuple, dict[str, Any]] | None = None,
             adapter: Path | None = None, checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Train (unless ``base``) and evaluate one cell; returns its result row.

    ``same_data`` maps ``(model, seed, training_data_key)`` to finished rows: a cell whose training data is exactly
    that of a finished cell (e.g. a distillation that changed no token, next to its starting samples) would repeat
    the same deterministic run, so its scores and its ``adapter`` are copied and the row says ``same_data_as``.
    ``adapter``: the folder (under ``stages.root``) where the cell's trained LoRA adapter is saved.
    ``checkpoint_dir``: where the cell's training writes its full state every few minutes; an interrupted cell
    continues from it exactly (the caller removes it once the cell's result is written)."""
    from .checkpoint import TrainCheckpointer
    from .models import load_model, load_tokenizer, save_adapter
    from .training import train_on_embeddings, train_on_examples

    def checkpointer(data_key: str) -> TrainCheckpointer | None:
        if checkpoint_dir is None:
            return None
        checkpointer = TrainCheckpointer(checkpoint_dir, every_seconds=stages.checkpoint_seconds,
                                         every_steps=stages.checkpoint_every,
                                         fingerprint={"cell": cell_key(config, method), "model": model_name,
                                                      "seed": seed, "data": data_key})
        checkpointer.discard_if_stale()   # an interrupted run of this cell under other settings: start over
        return checkpointer

    row: dict[str, Any] = {"model": model_name, "method": method, "budget": budget if method not in ("base",) else "",
                           "seed": seed if seed is not None else "", "task": f"{config.target.task}:{config.target.split}"}
    start = time.time()
    if method == "base":
        tokenizer = load_tokenizer(model_name, trust_remote_code=stages.trust_remote_code)
        model = load_model(model_name, device=stages.device, attn_implementation="sdpa",
                           trust_remote_code=stages.trust_remote_code)
        row.update({"train_examples": 0, "train_seconds": 0.0, "data_seconds": 0.0})
    elif method == "continuous":
        from .artifacts import sha256_file

        folder = stages.distilled(budget, seed if config.distill_per_seed else 0)
        embeddings = folder / "embeddings.safetensors"
        row.update({"distill_run": str(folder), "data_key": sha256_file(embeddings)[:16]})
        model, tokenizer, result = train_on_embeddings(
            model_name=model_name, embeddings=embeddings, config=dataclasses.replace(config.recipe, seed=seed),
            device=stages.device, progress=progress, checkpointer=checkpointer(row["data_key"]),
            trust_remote_code=stages.trust_remote_code)
        row.update({"train_examples": result.examples, "train_steps": result.steps,
                    "train_seconds": round(result.seconds, 1), "train_last_loss": round(result.losses[-1], 4)})
    else:
        data_start = time.time()
        examples, info = stages.examples(method, budget, seed, model_name)
        row["data_seconds"] = round(time.time() - data_start, 1)
        row.update(info)
        row["data_key"] = training_data_key(examples)
        twin = (same_data or {}).get((model_name, seed, row["data_key"]))
        if twin is not None:
            row.update({k: twin[k] for k in CellResult.run_fields() if k in twin})
            if adapter is not None:   # an adapter this cell trained under other settings is not its run any more
                shutil.rmtree(adapter, ignore_errors=True)
            row.update({"train_examples": len(examples), "cell_seconds": round(time.time() - start, 1),
                        "same_data_as": f"{twin['method']} {twin['budget']} seed {twin['seed']}"})
            if method == "distilled":
                row["prompt_tokens_mean"] = _prompt_tokens_mean(
                    load_tokenizer(model_name, trust_remote_code=stages.trust_remote_code), examples)
            return row
        recipe = dataclasses.replace(config.recipe, seed=seed)
        model, tokenizer, result = train_on_examples(model_name=model_name, examples=examples, config=recipe,
                                                     device=stages.device, progress=progress,
                                                     checkpointer=checkpointer(row["data_key"]),
                                                     trust_remote_code=stages.trust_remote_code)
        row.update({"train_examples": len(examples), "train_steps": result.steps,
                    "train_seconds": round(result.seconds, 1), "train_last_loss": round(result.losses[-1], 4)})
        if method == "distilled":
            row["prompt_tokens_mean"] = _prompt_tokens_mean(tokenizer, examples)
    if adapter is not None and method != "base" and config.recipe.method == "lora":   # full fine-tuning: no adapter
        save_adapter(model, tokenizer, adapter, model_name)
        row["adapter"] = str(adapter.relative_to(stages.root))
    from .evaluation import evaluate_with_records

    metrics, records = evaluate_with_records(model, tokenizer, config.target, progress=progress)
    row.update({"acc": metrics["acc"], "acc_norm": metrics["acc_norm"], "n": metrics["n"],
                "eval_seconds": metrics["seconds"], "cell_seconds": round(time.time() - start, 1),
                # per question, for the report's paired differences (the same questions in every cell)
                "correct": "".join(str(r["acc"]) for r in records),
                "correct_norm": "".join(str(r["acc_norm"]) for r in records)})
    return row


def _prompt_tokens_mean(tokenizer: Any, examples: list[Example]) -> float:
    """Mean number of tokens the (target) tokenizer makes of the prompts: what re-tokenized distilled text costs."""
    counts = [len(tokenizer(e.prompt, add_special_tokens=False)["input_ids"]) for e in examples]
    return round(sum(counts) / len(counts), 2)


#: How often a process waits for cells that another process sharing the run folder is running.
CELL_POLL_SECONDS = 20.0


def _finished_by_data(root: Path, keys: dict[str, str]) -> dict[tuple, dict[str, Any]]:
    """Finished cells of this config (any method, also those of other processes) by the data they trained on."""
    finished = {}
    for path in sorted((root / "cells").glob("**/result.json")):
        row = read_json(path)
        if (row.get("config_key") == keys.get(row.get("method")) and row.get("data_key")
                and "same_data_as" not in row):
            finished[(row["model"], row["seed"], row["data_key"])] = row
    return finished


def run_experiment(config: ExperimentConfig, output: str | Path, *, device: str = "auto",
                   progress: bool = True, log=print, report_only: bool = False, trust_remote_code: bool = False,
                   checkpoint_every: int | None = None, checkpoint_seconds: float | None = 300.0
                   ) -> list[dict[str, Any]]:
    """Entry of ``textdistill experiment``: run every cell not finished yet and write the results and report.

    ``report_only`` runs nothing: the report covers the cells already finished with these settings.
    Under ``torchrun`` / ``accelerate launch`` each rank is an independent worker on its own device (no process
    group): it takes the next cell or shared stage that no other process holds (file locks), so N ranks run N cells
    at once; each then waits for the cells the others hold and returns (and writes) the same full report.
    A rerun after a crash continues: finished stages and cells are skipped, and an interrupted expert run, LESS
    warm-up, distillation or cell training resumes from its checkpoint (``checkpoint_every`` steps /
    ``checkpoint_seconds`` seconds apart). ``trust_remote_code`` lets models with custom code load (off unless
    asked)."""
    with distributed.independent():
        return _run_experiment(config, output, device=device, progress=progress, log=log, report_only=report_only,
                               trust_remote_code=trust_remote_code, checkpoint_every=checkpoint_every,
                               checkpoint_seconds=checkpoint_seconds)


def _run_experiment(config: ExperimentConfig, output: str | Path, *, device: str, progress: bool, log,
                    report_only: bool, trust_remote_code: bool, checkpoint_every: int | None,
                    checkpoint_seconds: float | None) -> list[dict[str, Any]]:
    from .report import write_report

    root = Path(output)
    config = resolve_precisions(config, device)   # keys then say what was computed (bf16 or fp32)
    pool = validate(config)  # fails before any model is loaded
    root.mkdir(parents=True, exist_ok=True)
    write_run_info(root, command="experiment", config=config, seeds={"seeds": list(config.seeds)})
    stages = _Stages(config, root, pool, device, progress, log=log, trust_remote_code=trust_remote_code,
                     checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds)
    cells: list[tuple[str, str, int | None, str]] = []
    for method in config.methods:
        # learned vectors only fit the model that learned them
        models = list(config.models)
        if method == "continuous":
            models = [m for m in models if m == config.distill_model]
        if method == "base":
            cells += [(method, "", None, m) for m in models]
        elif method == "full":
            cells += [(method, "100%", s, m) for s in config.seeds for m in models]
        else:
            cells += [(method, b, s, m) for b in config.budgets for s in config.seeds for m in models]
    total = len(cells)
    # a cell's result is reused only if it was made with the same pool, target, recipe and stage settings
    # a twin with the same training data may be a cell of a method this call does not run (e.g. `match` for
    # `distill-init` when only the distillation's methods are asked for), so every method's key is known
    every_key = {method: cell_key(config, method) for method in METHODS}
    keys = {method: every_key[method] for method in config.methods}
    rows = []
    pending = [(index, *cell) for index, cell in enumerate(cells)]
    while pending:
        deferred = []
        for index, method, budget, seed, model_name in pending:
            folder = _cell_dir(root, model_name, method, budget or "none", seed)
            label = f"[{index + 1}/{total}] {model_name} {method} {budget} seed {seed}"
            previous = read_json(folder / "result.json") if (folder / "result.json").is_file() else None
            if previous is not None and previous.get("config_key") == keys[method]:
                log(f"{label}: done earlier, skipped")
                rows.append(previous)
                continue
            if report_only:
                log(f"{label}: {'made with other settings' if previous is not None else 'not run'}")
                continue
            # another process sharing this folder may be running the cell: do the others first, then come back
            lock = try_lock(folder)
            if lock is None:
                deferred.append((index, method, budget, seed, model_name))
                continue
            try:
                previous = read_json(folder / "result.json") if (folder / "result.json").is_file() else None
                if previous is not None and previous.get("config_key") == keys[method]:
                    log(f"{label}: done by another process, skipped")
                    rows.append(previous)
                    continue
                log(f"{label}{': made with other settings, redone' if previous is not None else ''}")
                if (folder / "checkpoint" / "state.json").is_file():
                    log("    its training was interrupted: continuing from its checkpoint")
                row = run_cell(config, stages, model_name, method, budget, seed, progress,
                               same_data=_finished_by_data(root, every_key), adapter=folder / "adapter",
                               checkpoint_dir=folder / "checkpoint")
                row["config_key"] = keys[method]
                row["row_schema"] = CellResult.ROW_SCHEMA
                atomic_write_json(folder / "result.json", CellResult.check(row))
                shutil.rmtree(folder / "checkpoint", ignore_errors=True)   # the result is the cell's completion mark
            finally:
                lock.release()
            rows.append(row)
            if "same_data_as" in row:
                log(f"    same training data as {row['same_data_as']}: its run is reused")
            log(f"    acc {row['acc']:.4f}  acc_norm {row['acc_norm']:.4f}  ({row['cell_seconds']:.0f} s)")
        if deferred and len(deferred) == len(pending):
            log(f"    {len(deferred)} cell(s) are being run by another process; waiting for them")
            time.sleep(CELL_POLL_SECONDS)
        pending = deferred
    stage_seconds = {k: round(v, 1) for k, v in stages.seconds.items()}
    with stage_lock(root / "stage_seconds.json", poll_seconds=0.5, log=log):   # other processes may add theirs
        previous = read_json(root / "stage_seconds.json") if (root / "stage_seconds.json").is_file() else {}
        for key, value in previous.items():
            stage_seconds[key] = round(stage_seconds.get(key, 0.0) + value, 1)
        atomic_write_json(root / "stage_seconds.json", stage_seconds)
    write_report(root, rows, config=config, stage_seconds=stage_seconds,
                 paired_reference=config.paired_reference_arm())
    return rows
