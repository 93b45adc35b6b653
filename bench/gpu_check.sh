#!/usr/bin/env bash
# The short GPU check of issue 9, prepared for a session that is lent a GPU (the `device` tool), and runnable on a
# CPU as a smoke test of the same commands (DEVICE=cpu SMALL=1: a few minutes on 2 cores).
#
#   bash bench/gpu_check.sh                 # on the GPU machine: bf16, 1 rank, then 2 ranks where there are 2 GPUs
#   DEVICE=cpu SMALL=1 bash bench/gpu_check.sh
#
# SmolLM2-135M: experts (bf16 base, fp32 LoRA), a few distillation iterations on 1 rank and on 2 ranks over the same
# segments (the two must end with the same tokens) and once more layer by layer, 2 samples at a time (tokens
# compared: equal up to rounding flips), and ARC-Easy scoring on 1 and 2 ranks (the same accuracy).
# Every step's wall time goes to $OUT/times.txt; the last line prints key=value figures.
set -euo pipefail
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-runs/gpu-check}
SMALL=${SMALL:-0}
if [ "$DEVICE" = cpu ]; then
    NPROC=2; DTYPE=fp32; PRECISION=fp32; export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
else
    NPROC=$(python -c "import torch; print(min(2, torch.cuda.device_count()))"); DTYPE=bf16; PRECISION=bf16
fi
if [ "$SMALL" = 1 ]; then LIMIT=48; STEPS=8; EVAL=40; else LIMIT=400; STEPS=50; EVAL=500; fi
rm -rf "$OUT"; mkdir -p "$OUT"
timed() { local name=$1; shift; local t0=$(date +%s.%N); "$@"; echo "$name $(python -c "print(round($(date +%s.%N) - $t0, 1))")" >> "$OUT/times.txt"; }
run2() { python -m torch.distributed.run --nproc-per-node="$NPROC" --master-addr=127.0.0.1 --master-port=29561 \
             -m textdistill.cli "$@"; }

python -c "import textdistill.artifacts as a, json; print(json.dumps(a.machine_description()))" > "$OUT/machine.json"
timed experts textdistill experts --model smollm2-135m --data arc-easy:train --limit "$LIMIT" --num-experts 3 \
    --max-steps "$STEPS" --snapshot-every $((STEPS / 4)) --batch-size 8 --lr 0.1 --optimizer sgd \
    --train.dtype "$DTYPE" --train.precision "$PRECISION" --device "$DEVICE" --output "$OUT/experts" --no-progress
DISTILL=(distill --experts "$OUT/experts" --budget 8 --iterations 3 --segments 2 --syn-steps 2 --batch-size 4
         --dtype "$DTYPE" --precision "$PRECISION" --instrument.draws 2 --instrument.random_subsets 1
         --instrument.heldout_experts 1 --device "$DEVICE" --no-progress)
timed distill_1rank textdistill "${DISTILL[@]}" --output "$OUT/distill-1"
timed distill_2ranks run2 "${DISTILL[@]}" --output "$OUT/distill-2"
# the layer-by-layer replay, 2 samples at a time (--recompute --checkpoint_layers true --micro_batch 2): the same
# meta-gradients up to rounding
timed distill_layerwise textdistill "${DISTILL[@]}" --recompute --checkpoint_layers true --micro_batch 2 \
    --output "$OUT/distill-3"
EVAL_ARGS=(--model smollm2-135m --task arc-easy --split test --limit "$EVAL" --precision "$PRECISION" --device "$DEVICE"
           --no-progress)
timed eval_1rank textdistill eval "${EVAL_ARGS[@]}" --output "$OUT/eval-1.json"
timed eval_2ranks run2 eval "${EVAL_ARGS[@]}" --output "$OUT/eval-2.json"
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
out = Path(sys.argv[1])
times = dict(line.split() for line in (out / "times.txt").read_text().splitlines())
a, b, c = (load_file(out / f"distill-{n}" / "state.safetensors") for n in (1, 2, 3))
same_tokens = int(bool((a["token_ids"] == b["token_ids"]).all()))
layerwise_same_tokens = int(bool((a["token_ids"] == c["token_ids"]).all()))
acc = []
for n in (1, 2):
    result = json.loads((out / f"eval-{n}.json").read_text())
    acc.append(next(iter(result["results"].values()))["acc,none"])
print(" ".join(f"{k}_s={v}" for k, v in times.items()),
      f"distill_same_tokens={same_tokens} layerwise_same_tokens={layerwise_same_tokens} "
      f"eval_acc_1rank={acc[0]:.4f} eval_acc_2ranks={acc[1]:.4f}")
EOF
