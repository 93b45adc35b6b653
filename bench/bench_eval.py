"""Multiple-choice scoring throughput on the real models (needs `textdistill assets install`).

    python bench/bench_eval.py [--threads 2] [--questions 100] [--batch-size 16] [--out results/bench_eval.md]

On the first N ARC-Easy validation questions (0-shot), for SmolLM2-135M and Gemma-3-270M in fp32 with sdpa
attention, times three ways of scoring every choice:

(a) batched: ``score_requests`` with up to ``--batch-size`` questions per batch (one forward for their contexts,
    then their continuations on the cache, in one or a few forwards);
(b) one question at a time: ``score_requests(batch_size=1)``, the context once, its choices as one batch;
(c) naive: one full forward per choice over context + continuation (logits only where they are scored).

It checks that the three agree (log-likelihoods within rtol 1e-5 + atol 1e-4, same predictions and greedy flags),
prints a table and, as the last line, ``key=value`` figures; writes the same to a Markdown file with a description
of the machine. Each path runs once after a short warm-up; the times depend on the machine and on other load, so
only ratios within one run are meant to be compared.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = ("smollm2-135m", "gemma3-270m")
RTOL, ATOL = 1e-5, 1e-4


def machine_description(threads: int, load_at_start: tuple[float, ...]) -> dict:
    """CPU model, whether it has avx512_bf16, torch's kernel level and thread count, the load of other work on the
    machine (other processes slow every path, and oversubscribed cores slow multi-threaded kernels a lot), library
    versions."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        lscpu = ""
    try:
        avx512_bf16 = bool(torch.cpu.get_capabilities().get("avx512_bf16"))
    except (AttributeError, RuntimeError):
        avx512_bf16 = "avx512_bf16" in lscpu
    return {"cpu": cpu, "avx512_bf16": avx512_bf16, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "requested_threads": threads,
            "load_average_1_5_15_min_at_start": " / ".join(f"{x:.2f}" for x in load_at_start),
            "load_average_1_5_15_min_at_end": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
            "torch": torch.__version__, "transformers": transformers.__version__}


def naive_scores(model, tokenizer, requests) -> list:
    """One forward per choice over context + continuation[:-1]; logits only at the positions that predict the
    continuation (``logits_to_keep``), so the baseline does not pay for a vocabulary-sized head at every position."""
    from textdistill.evaluation import ChoiceScores, encode_request, tokenizer_adds_bos

    add_bos = tokenizer_adds_bos(tokenizer)
    results = []
    with torch.inference_mode():
        for request in requests:
            encoded = encode_request(tokenizer, request, add_bos=add_bos)
            loglik, greedy = [], []
            for cont in encoded.continuation_ids:
                ids = torch.tensor([list(encoded.context_ids) + list(cont[:-1])])
                logp = model(input_ids=ids, logits_to_keep=len(cont)).logits[0].float().log_softmax(-1)
                target = torch.tensor(cont)
                loglik.append(float(logp.gather(-1, target[:, None]).double().sum()))
                greedy.append(bool((logp.argmax(-1) == target).all()))
            results.append(ChoiceScores(loglik=tuple(loglik), is_greedy=tuple(greedy),
                                        num_tokens=tuple(len(c) for c in encoded.continuation_ids),
                                        num_chars=request.choice_lengths))
    return results


def compare(reference: list, other: list) -> dict:
    """Largest log-likelihood differences, and counts of disagreements beyond float noise."""
    max_abs = max_rel = 0.0
    out_of_tolerance = pred_mismatch = greedy_mismatch = 0
    for ref, got in zip(reference, other, strict=True):
        for a, b in zip(got.loglik, ref.loglik, strict=True):
            max_abs = max(max_abs, abs(a - b))
            max_rel = max(max_rel, abs(a - b) / max(abs(b), 1e-12))
            out_of_tolerance += abs(a - b) > ATOL + RTOL * abs(b)
        # a different prediction only counts when the two choices are not tied within the tolerance
        per_char = [ll / max(n, 1) for ll, n in zip(ref.loglik, ref.num_chars)]
        for values, i, j in ((ref.loglik, ref.pred, got.pred), (per_char, ref.pred_norm, got.pred_norm)):
            if i != j and abs(values[i] - values[j]) > 2 * (ATOL + RTOL * max(abs(values[i]), abs(values[j]))):
                pred_mismatch += 1
        greedy_mismatch += sum(x != y for x, y in zip(got.is_greedy, ref.is_greedy))
    return {"max_abs_diff": max_abs, "max_rel_diff": max_rel, "out_of_tolerance": out_of_tolerance,
            "pred_mismatches": pred_mismatch, "greedy_mismatches": greedy_mismatch}


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_model(name: str, requests: list, batch_size: int) -> dict:
    from textdistill.evaluation import multiple_choice_metrics, score_requests
    from textdistill.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(name)
    model = load_model(name, dtype="fp32", attn_implementation="sdpa")
    score_requests(model, tokenizer, requests[:4], progress=False, batch_size=batch_size)  # warm-up
    paths = {
        "batched": lambda: score_requests(model, tokenizer, requests, progress=False, batch_size=batch_size),
        "one_at_a_time": lambda: score_requests(model, tokenizer, requests, progress=False, batch_size=1),
        "naive": lambda: naive_scores(model, tokenizer, requests),
    }
    seconds, scores = {}, {}
    for path, fn in paths.items():
        seconds[path], scores[path] = timed(fn)
        print(f"  {name} {path}: {seconds[path]:.1f} s", file=sys.stderr)
    golds = [r.gold for r in requests]
    return {
        "seconds": seconds,
        "acc": {path: multiple_choice_metrics(s, golds)["acc"] for path, s in scores.items()},
        "checks": {path: compare(scores["one_at_a_time"], scores[path]) for path in ("batched", "naive")},
    }


def report(results: dict, questions: int, batch_size: int, machine: dict, command: str,
           note: str | None) -> tuple[str, str]:
    """A Markdown report and the final ``key=value`` line."""
    lines = ["# Multiple-choice scoring throughput", "",
             f"ARC-Easy validation, first {questions} questions, 0-shot, fp32, sdpa attention. batched: up to "
             f"{batch_size} questions per batch (one forward for their contexts, one or a few for their "
             "continuations); one_at_a_time: batch_size=1; naive: one forward per choice. Each path ran once "
             "after a warm-up.", "",
             "| model | path | seconds | questions/s | vs naive | acc | max abs diff | max rel diff | "
             "pred / greedy mismatches |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    figures = {}
    for name, res in results.items():
        key = name.split("-")[0]
        secs = res["seconds"]
        for path in ("batched", "one_at_a_time", "naive"):
            check = res["checks"].get(path)
            diffs = (f"{check['max_abs_diff']:.2e} | {check['max_rel_diff']:.2e} | "
                     f"{check['pred_mismatches']} / {check['greedy_mismatches']}") if check else "reference | | "
            lines.append(f"| {name} | {path} | {secs[path]:.1f} | {questions / secs[path]:.2f} | "
                         f"{secs['naive'] / secs[path]:.2f}x | {res['acc'][path]:.3f} | {diffs} |")
            figures[f"{key}_{path}_qps"] = questions / secs[path]
        figures[f"{key}_batched_vs_naive"] = secs["naive"] / secs["batched"]
        figures[f"{key}_batched_vs_one_at_a_time"] = secs["one_at_a_time"] / secs["batched"]
        figures[f"{key}_one_at_a_time_vs_naive"] = secs["naive"] / secs["one_at_a_time"]
        figures[f"{key}_agree"] = int(all(c["out_of_tolerance"] == 0 and c["pred_mismatches"] == 0
                                          for c in res["checks"].values()))
    if "smollm2-135m" in results:
        figures = {"eval_speedup": figures["smollm2_batched_vs_naive"], **figures}
    key_values = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    lines += ["", "Agreement is with the one-question-at-a-time path (the reference): log-likelihoods within "
              f"rtol {RTOL:g} + atol {ATOL:g}; prediction mismatches count only where the two choices are not tied "
              "within that tolerance.", "",
              "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    if note:
        lines += ["", note]
    lines += ["", "## Command", "", f"    {command}", "", "## Figures", "", f"    {key_values}", ""]
    return "\n".join(lines), key_values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", default="results/bench_eval.md")
    parser.add_argument("--note", help="a remark on the conditions of the run, written under the machine")
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    from textdistill.config import EvalConfig
    from textdistill.evaluation import build_requests

    requests = build_requests(EvalConfig(task="arc-easy", split="validation", limit=args.questions))
    results = {name: bench_model(name, requests, args.batch_size) for name in args.models}
    command = shlex.join(["python", "bench/bench_eval.py", *(sys.argv[1:] if argv is None else argv)])
    text, key_values = report(results, len(requests), args.batch_size,
                              machine_description(args.threads, load_at_start), command, args.note)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text.split("\n\n## Machine")[0])
    print(key_values)
    agree = all(c["out_of_tolerance"] == 0 and c["pred_mismatches"] == 0
                for res in results.values() for c in res["checks"].values())
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
