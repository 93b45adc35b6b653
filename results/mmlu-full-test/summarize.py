"""Accuracy on MMLU test from `textdistill eval --log-samples` folders (one, or chunks joined by `+`): micro (every
question counts the same) and macro (every subject counts the same) acc and acc_norm, each with its standard error
and a normal 95% interval, and whether that interval lies above chance (0.25: every MMLU question has 4 choices).

    python results/mmlu-full-test/summarize.py DIR[+DIR...] --output FILE.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from textdistill.artifacts import atomic_write_json
from textdistill.evaluation import aggregate_by_subject

CHANCE = 0.25


def read_records(spec: str) -> list[dict]:
    """The per-question records of every folder in ``A+B+...``, in that order."""
    records = []
    for folder in spec.split("+"):
        files = sorted(Path(folder).glob("samples_*.jsonl"))
        if len(files) != 1:
            raise SystemExit(f"{folder}: expected one samples_*.jsonl, found {len(files)}")
        with open(files[0], encoding="utf-8") as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def interval(mean: float, stderr: float) -> list[float]:
    return [round(mean - 1.96 * stderr, 4), round(mean + 1.96 * stderr, 4)]


def summarize(records: list[dict]) -> dict:
    ids = [r["item_id"] for r in records]
    if len(set(ids)) != len(ids):
        raise SystemExit("a question appears twice: overlapping chunks")
    agg = aggregate_by_subject(records)
    out = {"n": len(records), "num_subjects": agg["macro"]["num_subjects"], "chance": CHANCE}
    for metric in ("acc", "acc_norm"):
        micro, se = agg["micro"][metric], agg["micro"][f"{metric}_stderr"]
        # macro = mean of subject means: its variance is the sum of the subjects' binomial variances over S^2
        subjects = agg["subjects"].values()
        macro = agg["macro"][metric]
        macro_se = math.sqrt(sum(s[metric] * (1 - s[metric]) / s["n"] for s in subjects)) / len(agg["subjects"])
        out[metric] = {"micro": round(micro, 4), "micro_stderr": round(se, 4), "micro_ci95": interval(micro, se),
                       "micro_above_chance": micro - 1.96 * se > CHANCE,
                       "macro": round(macro, 4), "macro_stderr": round(macro_se, 4),
                       "macro_ci95": interval(macro, macro_se), "macro_above_chance": macro - 1.96 * macro_se > CHANCE}
    out["subjects"] = {k: {m: round(v, 4) if isinstance(v, float) else v for m, v in s.items()}
                       for k, s in agg["subjects"].items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", help="DIR or DIR+DIR+... (chunks of one evaluation, in order)")
    parser.add_argument("--output", help="write the summary here (JSON)")
    args = parser.parse_args()
    summary = summarize(read_records(args.samples))
    for metric in ("acc", "acc_norm"):
        s = summary[metric]
        print(f"{metric}: micro {s['micro']:.4f} ± {s['micro_stderr']:.4f} {s['micro_ci95']} "
              f"(above chance: {s['micro_above_chance']}); macro {s['macro']:.4f} ± {s['macro_stderr']:.4f} "
              f"{s['macro_ci95']} (above chance: {s['macro_above_chance']}); n {summary['n']}")
    if args.output:
        atomic_write_json(args.output, summary)


if __name__ == "__main__":
    main()
