#!/usr/bin/env bash
# Real-model reference runs for the README (issue: foundation). Sequential, 1 thread (another job uses the other core), CPU.
# Usage: bash bench/foundation_runs.sh [OUT_DIR]   (default results/foundation)
set -euo pipefail
OUT=${1:-results/foundation}
mkdir -p "$OUT"
run() { local name=$1; shift; if [ -f "$OUT/$name.json" ]; then echo "skip $name"; return; fi
        /usr/bin/time -f "$name wall %e s" "$@" --output "$OUT/$name.json" --threads 1 --no-progress; }
run smollm2-arc-easy-test-rc textdistill eval --model smollm2-135m --task arc-easy --split test --template rc
run smollm2-arc-easy-test-mc textdistill eval --model smollm2-135m --task arc-easy --split test --template mc
run gemma3-arc-easy-test-rc  textdistill eval --model gemma3-270m --task arc-easy --split test --template rc
run gemma3-arc-easy-test-mc  textdistill eval --model gemma3-270m --task arc-easy --split test --template mc
run smollm2-mmlu-test-20per-subject-mc textdistill eval --model smollm2-135m --task mmlu --split test --template mc --per-subject-limit 20
if [ ! -f "$OUT/smollm2-lora-arc-easy-train/summary.json" ]; then
  /usr/bin/time -f "train wall %e s" textdistill train --model smollm2-135m --data arc-easy:train \
     --config configs/lora-arc-easy-full.yaml --output "$OUT/smollm2-lora-arc-easy-train" --threads 1 --no-progress
fi
run smollm2-lora-arc-easy-train-test-rc textdistill eval --model smollm2-135m \
     --adapter "$OUT/smollm2-lora-arc-easy-train" --task arc-easy --split test --template rc
