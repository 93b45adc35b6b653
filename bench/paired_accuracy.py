"""Is one arm more accurate than another on the same questions? A paired comparison from `textdistill eval
--log-samples` files: per training seed each arm's accuracy, the questions only one of the two answers right, and
over the seeds the mean accuracy difference with a bootstrap 95% interval that resamples questions (the seeds'
samples are resampled together, so the interval covers question sampling as well as the seeds given).

    python bench/paired_accuracy.py --a start=DIR0,DIR1,DIR2 --b distilled=DIR0,DIR1,DIR2 [--output FILE.json]

Each DIR holds a `samples_<task>.jsonl` of the same questions in the same order; the k-th DIR of A pairs with the
k-th of B (the same training seed). `DIR1+DIR2` joins two slices of questions evaluated for one seed. An arm given
as `@FILE.json:a` (or `:b`) takes its per-seed answers from an earlier output of this script (its `correct_a` /
`correct_b`): the samples files are not kept in the repository, those outputs are. `@RESULTS.json:METHOD/BUDGET/MODEL`
takes an arm of a `textdistill experiment` run from its results.json (each cell's `correct`), e.g.
`@results/arc-easy-tuned-5pct/results.json:match/5%/smollm2-135m`; `@ARM_DIR` an arm of bench/text_arm.py (its
seed<k>.json cells).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from textdistill.report import paired_accuracy_difference


def read_correct(folder: str, metric: str = "acc") -> list[int]:
    """Per question, 1 where the argmax choice is the gold one (the `acc` the eval wrote; ``metric`` acc_norm: its
    length-normalised argmax); ``A+B``: A's questions, then B's."""
    if "+" in folder:
        return [c for part in folder.split("+") for c in read_correct(part, metric)]
    files = sorted(Path(folder).glob("samples_*.jsonl"))
    if len(files) != 1:
        raise SystemExit(f"{folder}: expected one samples_*.jsonl, found {len(files)}")
    with open(files[0], encoding="utf-8") as f:
        return [int(json.loads(line)[metric]) for line in f if line.strip()]


def read_arm(spec: str, metric: str = "acc") -> list[list[int]]:
    """Per seed, per question 1/0: from ``DIR,DIR,...`` (samples files), ``@FILE.json:a|b`` (a stored output),
    ``@RESULTS.json:METHOD/BUDGET/MODEL`` (an experiment's results.json: that arm's cells, by seed) or ``@ARM_DIR``
    (the seed<k>.json cells bench/text_arm.py writes). acc_norm is read from samples files only."""
    if metric != "acc" and spec.startswith("@"):
        raise SystemExit(f"{spec}: only samples folders keep {metric} per question; give the eval's folders")
    if spec.startswith("@") and Path(spec[1:]).is_dir():   # a bench/text_arm.py arm: seed<k>.json by seed
        cells = sorted(Path(spec[1:]).glob("seed*.json"), key=lambda p: int(p.stem[4:]))
        records = [json.loads(p.read_text(encoding="utf-8")) for p in cells]
        if not records or any("correct" not in r for r in records):
            raise SystemExit(f"{spec}: no seed*.json with per-question answers")
        return [[int(c) for c in r["correct"]] for r in records]
    if spec.startswith("@"):
        path, _, side = spec[1:].rpartition(":")
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        if "rows" in record:
            method, budget, model = (side.split("/") + ["", "", ""])[:3]
            cells = sorted((r for r in record["rows"] if r["method"] == method and r["budget"] == budget
                            and Path(r["model"]).name == model), key=lambda r: r["seed"])
            if not cells or any("correct" not in r for r in cells):
                raise SystemExit(f"{spec}: no cells with per-question answers for {method} {budget} {model}")
            return [[int(c) for c in r["correct"]] for r in cells]
        if side not in ("a", "b"):
            raise SystemExit(f"{spec}: expected @FILE.json:a, @FILE.json:b or @RESULTS.json:METHOD/BUDGET/MODEL")
        return [[int(c) for c in seed] for seed in record[f"correct_{side}"]]
    return [read_correct(d, metric) for d in spec.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="NAME=DIR,DIR,...")
    parser.add_argument("--b", required=True, help="NAME=DIR,DIR,...")
    parser.add_argument("--metric", choices=("acc", "acc_norm"), default="acc", help="the per-question score paired")
    parser.add_argument("--output")
    args = parser.parse_args()
    (name_a, _, dirs_a), (name_b, _, dirs_b) = args.a.partition("="), args.b.partition("=")
    correct_a, correct_b = read_arm(dirs_a, args.metric), read_arm(dirs_b, args.metric)
    result = paired_accuracy_difference(correct_a, correct_b)
    result = {"a": name_a, "b": name_b, "metric": args.metric, **result,
              "dirs_a": dirs_a.split(","), "dirs_b": dirs_b.split(","),
              # per seed, per question: 1 = answered right (the figures above are recomputable from these)
              "correct_a": ["".join(map(str, c)) for c in correct_a],
              "correct_b": ["".join(map(str, c)) for c in correct_b]}
    print(f"{name_a}: {args.metric} {', '.join(f'{x:.3f}' for x in result['acc_a'])}; {name_b}: {args.metric} "
          f"{', '.join(f'{x:.3f}' for x in result['acc_b'])} (n {result['n']})")
    print(f"{name_b} - {name_a}: {result['mean_difference']:+.4f} [{result['ci95'][0]:+.4f}, {result['ci95'][1]:+.4f}]"
          f"; questions only {name_b} gets right per seed {result['b_only_right']}, only {name_a} {result['a_only_right']}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
