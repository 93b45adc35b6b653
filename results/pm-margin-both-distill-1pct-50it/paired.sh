#!/bin/bash
# Paired differences of the 50-iteration two-receiver text against its start, its own 28-iteration text, the
# single-receiver margin texts and LESS (Gemma-3), and SmolLM2's against full data (seeds 1-2), per question and
# seed, over test 0-499 + 1000-1999 (bench/paired_accuracy.py). The other arms' per-question answers come from the
# committed outputs of section 18 (`@FILE:a|b`: the samples files are not kept in the repository).
cd "$(dirname "$0")/../.."
B=results/pm-margin-both-distill-1pct; R=results/pm-margin-both-distill-1pct-50it; F=results/full-seeds
T=distilled-both-50it
dirs() { # model -> comma list of both-slice dirs per seed of this text
  echo "$R/comparison-slice/$1/$T/seed0+$R/study-slice/$1/$T/seed0,$R/comparison-slice/$1/$T/seed1+$R/study-slice/$1/$T/seed1,$R/comparison-slice/$1/$T/seed2+$R/study-slice/$1/$T/seed2"
}
for m in smollm2-135m gemma3-270m; do
  echo "== $m both slices"
  python bench/paired_accuracy.py --a start=@$B/paired-$m-start-both-slices.json:a --b $T=$(dirs $m) --output $R/paired-$m-start-both-slices.json | tail -1
  python bench/paired_accuracy.py --a distilled-both-28it=@$B/paired-$m-start-both-slices.json:b --b $T=$(dirs $m) --output $R/paired-$m-28it-both-slices.json | tail -1
  python bench/paired_accuracy.py --a distilled-margin-seed0=@$B/paired-$m-seed0-text-both-slices.json:a --b $T=$(dirs $m) --output $R/paired-$m-seed0-text-both-slices.json | tail -1
  python bench/paired_accuracy.py --a distilled-margin-seed1=@$B/paired-$m-seed1-text-both-slices.json:a --b $T=$(dirs $m) --output $R/paired-$m-seed1-text-both-slices.json | tail -1
done
m=gemma3-270m
echo "== $m both slices, less"
python bench/paired_accuracy.py --a less=@$B/paired-$m-less-both-slices.json:a --b $T=$(dirs $m) --output $R/paired-$m-less-both-slices.json | tail -1
m=smollm2-135m
seeds12="$R/comparison-slice/$m/$T/seed1+$R/study-slice/$m/$T/seed1,$R/comparison-slice/$m/$T/seed2+$R/study-slice/$m/$T/seed2"
echo "== $m both slices, full (seeds 1-2)"
python bench/paired_accuracy.py --a full=@$F/paired-$m-distilled-both-vs-full-both-slices.json:a --b $T=$seeds12 --output $R/paired-$m-vs-full-both-slices.json | tail -1
