"""Copy finished cells of an earlier experiment run into a new run folder when the new config makes exactly the
same cells (same pool, pool settings, target, training recipe and, per method, the stage settings), so that a
rerun with a changed distillation does not retrain the random, LESS, base and full arms.

    python bench/reuse_cells.py OLD_RUN NEW_CONFIG NEW_RUN [--methods base,random,less,full]

The old run's ``run.json`` holds its resolved config; each setting a method depends on is compared as JSON with
the new config (after ``precision: auto`` is resolved on this machine). Cells that match are copied with the new
cell key and ``reused_from`` naming the old folder; anything that differs is listed and not copied.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def _plain(value):
    from textdistill.artifacts import to_jsonable

    return json.loads(json.dumps(to_jsonable(value), sort_keys=True))


def _without(mapping: dict, *keys: str) -> dict:
    return {k: v for k, v in mapping.items() if k not in keys}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old_run")
    parser.add_argument("new_config")
    parser.add_argument("new_run")
    parser.add_argument("--methods", default="base,random,less,full")
    args = parser.parse_args()

    from textdistill.artifacts import atomic_write_json, read_json
    from textdistill.experiment import _cell_dir, cell_key, load_experiment_config, resolve_precisions

    old_root, new_root = Path(args.old_run), Path(args.new_run)
    old = read_json(old_root / "run.json")["config"]
    new = resolve_precisions(load_experiment_config(args.new_config), "cpu")
    new_plain = _plain(dataclasses.asdict(new))
    # options removed since (they never did anything) are not compared
    old["recipe"] = _without(old["recipe"], "log_every", "save_every")
    common = ("pool", "pool_limit", "target", "recipe", "distill_model")
    differs = [k for k in common if _plain(old.get(k)) != new_plain.get(k)]
    per_method = {"less": ["less"], "base": [], "random": [], "full": []}
    copied = 0
    for method in args.methods.split(","):
        mismatch = differs + [k for k in per_method[method] if _plain(old.get(k)) != new_plain.get(k)]
        if method == "base":   # an untrained model depends only on the target
            mismatch = [k for k in mismatch if k in ("target",)]
        if mismatch:
            print(f"{method}: not reused, settings differ: {', '.join(mismatch)}")
            continue
        key = cell_key(new, method)
        for result in sorted((old_root / "cells").glob(f"*/{method}/*/*/result.json")):
            row = read_json(result)
            if "same_data_as" in row:   # its twin's run; the new run finds twins itself
                continue
            target = _cell_dir(new_root, row["model"], method, row["budget"] or "none",
                               row["seed"] if row["seed"] != "" else None) / "result.json"
            if target.is_file():
                continue
            row.update({"config_key": key, "reused_from": str(result.parent)})
            atomic_write_json(target, row)
            copied += 1
        print(f"{method}: cells copied with key {key}")
    print(f"{copied} cells copied into {new_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
