"""bf16 autocast vs fp32 meta-gradient of the distillation, on fixed draws (SmolLM2-135M, real experts).

    python bench/bench_metagrad_precision.py --experts DIR [--budget 12] [--draws 4] [--threads 2]
        [--syn-steps N] [--batch-size B] [--lr LR] [--out results/bench_metagrad_precision.md]

The student follows the experts (N, batch and lr from their manifest) unless --syn-steps/--batch-size/--lr say
otherwise.

For each draw (expert segment, start, minibatch order of the student over a random real subset of the pool) the
meta-gradient of the matching loss w.r.t. the prompt embeddings (what the token search ranks swaps by) and w.r.t.
the student lr is computed in fp32 and under bf16 autocast, from the same exact token embeddings. Reports the
cosine between the two embedding gradients, the relative lr-gradient difference, and the time of each. The
distillation makes bf16 its default only where it is native *and* the direction agrees (cosine >= 0.9).
Prints a table and, as the last line, key=value figures; writes the same to --out with the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", required=True)
    parser.add_argument("--budget", type=int, default=12)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--syn-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--out", default="results/bench_metagrad_precision.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from textdistill.artifacts import machine_description
    from textdistill.experts import load_experts
    from textdistill.matching import (SampleSet, StudentSettings, load_expert_pool, load_student_model, make_draws,
                                      resolve_student)
    from textdistill.projection import input_embedding_matrix
    from textdistill.selection import random_indices
    from textdistill.unroll import SyntheticBatch, matching_loss, unroll

    trajectories = load_experts(args.experts)
    model, tokenizer = load_student_model(trajectories, device="cpu")
    student = resolve_student(StudentSettings(syn_steps=args.syn_steps, batch_size=args.batch_size, lr=args.lr),
                              trajectories)
    train_experts, _ = trajectories.split(1)
    _, pool = load_expert_pool(tokenizer, trajectories.manifest)
    embed = input_embedding_matrix(model)
    rows = [pool[i] for i in random_indices(len(pool), args.budget, 7)]
    samples = SampleSet.from_tokenized(rows, embed)
    draws = make_draws(train_experts, student, len(samples), args.draws, seed=11)

    def meta_gradient(draw, bf16: bool):
        prompts = [p.clone().requires_grad_(True) for p in samples.prompts]
        lr = torch.tensor(student.lr, requires_grad=True)
        start = trajectories.load(draw.expert, draw.start)
        target = trajectories.load(draw.expert, draw.start + student.span)
        batches = [SyntheticBatch.from_samples([prompts[i] for i in b], [samples.responses[i] for i in b])
                   for b in draw.batches]
        began = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            final = unroll(model, start, batches, lr)
        loss = matching_loss(final, start, target)
        loss.backward()
        seconds = time.perf_counter() - began
        # samples the draw never uses get no gradient: zeros, so both precisions flatten to the same layout
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in prompts])
        return grad, float(lr.grad), float(loss), seconds

    table = ["| draw | loss fp32 | loss bf16 | cos(embedding grads) | lr grad rel. diff | s fp32 | s bf16 |",
             "|---|---|---|---|---|---|---|"]
    cosines, lr_diffs, t32, t16 = [], [], [], []
    meta_gradient(draws[0], False)   # warm-up
    for k, draw in enumerate(draws):
        g32, l32, loss32, s32 = meta_gradient(draw, False)
        g16, l16, loss16, s16 = meta_gradient(draw, True)
        cos = float(torch.nn.functional.cosine_similarity(g32, g16, dim=0))
        rel = abs(l16 - l32) / max(abs(l32), 1e-30)
        cosines.append(cos), lr_diffs.append(rel), t32.append(s32), t16.append(s16)
        table.append(f"| {k} | {loss32:.4f} | {loss16:.4f} | {cos:.4f} | {rel:.3f} | {s32:.1f} | {s16:.1f} |")
    machine = machine_description()
    figures = (f"cos_min={min(cosines):.4f} cos_median={statistics.median(cosines):.4f} "
               f"lr_grad_rel_diff_median={statistics.median(lr_diffs):.4f} "
               f"bf16_speedup={statistics.median(t32) / statistics.median(t16):.2f}")
    text = "\n".join([
        "# Meta-gradient: bf16 autocast vs fp32", "",
        f"Command: `python {' '.join(sys.argv)}`", "",
        f"Machine: {machine['cpu']}, {machine['cpu_cores']} cores, torch threads {args.threads}, kernel level "
        f"{machine['cpu_capability']}, avx512_bf16 {machine['avx512_bf16']}, amx_bf16 {machine['amx_bf16']}.", "",
        f"SmolLM2-135M, experts `{args.experts}`, {len(samples)} random pool rows, student N={student.steps} steps "
        f"of batch {student.batch_size} at lr {student.lr}, keep-graph unroll; {len(draws)} draws of the training "
        "experts.", "", *table, "", figures, ""])
    Path(args.out).write_text(text)
    print("\n".join(table))
    print(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
