#!/bin/bash
# Issue 20: MMLU in the cloze form on the WHOLE test split (14,042 questions), for intervals tight enough to say whether
# a model is above chance and whether training on the pool moves it (the stratified 1,140 give +-0.026). One thread
# per process. Evaluations run in chunks of 1,000 questions (--offset/--limit), each kept when done, so a run
# resumes over sessions; SmolLM2's zero-shot ran as one evaluation (1 h 11 min of one core of the AMX Xeon).
# Runs land in $RUNS (samples files are large: not kept in the repository); summaries land here.
#   bash results/mmlu-full-test/run.sh smollm2 | gemma | smollm2-pool600 | paired-pool600 | paired-models
cd "$(dirname "$0")/../.."
OUT=results/mmlu-full-test; RUNS=${RUNS:-/work/runs/mmlu}
COMMON="--task mmlu --template rc --split test --threads 1 --no-progress --log-samples"
CHUNKS="0 1 2 3 4 5 6 7 8 9 10 11 12 13 14"   # 14 x 1,000 + 42

chunked() {  # NAME MODEL [eval options...]: evaluate every missing chunk, then summarise the whole split
  local name=$1 model=$2; shift 2
  for k in $CHUNKS; do
    [ -f $RUNS/$name/chunk$k/results.json ] || textdistill eval --model $model $COMMON "$@" \
        --offset $((k * 1000)) --limit 1000 --output $RUNS/$name/chunk$k/results.json || exit 1
  done
  python $OUT/summarize.py $(for k in $CHUNKS; do printf "$RUNS/$name/chunk$k+"; done | sed 's/+$//') \
      --output $OUT/$name.json
}

case "$1" in
smollm2)
  [ -f $RUNS/smollm2-zero-shot-full/results.json ] || textdistill eval --model smollm2-135m $COMMON \
      --output $RUNS/smollm2-zero-shot-full/results.json
  python $OUT/summarize.py $RUNS/smollm2-zero-shot-full --output $OUT/smollm2-135m-zero-shot.json ;;
gemma) chunked gemma3-270m-zero-shot gemma3-270m ;;
# the adapter of results/mmlu-pool-probe/run.sh: 600 steps on the 10,000-row cloze sample of mcqa-pool
smollm2-pool600) chunked smollm2-135m-pool10k-600steps smollm2-135m --adapter $RUNS/smollm2-pool10k-600steps ;;
paired-pool600)
  python bench/paired_accuracy.py --a zero-shot=$RUNS/smollm2-zero-shot-full \
      --b pool-600-steps=$(for k in $CHUNKS; do printf "$RUNS/smollm2-135m-pool10k-600steps/chunk$k+"; done | sed 's/+$//') \
      --output $OUT/paired-smollm2-135m-pool600-vs-zero-shot.json
  python bench/paired_accuracy.py --metric acc_norm --a zero-shot=$RUNS/smollm2-zero-shot-full \
      --b pool-600-steps=$(for k in $CHUNKS; do printf "$RUNS/smollm2-135m-pool10k-600steps/chunk$k+"; done | sed 's/+$//') \
      --output $OUT/paired-smollm2-135m-pool600-vs-zero-shot-acc_norm.json ;;
# the two zero-shot models on the same questions
paired-models)
  python bench/paired_accuracy.py --a smollm2-135m=$RUNS/smollm2-zero-shot-full \
      --b gemma3-270m=$(for k in $CHUNKS; do printf "$RUNS/gemma3-270m-zero-shot/chunk$k+"; done | sed 's/+$//') \
      --output $OUT/paired-gemma3-270m-vs-smollm2-135m-zero-shot.json ;;
*) echo "usage: $0 smollm2|gemma|smollm2-pool600|paired-pool600|paired-models"; exit 2 ;;
esac
