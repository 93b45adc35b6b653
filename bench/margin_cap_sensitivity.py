"""How the validity of the margin score depends on its cap: for each receiver and recipe of the validity study whose
margin files are complete, the Spearman correlation (bootstrap 95% interval) between the study's test accuracy
(seed 0, questions 1000-1999) and the mean over the held-out questions of min(margin, cap), for several caps;
also the mean of clip(margin, -cap, cap) (only close questions count), the fraction of questions answered right
(validation accuracy) and the uncapped mean (`pm-margin`).

The study's own objective `pm-margin-capped` uses one cap, fixed (1.0) before any of these figures was computed;
this table says how much that choice matters, not which cap to pick.

    python bench/margin_cap_sensitivity.py [STUDY_DIR] [--out results/validity/margin-cap-sensitivity.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CAPS = (None, 8.0, 4.0, 2.0, 1.0, 0.5, 0.0)
CLIPS = (1.0, 2.0, 4.0)


def scores_of(margins: list[float]) -> dict[str, float]:
    """Every score of one subset from its per-question margins (higher = better)."""
    from textdistill.evaluation import mean_margin

    out = {("uncapped" if cap is None else f"min(m, {cap:g})"): mean_margin(margins, cap) for cap in CAPS}
    out.update({f"clip(m, +-{c:g})": sum(max(-c, min(m, c)) for m in margins) / len(margins) for c in CLIPS})
    out["fraction right (m > 0)"] = sum(m > 0 for m in margins) / len(margins)
    return out


def main() -> None:
    from textdistill.artifacts import atomic_write_json, machine_description
    from textdistill.validity import spearman_with_interval

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", default="results/validity-arc-easy-1pct")
    parser.add_argument("--out", default="results/validity/margin-cap-sensitivity.json")
    args = parser.parse_args()
    study = Path(args.study)
    subsets = json.loads((study / "subsets.json").read_text())["subsets"]
    settings = json.loads((study / "study.json").read_text())["settings"]
    pm_seed, resamples = settings.get("pm_seed", 1), settings.get("bootstrap", 10000)
    report = {"study": str(study), "subsets": len(subsets), "machine": machine_description(), "columns": {}}
    for folder in sorted((study / "cells").glob("*/*")):
        model, recipe = folder.parent.name, folder.name
        margins, acc = {}, {}
        for name in subsets:
            margin, cell = folder / name / f"seed{pm_seed}" / "margin.json", folder / name / "seed0" / "result.json"
            if not (margin.is_file() and cell.is_file()):
                break
            stored = json.loads(margin.read_text())
            if "question_margins" not in stored:
                break
            margins[name], acc[name] = stored["question_margins"], json.loads(cell.read_text())["acc"]
        if len(margins) < len(subsets):
            print(f"{model} {recipe}: {len(margins)} of {len(subsets)} subsets have per-question margins; skipped")
            continue
        per_subset = {name: scores_of(m) for name, m in margins.items()}
        column = {}
        for score in next(iter(per_subset.values())):
            rho, ci = spearman_with_interval([per_subset[n][score] for n in subsets], [acc[n] for n in subsets],
                                             resamples=resamples)
            column[score] = {"spearman": rho, "ci95": ci}
        report["columns"][f"{model} {recipe}"] = column
        print(f"\n{model} {recipe} (n {len(subsets)})")
        for score, row in column.items():
            print(f"  {score:<24} {row['spearman']:+.2f} [{row['ci95'][0]:+.2f}, {row['ci95'][1]:+.2f}]")
    atomic_write_json(Path(args.out), report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
