"""The MMLU comparison's table (issue 20): the rows of several experiment folders of results/mmlu-rc/run.sh joined
(base and full, then one folder per model and budget, each trained at its own tuned epochs), as one mean ± std table
and the paired differences against random over the same questions and seeds.

    python results/mmlu-rc/table.py FOLDER [FOLDER ...] --output table.md"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from textdistill.artifacts import atomic_write_text
from textdistill.report import comparison_table, paired_comparisons, paired_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="experiment run folders (each with results.json)")
    parser.add_argument("--output", type=Path, required=True, help="the Markdown file written")
    args = parser.parse_args()
    rows = []
    for folder in args.folders:
        results = folder / "results.json"
        if not results.is_file():
            raise SystemExit(f"error: {results} does not exist (has the run in {folder} finished?)")
        rows += json.loads(results.read_text())["rows"]
    text = ["# MMLU test split, cloze form: mean ± std over seeds", "", comparison_table(rows), "",
            "## Paired against random (95% bootstrap interval over questions)", "",
            paired_table(paired_comparisons(rows, "random")), ""]
    atomic_write_text(args.output, "\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
