"""Speed ratios measured in one run, on the real SmolLM2-135M (needs `textdistill assets install`).

    python bench/bench_speed.py [--threads 1] [--questions 40] [--out results/bench_speed.json]

1. Multiple-choice scoring: context run once per question (shared KV cache) vs one full forward per choice.
2. One LoRA training step: fp32 vs bf16 autocast.
3. One distillation outer iteration (N student steps + meta-gradient): keep-graph vs recompute, fp32 vs bf16.

Prints a table and writes JSON. Times are medians of repeats after one warm-up; they depend on the machine and on
other load, so only the ratios within one run are meant to be compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_scoring(model, tokenizer, questions: int) -> dict:
    from textdistill.config import EvalConfig
    from textdistill.evaluation import build_requests, encode_request, score_requests, tokenizer_adds_bos

    requests = build_requests(EvalConfig(task="arc-easy", split="validation", limit=questions))

    def naive():
        add_bos = tokenizer_adds_bos(tokenizer)
        with torch.inference_mode():
            for request in requests:
                encoded = encode_request(tokenizer, request, add_bos=add_bos)
                for cont in encoded.continuation_ids:
                    ids = torch.tensor([list(encoded.context_ids) + list(cont)])
                    logits = model(input_ids=ids).logits[0, len(encoded.context_ids) - 1: -1].float()
                    logits.log_softmax(-1).gather(-1, torch.tensor(cont)[:, None]).sum()

    shared = _median_time(lambda: score_requests(model, tokenizer, requests, progress=False), 2)
    full = _median_time(naive, 2)
    return {"questions": len(requests), "shared_context_s": shared, "per_choice_forward_s": full,
            "speedup": full / shared}


def bench_training_step(model_name: str) -> dict:
    from textdistill.config import LoraSettings, TrainConfig
    from textdistill.data import load_examples, tokenize_examples
    from textdistill.models import add_lora, load_model, load_tokenizer
    from textdistill.training import train_model

    tokenizer = load_tokenizer(model_name)
    examples = tokenize_examples(tokenizer, load_examples("arc-easy:train")[:64], max_length=256)
    out = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = add_lora(load_model(model_name, attn_implementation="sdpa"),
                         LoraSettings(r=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
        result = train_model(model, examples, TrainConfig(max_steps=6, batch_size=8, precision=precision),
                             pad_id=tokenizer.pad_token_id, progress=False)
        out[f"{precision}_step_s"] = result.seconds / result.steps
    out["bf16_speedup"] = out["fp32_step_s"] / out["bf16_step_s"]
    return out


def bench_unroll(model_name: str, steps: int) -> dict:
    from textdistill.config import LoraSettings
    from textdistill.data import load_examples, tokenize_examples
    from textdistill.models import add_lora, load_model, load_tokenizer
    from textdistill.projection import input_embedding_matrix
    from textdistill.unroll import SyntheticBatch, lora_parameters, matching_loss, unroll

    tokenizer = load_tokenizer(model_name)
    model = add_lora(load_model(model_name, attn_implementation="eager"),
                     LoraSettings(r=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
    model.eval()
    examples = tokenize_examples(tokenizer, load_examples("arc-easy:train")[:4], max_length=256)
    embed = input_embedding_matrix(model)
    prompts = [torch.nn.Parameter(embed[list(e.prompt_ids)].clone()) for e in examples]
    responses = [torch.tensor(e.response_ids) for e in examples]
    start = {k: v + 0.01 * torch.randn_like(v) for k, v in lora_parameters(model).items()}
    target = {k: v + 0.01 * torch.randn_like(v) for k, v in start.items()}
    lr = torch.tensor(0.1, requires_grad=True)
    out = {}
    for label, recompute, precision in (("keep_graph_fp32", False, None), ("recompute_fp32", True, None),
                                        ("keep_graph_bf16", False, torch.bfloat16)):
        def outer():
            batches = [SyntheticBatch.from_samples(prompts, responses) for _ in range(steps)]
            context = torch.autocast("cpu", dtype=precision) if precision else torch.autocast("cpu", enabled=False)
            with context:
                student = unroll(model, start, batches, lr, recompute=recompute)
            matching_loss(student, start, target).backward()

        # (peak RSS is monotonic within a process, so memory is not compared here; tests/test_unroll.py counts the
        # tensors each mode keeps for the backward instead)
        out[f"{label}_s"] = _median_time(outer, 1)
    out["recompute_time_ratio"] = out["recompute_fp32_s"] / out["keep_graph_fp32_s"]
    out["bf16_speedup"] = out["keep_graph_fp32_s"] / out["keep_graph_bf16_s"]
    out["inner_steps"] = steps
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--steps", type=int, default=4, help="student steps in the unroll benchmark")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="results/bench_speed.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from textdistill.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, attn_implementation="sdpa")
    results = {"threads": args.threads, "model": args.model, "torch": torch.__version__,
               "scoring": bench_scoring(model, tokenizer, args.questions)}
    del model
    results["training_step"] = bench_training_step(args.model)
    results["unroll"] = bench_unroll(args.model, args.steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for section, values in results.items():
        if isinstance(values, dict):
            for key, value in values.items():
                print(f"{section:>14} {key:<36} {value:.3f}" if isinstance(value, float) else
                      f"{section:>14} {key:<36} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
