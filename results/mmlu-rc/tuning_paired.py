"""The tuned rule's grid on MMLU validation against the untrained model, question by question (issue 20: does
training at a budget move MMLU, and does the number of epochs?). For each epoch count, its subsets' cells (each
keeps its per-question answers) minus the untrained model's answers on the same questions, with the bootstrap 95%
interval over questions of bench/paired_accuracy.py; counts whose cells were made before the cells kept their
answers are listed by mean only.

    python results/mmlu-rc/tuning_paired.py TUNING_DIR/tuning/MODEL ZERO_SHOT_SAMPLES_DIR [--output FILE.json]"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from textdistill.report import paired_accuracy_difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path, help="the model's grid folder: epochs<E>/subset<k>/result.json")
    parser.add_argument("zero_shot", type=Path, help="a `textdistill eval --log-samples` folder of the same questions")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    samples = sorted(args.zero_shot.glob("samples_*.jsonl"))
    if len(samples) != 1:
        raise SystemExit(f"{args.zero_shot}: expected one samples_*.jsonl, found {len(samples)}")
    with open(samples[0], encoding="utf-8") as f:   # by "\n" only: answers may hold other line separators
        records = [json.loads(line) for line in f if line.strip()]
    out = []
    for folder in sorted(args.grid.glob("epochs*"), key=lambda p: float(p.name[6:])):
        cells = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("subset*/result.json"))]
        cells = [c for c in cells if "acc" in c]   # skipped counts (the grid stopped) have none
        if not cells:
            continue
        entry = {"epochs": float(folder.name[6:]), "subsets": len(cells), "train_steps": cells[0]["train_steps"],
                 "mean_acc": statistics.fmean(c["acc"] for c in cells),
                 "mean_acc_norm": statistics.fmean(c["acc_norm"] for c in cells)}
        kept = [c for c in cells if "correct" in c]
        for metric, field in (("acc", "correct"), ("acc_norm", "correct_norm")):
            if kept:
                base = [int(r[metric]) for r in records]
                trained = [[int(x) for x in c[field]] for c in kept]
                entry[f"paired_{metric}"] = {"subsets": [c["subset"] for c in kept],
                                             **paired_accuracy_difference([base] * len(kept), trained)}
        out.append(entry)
        line = (f"{entry['epochs']:g} epochs ({entry['train_steps']} steps, {len(cells)} subsets): "
                f"mean acc {entry['mean_acc']:.4f}")
        for metric in ("acc", "acc_norm"):
            if f"paired_{metric}" in entry:
                p = entry[f"paired_{metric}"]
                line += (f"; {metric} minus untrained over subsets {p['subsets']}: {p['mean_difference']:+.4f} "
                         f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]")
        print(line)
    if args.output:
        args.output.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
