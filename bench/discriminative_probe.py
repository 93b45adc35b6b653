"""A first probe of a discriminative performance objective: for each subset of the validity study, SmolLM2 trained on
it with the tuned recipe and the pm training seed, then scored on ARC-Easy validation questions 285-569 (the rows
whose response loss is `pm`): validation acc, the gold-minus-best-distractor margin and the multiple-choice
cross-entropy. Spearman of each (and of `pm`) with the study's test accuracy (questions 1000-1999, seed 0).

    python bench/discriminative_probe.py OUT_DIR [--part K/N]     # N processes, one per core; rerun skips done ones
    python bench/discriminative_probe.py OUT_DIR --report
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

STUDY = Path("results/validity-arc-easy-1pct")
PM = Path("results/validity/pm-smollm2-1pct-tuned.json")
CONFIG = "configs/arc-easy-tuned-1pct.yaml"


def run(out: Path, part: int, parts: int) -> None:
    import torch
    from choice_margins import slice_figures

    from textdistill.artifacts import atomic_write_json
    from textdistill.config import EvalConfig, load_config
    from textdistill.data import load_examples
    from textdistill.evaluation import _evaluate, _task_requests
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
        _, records = _evaluate(model, tokenizer, _task_requests(evaluate), False)
        atomic_write_json(path, {"set": name, "indices": indices, **slice_figures(records)})
        print(name, flush=True)


def report(out: Path) -> None:
    from textdistill.validity import spearman_with_interval

    points = {p["set"]: p for p in json.loads(PM.read_text())["points"]}
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "report.json"]
    acc = [points[r["set"]]["acc"] for r in rows]
    result = {"n": len(rows), "test_acc": "validity study, SmolLM2 tuned, questions 1000-1999, seed 0"}
    for name, values in [("pm (the study's score: response loss, negated)", [points[r["set"]]["score"] for r in rows]),
                         ("validation acc", [r["acc"] for r in rows]),
                         ("gold minus best other", [r["gold_minus_best_other"] for r in rows]),
                         ("multiple-choice cross-entropy, negated", [-r["mc_cross_entropy"] for r in rows]),
                         ("gold log-likelihood per token", [r["gold_loglik_per_token"] for r in rows])]:
        rho, ci = spearman_with_interval(values, acc)
        result[name] = {"spearman": round(rho, 3), "ci95": [round(c, 3) for c in ci]}
        print(f"{name}: {rho:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}] (n {len(rows)})")
    (out / "report.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--part", default="0/1")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        report(out)
    else:
        part, parts = map(int, args.part.split("/"))
        run(out, part, parts)
