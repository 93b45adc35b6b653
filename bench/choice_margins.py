"""What a trained receiver's held-out loss and its accuracy each see, from `textdistill eval --log-samples` files:
per slice of items, acc, acc_norm, the gold continuation's log-likelihood per token (what performance matching's
response loss measures), the mean log-likelihood of every choice, the multiple-choice cross-entropy and the margin
of the gold choice over the best other one.

    python bench/choice_margins.py NAME=SAMPLES.jsonl ... [--slices 0:285 285:570] [--output FILE.json]
"""

from __future__ import annotations

import argparse
import json

from textdistill.evaluation import choice_figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=samples.jsonl")
    parser.add_argument("--slices", nargs="+", default=["0:285", "285:570"])
    parser.add_argument("--output")
    args = parser.parse_args()
    out = {}
    for run in args.runs:
        name, _, path = run.partition("=")
        with open(path, encoding="utf-8") as f:
            samples = [json.loads(line) for line in f if line.strip()]
        for spec in args.slices:
            lo, hi = map(int, spec.split(":"))
            figures = choice_figures(samples[lo:hi])
            out[f"{name} {lo}-{hi - 1}"] = figures
            print(f"{name} items {lo}-{hi - 1}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                            for k, v in figures.items()))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
