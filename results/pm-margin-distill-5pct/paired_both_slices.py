"""The 5% distilled text (SmolLM2) against LESS, its start and full data over the comparison's 500 test questions plus
1000-1999 (study_slice.sh): per seed, the comparison cells' answers (`correct`) followed by the study slice's
samples; full data's seeds 1-2 from results/full-seeds (the same 1500 questions in the same order). Writes
paired-smollm2-135m-<arm>-both-slices.json beside this file and checks the adapter route on seed 0."""

import json
from pathlib import Path

from textdistill.report import paired_accuracy_difference

HERE = Path(__file__).parent
M = "smollm2-135m"
EXPERIMENT = json.loads(Path("results/arc-easy-tuned-5pct/results.json").read_text())


def samples(folder: Path) -> list[int]:
    (path,) = folder.glob("samples_*.jsonl")
    return [int(json.loads(line)["acc"]) for line in path.read_text().splitlines() if line.strip()]


def comparison(arm: str) -> list[list[int]]:
    """Per seed 0-2, the comparison cells' answers on test 0-499."""
    if arm == "distilled-margin":
        cells = [json.loads((HERE / "arms" / M / arm / f"seed{k}.json").read_text()) for k in range(3)]
    else:
        method = {"less": "less", "start": "performance"}[arm]
        cells = sorted((r for r in EXPERIMENT["rows"] if r["method"] == method and r["budget"] == "5%"),
                       key=lambda r: r["seed"])
    return [[int(c) for c in cell["correct"]] for cell in cells]


def both(arm: str) -> list[list[int]]:
    return [first + samples(HERE / "study-slice" / M / arm / f"seed{k}")
            for k, first in enumerate(comparison(arm))]


check = samples(HERE / "comparison-slice" / M / "distilled-margin" / "seed0")
assert check == comparison("distilled-margin")[0], "the adapter route does not reproduce the in-memory cell"
print("adapter route: seed 0's 500 answers equal the cell's")
distilled = both("distilled-margin")
full = json.loads(Path("results/full-seeds/paired-smollm2-135m-start-vs-full-both-slices.json").read_text())
references = {"less": both("less"), "start": both("start"),
              "full": [[int(c) for c in s] for s in full["correct_a"]]}   # seeds 1, 2
for name, reference in references.items():
    mine = distilled[1:] if name == "full" else distilled
    result = paired_accuracy_difference(reference, mine)
    print(f"distilled-margin - {name} over {result['n']} questions: {result['mean_difference']:+.4f} "
          f"[{result['ci95'][0]:+.4f}, {result['ci95'][1]:+.4f}]; only distilled right {result['b_only_right']}, "
          f"only {name} {result['a_only_right']}")
    (HERE / f"paired-{M}-{name}-both-slices.json").write_text(json.dumps(
        {"a": name, "b": "distilled-margin-5pct", **result, "seeds": [1, 2] if name == "full" else [0, 1, 2],
         "correct_a": ["".join(map(str, c)) for c in reference],
         "correct_b": ["".join(map(str, c)) for c in mine]}, indent=2) + "\n")
