"""Print every key of every committed config and shipped preset: each method's cell key (the methods the config
runs) and the stage keys (experts folder, selections, distillation folder) its cells are built on, as JSON.

    python bench/cell_keys.py > keys.json

A change that must keep the finished work of results/ reusable leaves this output unchanged; tests/data/
cell_keys.json holds it as the code that made results/ printed it (tests/test_cpu_kinds.py compares)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def all_keys() -> dict[str, dict[str, str]]:
    from textdistill.experiment import DISTILL_METHODS, _Stages, cell_key, load_experiment_config, resolve_precisions, stage_settings
    from textdistill.keys import code_identity

    keys = {}
    sources = sorted(str(p) for p in (ROOT / "configs").glob("*.yaml")) + ["demo", "arc-easy", "mmlu"]
    for source in sources:
        if source.endswith(".yaml") and "experiment:" not in Path(source).read_text():
            continue   # not a comparison (e.g. a validity study)
        config = resolve_precisions(load_experiment_config(source), "cpu")
        stages = _Stages(config, Path("/nonexistent"), [], "cpu", False)
        entry = {f"cell {m}": cell_key(config, m) for m in config.methods}
        distilling = bool(set(config.methods) & set(DISTILL_METHODS))
        used = {"random": "random" in config.methods or (distilling and config.distill_init == "random"),
                "less": "less" in config.methods or (distilling and config.distill_init == "less"),
                "match": "match" in config.methods or (distilling and config.distill_init == "match"),
                "distilled": distilling}
        if used["match"] or distilling:
            entry["stage experts"] = stages.key(config.distill_model, config.experts, *code_identity("experts"))
        for method in (m for m, on in used.items() if on):
            entry[f"stage {method}"] = stages.key(*stage_settings(config, method))
        keys[Path(source).stem] = entry
    return keys


if __name__ == "__main__":
    json.dump(all_keys(), sys.stdout, indent=1, sort_keys=True)
    print()
