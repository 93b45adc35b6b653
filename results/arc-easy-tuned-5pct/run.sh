#!/bin/bash
# The 5% comparison for SmolLM2-135M under its tuned recipe (6 epochs at 5%), two processes sharing the folder.
cd "$(dirname "$0")/../.."
textdistill experiment configs/arc-easy-tuned-5pct.yaml --output results/arc-easy-tuned-5pct --threads 1 --no-progress
# As run (results/README.md section 20): this twice (experiment-a.log, -b.log), once with --set 'methods=[distilled]'
# (experiment-c.log), and `python results/arc-easy-tuned-5pct/helper_draws.py` scoring performance draws 15 down to
# 8 into the stage's cache at the same time (helper_draws.log); the single command above gives the same folder.
