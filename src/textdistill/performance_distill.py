"""Distillation on performance matching: edit a selected subset's prompts token by token, and keep an edit when the
receiver's held-out loss after training on the edited text drops.

Performance matching scores a set by what training on it does (the receiver fine-tuned on it with the comparison's
recipe; the token-mean response loss of held-out rows of the target task; lower is better). It is the only objective
of the validity study whose correlation with accuracy lies above zero on both SmolLM2-135M and Gemma-3-270M
(results/README.md section 13), and no cheap surrogate of it was found valid, so every score here is one training
run and the search is gradient-free:

- each iteration proposes ``candidates`` edited sets; each changes ``swaps`` prompt tokens, in distinct rows, to one of
  the model's own top-``fluent_top_k`` next tokens at that position (given the tokens before it), so the text stays
  words; the template scaffolding ("Question:", "\\nAnswer:") never changes, and an edit whose text does not read
  back as the same tokens is redrawn;
- every candidate is trained with the same training seed as the current set (paired: the same initialisation and the
  same data order, so only the text differs), ``workers`` at a time (one process per core);
- the best candidate replaces the current set if its held-out loss is lower.

``co_receivers`` are other models trained on every set too, each through its own tokenizer on the decoded text (as
a user of another architecture would train on it), with ``recipe`` at its own epoch count
(``co_receiver_epochs``); a set's score is then the sum of every receiver's, so the text is chosen for all of them
at once. With ``score: margin`` that is the validity study's ``pm-margin-sum`` (+0.54 on SmolLM2-135M and +0.59 on
Gemma-3-270M at 1% on ARC-Easy, results/README.md section 18); with the response loss it is ``pm-sum``, which the
study did not find valid on both. The proposals stay ``model``'s. Every stored loss is then the sum; the state, the
summary and the instrument also keep each receiver's part (``*_by_model``, ``by_model``).

``score: margin`` scores a set instead by the held-out rows as multiple-choice questions: the mean margin of the gold
choice's log-likelihood over the best other choice's (results/README.md section 15), each question's margin counted
up to ``margin_cap`` when one is set (so that questions already answered right cannot raise it further). A search on
the response loss found edits that make every answer likelier and the margin smaller (section 14); the margin
cannot be raised that way. Every stored loss (``state.json``, ``metrics.jsonl``, ``summary.json``) is then the
negated margin, so that lower is better throughout.

The held-out instrument, computed at the end on what the search never saw: the start and final sets trained with
other seeds (``instrument_seeds``) and scored on other held-out rows (``instrument_rows_*``).

Under ``torchrun`` / ``accelerate launch`` every process is a worker on its own device (``workers`` stays 1): the
training runs of each batch (candidates x receivers, then the instrument's) are shared out over the ranks
(:func:`distributed.shard_indices`) and every rank gathers every score, so all ranks take the same decisions; rank 0
proposes the edits (and sends them to the others) and writes the run folder. The run is the one-process run: the
same runs with the same seeds, only on several devices at once.

A run folder holds ``state.json`` (the current prompts after every iteration: a rerun continues exactly),
``metrics.jsonl`` (one line per iteration), and at the end ``distilled.jsonl`` (prompt, response: what a user trains
on), ``diagnostics.jsonl`` (per row, the start prompt and the marked changes), ``summary.json`` and ``run.json``.

Entry: :func:`distill_by_performance` (``textdistill distill-pm``).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from . import distributed
from .artifacts import atomic_write_json, read_json, sha256_json, write_jsonl, write_run_info
from .config import TrainConfig, option
from .data import Example
from .errors import ConfigError, DataError
from .performance_selection import check_score, margin_cap_option, score_option

__all__ = ["PerformanceDistillConfig", "apply_edit", "distill_by_performance", "editable_positions", "held_out_score",
           "propose_edit"]


@dataclass(frozen=True)
class PerformanceDistillConfig:
    """Token search on performance matching (every score is one training run of ``model``, and one of each
    co-receiver)."""

    model: str = option("smollm2-135m", "the receiver whose held-out score scores a set (with the co-receivers'); "
                                        "its tokenizer writes the text and its next-token predictions propose the "
                                        "edits")
    iterations: int = option(40, "outer iterations; a rerun with more continues, with fewer (or as many) it only "
                                 "writes the outputs", resume=False)
    candidates: int = option(2, "edited sets scored per iteration (one training run each)")
    swaps: int = option(4, "prompt tokens changed per candidate, each in another row")
    fluent_top_k: int = option(8, "a new token is among the model's own top-k next tokens at its position")
    score: Literal["loss", "margin"] = score_option()
    margin_cap: float | None = margin_cap_option()
    co_receivers: tuple[str, ...] = option((), "other receivers trained on every set (the decoded text, through "
                                               "their own tokenizers); a set scores the sum over model and these "
                                               "(validated with score: margin)", omit_when=())
    co_receiver_epochs: tuple[float, ...] = option((), "each co-receiver's epochs (its recipe is otherwise the "
                                                       "recipe's; the tuned rule's count, e.g. 3 for gemma3-270m); "
                                                       "empty: the recipe's", omit_when=(),
                                                   acts=lambda *configs: bool(configs[-1].co_receivers))
    train_seed: int = option(1, "training seed of every scoring run (the same for every set: paired)")
    rows: str = option("arc-easy:validation", "held-out rows whose response loss scores a set; never the reported "
                                              "questions")
    rows_offset: int = option(285, "first row of `rows` used by the search")
    rows_limit: int | None = option(285, "rows of `rows` used by the search (None: all from rows_offset)")
    instrument_seeds: tuple[int, ...] = option((2, 3), "training seeds of the held-out instrument (start and final "
                                                       "sets); () skips it")
    instrument_rows_offset: int = option(0, "first row of `rows` the instrument scores (keep them apart from the "
                                            "search's)")
    instrument_rows_limit: int | None = option(285, "rows of `rows` the instrument scores")
    seed: int = option(0, "seed of the proposals (iteration i draws from seed and i)")
    workers: int = option(1, "processes training candidates at once (one per core; each sets 1 torch thread when "
                             "above 1); under torchrun every launched process is one worker instead", keyed=False,
                          resume=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "margin_cap", check_score(self.score, self.margin_cap))
        for name in ("co_receivers", "co_receiver_epochs", "instrument_seeds"):   # lists from Python: keys as tuples
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("iterations", "candidates", "swaps", "fluent_top_k", "workers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("rows_offset", "instrument_rows_offset"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rows_limit", "instrument_rows_limit"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive (or null: all rows), got {getattr(self, name)}")
        if any(not m for m in self.co_receivers):
            raise ConfigError("co_receivers holds an empty model name")
        if self.model in self.co_receivers or len(set(self.co_receivers)) < len(self.co_receivers):
            raise ConfigError(f"co_receivers must be distinct models other than model ({self.model}), got "
                              f"{list(self.co_receivers)}")
        if self.co_receiver_epochs and len(self.co_receiver_epochs) != len(self.co_receivers):
            raise ConfigError(f"co_receiver_epochs needs one count per co-receiver ({len(self.co_receivers)}), got "
                              f"{list(self.co_receiver_epochs)}")
        if any(not 0 < e < float("inf") for e in self.co_receiver_epochs):
            raise ConfigError(f"co_receiver_epochs must be positive, got {list(self.co_receiver_epochs)}")

    def receivers(self, recipe: TrainConfig) -> list[tuple[str, TrainConfig]]:
        """Every receiver that scores a set, ``model`` first, with its recipe (a co-receiver's at its own epochs)."""
        if self.co_receiver_epochs and recipe.max_steps is not None:
            raise ConfigError(f"co_receiver_epochs does not act while the recipe sets max_steps "
                              f"({recipe.max_steps}): every receiver would train that many steps; unset one")
        epochs = self.co_receiver_epochs or (recipe.epochs,) * len(self.co_receivers)
        return [(self.model, recipe)] + [(m, dataclasses.replace(recipe, epochs=e))
                                         for m, e in zip(self.co_receivers, epochs)]


# ----------------------------------------------------------------------------------------------------------------
# Proposals (pure: token ids in, token ids out)
# ----------------------------------------------------------------------------------------------------------------

def editable_positions(tokenizer: Any, prompt: str) -> tuple[list[int], list[int]]:
    """The prompt's token ids (no special tokens) and the positions an edit may change: not the template
    scaffolding, not position 0 (no prediction precedes it), not a special token."""
    from .data import scaffold_mask

    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    frozen = scaffold_mask(tokenizer, prompt, ids)
    special = set(getattr(tokenizer, "all_special_ids", []))
    return ids, [p for p in range(1, len(ids)) if not frozen[p] and ids[p] not in special]


def propose_edit(prompts: Sequence[list[int]], editable: Sequence[Sequence[int]],
                 fluent: Callable[[int, int], Sequence[int]], swaps: int, rng: random.Random,
                 reads_back: Callable[[list[int]], bool], tries: int = 20) -> list[tuple[int, int, int]]:
    """One candidate: ``swaps`` single-token changes ``(row, position, new_id)`` in distinct rows, each new id among
    ``fluent(row, position)`` (the model's top-k next tokens there) and unlike the current one, each row's edited
    ids reading back as themselves (``reads_back``). Fewer swaps when the rows run out; rows without an editable
    position are skipped."""
    rows = [r for r in range(len(prompts)) if editable[r]]
    rng.shuffle(rows)
    edit: list[tuple[int, int, int]] = []
    for row in rows:
        if len(edit) == swaps:
            break
        for _ in range(tries):
            position = rng.choice(list(editable[row]))
            options = [t for t in fluent(row, position) if t != prompts[row][position]]
            if not options:
                continue
            token = rng.choice(options)
            changed = list(prompts[row])
            changed[position] = token
            if reads_back(changed):
                edit.append((row, position, token))
                break
    return edit


def apply_edit(prompts: Sequence[list[int]], edit: Sequence[tuple[int, int, int]]) -> list[list[int]]:
    """The prompts with the edit's swaps applied (a new list; the input is unchanged)."""
    out = [list(p) for p in prompts]
    for row, position, token in edit:
        out[row][position] = token
    return out


# ----------------------------------------------------------------------------------------------------------------
# Scoring: one training run per set (in worker processes when workers > 1)
# ----------------------------------------------------------------------------------------------------------------

def _init_worker(threads: int) -> None:
    """A scoring process: ``threads`` torch threads, and an exit as soon as the process that started it is gone (a
    killed search must not leave training runs behind on the cores)."""
    import os
    import threading

    import torch

    torch.set_num_threads(threads)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def held_out_score(model: str, examples: Sequence[Example], recipe: TrainConfig, rows: tuple[str, int, int | None],
                   seed: int, score: str = "loss", margin_cap: float | None = None, device: str = "auto",
                   trust_remote_code: bool = False) -> float:
    """Performance matching's score of ``examples`` (lower = better): ``model`` trained on them with ``recipe`` and
    ``seed``, then scored on the held-out ``rows`` (source, offset, limit) by
    :func:`performance_selection.score_trained`: the token-mean response loss (``score`` "loss", what
    :func:`performance_selection.score_draws` computes for a real subset) or the negated mean margin of the gold
    choice's log-likelihood over the best other choice's, capped at ``margin_cap`` (``score`` "margin")."""
    from .performance_selection import score_trained
    from .training import train_on_examples

    check_score(score, margin_cap)   # before the training run, not after it
    recipe = dataclasses.replace(recipe, seed=seed)
    # this process's own run: under a launcher the other ranks train other sets at the same time
    trained, tokenizer, _ = train_on_examples(model_name=model, examples=list(examples), config=recipe,
                                              device=device, progress=False, trust_remote_code=trust_remote_code,
                                              data_parallel=False)
    return score_trained(trained, tokenizer, model, rows, recipe.data, score, margin_cap)


class _Scorer:
    """Scores example sets on each of ``receivers`` ((model, recipe) pairs; a set's score is the sum of theirs),
    ``workers`` training runs at a time (in-process when 1), or under a launcher each rank its share of the runs."""

    def __init__(self, workers: int, receivers: Sequence[tuple[str, TrainConfig]], **fixed: Any):
        self.receivers = list(receivers)
        self.fixed = fixed
        self.pool = None
        if workers > 1:
            import multiprocessing

            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker, initargs=(1,))

    def by_model(self, jobs: Sequence[tuple[Sequence[Example], tuple, int]]) -> list[dict[str, float]]:
        """Each job's (examples, rows, seed) score per receiver."""
        runs = [dict(model=m, recipe=r, examples=list(e), rows=rows, seed=s, **self.fixed)
                for e, rows, s in jobs for m, r in self.receivers]
        if distributed.world_size() > 1:   # this rank's share of the runs; every rank gets every score
            # dealt out receiver by receiver, so that each rank gets its share of every receiver's (slower) runs
            # rather than, with as many receivers as ranks, one receiver's runs alone
            n = len(self.receivers)
            order = sorted(range(len(runs)), key=lambda k: (k % n, k // n))
            mine = [held_out_score(**runs[order[k]]) for k in distributed.shard_indices(len(runs))]
            dealt = distributed.merge_shards(distributed.all_gather_objects(mine), len(runs))
            scores = [0.0] * len(runs)
            for k, score in zip(order, dealt):
                scores[k] = score
        elif self.pool is None:
            scores = [held_out_score(**run) for run in runs]
        else:
            scores = [f.result() for f in [self.pool.submit(held_out_score, **run) for run in runs]]
        n = len(self.receivers)
        return [{m: scores[k * n + i] for i, (m, _) in enumerate(self.receivers)} for k in range(len(jobs))]


    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


# ----------------------------------------------------------------------------------------------------------------
# Entry
# ----------------------------------------------------------------------------------------------------------------

def _fingerprint(config: PerformanceDistillConfig, recipe: TrainConfig, start: Sequence[Example]) -> str:
    from .keys import keyed, resume_settings

    return sha256_json([resume_settings(config), keyed(recipe), [[e.prompt, e.response] for e in start]])[:16]


def distill_by_performance(*, data: str, selection: str | Path, output: str | Path, config: PerformanceDistillConfig,
                           recipe: TrainConfig, device: str = "auto", progress: bool = True,
                           trust_remote_code: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Entry of ``textdistill distill-pm``: start from the rows of ``selection`` (a selection file of ``data``),
    edit their prompts for ``config.iterations`` iterations, keeping an edit when the held-out loss (negated margin)
    of ``config.model`` after training with ``recipe``, summed with its co-receivers', drops; write the text and the
    held-out instrument to ``output``. A rerun on the same folder continues; a folder of other settings is refused.
    Under a launcher every rank calls it (the module docstring says how they share the work). Returns the summary
    (on every rank)."""
    output = Path(output)
    with distributed.main_process_owns(output / ".lock", f"the distill-pm run {output}", device) as target:
        if distributed.world_size() > 1 and config.workers > 1:
            raise ConfigError(f"workers: under torchrun / accelerate launch every process is one worker (here "
                              f"{distributed.world_size()}); set workers to 1")
        return _search(data=data, selection=selection, output=output, config=config, recipe=recipe,
                       device=str(target), progress=progress, trust_remote_code=trust_remote_code,
                       log=log if distributed.is_main() else (lambda _: None))


def _search(*, data: str, selection: str | Path, output: Path, config: PerformanceDistillConfig, recipe: TrainConfig,
            device: str, progress: bool, trust_remote_code: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """The body of :func:`distill_by_performance`, on this rank's ``device``."""
    from tqdm.auto import tqdm

    from .data import load_examples
    from .models import load_model, load_tokenizer
    from .selection import apply_selection

    main = distributed.is_main()
    receivers = config.receivers(recipe)
    if config.co_receivers:   # a misspelt or inaccessible receiver: a clear error now, not after the first run
        from .models import resolve_model_path

        resolved = [resolve_model_path(m) for m, _ in receivers]
        if len(set(resolved)) < len(resolved):
            raise ConfigError(f"two receivers are the same model: {', '.join(m for m, _ in receivers)} resolve "
                              f"to {', '.join(resolved)}")
        for name, _ in receivers[1:]:
            load_tokenizer(name, trust_remote_code=trust_remote_code)
    pool = load_examples(data, recipe.data)
    start_examples = apply_selection(pool, selection)
    tokenizer = load_tokenizer(config.model, trust_remote_code=trust_remote_code)
    fingerprint = _fingerprint(config, recipe, start_examples)
    state_path = output / "state.json"
    state = read_json(state_path) if state_path.is_file() else None
    if state is not None and state["fingerprint"] != fingerprint:
        raise ConfigError(f"{output} holds a distill-pm run of other settings (fingerprint {state['fingerprint']}, "
                          f"now {fingerprint}); use another --output")
    distributed.barrier()   # every rank has read the folder as it was before rank 0 writes into it
    if main:
        output.mkdir(parents=True, exist_ok=True)
        write_run_info(output, command="distill-pm", config={"distill_pm": config, "recipe": recipe, "data": data,
                                                             "selection": str(selection)},
                       seeds={"proposals": config.seed, "train": config.train_seed},
                       extra={"world_size": distributed.world_size()})

    starts, editable = zip(*(editable_positions(tokenizer, e.prompt) for e in start_examples))
    starts, editable = [list(s) for s in starts], [list(e) for e in editable]
    if not any(editable):
        raise DataError(f"no row of {selection} has an editable prompt token (scaffolding only)")
    search_rows = (config.rows, config.rows_offset, config.rows_limit)

    def examples_of(prompts: Sequence[list[int]]) -> list[Example]:
        return [dataclasses.replace(e, prompt=tokenizer.decode(p)) for e, p in zip(start_examples, prompts)]

    for example, ids in zip(start_examples, starts):   # the text a user loads is what is scored
        if tokenizer.decode(ids) != example.prompt:
            raise DataError(f"row {example.id}: its prompt does not decode back from its tokens; it cannot be edited "
                            f"token by token with {config.model}'s tokenizer")
    workers = min(config.workers, len(receivers) * max(config.candidates, len(config.instrument_seeds) * 2))
    if config.score == "margin":   # a clear error now rather than after the first training run
        from .performance_selection import held_out_questions

        held_out_questions(config.rows, config.rows_offset, config.rows_limit)
    scorer = _Scorer(workers, receivers, score=config.score, margin_cap=config.margin_cap, device=device,
                     trust_remote_code=trust_remote_code)
    search_start = time.time()
    try:
        if state is None:
            (by_model,) = scorer.by_model([(start_examples, search_rows, config.train_seed)])
            loss = sum(by_model.values())
            state = {"fingerprint": fingerprint, "iteration": 0, "prompts": starts, "loss": loss, "start_loss": loss,
                     "accepted": 0, "seconds": 0.0}
            if config.co_receivers:
                state["start_loss_by_model"] = by_model
            if main:
                atomic_write_json(state_path, state)
            label = "loss" if config.score == "loss" else "negated margin" + (
                "" if config.margin_cap is None else f" (capped at {config.margin_cap:g})")
            parts = ", ".join(f"{m} {v:.4f}" for m, v in by_model.items()) if config.co_receivers else ""
            parts = f" ({parts})" if parts else ""
            log(f"start: held-out {label} {loss:.4f}{parts}")
        model = None
        fluent_cache: dict[tuple, list[int]] = {}

        def fluent(row: int, position: int) -> list[int]:
            nonlocal model
            ids = tuple(state["prompts"][row][:position])
            if ids not in fluent_cache:
                import torch

                from .data import uses_bos

                if model is None:
                    model = load_model(config.model, device=device, trust_remote_code=trust_remote_code)
                prefix = [tokenizer.bos_token_id] if uses_bos(tokenizer) else []
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([prefix + list(ids)], device=model.device)).logits[0, -1]
                fluent_cache[ids] = logits.topk(config.fluent_top_k).indices.tolist()
            return fluent_cache[ids]

        def reads_back(ids: list[int]) -> bool:
            return list(tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"]) == ids

        metrics_path = output / "metrics.jsonl"
        bar = tqdm(total=config.iterations, initial=min(state["iteration"], config.iterations), desc="distill-pm",
                   disable=not progress or not main)
        while state["iteration"] < config.iterations:
            iteration, began = state["iteration"], time.time()
            edits = None
            if main:   # rank 0 alone loads the proposing model; the others receive its edits
                rng = random.Random(f"{config.seed}-{iteration}")
                edits = [propose_edit(state["prompts"], editable, fluent, config.swaps, rng, reads_back)
                         for _ in range(config.candidates)]
                edits = [e for e in edits if e]
            edits = distributed.broadcast_object(edits)
            by_model = scorer.by_model([(examples_of(apply_edit(state["prompts"], e)), search_rows,
                                         config.train_seed) for e in edits])
            losses = [sum(scores.values()) for scores in by_model]
            best = min(range(len(edits)), key=lambda k: losses[k]) if edits else None
            accepted = best is not None and losses[best] < state["loss"]
            record = {"iteration": iteration, "current_loss": state["loss"], "candidate_losses": losses,
                      "accepted": accepted, "seconds": round(time.time() - began, 1)}
            if config.co_receivers:
                record["candidate_losses_by_model"] = by_model
            if accepted:
                record["swaps"] = [{"row": r, "position": p, "from": tokenizer.decode([state["prompts"][r][p]]),
                                    "to": tokenizer.decode([t])} for r, p, t in edits[best]]
                state["prompts"] = apply_edit(state["prompts"], edits[best])
                state["loss"] = losses[best]
                state["accepted"] += 1
            state["iteration"] = iteration + 1
            state["seconds"] = round(state["seconds"] + record["seconds"], 1)
            if main:
                with open(metrics_path, "a", encoding="utf-8") as f:   # one line per iteration, then the state
                    f.write(json.dumps(record) + "\n")
                atomic_write_json(state_path, state)
            bar.update(1)
            bar.set_postfix(loss=f"{state['loss']:.4f}", accepted=state["accepted"])
        bar.close()
        summary = _finish(output, state, start_examples, starts, examples_of, scorer, config, tokenizer)
    finally:
        scorer.close()
    summary["wall_seconds_this_call"] = round(time.time() - search_start, 1)
    return summary


def _current_by_model(state: dict[str, Any], metrics_path: Path) -> dict[str, float]:
    """Each receiver's part of the current set's loss: the start's, then that of every accepted candidate (the best
    of its iteration), traced through ``metrics.jsonl`` (its last line per iteration, up to the state's)."""
    records: dict[int, dict[str, Any]] = {}
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                records[record["iteration"]] = record
    current = dict(state["start_loss_by_model"])
    for iteration in range(state["iteration"]):
        record = records[iteration]
        if record["accepted"]:
            losses = record["candidate_losses"]
            current = record["candidate_losses_by_model"][min(range(len(losses)), key=lambda k: losses[k])]
    if abs(sum(current.values()) - state["loss"]) > 1e-9 * max(1.0, abs(state["loss"])):
        raise DataError(f"{metrics_path} does not trace to the state's loss {state['loss']} (by model: {current})")
    return current


def _instrument_figures(losses: Sequence[float]) -> dict[str, Any]:
    """The instrument's figures from its scores ordered (start, final) per seed."""
    start_losses, final_losses = list(losses[0::2]), list(losses[1::2])
    differences = [f - s for s, f in zip(start_losses, final_losses)]
    return {"start": start_losses, "final": final_losses, "final_minus_start": differences,
            "mean_final_minus_start": sum(differences) / len(differences)}


def _finish(output: Path, state: dict[str, Any], start_examples: Sequence[Example], starts: Sequence[list[int]],
            examples_of: Callable, scorer: _Scorer, config: PerformanceDistillConfig, tokenizer: Any) -> dict[str, Any]:
    """Write the dataset, its diagnostics and the summary (with the held-out instrument, computed once; every rank
    trains its share of it, rank 0 writes); returns the summary on every rank."""
    final = examples_of(state["prompts"])
    main = distributed.is_main()
    rows = []
    for example, start_ids, ids, out in zip(start_examples, starts, state["prompts"], final):
        changed = [k for k, (a, b) in enumerate(zip(start_ids, ids)) if a != b]
        marked = "".join(f"[{tokenizer.decode([start_ids[k]])}->{tokenizer.decode([ids[k]])}]" if k in changed
                         else tokenizer.decode([ids[k]]) for k in range(len(ids)))
        rows.append({"prompt": out.prompt, "response": out.response, "init_id": example.id,
                     "init_prompt": example.prompt, "changed_positions": changed, "marked_prompt": marked})
    summary_path = output / "summary.json"
    previous = {}
    if main:   # the text first: the instrument below takes several training runs
        write_jsonl(output / "distilled.jsonl", [{"prompt": r["prompt"], "response": r["response"]} for r in rows])
        write_jsonl(output / "diagnostics.jsonl", [{"index": i, **r} for i, r in enumerate(rows)])
        previous = read_json(summary_path) if summary_path.is_file() else {}
    instrument = previous.get("instrument") if previous.get("iteration") == state["iteration"] else None
    instrument = distributed.broadcast_object(instrument)   # every rank takes part in computing it, or none
    if instrument is None and config.instrument_seeds:
        rows_spec = (config.rows, config.instrument_rows_offset, config.instrument_rows_limit)
        jobs = [(examples, rows_spec, seed) for seed in config.instrument_seeds for examples in (start_examples, final)]
        by_model = scorer.by_model(jobs)
        instrument = {"rows": list(rows_spec), "seeds": list(config.instrument_seeds),
                      **_instrument_figures([sum(s.values()) for s in by_model])}
        if config.co_receivers:   # the sum above, and each receiver's own figures
            instrument["sum_over"] = list(by_model[0])
            instrument["by_model"] = {m: _instrument_figures([s[m] for s in by_model]) for m in by_model[0]}
    if not main:
        return distributed.broadcast_object(None)
    by_model = _current_by_model(state, output / "metrics.jsonl") if config.co_receivers else None
    score = {"loss": "loss", "margin": "margin (every loss below is the negated margin)"}[config.score]
    if config.margin_cap is not None:
        score = f"margin capped at {config.margin_cap:g} per question (every loss below is the negated capped margin)"
    if config.co_receivers:
        score = f"the sum over {', '.join(m for m, _ in scorer.receivers)} of each one's {score}"
    summary = {"score": score,
               "iteration": state["iteration"], "accepted": state["accepted"], "start_loss": state["start_loss"],
               "final_loss": state["loss"], "search_seconds": state["seconds"],
               "iterations_per_hour": round(3600 * state["iteration"] / state["seconds"], 2) if state["seconds"] else None,
               "changed_tokens": sum(len(r["changed_positions"]) for r in rows),
               "changed_rows": sum(bool(r["changed_positions"]) for r in rows), "rows": len(rows),
               "instrument": instrument}
    if by_model is not None:
        summary.update({"receivers": [m for m, _ in scorer.receivers],
                        "start_loss_by_model": state["start_loss_by_model"], "final_loss_by_model": by_model})
    atomic_write_json(summary_path, summary)
    return distributed.broadcast_object(summary)
