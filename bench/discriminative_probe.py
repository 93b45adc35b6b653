"""A first probe of a discriminative performance objective: for each subset of the validity study, SmolLM2 trained on
it with the tuned recipe and the pm training seed, then scored on ARC-Easy validation questions 285-569 (the rows
whose response loss is `pm`): validation acc, the gold-minus-best-distractor margin and the multiple-choice
cross-entropy. Spearman of each (and of `pm`) with the study's test accuracy (questions 1000-1999, seed 0).

    python bench/discriminative_probe.py OUT_DIR [--part K/N]     # N processes, one per core; rerun skips done ones
    python bench/discriminative_probe.py OUT_DIR --report
    python bench/discriminative_probe.py OUT_DIR --report --from-study gemma3-270m comparison

`--from-study MODEL RECIPE` reports the same figures from the validity study's own `pm-margin` runs
(cells/MODEL/RECIPE/*/seed1/margin.json, written by `textdistill validity` with pm-margin among its objectives) into
OUT_DIR/report-MODEL-RECIPE.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

STUDY = Path("results/validity-arc-easy-1pct")
PM = Path("results/validity/pm-smollm2-1pct-tuned.json")
CONFIG = "configs/arc-easy-tuned-1pct.yaml"


def run(out: Path, part: int, parts: int) -> None:
    import torch

    from textdistill.artifacts import atomic_write_json
    from textdistill.config import EvalConfig, load_config
    from textdistill.data import load_examples
    from textdistill.evaluation import choice_figures, evaluate_with_records
    from textdistill.experiment import ExperimentConfig
    from textdistill.training import train_on_examples

    torch.set_num_threads(1)
    recipe = dataclasses.replace(load_config(ExperimentConfig, path=CONFIG, section="experiment").recipe, seed=1)
    pool = load_examples("arc-easy:train", recipe.data)
    subsets = json.loads((STUDY / "subsets.json").read_text())["subsets"]
    evaluate = EvalConfig(task="arc-easy", split="validation", template="rc", offset=285, limit=285)
    for k, (name, indices) in enumerate(subsets.items()):
        path = out / f"{name}.json"
        if k % parts != part or path.is_file():
            continue
        model, tokenizer, _ = train_on_examples(model_name="smollm2-135m", examples=[pool[i] for i in indices],
                                                config=recipe, device="cpu", progress=False)
        _, records = evaluate_with_records(model, tokenizer, evaluate)
        atomic_write_json(path, {"set": name, "indices": indices, **choice_figures(records)})
        print(name, flush=True)


def report(out: Path, study: tuple[str, str] | None = None) -> None:
    from textdistill.validity import spearman_with_interval

    if study is None:
        model, recipe, pm = "smollm2-135m", "tuned", PM
        rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if not p.name.startswith("report")]
        target = out / "report.json"
    else:
        model, recipe = study
        short = {"smollm2-135m": "smollm2", "gemma3-270m": "gemma3"}[model]
        pm = Path(f"results/validity/pm-{short}-1pct-{recipe}.json")
        rows = [{"set": p.parts[-3], **json.loads(p.read_text())}
                for p in sorted((STUDY / "cells" / model / recipe).glob("*/seed1/margin.json"))]
        target = out / f"report-{model}-{recipe}.json"
    points = {p["set"]: p for p in json.loads(pm.read_text())["points"]}
    acc = [points[r["set"]]["acc"] for r in rows]
    result = {"n": len(rows), "test_acc": f"validity study, {model} {recipe}, questions 1000-1999, seed 0"}
    for name, values in [("pm (the study's score: response loss, negated)", [points[r["set"]]["score"] for r in rows]),
                         ("validation acc", [r["acc"] for r in rows]),
                         ("gold minus best other", [r["gold_minus_best_other"] for r in rows]),
                         ("multiple-choice cross-entropy, negated", [-r["mc_cross_entropy"] for r in rows]),
                         ("gold log-likelihood per token", [r["gold_loglik_per_token"] for r in rows])]:
        rho, ci = spearman_with_interval(values, acc)
        result[name] = {"spearman": round(rho, 3), "ci95": [round(c, 3) for c in ci]}
        print(f"{name}: {rho:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}] (n {len(rows)})")
    target.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--part", default="0/1")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--from-study", nargs=2, metavar=("MODEL", "RECIPE"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        report(out, tuple(args.from_study) if args.from_study else None)
    else:
        part, parts = map(int, args.part.split("/"))
        run(out, part, parts)
