"""Item-by-item agreement of textdistill's multiple-choice scorer with lm-evaluation-harness itself.

    python bench/lm_eval_agreement.py [--models smollm2-135m[,gemma3-270m]] [--task arc-easy] [--split validation]
                                      [--limit 100] [--item-set NAME] [--per-subject-limit K] [--threads 1]
                                      [--out results/lm_eval_agreement.md]

MMLU in the cloze form: ``--task mmlu --split test --item-set mmlu-test-stratified-20 --per-subject-limit 2``
(two questions of each of the 57 subjects); the report then also says whether every context is, string for
string, the harness's own ``mmlu_<subject>_continuation`` task's (``harness.mmlu_continuation_context``).

Needs the offline assets (``textdistill assets install``) and the extra ``pip install 'textdistill[lm-eval]'``.
Each model in fp32 (sdpa attention), the first ``--limit`` items of a task split with the rc template (the
harness's own ``Question: ...\\nAnswer:`` prompt), 0-shot. The same in-memory model is scored twice:

* ours: ``evaluation.score_requests`` (batched, as ``textdistill eval`` runs it);
* the harness: ``harness.harness_records``: lm_eval's ``HFLM`` and ``simple_evaluate`` on a generated task YAML
  over a local jsonl of the same items (whose contexts and continuations are checked to be the same strings).

It reports the largest per-choice log-likelihood difference (absolute and relative), token-count differences of
the continuations (ours vs the harness's own context/continuation split), the items whose ``acc`` or
``acc_norm`` prediction differs, both sides' aggregate accuracies, and, to document the fix of issue 10, the
``acc_norm`` that our log-likelihoods give under the old divisor (the length of the continuation with its leading
space) and the items where that changes the prediction. Writes a Markdown report and a JSON file beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

RTOL, ATOL = 1e-4, 1e-3      # what "agree" means for one log-likelihood (any CPU, batched vs unbatched kernels)


def _cpu_name() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "datasets", "lm_eval", "textdistill"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _argmax(values) -> int:
    from textdistill.evaluation import argmax_first

    return argmax_first(list(values))


def _tied(values, i: int, j: int) -> bool:
    """Whether choices i and j are within the agreement tolerance of each other (a flip there is rounding)."""
    a, b = values[i], values[j]
    return abs(a - b) <= ATOL + RTOL * max(abs(a), abs(b))


def compare(requests, ours, theirs) -> dict:
    """Item-by-item comparison of our ChoiceScores with the harness's records."""
    max_abs = max_rel = 0.0
    worst = None
    token_diffs, acc_diffs, norm_diffs, old_norm_flips = [], [], [], []
    ours_acc = ours_norm = ours_old_norm = 0
    for req, s, r in zip(requests, ours, theirs):
        for k, (a, b) in enumerate(zip(s.loglik, r["loglik"])):
            diff = abs(a - b)
            if diff > max_abs:
                max_abs, worst = diff, {"item_id": req.item_id, "choice": k, "ours": a, "harness": b}
            max_rel = max(max_rel, diff / max(abs(b), 1e-12))
        if list(s.num_tokens) != list(r["num_tokens"]):
            token_diffs.append({"item_id": req.item_id, "ours": list(s.num_tokens), "harness": r["num_tokens"]})
        ours_acc += s.pred == req.gold
        ours_norm += s.pred_norm == req.gold
        if int(s.pred == req.gold) != r["acc"] or s.pred != r["pred"]:
            acc_diffs.append({"item_id": req.item_id, "gold": req.gold, "ours_pred": s.pred, "harness_pred": r["pred"],
                              "tie_within_tolerance": _tied(s.loglik, s.pred, r["pred"])})
        if int(s.pred_norm == req.gold) != r["acc_norm"] or s.pred_norm != r["pred_norm"]:
            per_char = [ll / n for ll, n in zip(s.loglik, s.num_chars)]
            norm_diffs.append({"item_id": req.item_id, "gold": req.gold, "ours_pred_norm": s.pred_norm,
                               "harness_pred_norm": r["pred_norm"],
                               "tie_within_tolerance": _tied(per_char, s.pred_norm, r["pred_norm"])})
        # the definition before the fix: divide by len(" " + choice)
        old = _argmax([ll / len(c) for ll, c in zip(s.loglik, req.continuations)])
        ours_old_norm += old == req.gold
        if old != s.pred_norm:
            old_norm_flips.append({"item_id": req.item_id, "gold": req.gold, "old_pred_norm": old,
                                   "pred_norm": s.pred_norm, "harness_pred_norm": r["pred_norm"],
                                   "choices": [c[1:] for c in req.continuations],
                                   "loglik": [round(x, 4) for x in s.loglik]})
    n = len(requests)
    return {
        "n": n,
        "max_abs_loglik_diff": max_abs, "max_rel_loglik_diff": max_rel, "worst_choice": worst,
        "loglik_within_tolerance": all(
            abs(a - b) <= ATOL + RTOL * abs(b) for s, r in zip(ours, theirs) for a, b in zip(s.loglik, r["loglik"])),
        "continuation_token_count_diffs": token_diffs,
        "acc_prediction_diffs": acc_diffs, "acc_norm_prediction_diffs": norm_diffs,
        "ours": {"acc": ours_acc / n, "acc_norm": ours_norm / n,
                 "acc_norm_old_divisor_with_leading_space": ours_old_norm / n},
        "harness": {"acc": sum(r["acc"] for r in theirs) / n, "acc_norm": sum(r["acc_norm"] for r in theirs) / n},
        "old_divisor_flips": old_norm_flips,
    }


def _model_section(run: dict) -> list[str]:
    c = run["comparison"]
    lines = [
        f"## {run['model']}",
        "",
        "| | acc | acc_norm |",
        "|---|---:|---:|",
        f"| lm-evaluation-harness | {c['harness']['acc']:.3f} | {c['harness']['acc_norm']:.3f} |",
        f"| textdistill eval | {c['ours']['acc']:.3f} | {c['ours']['acc_norm']:.3f} |",
        f"| textdistill, acc_norm divided by len(' ' + choice) (before the fix) | | "
        f"{c['ours']['acc_norm_old_divisor_with_leading_space']:.3f} |",
        "",
        f"- per-choice log-likelihood: max abs difference {c['max_abs_loglik_diff']:.3g}, max relative "
        f"{c['max_rel_loglik_diff']:.3g} (all within rtol {RTOL:g} + atol {ATOL:g}: "
        f"{'yes' if c['loglik_within_tolerance'] else 'NO'})",
        f"- BOS prepended to every context: {run['bos']}",
        f"- continuation token counts that differ (ours vs the harness's split): "
        f"{len(c['continuation_token_count_diffs'])}",
        f"- items whose acc prediction differs: {len(c['acc_prediction_diffs'])}",
        f"- items whose acc_norm prediction differs: {len(c['acc_norm_prediction_diffs'])}",
        f"- seconds: ours {run['seconds']['ours']:.1f}, harness {run['seconds']['harness']:.1f}",
    ]
    for key, title in (("acc_prediction_diffs", "acc"), ("acc_norm_prediction_diffs", "acc_norm")):
        for d in c[key]:
            lines.append(f"  - {title} differs on {d}")
    if c["old_divisor_flips"]:
        lines += ["", "Items where dividing by the continuation's length with its leading space "
                  "(`len(' ' + choice)`, our definition before the fix) picks another choice than dividing by the "
                  "choice's own length (`len(choice)`, the harness's `process_results`):", ""]
        for f in c["old_divisor_flips"]:
            lines.append(f"- {f['item_id']}: gold {f['gold']}, old pred_norm {f['old_pred_norm']}, now "
                         f"{f['pred_norm']} (harness {f['harness_pred_norm']}); choices {f['choices']}, "
                         f"log-likelihoods {f['loglik']}")
    return lines + [""]


def _which_items(report: dict) -> str:
    if report.get("item_set"):
        per = f", the first {report['per_subject_limit']} of each subject" if report.get("per_subject_limit") else ""
        return f"{report['items']} items of the stored set `{report['item_set']}`{per}"
    return f"first {report['limit']} items"


def markdown(report: dict, command: str) -> str:
    m = report["machine"]
    lines = [
        "# Agreement of `textdistill eval` with lm-evaluation-harness",
        "",
        f"{report['task']}:{report['split']}, {_which_items(report)}, 0-shot, rc template (the harness's "
        f"`Question: ...\\nAnswer:` prompt, continuations ` choice`), fp32, sdpa attention. The same in-memory "
        f"model is scored by our scorer (`score_requests`, batched, {report['batch_size']} questions per batch) and "
        f"by lm-evaluation-harness {report['versions']['lm_eval']} (`HFLM` with batch size {report['batch_size']} + "
        f"`simple_evaluate` on a generated task YAML over a local jsonl of the same items; the harness's contexts "
        f"and continuations were checked to be the same strings as ours).",
        "",
    ]
    layout = report.get("harness_layout")
    if layout is not None:
        lines += [f"Every context against the harness's own `mmlu_<subject>_continuation` task (its subject line and "
                  f"`doc_to_text`, rendered by lm_eval from its installed task files): "
                  f"{layout['items'] - len(layout['contexts_differing'])} of {layout['items']} items over "
                  f"{layout['subjects']} subjects are the same string"
                  + (f"; differing: {', '.join(layout['contexts_differing'][:5])}" if layout["contexts_differing"]
                     else "") + ".", ""]
    for run in report["runs"]:
        lines += _model_section(run)
    lines += ["## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in m.items()]
    lines += [f"- {k}: {v}" for k, v in report["versions"].items()]
    lines += ["", "## Command", "", f"    {command}", ""]
    return "\n".join(lines)


def run_model(name: str, requests, config, batch_size: int) -> dict:
    from textdistill.evaluation import score_requests, tokenizer_adds_bos
    from textdistill.harness import harness_records
    from textdistill.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(name)
    model = load_model(name, dtype="fp32", device="cpu", attn_implementation="sdpa")
    start = time.time()
    ours = score_requests(model, tokenizer, requests, max_length=config.max_length, progress=False,
                          batch_size=batch_size)
    t_ours = time.time() - start
    start = time.time()
    theirs, harness_result = harness_records(model, tokenizer, requests, name="textdistill_agreement",
                                             batch_size=batch_size, max_length=config.max_length, progress=False)
    t_harness = time.time() - start
    comparison = compare(requests, ours, theirs)
    c = comparison
    print(f"{name}: harness acc={c['harness']['acc']:.3f} acc_norm={c['harness']['acc_norm']:.3f} | ours "
          f"acc={c['ours']['acc']:.3f} acc_norm={c['ours']['acc_norm']:.3f} (old divisor "
          f"{c['ours']['acc_norm_old_divisor_with_leading_space']:.3f}) | max abs loglik diff "
          f"{c['max_abs_loglik_diff']:.3g} | acc diffs {len(c['acc_prediction_diffs'])} acc_norm diffs "
          f"{len(c['acc_norm_prediction_diffs'])} token diffs {len(c['continuation_token_count_diffs'])}", flush=True)
    return {
        "model": name, "bos": tokenizer_adds_bos(tokenizer), "comparison": comparison,
        "harness_results": harness_result, "seconds": {"ours": round(t_ours, 1), "harness": round(t_harness, 1)},
        "items": [{"item_id": req.item_id, "gold": req.gold, "ours_loglik": list(s.loglik),
                   "harness_loglik": r["loglik"], "ours_num_tokens": list(s.num_tokens),
                   "harness_num_tokens": r["num_tokens"], "num_chars": list(s.num_chars),
                   "ours_pred": s.pred, "harness_pred": r["pred"], "ours_pred_norm": s.pred_norm,
                   "harness_pred_norm": r["pred_norm"]}
                  for req, s, r in zip(requests, ours, theirs)],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m", help="comma-separated named models or folders")
    ap.add_argument("--task", default="arc-easy")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--item-set", default=None, help="a stored item set (EvalConfig.item_set)")
    ap.add_argument("--per-subject-limit", type=int, default=None, help="MMLU: the first K items of each subject")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16, help="questions per batch (ours) / requests (harness)")
    ap.add_argument("--out", default="results/lm_eval_agreement.md", help="Markdown report; the JSON goes beside")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from textdistill.config import EvalConfig
    from textdistill.evaluation import build_requests
    from textdistill.harness import require_lm_eval

    require_lm_eval()
    load_start = os.getloadavg()
    config = EvalConfig(task=args.task, split=args.split, limit=args.limit, template="rc", item_set=args.item_set,
                        per_subject_limit=args.per_subject_limit)
    requests = build_requests(config)
    harness_layout = None
    if args.task == "mmlu":   # our cloze contexts against the harness's own mmlu_continuation tasks
        from textdistill.harness import mmlu_continuation_context

        differ = [r.item_id for r in requests if r.context != mmlu_continuation_context(
            r.subject, r.context.split("Question: ", 1)[1].removesuffix("\nAnswer:"))]
        harness_layout = {"items": len(requests), "subjects": len({r.subject for r in requests}),
                          "contexts_differing": differ}
    runs = [run_model(name.strip(), requests, config, args.batch_size)
            for name in args.models.split(",") if name.strip()]
    report = {
        "task": args.task, "split": args.split, "limit": args.limit, "item_set": args.item_set,
        "per_subject_limit": args.per_subject_limit, "items": len(requests), "harness_layout": harness_layout,
        "template": "rc", "num_fewshot": 0,
        "precision": "fp32", "batch_size": args.batch_size, "tolerance": {"rtol": RTOL, "atol": ATOL},
        "machine": {"cpu": _cpu_name(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_1_5_15_min_at_start": " / ".join(f"{x:.2f}" for x in load_start),
                    "load_average_1_5_15_min_at_end": " / ".join(f"{x:.2f}" for x in os.getloadavg())},
        "versions": _versions(),
        "runs": runs,
    }
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = env + "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(report, command))
    out.with_suffix(".json").write_text(json.dumps({**report, "command": command}, indent=1) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    agree = all(r["comparison"]["loglik_within_tolerance"] and not r["comparison"]["acc_prediction_diffs"]
                and not r["comparison"]["acc_norm_prediction_diffs"] for r in runs)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
