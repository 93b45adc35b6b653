#!/bin/bash
# Issue 20, the precondition of any MMLU comparison: does training on the instruction pool lift SmolLM2-135M above
# chance on the stratified MMLU set (cloze form)? A seeded 10,000-row sample of mcqa-pool in the cloze form, LoRA
# with the comparison's recipe (r 8 on q/k/v/o, AdamW 5e-4, linear, 5% warm-up, batch 8, bf16 autocast) for 600
# steps (4,800 rows, about half an epoch: what fitted this session beside a distill-pm search), then scored on
# mmlu-test-stratified-20 (1,140 test questions) with per-question records. Zero-shot: results/foundation.
cd "$(dirname "$0")/../.."
OUT=results/mmlu-pool-probe; RUN=${RUN:-/work/runs/mmlu/smollm2-pool10k-600steps}
[ -f $RUN/adapter_model.safetensors ] || textdistill train --model smollm2-135m --data mcqa-pool --data.sample 10000 \
  --data.sample_seed 0 --template rc --max-length 256 --method lora --lora.r 8 --lora.alpha 16 \
  --lora.target_modules "[q_proj,k_proj,v_proj,o_proj]" --optimizer adamw --lr 5e-4 --schedule linear \
  --warmup_ratio 0.05 --batch_size 8 --max_steps 600 --precision bf16 --seed 0 --threads 1 --output $RUN
for f in summary.json run.json metrics.jsonl; do cp $RUN/$f $OUT/smollm2-135m-pool10k-600steps-train-${f}; done
textdistill eval --model smollm2-135m --adapter $RUN --task mmlu --template rc --split test \
  --item_set mmlu-test-stratified-20 --threads 1 --no-progress --log-samples \
  --output $OUT/smollm2-135m-pool10k-600steps/results.json
# zero-shot with per-question records, and the paired difference
textdistill eval --model smollm2-135m --task mmlu --template rc --split test --item_set mmlu-test-stratified-20 \
  --threads 1 --no-progress --log-samples --output $OUT/smollm2-135m-zero-shot/results.json
python bench/paired_accuracy.py --a zero-shot=$OUT/smollm2-135m-zero-shot --b pool-600-steps=$OUT/smollm2-135m-pool10k-600steps \
  --output $OUT/paired-smollm2-135m-pool-vs-zero-shot.json
