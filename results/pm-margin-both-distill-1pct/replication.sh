#!/bin/bash
# After the two-receiver margin search: its text trained on both receivers (3 seeds, each receiver's tuned recipe)
# and scored with per-question records on test 0-499 and 1000-1999 (bench/text_arm_replication.sh).
cd "$(dirname "$0")/../.." && exec bash bench/text_arm_replication.sh results/pm-margin-both-distill-1pct distilled-both /tmp/text-arm-both
