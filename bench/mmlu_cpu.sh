#!/usr/bin/env bash
# The MMLU comparison of results/mmlu-cpu (configs/mmlu-cpu.yaml) on 2 CPU cores, 1 thread per worker.
#   bash bench/mmlu_cpu.sh smollm2   # SmolLM2 cells; makes the experts, the LESS selection and the distillation
#   bash bench/mmlu_cpu.sh gemma     # Gemma-3 cells (waits on the stage locks for what worker 1 is making)
#   bash bench/mmlu_cpu.sh report
set -euo pipefail
CONFIG=configs/mmlu-cpu.yaml
OUT=${OUT:-results/mmlu-cpu}
run() { textdistill experiment "$CONFIG" --output "$OUT" --threads 1 --no-progress "$@"; }
case "${1:?smollm2, gemma or report}" in
  smollm2) run --set 'models=[smollm2-135m]' --set 'methods=[less, distill-init, distilled, base, random]' ;;
  gemma)   run --set 'models=[gemma3-270m]' --set 'methods=[base, random, less, distill-init, distilled]' ;;
  report)  run --report-only ;;
esac
