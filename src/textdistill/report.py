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


def write_report(root: Path, rows: Sequence[dict[str, Any]], *, config: Any, stage_seconds: dict[str, float]) -> Path:
    """Write ``results.csv``, ``results.json``, ``report.md`` and the PNG plots into ``root``."""
    rows = _sorted_rows(rows)
    buffer = io.StringIO()
    columns = CellResult.csv_columns()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    atomic_write_text(root / "results.csv", buffer.getvalue())
    atomic_write_json(root / "results.json", {"rows": rows, "summary": summarize(rows),
                                              "stage_seconds": stage_seconds})
    lines = [f"# Experiment `{getattr(config, 'name', 'experiment')}`", "",
             f"Pool `{config.pool}`" + (f" (first {config.pool_limit} rows)" if config.pool_limit else "") +
             f"; target `{config.target.task}:{config.target.split}`" +
             (f" (first {config.target.limit} items)" if config.target.limit else "") +
             f", {config.target.template} template, {config.target.num_fewshot}-shot; distilling model "
             f"`{config.distill_model}`; seeds {list(config.seeds)}.", "",
             "## Accuracy by budget", "", "acc, mean ± std over seeds (the number of seeds in brackets when not 3):",
             "", budget_table(rows), "", "acc_norm:", "", budget_table(rows, "acc_norm"), "",
             "## Every arm", "", comparison_table(rows), "", "![accuracy vs budget](accuracy_vs_budget.png)", ""]
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
