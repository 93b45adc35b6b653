"""One-off (copied from the session's scratch folder; run from the repository root): score the later draws of the 5% performance stage (configs/arc-easy-tuned-5pct.yaml) into the stage's
shared cache, from the last draw down, while the experiment process scores from the first up (each draw's run is
deterministic: the same entry whichever process writes it; the experiment reads every cached draw)."""
import sys
from pathlib import Path

import torch

from textdistill.data import load_examples
from textdistill.experiment import _pool_settings, load_experiment_config, resolve_precisions
from textdistill.performance_selection import draw_indices, score_cache_path, score_draws
from textdistill.selection import pool_ids_hash, resolve_budget

torch.set_num_threads(1)
config = resolve_precisions(load_experiment_config("configs/arc-easy-tuned-5pct.yaml"), "cpu")
pool = load_examples(config.pool, _pool_settings(config))
count = resolve_budget("5%", len(pool))
draws = draw_indices(len(pool), count, config.performance)
cache = score_cache_path(Path("results/arc-easy-tuned-5pct/selections/performance-draws"), "smollm2-135m",
                         config.recipe, config.performance, pool_ids_hash(pool), count)
print(cache, flush=True)
if not cache.with_name(cache.name + ".lock").exists():
    sys.exit("not the experiment's cache file")
if len(sys.argv) > 1 and sys.argv[1] == "--check":
    sys.exit(0)
score_draws(pool=pool, draws=draws, model="smollm2-135m", recipe=config.recipe, config=config.performance,
            cache=cache, device="cpu", progress=False, share=list(range(15, 7, -1)))
