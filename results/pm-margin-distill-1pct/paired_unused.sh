#!/bin/bash
cd "$(dirname "$0")/../.."
A=results/pm-margin-distill-1pct
u() { echo "$A/test-500-999/$1/$2/seed0+$A/test-2000-2375/$1/$2/seed0,$A/test-500-999/$1/$2/seed1+$A/test-2000-2375/$1/$2/seed1,$A/test-500-999/$1/$2/seed2+$A/test-2000-2375/$1/$2/seed2"; }
all() { echo "$A/comparison-slice/$1/$2/seed0+$A/test-500-999/$1/$2/seed0+$A/study-slice/$1/$2/seed0+$A/test-2000-2375/$1/$2/seed0,$A/comparison-slice/$1/$2/seed1+$A/test-500-999/$1/$2/seed1+$A/study-slice/$1/$2/seed1+$A/test-2000-2375/$1/$2/seed1,$A/comparison-slice/$1/$2/seed2+$A/test-500-999/$1/$2/seed2+$A/study-slice/$1/$2/seed2+$A/test-2000-2375/$1/$2/seed2"; }
m=$1; shift
for ref in "$@"; do
  echo "== $m distilled-margin vs $ref, unused 876"
  python bench/paired_accuracy.py --a $ref=$(u $m $ref) --b distilled-margin=$(u $m distilled-margin) --output $A/paired-$m-$ref-unused-876.json
  echo "== $m distilled-margin vs $ref, whole test split 2376"
  python bench/paired_accuracy.py --a $ref=$(all $m $ref) --b distilled-margin=$(all $m distilled-margin) --output $A/paired-$m-$ref-all-2376.json
done
