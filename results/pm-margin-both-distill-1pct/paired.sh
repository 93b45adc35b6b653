#!/bin/bash
# Paired differences of the two-receiver text against its start, the single-receiver margin texts and LESS, per
# question and seed, over test 0-499 + 1000-1999 (and each slice alone).
cd "$(dirname "$0")/../.."
A=results/pm-margin-distill-1pct; S=results/pm-margin-distill-1pct-seed1; R=results/pm-margin-both-distill-1pct
dirs() { # root model arm -> comma list of both-slice dirs per seed
  echo "$1/comparison-slice/$2/$3/seed0+$1/study-slice/$2/$3/seed0,$1/comparison-slice/$2/$3/seed1+$1/study-slice/$2/$3/seed1,$1/comparison-slice/$2/$3/seed2+$1/study-slice/$2/$3/seed2"
}
slice() { echo "$1/$4/$2/$3/seed0,$1/$4/$2/$3/seed1,$1/$4/$2/$3/seed2"; }
for m in smollm2-135m gemma3-270m; do
  for s in comparison-slice study-slice; do
    echo "== $m $s"; python bench/paired_accuracy.py --a start=$(slice $A $m start $s) --b distilled-both=$(slice $R $m distilled-both $s) --output $R/$s/$m/paired-start.json | tail -1
  done
  echo "== $m both slices"
  python bench/paired_accuracy.py --a start=$(dirs $A $m start) --b distilled-both=$(dirs $R $m distilled-both) --output $R/paired-$m-start-both-slices.json | tail -1
  python bench/paired_accuracy.py --a distilled-margin-seed0=$(dirs $A $m distilled-margin) --b distilled-both=$(dirs $R $m distilled-both) --output $R/paired-$m-seed0-text-both-slices.json | tail -1
  python bench/paired_accuracy.py --a distilled-margin-seed1=$(dirs $S $m distilled-margin) --b distilled-both=$(dirs $R $m distilled-both) --output $R/paired-$m-seed1-text-both-slices.json | tail -1
done
m=gemma3-270m
echo "== $m both slices, less"
python bench/paired_accuracy.py --a less=$(dirs $A $m less) --b distilled-both=$(dirs $R $m distilled-both) --output $R/paired-$m-less-both-slices.json | tail -1
