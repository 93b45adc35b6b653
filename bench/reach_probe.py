"""Is the matching target reachable? Paired probe on held-out expert segments: the matching loss that random real
subsets of S rows reach (the null) and that the rows the expert actually trained on reach (the floor), for several
student settings and learning rates, on the same fixed draws.

    python bench/reach_probe.py EXPERTS_DIR S '[{"syn_steps": 4, "batch_size": 8}]' '[0.01, 0.03, 0.1]'
        [--draws 6] [--subsets 5] [--threads 1]

One JSON line per (setting, lr) as it finishes, then one per setting with everything: `floor` (per draw, at the
experts' own lr), `random@LR` (mean over the draws, one per subset). The logs of results/README.md section 7 are in
results/reachability/.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experts")
    parser.add_argument("size", type=int, help="rows per candidate set (S)")
    parser.add_argument("settings", help="JSON list of StudentSettings fields, one probe per entry")
    parser.add_argument("lrs", help="JSON list of student learning rates")
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--subsets", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from textdistill.experts import load_experts
    from textdistill.matching import (SampleSet, Scorer, StudentSettings, load_expert_pool, load_student_model,
                                      make_draws, resolve_student)
    from textdistill.projection import input_embedding_matrix

    trajectories = load_experts(args.experts)
    model, tokenizer = load_student_model(trajectories, device="cpu")
    _, pool = load_expert_pool(tokenizer, trajectories.manifest)
    embed = input_embedding_matrix(model).float()
    _, heldout = trajectories.split(1)
    for spec in json.loads(args.settings):
        student = resolve_student(StudentSettings(**spec), trajectories)
        draws = make_draws(heldout, student, args.size, args.draws, 0)
        scorer = Scorer(model, trajectories, student, device="cpu")
        started = time.time()
        result = {"spec": spec, "student": dataclass_dict(student), "starts": [d.start for d in draws],
                  "floor": [round(scorer.floor_loss(pool, d, embed), 3) for d in draws]}
        subsets = [SampleSet.from_tokenized([pool[i] for i in random.Random(k).sample(range(len(pool)), args.size)],
                                            embed) for k in range(args.subsets)]
        for lr in json.loads(args.lrs):
            result[f"random@{lr}"] = [round(sum(scorer.losses(s, draws, lr=lr)) / len(draws), 3) for s in subsets]
            print(json.dumps({"lr": lr, "spec": spec, "random": result[f"random@{lr}"],
                              "s": round(time.time() - started)}), flush=True)
        result["seconds"] = round(time.time() - started)
        print(json.dumps(result), flush=True)
    return 0


def dataclass_dict(obj) -> dict:
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


if __name__ == "__main__":
    sys.exit(main())
