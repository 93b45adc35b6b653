"""Results of an experiment: CSV/JSON, a markdown report with mean ± std per cell, and PNG plots."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .artifacts import atomic_write_bytes, atomic_write_json, atomic_write_text
from .errors import DataError


def _column(*, run: bool = False, csv: bool = True, default: Any = None) -> Any:
    """A field of a result row: ``run`` = it describes the cell's training run and scores (copied to a cell that
    trains on the same data), ``csv`` = a column of results.csv."""
    return field(default=default, metadata={"run": run, "csv": csv})


@dataclass(frozen=True)
class CellResult:
    """One finished experiment cell, as ``cells/.../result.json`` and a row of ``results.csv`` hold it.

    Rows are plain JSON mappings on disk; this class says which keys a row may have, what each means, which are
    the training run's (copied when two cells train on the same data) and which are CSV columns. ``ROW_SCHEMA``
    versions it: rows written before a change of meaning carry an older number."""

    ROW_SCHEMA = 1

    model: str = _column()
    method: str = _column()
    budget: str = _column()                      # "" for base
    seed: int | str = _column()                  # "" for base
    task: str = _column()                        # "task:split" the cell is scored on
    acc: float = _column(run=True)
    acc_norm: float = _column(run=True)
    n: int = _column(run=True)                   # questions scored
    train_examples: int = _column()
    train_steps: int | None = _column(run=True)
    train_seconds: float | None = _column(run=True)
    train_last_loss: float | None = _column(run=True, csv=False)
    eval_seconds: float | None = _column(run=True)
    data_seconds: float | None = _column()       # making or reading the cell's training data
    cell_seconds: float | None = _column()
    prompt_tokens_mean: float | None = _column()  # distilled text: mean prompt tokens under the cell's tokenizer
    same_data_as: str | None = _column()         # the cell whose run was reused (same training data)
    data_key: str | None = _column()             # hash of the training data
    adapter: str | None = _column(run=True, csv=False)   # the trained LoRA adapter, relative to the run folder
    distill_run: str | None = _column(csv=False)  # the distillation the cell's data came from
    selection: str | None = _column(csv=False)   # performance: the selection file (selections/) it trained on
    reused_from: str | None = _column(csv=False)  # an earlier run folder the cell was copied from
    config_key: str | None = _column(csv=False)  # the cell key it was made under (experiment.cell_key)
    # per target question, in the target's order: "1" where the argmax choice is gold (acc), "0" otherwise; what the
    # report's paired differences are computed from (cells made before it existed have none)
    correct: str | None = _column(run=True, csv=False)
    correct_norm: str | None = _column(run=True, csv=False)   # the same for acc_norm
    row_schema: int = _column(csv=False, default=ROW_SCHEMA)

    @classmethod
    def check(cls, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` as it is, after checking that every key is a field (a typo'd key fails here, not in a report)."""
        unknown = sorted(set(row) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise DataError(f"a result row has unknown field(s) {', '.join(unknown)}")
        return row

    @classmethod
    def run_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["run"])

    @classmethod
    def csv_columns(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["csv"])


def summarize(rows: Sequence[dict[str, Any]], metric: str = "acc") -> list[dict[str, Any]]:
    """Mean and sample std of ``metric`` over seeds for each (model, method, budget), in first-seen order, with the
    mean training and evaluation seconds of a cell (cells that reused another cell's run are left out of those)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["method"], str(row["budget"])), []).append(row)
    out = []
    for (model, method, budget), members in groups.items():
        values = [float(r[metric]) for r in members]
        own = [r for r in members if "same_data_as" not in r]
        out.append({"model": model, "method": method, "budget": budget, "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0, "seeds": len(values),
                    "train_seconds": statistics.fmean(float(r.get("train_seconds") or 0) for r in own) if own else None,
                    "eval_seconds": statistics.fmean(float(r.get("eval_seconds") or 0) for r in own) if own else None,
                    "same_data_as": sorted({r["same_data_as"].split(" seed")[0] for r in members
                                            if "same_data_as" in r})})
    return out


def comparison_table(rows: Sequence[dict[str, Any]], metrics: Sequence[str] = ("acc", "acc_norm")) -> str:
    """Markdown table: one line per (model, method, budget) with mean ± std over seeds of each metric, and the mean
    seconds a cell spent training and evaluating (``same as X``: the training data equalled X's, its run reused)."""
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    metrics = [m for m in metrics if all(m in r for r in rows)] or metrics[:1]
    stats = [summarize(rows, m) for m in metrics]
    head = " | ".join(f"{m} (mean ± std)" for m in metrics)
    lines = [f"| model | method | budget | {head} | seeds | train s | eval s |",
             "|---|---|---|" + "---|" * len(metrics) + "---|---|---|"]
    for group in zip(*stats):
        first = group[0]
        values = " | ".join(f"{g['mean']:.4f} ± {g['std']:.4f}" if g["seeds"] > 1 else f"{g['mean']:.4f}"
                            for g in group)
        timing = " | ".join("-" if first[k] is None else f"{first[k]:.0f}" for k in ("train_seconds", "eval_seconds"))
        note = f" (same as {', '.join(first['same_data_as'])})" if first["same_data_as"] else ""
        lines.append(f"| {first['model']} | {first['method']}{note} | {first['budget'] or '-'} | {values} | "
                     f"{first['seeds']} | {timing} |")
    return "\n".join(lines)


def paired_accuracy_difference(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]], *, resamples: int = 10000,
                      seed: int = 0) -> dict[str, Any]:
    """Is arm B more accurate than arm A on the same questions (the difference is **B - A**)? ``a[k][i]``, ``b[k][i]``: 0/1 correctness of question
    ``i`` under training seed ``k`` (the k-th run of A pairs with the k-th of B). Returns each run's accuracy, per seed
    the questions only B / only A gets right, the mean over seeds of B - A and its percentile bootstrap 95% interval
    over questions (every seed's answers to a question are resampled together, so the interval covers the sampling
    of questions as well as the seeds given; the seeds' std alone covers training noise only)."""
    import numpy as np

    if not a or len(a) != len(b):
        raise ValueError(f"A and B need the same number of runs (seeds), and at least one: {len(a)} and {len(b)}")
    n = len(a[0])
    if n == 0 or any(len(x) != n for x in [*a, *b]):
        raise ValueError("every run needs the same questions (the same, non-zero count)")
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)   # (seeds, questions)
    per_question = (b_arr - a_arr).mean(axis=0)                                       # (questions,)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // n)   # resampled index blocks of (chunk, n): bounded memory
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        means[start:stop] = per_question[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return {"n": n, "seeds": len(a), "acc_a": [float(x) for x in a_arr.mean(axis=1)],
            "acc_b": [float(x) for x in b_arr.mean(axis=1)],
            "b_only_right": [int(x) for x in ((b_arr > a_arr).sum(axis=1))],
            "a_only_right": [int(x) for x in ((a_arr > b_arr).sum(axis=1))],
            "mean_difference": float(per_question.mean()), "ci95": [float(low), float(high)]}


def paired_comparisons(rows: Sequence[dict[str, Any]], reference: str, metric: str = "acc",
                       resamples: int = 10000) -> list[dict[str, Any]]:
    """``reference`` minus every other arm, question by question, per model and budget (``base`` and ``full`` beside
    every budget): :func:`paired_accuracy_difference` over the training seeds both arms have (``base``'s single run
    pairs with every seed). ``reference`` is an arm trained at a budget (not ``base`` or ``full``). Only cells with
    per-question records (``correct``; ``correct_norm`` for ``acc_norm``) count; a pair that cannot be compared is
    listed with ``n`` 0 and the reason."""
    field_name = {"acc": "correct", "acc_norm": "correct_norm"}[metric]
    by_arm: dict[tuple[str, str, str], dict[Any, str]] = {}
    for row in rows:
        if row.get(field_name):
            by_arm.setdefault((row["model"], row["method"], str(row["budget"])), {})[row["seed"]] = row[field_name]
    groups = sorted({(r["model"], str(r["budget"])) for r in rows
                     if r["method"] == reference}, key=lambda k: (k[0], _budget_value(k[1])))
    out = []
    for model, budget in groups:
        mine = by_arm.get((model, reference, budget), {})
        arms = sorted({(r["method"], str(r["budget"])) for r in rows if r["model"] == model and r["method"] != reference
                       and (str(r["budget"]) == budget or r["method"] in ("base", "full"))},
                      key=lambda k: _method_order(k[0]))
        for method, arm_budget in arms:
            theirs = by_arm.get((model, method, arm_budget), {})
            if len(theirs) == 1 and "" in theirs:      # base: one run, the same for every seed
                seeds = sorted(mine, key=_seed_order)
                pairs = [(mine[s], theirs[""]) for s in seeds]
            else:
                seeds = sorted(set(mine) & set(theirs), key=_seed_order)
                pairs = [(mine[s], theirs[s]) for s in seeds]
            entry: dict[str, Any] = {"model": model, "budget": budget, "reference": reference, "arm": method,
                                     "arm_budget": arm_budget, "metric": metric, "pair_seeds": seeds}
            lengths = {len(x) for pair in pairs for x in pair}
            if not pairs or len(lengths) != 1:
                reason = ("the arm has no per-question records" if not theirs else
                          "the reference has no per-question records" if not mine else
                          "no training seed with per-question records in both" if not pairs else
                          "the runs scored different numbers of questions")
                entry.update({"n": 0, "reason": reason})
            else:
                result = paired_accuracy_difference([[int(c) for c in arm] for _, arm in pairs],
                                           [[int(c) for c in ref] for ref, _ in pairs], resamples=resamples)
                entry.update({"n": result["n"], "mean_difference": result["mean_difference"], "ci95": result["ci95"],
                              "reference_only_right": result["b_only_right"],
                              "arm_only_right": result["a_only_right"]})
            out.append(entry)
    return out


def _seed_order(seed: Any) -> tuple[bool, Any]:
    return (isinstance(seed, str), seed)   # integers in numeric order; base's "" last


def paired_table(comparisons: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the compared pairs of :func:`paired_comparisons` (``n`` > 0): the difference, its 95%
    interval over questions, and per seed the questions only the reference / only the arm answers right; a last
    line names the pairs that could not be compared, and why. Empty when no pair was compared."""
    compared = [c for c in comparisons if c["n"]]
    if not compared:
        return ""
    lines = ["| model | budget | reference - arm | difference | 95% interval over questions | seeds | questions "
             "only the reference / only the arm gets right, per seed |", "|---|---|---|---|---|---|---|"]
    for c in compared:
        arm = c["arm"] + (f" {c['arm_budget']}" if c["arm_budget"] and c["arm_budget"] != c["budget"] else "")
        head = f"| {c['model']} | {c['budget']} | {c['reference']} - {arm} |"
        low, high = c["ci95"]
        resolved = "**" if low > 0 or high < 0 else ""
        counts = ", ".join(f"{x}/{y}" for x, y in zip(c["reference_only_right"], c["arm_only_right"]))
        lines.append(f"{head} {resolved}{c['mean_difference']:+.4f}{resolved} | [{low:+.4f}, {high:+.4f}] | "
                     f"{len(c['pair_seeds'])} | {counts} |")
    skipped = [c for c in comparisons if not c["n"]]
    if skipped:
        lines += ["", "Not compared: " + "; ".join(f"{c['model']} {c['budget']} {c['reference']} - {c['arm']} "
                                                   f"({c['reason']})" for c in skipped) + "."]
    return "\n".join(lines)


def _budget_value(budget: str) -> float:
    try:
        return float(str(budget).rstrip("%"))
    except ValueError:
        return -1.0


def budget_table(rows: Sequence[dict[str, Any]], metric: str = "acc") -> str:
    """Markdown table with one line per (model, method) and one column per budget: ``mean ± std (seeds)`` of
    ``metric``; ``base`` fills the no-training column and ``full`` the 100% one."""
    stats = summarize(rows, metric)
    budgets = sorted({s["budget"] for s in stats}, key=_budget_value)
    header = ["no training" if not b else b for b in budgets]
    lines = ["| model | method | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(budgets)]
    keys = sorted({(s["model"], s["method"]) for s in stats}, key=lambda k: (k[0], _method_order(k[1])))
    for model, method in keys:
        cells = []
        for budget in budgets:
            match = [s for s in stats if (s["model"], s["method"], s["budget"]) == (model, method, budget)]
            if not match:
                cells.append("")
                continue
            s = match[0]
            cells.append(f"{s['mean']:.3f}" if s["seeds"] == 1 else f"{s['mean']:.3f} ± {s['std']:.3f}")
            cells[-1] += f" ({s['seeds']})" if s["seeds"] != 3 and method != "base" else ""
        lines.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _method_order(method: str) -> int:
    order = ["base", "full", "random", "less", "match", "performance", "distill-init", "distilled", "continuous"]
    return order.index(method) if method in order else len(order)


def _sorted_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r["model"], _method_order(r["method"]), str(r["budget"]), str(r["seed"])))


def _loss(value: Any) -> str:
    return "-" if not value else f"{value['loss']:.4f}"


def distillation_folders(root: Path) -> list[Path]:
    """The distillation run folders of an experiment's run folder ``root`` (the lock files beside them left out)."""
    folder = root / "distill"
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def distillation_summary(folder: Path, samples: int = 3) -> list[str]:
    """Markdown lines describing one distillation run: what changed, the held-out instrument's paired numbers,
    and a few prompts before and after (changed tokens shown as ``[old->new]``)."""
    summary_file = folder / "summary.json"
    if not summary_file.is_file():
        return []
    summary = json.loads(summary_file.read_text())
    heldout = summary.get("heldout") or {}
    lines = [f"### `{folder.name}`: {summary.get('mode', 'continuous')}, {summary['iterations']} iterations, "
             f"{summary['samples']} samples", "",
             f"Learnable prompt tokens changed: {summary.get('tokens_changed_fraction', 0.0):.3f} "
             f"({summary.get('prompts_changed', 0)} of {summary['samples']} prompts); learned student lr "
             f"{summary.get('learned_lr', float('nan')):.4g}.", ""]
    if heldout.get("init"):
        randoms = [r["loss"] for r in heldout.get("random", [])]
        lines += [f"Held-out matching loss (mean of {len(heldout['init']['draws'])} paired draws of held-out expert "
                  "segments; lower is closer to the expert, 1 = no closer than the start):", "",
                  "| set | loss |", "|---|---|",
                  f"| starting samples | {_loss(heldout.get('init'))} |",
                  f"| learned vectors (before projection) | {_loss(heldout.get('continuous'))} |",
                  f"| distilled text (decoded, re-tokenized) | {_loss(heldout.get('projected'))} |"]
        for name, value in (heldout.get("compare") or {}).items():
            lines.append(f"| {name} selection | {_loss(value)} |")
        if randoms:
            lines.append(f"| {len(randoms)} random subsets | {min(randoms):.4f} - {max(randoms):.4f} "
                         f"(mean {statistics.fmean(randoms):.4f}) |")
        lines.append(f"| floor (the rows the expert trained on) | {_loss(heldout.get('floor'))} |")
        diff = heldout.get("projected_minus_init")
        if diff:
            lines += ["", f"Distilled text minus starting samples: {diff['mean']:+.4f} (95% interval "
                          f"{diff['ci95'][0]:+.4f} to {diff['ci95'][1]:+.4f}); rank among the random subsets: "
                          f"{heldout.get('projected_rank_among_random')} of {len(randoms) + 1}."]
        lines.append("")
    data_file = folder / "distilled.jsonl"
    if data_file.is_file() and samples:
        from .distill import read_distilled_rows

        rows = read_distilled_rows(folder)
        rows = sorted(rows, key=lambda r: -len(r.get("changed_positions", [])))[:samples]
        lines += ["Prompts after distillation (`[old->new]` marks a changed token):", ""]
        for row in rows:
            lines.append(f"- `{row.get('marked_prompt', row['prompt'])[:300]!r}` -> `{row['response'][:80]!r}`")
        lines.append("")
    return lines


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def plot_accuracy_vs_budget(rows: Sequence[dict[str, Any]]) -> bytes:
    """Accuracy against budget, one panel per model, one line per method (error bars: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarize(rows)
    models = sorted({s["model"] for s in stats})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [s for s in stats if s["model"] == model]
        budgets = sorted({s["budget"] for s in mine if s["method"] not in ("base", "full")},
                         key=lambda b: float(b.rstrip("%")) if b.rstrip("%").replace(".", "").isdigit() else 0)
        methods = [m for m in sorted({s["method"] for s in mine}, key=_method_order) if m not in ("base", "full")]
        for method in sorted({s["method"] for s in mine}, key=_method_order):
            points = [s for s in mine if s["method"] == method]
            if method in ("base", "full"):
                ax.axhline(points[0]["mean"], linestyle="--" if method == "base" else ":", color="grey" if
                           method == "base" else "black", label=f"{method} ({points[0]['mean']:.3f})")
                continue
            points.sort(key=lambda s: budgets.index(s["budget"]))
            # methods side by side around each budget so that equal values stay visible
            offset = (methods.index(method) - (len(methods) - 1) / 2) * 0.08
            xs = [budgets.index(s["budget"]) + offset for s in points]
            ax.errorbar(xs, [s["mean"] for s in points], yerr=[s["std"] for s in points], marker="o", capsize=3,
                        label=method)
        ax.set_xticks(range(len(budgets)), budgets)
        ax.set_xlim(-0.5, max(len(budgets), 1) - 0.5)
        ax.set_title(model)
        ax.set_xlabel("budget")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7)
    return _png(fig)


def plot_matching_loss(runs: dict[str, list[dict[str, Any]]]) -> bytes:
    """Matching loss per iteration for each distillation run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, metrics in runs.items():
        metrics = [m for m in metrics if m["matching_loss"] is not None]   # iterations skipped for a fault
        xs, ys = [m["iteration"] for m in metrics], [m["matching_loss"] for m in metrics]
        line, = ax.plot(xs, ys, linewidth=0.8, alpha=0.45)
        # the per-iteration loss swings with the sampled expert segment: a trailing mean shows the trend
        window = max(1, min(10, len(ys) // 4))
        smooth = [sum(ys[max(0, i - window + 1): i + 1]) / len(ys[max(0, i - window + 1): i + 1]) for i in range(len(ys))]
        ax.plot(xs, smooth, color=line.get_color(), linewidth=2, label=f"{name} (mean of last {window})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("matching loss")
    ax.legend(fontsize=7)
    return _png(fig)


def plot_distance_histogram(distances: list[float]) -> bytes:
    """Histogram of the distance of each learned prompt vector to its nearest token embedding."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.hist(distances, bins=40)
    ax.set_xlabel("distance to nearest token")
    ax.set_ylabel("prompt vectors")
    return _png(fig)


def write_report(root: Path, rows: Sequence[dict[str, Any]], *, config: Any, stage_seconds: dict[str, float],
                 paired_reference: str | None = None) -> Path:
    """Write ``results.csv``, ``results.json``, ``report.md`` and the PNG plots into ``root``; with
    ``paired_reference``, also that arm's paired differences against every other arm (:func:`paired_comparisons`)."""
    rows = _sorted_rows(rows)
    buffer = io.StringIO()
    columns = CellResult.csv_columns()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    atomic_write_text(root / "results.csv", buffer.getvalue())
    paired = paired_comparisons(rows, paired_reference) if paired_reference else []
    atomic_write_json(root / "results.json", {"rows": rows, "summary": summarize(rows),
                                              "paired": paired, "stage_seconds": stage_seconds})
    lines = [f"# Experiment `{getattr(config, 'name', 'experiment')}`", "",
             f"Pool `{config.pool}`" + (f" (first {config.pool_limit} rows)" if config.pool_limit else "") +
             f"; target `{config.target.task}:{config.target.split}`" +
             (f" (first {config.target.limit} items)" if config.target.limit else "") +
             f", {config.target.template} template, {config.target.num_fewshot}-shot; distilling model "
             f"`{config.distill_model}`; seeds {list(config.seeds)}.", "",
             "## Accuracy by budget", "", "acc, mean ± std over seeds (the number of seeds in brackets when not 3):",
             "", budget_table(rows), "", "acc_norm:", "", budget_table(rows, "acc_norm"), "",
             "## Every arm", "", comparison_table(rows), "", "![accuracy vs budget](accuracy_vs_budget.png)", ""]
    table = paired_table(paired)
    if table:
        lines += [f"## Paired differences: `{paired_reference}` against every other arm, question by question", "",
                  "acc of the reference minus acc of the arm on the same questions, mean over the training seeds both "
                  "have (base: its one run); the interval resamples questions (bootstrap) for these seeds, so it covers "
                  "the sampling of questions, which the std over seeds does not (and not the choice of seeds). "
                  "**Bold**: the interval excludes zero.", "", table, ""]
    if rows:
        atomic_write_bytes(root / "accuracy_vs_budget.png", plot_accuracy_vs_budget(rows))
    runs = {}
    distances: list[float] = []
    for folder in distillation_folders(root):
        metrics_file = folder / "metrics.jsonl"
        if metrics_file.is_file():
            runs[folder.name] = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
        if (folder / "distilled.jsonl").is_file():
            from .distill import read_distilled_rows

            for row in read_distilled_rows(folder):
                distances.extend(row.get("token_distance", []))
    if runs:
        atomic_write_bytes(root / "matching_loss.png", plot_matching_loss(runs))
        lines += ["## Distillation", ""]
        for folder in distillation_folders(root):
            lines += distillation_summary(folder)
        lines += ["![matching loss](matching_loss.png)", ""]
    if distances:
        atomic_write_bytes(root / "token_distance.png", plot_distance_histogram(distances))
        lines += ["![nearest-token distance](token_distance.png)", ""]
    lines += ["## Wall time per stage (seconds, this machine)", "", "| stage | seconds |", "|---|---|"]
    for key, value in sorted(stage_seconds.items()):
        lines.append(f"| {key} | {value:.0f} |")
    own = [r for r in rows if "same_data_as" not in r]   # a reused run was paid for once
    train_s = sum(float(r.get("train_seconds") or 0) for r in own)
    eval_s = sum(float(r.get("eval_seconds") or 0) for r in own)
    lines += [f"| training (all cells) | {train_s:.0f} |", f"| evaluation (all cells) | {eval_s:.0f} |", ""]
    atomic_write_text(root / "report.md", "\n".join(lines) + "\n")
    return root / "report.md"
