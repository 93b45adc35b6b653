"""The ablation table of the distillation modes: for each distillation run folder, what changed, the paired held-out
matching loss of its text minus its starting samples (mean, 95% interval), its rank among the random subsets and
against the match selection, and the perplexity of its prompts under SmolLM2-135M and Gemma-3-270M.

    python bench/ablation_table.py RUN_FOLDER [RUN_FOLDER ...] --out results/ablation.md [--threads 2]

Perplexity: exp of the mean negative log-likelihood of the prompt tokens (each model's own tokenizer, BOS where
the model uses one, the first token predicted from BOS only), over all prompts of a set; the starting samples'
prompts are measured the same way for reference.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch


def prompt_perplexity(model, tokenizer, prompts: list[str]) -> float:
    """exp(mean NLL per prompt token) of ``prompts`` under ``model`` (fp32, one prompt per forward)."""
    from textdistill.data import uses_bos

    total, count = 0.0, 0
    bos = [tokenizer.bos_token_id] if uses_bos(tokenizer) else []
    with torch.inference_mode():
        for text in prompts:
            ids = bos + list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(ids) < 2:
                continue
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum")
            total, count = total + float(nll), count + len(ids) - 1
    return math.exp(total / max(count, 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from textdistill.artifacts import machine_description, read_json
    from textdistill.distill import read_distilled_rows
    from textdistill.models import load_model, load_tokenizer

    runs = []
    for folder in map(Path, args.runs):
        summary = read_json(folder / "summary.json")
        rows = read_distilled_rows(folder)
        runs.append((folder, summary, rows, read_json(folder / "run.json")["config"]))
    perplexity: dict[tuple[str, str], float] = {}
    for name in ("smollm2-135m", "gemma3-270m"):
        model, tokenizer = load_model(name, device="cpu"), load_tokenizer(name)
        for folder, _, rows, _ in runs:
            perplexity[(str(folder), name)] = prompt_perplexity(model, tokenizer, [r["prompt"] for r in rows])
        perplexity[("init", name)] = prompt_perplexity(model, tokenizer, [r["init_prompt"] for r in runs[0][2]])
        del model
    lines = ["| mode | iterations | learnable tokens changed | text - start (95% interval) | vectors - start (95% "
             "interval) | rank among random | vs match selection | text loss | start loss | random mean | floor | "
             "ppl SmolLM2 | ppl Gemma-3 | minutes |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for folder, summary, rows, config in runs:
        h = summary["heldout"]
        diff = h["projected_minus_init"]
        vectors = h.get("continuous_minus_init")   # straight_through / continuous: the learned vectors themselves
        vectors = "-" if not vectors else \
            f"{vectors['mean']:+.4f} ({vectors['ci95'][0]:+.4f}, {vectors['ci95'][1]:+.4f})"
        randoms = [r["loss"] for r in h["random"]]
        match = (h.get("compare") or {}).get("match")
        versus = "-" if not match else f"{h['projected']['loss'] - match['loss']:+.4f}"
        minutes = (summary.get("distill_seconds", 0) + h.get("seconds", 0)) / 60 if "seconds" in h else \
            summary.get("distill_seconds", 0) / 60
        mode = summary["mode"]
        if (config.get("search") or {}).get("confirm_draws"):
            mode += f" (confirm_draws {config['search']['confirm_draws']})"
        lines.append(
            f"| {mode} | {summary['iterations']} | {summary['tokens_changed_fraction']:.3f} | "
            f"{diff['mean']:+.4f} ({diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}) | {vectors} | "
            f"{h['projected_rank_among_random']} of {len(randoms) + 1} | {versus} | {h['projected']['loss']:.4f} | "
            f"{h['init']['loss']:.4f} | {sum(randoms) / len(randoms):.4f} | "
            f"{(h.get('floor') or {}).get('loss', float('nan')):.4f} | "
            f"{perplexity[(str(folder), 'smollm2-135m')]:.1f} | {perplexity[(str(folder), 'gemma3-270m')]:.1f} | "
            f"{minutes:.0f} |")
    lines.append(f"| (starting samples) | | | | | | | | | | | {perplexity[('init', 'smollm2-135m')]:.1f} | "
                 f"{perplexity[('init', 'gemma3-270m')]:.1f} | |")
    machine = machine_description()
    text = "\n".join([f"Command: `python {' '.join(sys.argv)}`", "",
                      f"Machine: {machine['cpu']}, {machine['cpu_cores']} cores, kernel level "
                      f"{machine['cpu_capability']}.", "", *lines, ""])
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
