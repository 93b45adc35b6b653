#!/usr/bin/env bash
# The ARC-Easy comparison of results/arc-easy-cpu (configs/arc-easy-cpu.yaml), as run on 2 CPU cores: one worker
# per model, 1 thread each, then one report over every finished cell.
#   bash bench/arc_easy_cpu.sh smollm2   # worker 1: SmolLM2 cells (makes the LESS selection and distillations)
#   bash bench/arc_easy_cpu.sh gemma     # worker 2: Gemma-3 cells (waits for the distillations of worker 1)
#   bash bench/arc_easy_cpu.sh report    # results.csv / report.md over all finished cells
set -euo pipefail
CONFIG=configs/arc-easy-cpu.yaml
OUT=${OUT:-results/arc-easy-cpu}
run() { textdistill experiment "$CONFIG" --output "$OUT" --threads 1 --no-progress "$@"; }
case "${1:?smollm2, gemma or report}" in
  smollm2)
    run --set 'models=[smollm2-135m]' --set 'methods=[base, random, less, distill-init, distilled]'
    run --set 'models=[smollm2-135m]' --set 'methods=[full]' --set 'seeds=[0]' ;;
  gemma)
    run --set 'models=[gemma3-270m]' --set 'methods=[base, random, less]'
    run --set 'models=[gemma3-270m]' --set 'methods=[full]' --set 'seeds=[0]'
    until ls "$OUT"/distill/1pct-seed0-*/distilled.jsonl >/dev/null 2>&1; do sleep 30; done
    run --set 'models=[gemma3-270m]' --set 'methods=[distill-init, distilled]' ;;
  report)
    run --report-only ;;
esac
