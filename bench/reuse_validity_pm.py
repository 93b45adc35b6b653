"""Put the validity study's performance-matching runs into a `performance` selection's draw cache.

The validity study (configs/validity-arc-easy-1pct.yaml) trained every subset once with the comparison's recipe at
its `pm_seed` and measured the held-out loss of ARC-Easy validation 285-569, and (pm-margin) the same questions'
per-question margins. Where a draw of the comparison's `performance` selection is one of those subsets (its
`performance.seed` is the distillation's null seed, so draws 0-9 are the study's null-0..9), that run is the draw's
score: this copies it instead of training it again. It refuses unless the recipe (the study's comparison recipe, or
its tuned one for that model), the training seed, the held-out rows and the pool are the same.

    python bench/reuse_validity_pm.py configs/arc-easy-cpu-v2.yaml results/arc-easy-cpu-v2 \
        configs/validity-arc-easy-1pct.yaml results/validity-arc-easy-1pct

Options: `--score margin [--margin-cap C]` fills the cache of a selection by the (capped) margin instead of the
loss; `--cache-dir DIR` names the cache folder (default: the experiment's `selections/performance-draws`; for
`textdistill select --output OUT.json` it is `OUT.draws`); `--model M:EPOCHS` (repeatable) names the models and
their epochs instead of the experiment's (as bench/text_arm.py takes them).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from filelock import FileLock

from textdistill.artifacts import atomic_write_json, read_json
from textdistill.data import load_examples
from textdistill.experiment import load_experiment_config, resolve_precisions, validate
from textdistill.keys import keyed
from textdistill.performance_selection import draw_indices, draw_key, score_cache_path
from textdistill.selection import pool_ids_hash, resolve_budget
from textdistill.validity import _Study, load_validity_config


def main(experiment_config: str, experiment_root: str, validity_config: str, validity_root: str, *,
         score: str | None = None, margin_cap: float | None = None, cache_dir: str | None = None,
         models: list[str] | None = None) -> None:
    from textdistill.evaluation import mean_margin

    experiment = resolve_precisions(load_experiment_config(experiment_config), "cpu")
    study = load_validity_config(validity_config)
    if score is None:   # the experiment's own score and cap
        score, margin_cap = experiment.performance.score, experiment.performance.margin_cap
    performance = dataclasses.replace(experiment.performance, score=score, margin_cap=margin_cap)
    if performance.train_seed != study.pm_seed:
        sys.exit(f"the training seeds differ ({performance.train_seed} against the study's {study.pm_seed})")
    rows = (performance.rows, performance.rows_offset, performance.rows_limit)
    if rows != (study.objective_rows, study.objective_offset, study.objective_limit):
        sys.exit(f"the held-out rows differ: {rows} against the study's")
    pool = validate(experiment)
    if [e.id for e in pool] != [e.id for e in load_examples(study.pool, study.recipe.data)]:
        sys.exit("the pools differ")
    count = resolve_budget(study.budget, len(pool))
    draws = {str(d) for d in draw_indices(len(pool), count, performance)}
    cache_dir = Path(cache_dir) if cache_dir else Path(experiment_root) / "selections" / "performance-draws"
    studied = _Study(study, Path(validity_root), device="cpu", progress=False, log=print)
    for spec in models or experiment.models:
        model, _, epochs = spec.rpartition(":") if ":" in spec else (spec, "", "")
        model_recipe = dataclasses.replace(experiment.recipe, epochs=float(epochs)) if epochs else experiment.recipe
        recipe = dataclasses.replace(model_recipe, seed=performance.train_seed)
        # the study's recipe for this model that is the comparison's (comparison, or tuned where it was chosen)
        same = [r for r in ("comparison", "tuned") if (r != "tuned" or studied.tuning_path(model).is_file()) and
                keyed(dataclasses.replace(studied.recipe_config(model, r), seed=study.pm_seed)) == keyed(recipe)]
        if not same:
            print(f"{model}: none of the study's recipes is this one: nothing to reuse")
            continue
        cache = score_cache_path(cache_dir, model, model_recipe, performance, pool_ids_hash(pool), count)
        found = {}
        name = "result.json" if score == "loss" else "margin.json"
        folder = studied.cell_path(model, same[0], "x", study.pm_seed).parents[2]   # cells/<model>/<recipe>
        for path in sorted(folder.glob(f"*/seed{study.pm_seed}/{name}")):
            cell = read_json(path)
            if draw_key(cell["indices"]) not in draws:
                continue
            if score == "margin":   # the margin of the same training as the cell's (its held-out loss agrees)
                run = read_json(path.with_name("result.json"))
                if abs(cell["objective_loss"] - run["objective_loss"]) > 1e-6:
                    print(f"  {path}: not the training of its cell (held-out loss {cell['objective_loss']} against "
                          f"{run['objective_loss']}); skipped")
                    continue
            if score == "loss" and "objective_loss" in cell:
                found[draw_key(cell["indices"])] = {
                    "loss": cell["objective_loss"], "rows": cell["objective_rows"], "train_steps": cell["train_steps"],
                    "seconds": round(cell["train_seconds"] + cell["objective_seconds"], 1),
                    "from": str(path)}
            elif score == "margin" and "question_margins" in cell:
                found[draw_key(cell["indices"])] = {
                    "loss": -mean_margin(cell["question_margins"], margin_cap), "train_steps": cell["train_steps"],
                    "seconds": round(cell["train_seconds"] + cell["margin_seconds"], 1), "from": str(path)}
        cache.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache) + ".lock"):
            stored = read_json(cache)["draws"] if cache.is_file() else {}
            stored.update({k: v for k, v in found.items() if k not in stored})
            atomic_write_json(cache, {"model": model, "recipe": recipe, "rows": performance.rows,
                                      "rows_offset": performance.rows_offset, "rows_limit": performance.rows_limit,
                                      "score": score, "margin_cap": margin_cap, "draws": stored})
        print(f"{model}: {len(found)} of {len(draws)} draws from the study's {same[0]} recipe -> {cache}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("experiment_config", "experiment_root", "validity_config", "validity_root"):
        parser.add_argument(name)
    parser.add_argument("--score", choices=["loss", "margin"], default=None, help="default: the experiment's")
    parser.add_argument("--margin-cap", type=float, default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--model", action="append", default=None, help="MODEL or MODEL:EPOCHS (repeatable)")
    args = parser.parse_args()
    main(args.experiment_config, args.experiment_root, args.validity_config, args.validity_root, score=args.score,
         margin_cap=args.margin_cap, cache_dir=args.cache_dir, models=args.model)
