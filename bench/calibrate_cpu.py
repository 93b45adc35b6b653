"""The two figures issue 9 gives for its AMD EPYC (AVX2, no native bf16), measured the same way here, so that a
machine can be compared with that one: SmolLM2-135M scoring speed, one question per forward (batch 1) and batched
(16), for SmolLM2 and Gemma-3-270M on 60 ARC-Easy test questions, and one fp32 LoRA step of SmolLM2 (batch 4 of
ARC-Easy train rows, 128 tokens at most; median of 8).

    python bench/calibrate_cpu.py [--threads 2]
    ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/calibrate_cpu.py

The last line has key=value figures. On the EPYC (issue 9): SmolLM2 1.9 and Gemma-3 1.5 questions/s at batch 1,
a LoRA step 1.47 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from textdistill.artifacts import machine_description
    from textdistill.config import DataSettings, EvalConfig, LoraSettings
    from textdistill.data import load_examples, tokenize_examples
    from textdistill.evaluation import build_requests, score_requests
    from textdistill.models import add_lora, load_model, load_tokenizer
    from textdistill.training import collate, response_loss

    figures = {}
    requests = build_requests(EvalConfig(task="arc-easy", split="test", limit=60))
    for name, short in (("smollm2-135m", "smollm2"), ("gemma3-270m", "gemma3")):
        tokenizer, model = load_tokenizer(name), load_model(name, attn_implementation="sdpa")
        for batch in (1, 16):
            score_requests(model, tokenizer, requests[:4], batch_size=batch, progress=False)   # warm-up
            start = time.perf_counter()
            score_requests(model, tokenizer, requests, batch_size=batch, progress=False)
            figures[f"{short}_qps_batch{batch}"] = len(requests) / (time.perf_counter() - start)
        del model
    tokenizer = load_tokenizer("smollm2-135m")
    rows = tokenize_examples(tokenizer, load_examples("arc-easy:train", DataSettings(limit=40), tokenizer=tokenizer),
                             max_length=128)
    model = add_lora(load_model("smollm2-135m", attn_implementation="sdpa"),
                     LoraSettings(target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
    model.train()
    times = []
    for i in range(8):
        batch = collate(rows[i * 4:(i + 1) * 4], tokenizer.pad_token_id)
        start = time.perf_counter()
        loss, _ = response_loss(model, batch)
        loss.backward()
        times.append(time.perf_counter() - start)
    figures["lora_step_s"] = statistics.median(times)
    machine = machine_description()
    print(f"machine: {machine['cpu']}, kernel level {machine['cpu_capability']}, threads {args.threads}")
    print(" ".join(f"{k}={v:.2f}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
