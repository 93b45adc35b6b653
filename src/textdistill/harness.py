"""Evaluation with lm-evaluation-harness itself (``textdistill eval --backend lm-eval``; the optional extra
``lm-eval``): a cross-check of :mod:`textdistill.evaluation`'s scorer.

The already loaded model and tokenizer are wrapped in the harness's ``HFLM``; the task's items (the same ones, in
the same order, that ``textdistill eval`` scores) are written to a jsonl file in a temporary folder, next to a task
YAML that reads it with the ``json`` dataset builder, so nothing is fetched from the network::

    task: textdistill_arc_easy
    dataset_path: json
    dataset_kwargs: {data_files: {test: .../items.jsonl}}
    output_type: multiple_choice
    test_split: test
    doc_to_text: "Question: {{question}}\\nAnswer:"     # the rc template (the harness's own ARC prompt)
    doc_to_choice: choices                              # a column: the list as it is
    doc_to_target: gold                                 # a column: the 0-based index
    description: prefix                                 # only when some item has one (MMLU's subject line, shots)
    metric_list: [acc, acc_norm]

``prefix`` holds what ``textdistill eval`` puts before the question: MMLU's "The following are multiple choice
questions ..." line and our few-shot blocks (drawn by our seed, not by the harness's sampler), so that every
context is the same string. The harness's requests are checked against ours (context and continuations, character
for character) before any number is returned; a difference is an error, not a silent disagreement.

The result is the document ``textdistill eval`` writes (``results[task]["acc,none"]`` ...), with acc and acc_norm
the harness's own per-item metrics, and per-item records (log-likelihoods from the harness, token counts from the
harness's own context/continuation split) when asked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .data import TARGET_DELIMITER, with_task_template
from .errors import ConfigError, TextDistillError
from .evaluation import SCORING_BATCH_SIZE, _harness_results, _mean_stderr, _task_requests, aggregate_by_subject

__all__ = ["HARNESS_INSTALL", "HARNESS_PROMPT", "require_lm_eval", "check_harness_config", "write_harness_task",
           "harness_records", "evaluate_with_harness", "mmlu_continuation_context"]

#: How to get the harness.
HARNESS_INSTALL = "pip install 'textdistill[lm-eval]'"

#: ``doc_to_text`` of the generated task: the rc template, as the harness's own ARC task writes it.
HARNESS_PROMPT = "Question: {{question}}\nAnswer:"


def require_lm_eval() -> Any:
    """The ``lm_eval`` module; a one-line :class:`TextDistillError` naming the extra when it is not installed."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (HFLM: fails without its own dependencies)
    except ImportError as exc:
        raise TextDistillError(f"--backend lm-eval needs lm-evaluation-harness, which is not importable ({exc}); "
                               f"install it with {HARNESS_INSTALL}") from None
    return lm_eval


def lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "not installed"


def mmlu_continuation_context(subject: str, question: str) -> str:
    """The context the harness's own ``mmlu_<subject>_continuation`` task gives an MMLU question, 0-shot: its
    subject YAML's ``description`` and its template's ``doc_to_text`` rendered by the harness (from the installed
    lm_eval's task files; nothing of ours), for checking that our cloze form is the harness's string for string."""
    import yaml

    lm_eval = require_lm_eval()
    from lm_eval.utils import apply_template

    folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "continuation"

    def read(path: Path) -> dict[str, Any]:   # the harness's YAML has !function tags elsewhere; none here
        return yaml.safe_load(path.read_text(encoding="utf-8"))

    task = read(folder / f"mmlu_{subject}.yaml")
    template = read(folder / task["include"])
    return task["description"] + apply_template(template["doc_to_text"], {"question": question})


def check_harness_config(config: Any) -> Any:
    """``config`` with its task's template filled in; a one-line ConfigError unless it is ``rc`` (the harness task
    written here is the rc prompt: ``Question: ...\\nAnswer:`` and the choices' texts)."""
    config = with_task_template(config)
    if config.template != "rc":
        raise ConfigError(f"--backend lm-eval evaluates the rc template only (the harness's 'Question: ...\\nAnswer:' "
                          f"prompt with the choices' texts), got --template {config.template}; use --template rc "
                          f"or --backend textdistill")
    return config


def _harness_rows(requests: Sequence[Any]) -> list[dict[str, Any]]:
    """One jsonl row per request: question, choices (without the delimiter), gold, and the prefix that comes before
    the question in our context. A context that is not ``prefix + Question: {question}\\nAnswer:`` is refused."""
    rows = []
    for req in requests:
        if req.delimiter != TARGET_DELIMITER:
            raise ConfigError(f"item {req.item_id!r}: continuations joined by {req.delimiter!r}, the harness task "
                              f"uses target_delimiter {TARGET_DELIMITER!r}")
        # where the question starts does not matter for the prompt (prefix + question is the context either way,
        # and harness_records checks the harness's contexts against ours); the last "Question: " is the query's
        marker = req.context.rfind("Question: ")
        question = req.context[marker + len("Question: "):].removesuffix("\nAnswer:") if marker >= 0 else None
        if question is None or req.context[marker:] != f"Question: {question}\nAnswer:":
            raise ConfigError(f"item {req.item_id!r}: its context does not end in the rc prompt "
                              f"'Question: ...\\nAnswer:'; the lm-eval backend cannot reproduce it")
        rows.append({"doc_id": len(rows), "item_id": req.item_id, "subject": req.subject or "",
                     "prefix": req.context[:marker], "question": question,
                     "choices": [c[len(req.delimiter):] for c in req.continuations], "gold": int(req.gold)})
    return rows


def write_harness_task(folder: str | Path, name: str, requests: Sequence[Any]) -> Path:
    """Write ``requests`` (0-shot or with our few-shot prefix) as ``{name}.jsonl`` and the task YAML ``{name}.yaml``
    in ``folder`` (see the module docstring); returns the YAML's path."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = _harness_rows(requests)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    task: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "hf_datasets_cache")},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": HARNESS_PROMPT,
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": TARGET_DELIMITER,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    if any(r["prefix"] for r in rows):
        task["description"] = "prefix"      # a column: the harness puts doc["prefix"] before the question
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


@contextlib.contextmanager
def _quiet_lm_eval(quiet: bool) -> Iterator[None]:
    """Without progress, lm_eval's errors only (not its warnings that a model object rather than a name was
    passed, nor that the task's num_fewshot was set to 0)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _restore_pad_token(tokenizer: Any) -> Iterator[None]:
    pad_token, padding_side = tokenizer.pad_token, tokenizer.padding_side
    try:
        yield
    finally:
        if tokenizer.pad_token != pad_token:
            tokenizer.pad_token = pad_token
        tokenizer.padding_side = padding_side


def _sample_arguments(sample: dict[str, Any]) -> list[tuple[str, str]]:
    """The (context, continuation) pairs of one logged harness sample, in choice order."""
    args = sample["arguments"]
    if isinstance(args, dict):   # lm_eval >= 0.4.4: {"gen_args_0": {"arg_0": ctx, "arg_1": cont}, ...}
        return [(args[k]["arg_0"], args[k]["arg_1"]) for k in sorted(args, key=lambda k: int(k.rsplit("_", 1)[1]))]
    return [(a[0], a[1]) for a in args]


def harness_records(model: torch.nn.Module, tokenizer: Any, requests: Sequence[Any], *, name: str = "textdistill_task",
                    batch_size: int = SCORING_BATCH_SIZE, precision: str = "fp32", max_length: int | None = None,
                    progress: bool = True, workdir: str | Path | None = None) -> tuple[list[dict[str, Any]],
                                                                                      dict[str, Any]]:
    """Score ``requests`` with lm-evaluation-harness; returns per-item records in
    :func:`textdistill.evaluation.item_records`' format and the harness's own ``results`` entry of the task.

    ``loglik`` and ``is_greedy`` are the harness's, ``num_tokens`` the lengths of the continuations after the
    harness's own context/continuation split, ``acc``/``acc_norm`` the harness's per-item metrics, ``pred`` and
    ``pred_norm`` its argmax of the log-likelihoods (divided by the choice's characters for ``pred_norm``). The task
    files go to a temporary folder unless ``workdir`` names one (kept, for inspection).
    """
    import numpy as np

    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from .models import autocast_context

    if not requests:
        raise ValueError("no requests")
    was_training = model.training
    with contextlib.ExitStack() as stack:
        folder = Path(workdir) if workdir is not None else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="textdistill-lm-eval-")))
        write_harness_task(folder, name, requests)
        stack.enter_context(_quiet_lm_eval(not progress))
        # HFLM gives a tokenizer without one a pad token (its UNK or EOS): put ours back afterwards (a deep copy
        # of a 262k-vocabulary tokenizer takes seconds)
        stack.enter_context(_restore_pad_token(tokenizer))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        try:
            with autocast_context(precision, next(model.parameters()).device):
                # acc's and acc_norm's standard errors are the closed-form ones of a mean (nothing is bootstrapped);
                # the caller's random, numpy and torch generators are left alone (scoring draws nothing)
                out = simple_evaluate(model=lm, tasks=[name], task_manager=manager, num_fewshot=0,
                                      log_samples=True, bootstrap_iters=1000, random_seed=None,
                                      numpy_random_seed=None, torch_random_seed=None)
        finally:
            model.train(was_training)
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        harness_result = dict(out["results"][name])

        if len(samples) != len(requests):
            raise RuntimeError(f"the harness scored {len(samples)} of {len(requests)} items")
        records = []
        for doc_id, (req, sample) in enumerate(zip(requests, samples)):
            pairs = _sample_arguments(sample)
            expected = [(req.context, c) for c in req.continuations]
            if pairs != expected:
                raise RuntimeError(f"item {req.item_id!r}: the harness's requests {pairs!r} differ from ours "
                                   f"{expected!r}; the generated task YAML no longer reproduces the rc template")
            lls = [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in sample["resps"]]
            greedy = [bool(r[0][1]) if isinstance(r[0], (list, tuple)) else bool(r[1]) for r in sample["resps"]]
            choices = [c[len(req.delimiter):] for c in req.continuations]
            lengths = [len(c) for c in choices]
            tokens = [len(lm._encode_pair(ctx, cont)[1]) for ctx, cont in pairs]
            pred = int(np.argmax(lls))
            pred_norm = int(np.argmax(np.array(lls) / np.array(lengths, dtype=float)))
            records.append({
                "doc_id": doc_id, "item_id": req.item_id, "subject": req.subject,
                "prompt": req.context, "continuations": list(req.continuations), "gold": req.gold,
                "pred": pred, "pred_norm": pred_norm,
                "acc": int(sample["acc"]), "acc_norm": int(sample["acc_norm"]),
                "loglik": lls, "is_greedy": greedy, "num_tokens": tokens, "num_chars": lengths,
            })
    return records, harness_result


def evaluate_prepared(model: torch.nn.Module, tokenizer: Any, prepared: Any, progress: bool = True, *,
                      batch_size: int = SCORING_BATCH_SIZE) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``evaluation._evaluate`` with the harness as the scorer (``evaluation.evaluate``'s ``scorer``): a result
    dict (acc, acc_norm, their standard errors, n, ...; ``lm_eval``: the harness's version, task name and own
    results) and the per-item records of ``prepared`` (an ``evaluation._TaskRequests``)."""
    start = time.time()
    config = check_harness_config(prepared.config)
    name = "textdistill_" + "".join(ch if ch.isalnum() else "_" for ch in Path(config.task).stem)
    records, harness_result = harness_records(model, tokenizer, prepared.requests, name=name, batch_size=batch_size,
                                              precision=config.precision, max_length=config.max_length,
                                              progress=progress)
    acc = [float(r["acc"]) for r in records]
    acc_norm = [float(r["acc_norm"]) for r in records]
    result: dict[str, Any] = {"acc": statistics.fmean(acc), "acc_stderr": _mean_stderr(acc),
                              "acc_norm": statistics.fmean(acc_norm), "acc_norm_stderr": _mean_stderr(acc_norm),
                              "n": len(records)}
    if prepared.task.by_subject:
        result.update(aggregate_by_subject(records))
    result.update({"task": config.task, "split": config.split, "template": config.template,
                   "num_fewshot": config.num_fewshot, "limit": config.limit,
                   "per_subject_limit": config.per_subject_limit, "backend": "lm-eval",
                   "lm_eval": {"version": lm_eval_version(), "task": name, "results": harness_result},
                   "seconds": round(prepared.seconds + time.time() - start, 1)})
    return result, records


def evaluate_with_harness(model: torch.nn.Module, tokenizer: Any, config: Any, *, log_samples: bool = False,
                          batch_size: int = SCORING_BATCH_SIZE, progress: bool = True) -> dict[str, Any]:
    """Evaluate an already loaded model and tokenizer with lm-evaluation-harness on ``config``'s task split (an
    :class:`~textdistill.config.EvalConfig` with the rc template): the same items, contexts and continuations as
    ``textdistill eval``. Returns the document ``textdistill eval`` writes (lm-evaluation-harness's structure:
    ``results[task]["acc,none"]`` ...); with ``log_samples`` also ``samples[task]``: one record per item with the
    harness's per-choice log-likelihoods (``loglik``)."""
    start = time.time()
    require_lm_eval()
    prepared = _task_requests(check_harness_config(config))
    result, records = evaluate_prepared(model, tokenizer, prepared, batch_size=batch_size, progress=progress)
    run_config = {"model": getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
                  "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                  "device": str(next(model.parameters()).device), "batch_size": batch_size,
                  "limit": prepared.config.limit, "precision": prepared.config.precision, "backend": "lm-eval",
                  "lm_eval_version": lm_eval_version()}
    doc = _harness_results([(prepared, records)], run_config, seconds=time.time() - start)
    doc["lm_eval"] = {prepared.config.task: result["lm_eval"]}
    if log_samples:
        doc["samples"] = {prepared.config.task: records}
    return doc
