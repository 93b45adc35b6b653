#!/usr/bin/env bash
# The ARC-Easy comparison rerun with token-space distillation (configs/arc-easy-cpu-v2.yaml, issue 8), as run on
# 2 CPU cores, 1 thread per worker. The base, random, LESS and full cells are those of results/arc-easy-cpu, copied
# under their new keys by bench/reuse_cells.py; the experts, the match selection and the distillation are made once
# (the ablation of results/README.md section 7 made the 1% distillation with these settings: the runner reuses it).
#   bash bench/arc_easy_cpu_v2.sh smollm2 1%   # worker 1: SmolLM2's match / distill-init / distilled cells
#   bash bench/arc_easy_cpu_v2.sh gemma 1%     # worker 2: the same for Gemma-3 (waits for the distillation)
#   bash bench/arc_easy_cpu_v2.sh continuous 1%  # the continuous arm (SmolLM2 on the learned vectors)
#   bash bench/arc_easy_cpu_v2.sh report       # results.csv / report.md over all finished cells
# METHODS='match' bash bench/arc_easy_cpu_v2.sh smollm2 1% runs only those cells (e.g. before the distillation).
set -euo pipefail
CONFIG=configs/arc-easy-cpu-v2.yaml
OUT=${OUT:-results/arc-easy-cpu-v2}
run() { textdistill experiment "$CONFIG" --output "$OUT" --threads 1 --no-progress "$@"; }
case "${1:?smollm2, gemma or report}" in
  smollm2|gemma)
    model=$([ "$1" = smollm2 ] && echo smollm2-135m || echo gemma3-270m)
    run --set "models=[$model]" --set "budgets=[\"${2:?budget, e.g. 1%}\"]" \
        --set "methods=[${METHODS:-base, random, less, match, distill-init, distilled}]" ;;
  continuous)   # SmolLM2 fine-tuned on the vectors of the continuous-mode distillation of the ablation (section 7.2)
    run --set 'models=[smollm2-135m]' --set "budgets=[\"${2:?budget, e.g. 1%}\"]" --set 'methods=[continuous]' \
        --set distill.mode=continuous --set distill.iterations=24 --set distill.lr_embeddings=0.01 \
        --set distill.recompute=true ;;
  report)
    run --report-only --set 'methods=[base, full, random, less, match, distill-init, distilled]' ;;
esac
