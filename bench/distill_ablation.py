"""One distillation of an experiment config, made exactly as the experiment runner makes it (same folder and
settings key, so a later `textdistill experiment` run of the same settings reuses it), with the mode and any other
value overridden: the ablation of results/README.md section 7.2.

    python bench/distill_ablation.py CONFIG RUN_FOLDER BUDGET THREADS MODE [KEY=VALUE ...]
    e.g. python bench/distill_ablation.py configs/arc-easy-cpu-v2.yaml results/arc-easy-cpu-v2 1% 1 continuous \
             distill.iterations=24 distill.lr_embeddings=0.01 distill.recompute=true

KEY=VALUE pairs are `--set` overrides of the config (YAML values). Prints the run folder and its wall time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import yaml


def main(argv: list[str]) -> int:
    if len(argv) < 5:
        print(__doc__, file=sys.stderr)
        return 2
    config_path, run_folder, budget, threads, mode, *pairs = argv
    torch.set_num_threads(int(threads))
    from textdistill.experiment import _Stages, load_experiment_config, resolve_precisions, validate

    sets = {"distill.mode": mode}
    for pair in pairs:
        key, value = pair.split("=", 1)
        sets[key] = yaml.safe_load(value)
    config = resolve_precisions(load_experiment_config(config_path, sets=sets), "cpu")
    pool = validate(config)
    stages = _Stages(config, Path(run_folder), pool, "cpu", True)
    started = time.time()
    folder = stages.distilled(budget, 0)
    print(f"distill folder: {folder} seconds: {time.time() - started:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
