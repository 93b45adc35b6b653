#!/bin/bash
cd "$(dirname "$0")/../.."
A=results/pm-margin-distill-1pct; R=results/pm-margin-distill-1pct-seed1
dirs() { # root model arm -> comma list of both-slice dirs per seed
  echo "$1/comparison-slice/$2/$3/seed0+$1/study-slice/$2/$3/seed0,$1/comparison-slice/$2/$3/seed1+$1/study-slice/$2/$3/seed1,$1/comparison-slice/$2/$3/seed2+$1/study-slice/$2/$3/seed2"
}
slice() { echo "$1/$4/$2/$3/seed0,$1/$4/$2/$3/seed1,$1/$4/$2/$3/seed2"; }
for m in smollm2-135m gemma3-270m; do
  for s in comparison-slice study-slice; do
    echo "== $m $s"; python bench/paired_accuracy.py --a start=$(slice $A $m start $s) --b distilled-margin-seed1=$(slice $R $m distilled-margin $s) --output $R/$s/$m/paired-start.json | tail -1
    python bench/paired_accuracy.py --a distilled-margin-seed0=$(slice $A $m distilled-margin $s) --b distilled-margin-seed1=$(slice $R $m distilled-margin $s) --output $R/$s/$m/paired-seed0-text.json | tail -1
  done
  echo "== $m both"
  python bench/paired_accuracy.py --a start=$(dirs $A $m start) --b distilled-margin-seed1=$(dirs $R $m distilled-margin) --output $R/paired-$m-start-both-slices.json
  python bench/paired_accuracy.py --a distilled-margin-seed0=$(dirs $A $m distilled-margin) --b distilled-margin-seed1=$(dirs $R $m distilled-margin) --output $R/paired-$m-seed0-text-both-slices.json
done
m=gemma3-270m
for s in comparison-slice study-slice; do
  echo "== $m $s less"; python bench/paired_accuracy.py --a less=$(slice $A $m less $s) --b distilled-margin-seed1=$(slice $R $m distilled-margin $s) --output $R/$s/$m/paired-less.json | tail -1
done
echo "== $m both less"
python bench/paired_accuracy.py --a less=$(dirs $A $m less) --b distilled-margin-seed1=$(dirs $R $m distilled-margin) --output $R/paired-$m-less-both-slices.json
