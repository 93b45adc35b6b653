"""One more arm of a committed comparison: a text dataset (or a selection of the pool) trained with the experiment
config's recipe and scored on its target, per model and seed, by the experiment cell's own route (training in
memory, then the target scored with per-question records).

    python bench/text_arm.py EXP_CONFIG RESULTS_DIR ARM --data D [--selection S] --model M[:EPOCHS] ... \
        [--seeds 0 1 2] [--scratch DIR] [--threads 1]

Each cell's summary (train + eval, with each question's answer right or not) is written to
RESULTS_DIR/<model>/<ARM>/seed<k>.json; the adapters go to the scratch folder. A rerun skips finished cells, so two
processes (one per core) can share the list: each takes the cells whose lock it gets. Prints acc mean ± std per model. `M:EPOCHS` overrides the recipe's epochs for that model
(the tuned recipe: SmolLM2 15 epochs at 1%).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from textdistill.artifacts import atomic_write_json, machine_description
from textdistill.config import load_config
from textdistill.experiment import ExperimentConfig
from textdistill.data import load_examples
from textdistill.evaluation import evaluate_with_records
from textdistill.models import save_adapter
from textdistill.selection import apply_selection
from textdistill.training import train_on_examples


def model_and_epochs(spec: str) -> tuple[str, str]:
    """MODEL or MODEL:EPOCHS (the model may be a path with colons of its own): the model and the epochs ("" if
    none)."""
    model, sep, epochs = spec.rpartition(":")
    if not sep:
        return spec, ""
    if not epochs:   # "MODEL:" is MODEL
        return model, ""
    try:
        float(epochs)
    except ValueError:
        return spec, ""
    return model, epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("results")
    parser.add_argument("arm")
    parser.add_argument("--data", required=True)
    parser.add_argument("--selection")
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scratch", default="/tmp/text-arm")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the comparisons ran with 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(ExperimentConfig, path=args.config, section="experiment")
    target = config.target
    for spec in args.model:
        model, epochs = model_and_epochs(spec)
        recipe = config.recipe if not epochs else dataclasses.replace(config.recipe, epochs=float(epochs))
        for seed in args.seeds:
            out = Path(args.results) / Path(model).name / args.arm / f"seed{seed}.json"
            if out.is_file():
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                with FileLock(str(out) + ".lock", timeout=0):
                    if out.is_file():
                        continue
                    # the experiment cell's own route (experiment.run_cell): train in memory, score with records
                    examples = load_examples(args.data, recipe.data)
                    if args.selection:
                        examples = apply_selection(examples, args.selection)
                    trained, tokenizer, result = train_on_examples(
                        model_name=model, examples=examples, config=dataclasses.replace(recipe, seed=seed),
                        device="cpu", progress=False)
                    save_adapter(trained, tokenizer, Path(args.scratch) / Path(model).name / args.arm / f"seed{seed}",
                                 model)
                    metrics, records = evaluate_with_records(trained, tokenizer, target)
                    atomic_write_json(out, {"model": model, "arm": args.arm, "seed": seed, "data": args.data,
                                            "selection": args.selection, "epochs": recipe.epochs,
                                            "steps": result.steps, "train_seconds": round(result.seconds, 1),
                                            "acc": metrics["acc"], "acc_norm": metrics["acc_norm"], "n": metrics["n"],
                                            "eval_seconds": metrics["seconds"],
                                            # per question (1 = right), for bench/paired_accuracy.py's @ARM_DIR
                                            "correct": "".join(str(r["acc"]) for r in records),
                                            "correct_norm": "".join(str(r["acc_norm"]) for r in records),
                                            "threads": args.threads,
                                            "machine": {k: machine_description()[k] for k in ("cpu", "cpu_kind")}})
            except Timeout:   # another process runs this cell
                continue
    for spec in args.model:
        model = Path(model_and_epochs(spec)[0]).name
        rows = [json.loads(p.read_text()) for p in sorted((Path(args.results) / model / args.arm).glob("seed*.json"))]
        accs = [r["acc"] for r in rows]
        if accs:
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(f"{model} {args.arm}: acc {statistics.mean(accs):.3f} ± {spread:.3f} over {len(accs)} seeds "
                  f"({', '.join(f'{a:.3f}' for a in accs)})")


if __name__ == "__main__":
    main()
