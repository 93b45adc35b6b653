"""Put the held-out losses of a finished distillation run into its experts' score cache
(``<experts>/instrument_cache/``), so that later runs on the same experts, budget and seed do not score its starting
samples, its compared selections, its random subsets and its floor again (about 20 minutes on one CPU core for
ARC-Easy at 1%). For runs made before the cache existed.

    python bench/cache_heldout.py RUN_FOLDER [--threads 1]

The sets are rebuilt exactly as ``distill`` builds them (from the run's run.json and init.json); one draw of the
starting samples is recomputed first and must equal the stored loss, otherwise nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from textdistill.artifacts import read_json
    from textdistill.config import build_dataclass
    from textdistill.distill import NULL_SEED_OFFSET, DistillConfig, _special_ids, build_synthetic_set
    from textdistill.data import stable_token_ids
    from textdistill.experts import load_experts
    from textdistill.matching import (ResolvedStudent, SampleSet, ScoreCache, Scorer, load_expert_pool,
                                      load_student_model, make_draws, tokenize_for_experts)
    from textdistill.models import resolve_dtype
    from textdistill.projection import input_embedding_matrix
    from textdistill.selection import apply_selection, random_indices

    info, init, heldout = (read_json(args.run / name) for name in ("run.json", "init.json", "heldout.json"))
    config = build_dataclass(DistillConfig, info["config"])
    experts = info["experts"]
    trajectories = load_experts(experts)
    manifest = trajectories.manifest
    model, tokenizer = load_student_model(trajectories, device="cpu", dtype=config.dtype)
    examples, pool = load_expert_pool(tokenizer, manifest)
    count = info["budget_count"]
    student = dataclasses.replace(ResolvedStudent(**info["student"]), lr=heldout["lr"])   # the searched lr
    dtype = resolve_dtype(config.dtype)
    embed_matrix = input_embedding_matrix(model).to(torch.promote_types(dtype, torch.float32))
    vocab = embed_matrix.shape[0]
    special = _special_ids(tokenizer, vocab)
    allowed_ids = torch.tensor(stable_token_ids(tokenizer, vocab, exclude=special))
    chosen = init["indices"]
    synthetic = build_synthetic_set([pool[i] for i in chosen], [examples[i].prompt for i in chosen], embed_matrix,
                                    tokenizer=tokenizer, init=config.init, prompt_length=config.prompt_length,
                                    allowed_ids=allowed_ids, freeze_scaffold=config.freeze_scaffold,
                                    generator=torch.Generator().manual_seed(config.seed))
    sets = {"init": synthetic.sample_set(embed_matrix, ids=synthetic.init_token_ids)}
    for name in heldout.get("compare", {}):
        # the runner compares the experiment's selections of this budget; their files sit beside the run folder
        budget = info["config"]["budget"].replace("%", "pct")
        found = sorted((args.run.parent.parent / "selections").glob(f"{name}-{budget}-seed0-*.json"))
        if len(found) == 1:
            picked = apply_selection(examples, found[0])[:count]
            sets[name] = SampleSet.from_tokenized(tokenize_for_experts(tokenizer, picked, manifest), embed_matrix)
    null = [SampleSet.from_tokenized([pool[i] for i in random_indices(len(pool), count,
                                                                       config.seed + NULL_SEED_OFFSET + r)],
                                     embed_matrix) for r in range(len(heldout["random"]))]
    draws = make_draws(info["heldout_experts"], student, count, config.instrument.draws, config.instrument.seed)
    if [d.to_json() for d in draws] != heldout["draws"]:
        print("the rebuilt draws differ from the run's: nothing written", file=sys.stderr)
        return 1
    scorer = Scorer(model, trajectories, student, device="cpu", dtype=dtype)
    check = scorer.loss(sets["init"], draws[0])
    if check != heldout["init"]["draws"][0]:
        print(f"starting samples, draw 0: recomputed {check!r}, stored {heldout['init']['draws'][0]!r}: nothing "
              f"written", file=sys.stderr)
        return 1
    cache = ScoreCache(Path(experts) / "instrument_cache",
                       {"manifest": manifest, "student": dataclasses.asdict(student), "dtype": str(scorer.dtype),
                        "device": scorer.device.type})
    written = 0
    for name, samples in sets.items():
        stored = heldout["init"] if name == "init" else heldout["compare"].get(name)
        if stored is not None:
            cache.put("set", samples.fingerprint(), draws, student.lr, stored["draws"])
            written += 1
    for samples, stored in zip(null, heldout["random"]):
        cache.put("set", samples.fingerprint(), draws, student.lr, stored["draws"])
        written += 1
    if heldout.get("floor"):
        cache.put("floor", "", draws, student.lr, heldout["floor"]["draws"])
        written += 1
    print(f"cached {written} sets of {args.run} in {cache.folder} (draw 0 of the starting samples recomputed equal)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
