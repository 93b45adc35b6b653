#!/bin/bash
# The paired differences of results/README.md section 21 on the comparison's 500 questions (after arms.sh); the
# 1500-question ones come from study_slice.sh + paired_both_slices.py.
cd "$(dirname "$0")/../.."
O=results/pm-margin-distill-5pct; E=results/arc-easy-tuned-5pct/results.json; S=$O/arms/smollm2-135m; G=$O/arms/gemma3-270m
python bench/paired_accuracy.py --a "start=@$E:performance/5%/smollm2-135m" --b "distilled=@$S/distilled-margin" \
  --output $O/paired-smollm2-135m-start.json
for arm in less random match distilled; do
  python bench/paired_accuracy.py --a "$arm=@$E:$arm/5%/smollm2-135m" --b "distilled-margin=@$S/distilled-margin" \
    --output $O/paired-smollm2-135m-$arm.json
done
python bench/paired_accuracy.py --a "start=@$G/start" --b "distilled-margin=@$G/distilled-margin" \
  --output $O/paired-gemma3-270m-start.json
python bench/paired_accuracy.py --a "less=@$G/less" --b "distilled-margin=@$G/distilled-margin" \
  --output $O/paired-gemma3-270m-less.json
python bench/paired_accuracy.py --a "less=@$G/less" --b "start=@$G/start" --output $O/paired-gemma3-270m-start-vs-less.json
# full data: its seeds 1-2 (results/full-seeds; the first 500 of its 1500 answers) against the text's seeds 1-2
python - <<'PY'
import json
from pathlib import Path
from textdistill.report import paired_accuracy_difference
O = Path("results/pm-margin-distill-5pct")
full = json.loads(Path("results/full-seeds/paired-smollm2-135m-start-vs-full-both-slices.json").read_text())
full_c = [[int(c) for c in s[:500]] for s in full["correct_a"]]
dist = [[int(c) for c in json.loads((O / f"arms/smollm2-135m/distilled-margin/seed{k}.json").read_text())["correct"]]
        for k in (1, 2)]
r = paired_accuracy_difference(full_c, dist)
print(f"distilled-margin - full (seeds 1-2, 500 questions): {r['mean_difference']:+.4f} {r['ci95']}")
(O / "paired-smollm2-135m-full.json").write_text(json.dumps({
    "a": "full", "b": "distilled-margin-5pct", **r,
    "note": "full data seeds 1 and 2 (results/full-seeds, the first 500 of its 1500 questions) against the 5% text's seeds 1 and 2",
    "correct_a": ["".join(map(str, c)) for c in full_c], "correct_b": ["".join(map(str, c)) for c in dist]}, indent=2) + "\n")
PY
