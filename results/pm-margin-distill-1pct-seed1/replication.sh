#!/bin/bash
# After the seed-1 margin search: its text trained on both receivers (3 seeds) and scored with per-question records
# on test 0-499 and 1000-1999 (bench/text_arm_replication.sh).
cd "$(dirname "$0")/../.." && exec bash bench/text_arm_replication.sh results/pm-margin-distill-1pct-seed1 distilled-margin /tmp/text-arm-s1
