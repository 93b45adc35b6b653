"""Log-likelihood multiple-choice evaluation (the definitions of lm-evaluation-harness).

The first part of this module is pure: it turns ``ChoiceRequest`` objects into per-choice log-likelihoods with a
causal LM and turns those into accuracy metrics. It does no file I/O; entry points that load datasets and write
results build on it further down.

Definitions, as in lm-evaluation-harness:

* A request is a context and a few candidate continuations (usually starting with a space, e.g. ``" food"``).
* Tokenization: trailing whitespace of the context is moved to the start of each continuation; the whole string
  ``context + continuation`` is tokenized, and the continuation tokens are those after the tokens of the context.
  A BOS token is prepended when the tokenizer is configured to add one; an empty context becomes ``[BOS]`` (or
  ``[EOS]`` when there is no BOS).
* The log-likelihood of a continuation is the sum of the log-probabilities of its tokens given everything before;
  ``is_greedy`` says whether every continuation token is the argmax of the model's prediction.
* ``acc`` takes the choice with the highest log-likelihood; ``acc_norm`` the highest log-likelihood divided by the
  number of characters of the choice's text: the continuation without the delimiter (``" "``) that joins it to the
  context, as the harness's ``process_results`` divides by ``len(choice)``, not by ``len(" " + choice)``. Ties go to
  the first choice (like ``numpy.argmax``).

These definitions are checked against lm-evaluation-harness itself: ``textdistill eval --backend lm-eval``
(:mod:`textdistill.harness`) scores the same items with the harness, and ``bench/lm_eval_agreement.py`` compares the
two item by item (``results/lm_eval_agreement.md``).

Scoring runs the context through the model once per question: the KV cache of the context is repeated across the
choices and the right-padded continuations are run as one batch on top of it (``score_encoded``). Several questions
share each forward (``score_requests``): their right-padded contexts go through together, then their multi-token
continuations, each on a copy of its question's cache row, with positions counted from that question's real context
length.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .artifacts import (atomic_write_json, environment_versions, machine_description, sha256_file, to_jsonable,
                        write_jsonl)
from .config import TaskFields
from .data import (TARGET_DELIMITER, TASKS, Task, build_context, fewshot_examples, get_task, item_continuations,
                   load_task, normalize_split, read_item_set, uses_bos, with_task_template)
from .errors import ConfigError, DataError
from .models import autocast_context, load_model, load_tokenizer, output_head_only_at, resolve_device

__all__ = [
    "ChoiceRequest",
    "EncodedRequest",
    "ChoiceScores",
    "move_trailing_whitespace",
    "tokenizer_adds_bos",
    "encode_request",
    "score_encoded",
    "score_requests",
    "argmax_first",
    "multiple_choice_metrics",
    "question_margins",
    "mean_margin",
    "item_records",
    "aggregate_by_subject",
    "choice_figures",
    "evaluate_with_records",
]


# --------------------------------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChoiceRequest:
    """One multiple-choice question: a context, its candidate continuations and the index of the right one.

    ``delimiter`` is the harness's ``target_delimiter``: every continuation starts with it, and ``acc_norm`` divides
    by the length of the rest (the choice's text).
    """

    context: str
    continuations: tuple[str, ...]
    gold: int
    item_id: str = ""
    subject: str | None = None
    delimiter: str = ""

    def __post_init__(self) -> None:
        conts = tuple(self.continuations)
        object.__setattr__(self, "continuations", conts)
        if not conts:
            raise ValueError(f"request {self.item_id!r} has no continuations")
        if any(not isinstance(c, str) or c == "" for c in conts):
            raise ValueError(f"request {self.item_id!r} has an empty or non-string continuation: {conts!r}")
        if not all(c.startswith(self.delimiter) for c in conts):
            raise ValueError(f"request {self.item_id!r}: every continuation must start with {self.delimiter!r}")
        if not 0 <= int(self.gold) < len(conts):
            raise ValueError(f"request {self.item_id!r}: gold {self.gold} out of range for {len(conts)} choices")

    @property
    def choice_lengths(self) -> tuple[int, ...]:
        """Characters of each choice's text (the continuation without the delimiter): acc_norm's divisors."""
        return tuple(len(c) - len(self.delimiter) for c in self.continuations)


@dataclass(frozen=True)
class EncodedRequest:
    """Token ids of a request: one shared context and one non-empty id tuple per continuation."""

    context_ids: tuple[int, ...]
    continuation_ids: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class ChoiceScores:
    """Per-choice results of one request."""

    loglik: tuple[float, ...]      # sum of log-probabilities of the continuation tokens
    is_greedy: tuple[bool, ...]    # every continuation token is the argmax prediction
    num_tokens: tuple[int, ...]    # continuation length in tokens
    num_chars: tuple[int, ...]     # characters of the choice's text (``ChoiceRequest.choice_lengths``)

    @property
    def pred(self) -> int:
        """Index of the choice with the highest log-likelihood (first one on ties)."""
        return argmax_first(self.loglik)

    @property
    def pred_norm(self) -> int:
        """Index of the choice with the highest log-likelihood per character of its text (first one on ties)."""
        return argmax_first([ll / max(n, 1) for ll, n in zip(self.loglik, self.num_chars)])


# --------------------------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------------------------

def move_trailing_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """Move the trailing whitespace of ``context`` to the start of ``continuation``."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer has a BOS token and puts it in front of the text when adding special tokens
    (the same probe that training's tokenization uses, so scoring and training agree)."""
    return uses_bos(tokenizer)


def encode_request(tokenizer: Any, request: ChoiceRequest, *, add_bos: bool | None = None,
                   max_length: int | None = None) -> EncodedRequest:
    """Tokenize a request the way lm-evaluation-harness does (see the module docstring).

    ``add_bos``: prepend BOS to the context; by default whatever ``tokenizer_adds_bos`` says.
    ``max_length``: the longest input the model may see (context plus all but the last continuation token); the
    context is truncated from the left to fit the longest continuation, keeping at least one token.
    """
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    context, _ = move_trailing_whitespace(request.context, "")
    context_ids = _ids(tokenizer, context) if context else []
    conts: list[tuple[int, ...]] = []
    for continuation in request.continuations:
        ctx_text, cont_text = move_trailing_whitespace(request.context, continuation)
        whole = _ids(tokenizer, ctx_text + cont_text)
        cont_ids = whole[len(context_ids):]
        if not cont_ids:
            # the last context token swallowed the continuation; fall back to tokenizing it on its own
            cont_ids = _ids(tokenizer, cont_text)
        if not cont_ids:
            raise DataError(f"item {request.item_id!r}: the choice {continuation!r} has no tokens; give every "
                            f"choice visible text")
        conts.append(tuple(cont_ids))

    if add_bos:
        context_ids = [tokenizer.bos_token_id] + context_ids
    if not context_ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("empty context and the tokenizer has neither a BOS nor an EOS token")
        context_ids = [start]

    if max_length is not None:
        room = max_length - (max(len(c) for c in conts) - 1)
        if room < 1:
            longest = max(len(c) for c in conts)
            raise DataError(f"item {request.item_id!r}: a choice of {longest} tokens does not fit "
                            f"max_length={max_length}; raise max_length to at least {longest} or shorten the "
                            f"choice")
        context_ids = context_ids[-room:]
    return EncodedRequest(tuple(context_ids), tuple(conts))


# --------------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------------

def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)  # peft wrappers
    return get_base() if callable(get_base) else model


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers >= 5.x calls the KV cache argument ``cache`` (``past_key_values`` is deprecated)."""
    params = inspect.signature(type(_base_model(model)).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out: Any) -> Any:
    """The KV cache a forward returned (``cache`` in transformers >= 5.x, else ``past_key_values``), or ``None``."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _output_cache(out: Any, needs: str = "batch_repeat_interleave") -> Any:
    """The returned KV cache; it must have the batch method ``needs``."""
    cache = _returned_cache(out)
    if cache is None or not hasattr(cache, needs):
        raise TypeError(f"the model did not return a usable KV cache (got {type(cache).__name__})")
    return cache


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def score_encoded(model: torch.nn.Module, encoded: EncodedRequest, *,
                  cache_kwarg: str | None = None) -> tuple[list[float], list[bool]]:
    """Log-likelihood and greedy flag of each continuation; the context goes through the model once.

    Call inside ``torch.inference_mode()`` with the model in eval mode (``score_requests`` does both).
    """
    cache_kwarg = cache_kwarg or _cache_kwarg(model)
    device = _model_device(model)
    conts = encoded.continuation_ids
    n_ctx = len(encoded.context_ids)

    # 1) the context, once; only its last logit (which predicts every continuation's first token) is computed
    ctx = torch.tensor([encoded.context_ids], dtype=torch.long, device=device)
    out = model(input_ids=ctx, use_cache=True, logits_to_keep=1)
    first_logp = out.logits[0, -1].float().log_softmax(-1)
    first_ids = torch.tensor([c[0] for c in conts], device=device)
    loglik = first_logp[first_ids].double().tolist()
    greedy = (first_ids == first_logp.argmax()).tolist()

    # 2) the rest of the multi-token continuations, as one right-padded batch on top of the repeated context cache.
    # Token j of a continuation is predicted at input position j - 1, so the last token is never fed in.
    rows = [i for i, c in enumerate(conts) if len(c) > 1]
    if not rows:
        return loglik, greedy
    lengths = [len(conts[i]) - 1 for i in rows]
    width = max(lengths)
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, (i, n) in enumerate(zip(rows, lengths)):
        inputs[r, :n] = torch.tensor(conts[i][:-1])
        targets[r, :n] = torch.tensor(conts[i][1:])
        valid[r, :n] = True
    attention = torch.cat([torch.ones(len(rows), n_ctx, dtype=torch.long), valid.long()], dim=1)

    cache = _output_cache(out)
    del out
    if len(rows) > 1:
        cache.batch_repeat_interleave(len(rows))
    valid = valid.to(device)
    with output_head_only_at(model, valid) as packed:
        out = model(input_ids=inputs.to(device), attention_mask=attention.to(device), use_cache=True,
                    **{cache_kwarg: cache})
    logits = out.logits[0] if packed() else out.logits[valid]
    if logits.shape[0] != int(valid.sum()):
        raise RuntimeError(f"unexpected logits shape {tuple(out.logits.shape)} for {int(valid.sum())} positions")
    logp = logits.float().log_softmax(-1)                      # (number of real positions, vocab)
    del out, cache, logits
    flat_targets = targets.to(device)[valid]
    token_logp = logp.gather(-1, flat_targets[:, None])[:, 0].double().cpu()
    token_greedy = (logp.argmax(-1) == flat_targets).cpu()
    start = 0
    for i, n in zip(rows, lengths):
        loglik[i] += float(token_logp[start:start + n].sum())
        greedy[i] = greedy[i] and bool(token_greedy[start:start + n].all())
        start += n
    return loglik, greedy


def _attention_layout(model: torch.nn.Module, probe_ids: Sequence[int]) -> tuple[bool, int | None]:
    """Whether questions may be scored together, and the smallest attention window of the model (``None``: none).

    A one-token probe forward shows which KV cache the model builds. Batching right-pads contexts and copies cache
    rows, which is exact only for plain per-token caches: full attention layers, where padding is masked out, and
    sliding-window (or chunked) layers, where padding shifts distances and so only matters when a batch is wider
    than the window (``_fits`` handles that). Any other layer (recurrent or linear-attention state, quantized,
    sparse-indexed) keeps one question per forward.
    """
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    device = _model_device(model)
    out = model(input_ids=torch.tensor([list(probe_ids[:1])], device=device), use_cache=True, logits_to_keep=1)
    cache = _returned_cache(out)
    layers = getattr(cache, "layers", None)
    if not layers or not hasattr(cache, "batch_select_indices"):
        return False, None
    window = None
    for layer in layers:
        if type(layer) is DynamicSlidingWindowLayer:
            window = layer.sliding_window if window is None else min(window, layer.sliding_window)
        elif type(layer) is not DynamicLayer:
            return False, None
    return True, window


# Padded tokens per forward (contexts: questions x longest context; continuations: rows x (longest context +
# width), the repeated cache included) above which questions go to separate batches: the repeated KV cache of long
# few-shot contexts would otherwise take gigabytes. 0-shot ARC/MMLU batches of 16 questions stay far below it.
_MAX_BATCH_TOKENS = 16384

# The cost of one more forward, in padded tokens. On a 2-core CPU a one-token forward of SmolLM2-135M (reading all
# weights, the Python of 30 layers) takes about as long as 30 more tokens in a forward; padding costs as much as
# real tokens. Batches and continuation chunks are cut to minimise forwards x this + padded tokens.
_FORWARD_COST_TOKENS = 32


def _fits(*, questions: int, longest_ctx: int, shortest_ctx: int, rows: int, width: int,
          window: int | None) -> bool:
    """Whether a batch can be scored together with the same results as one question at a time.

    ``questions`` with contexts of ``shortest_ctx`` to ``longest_ctx`` tokens, ``rows`` multi-token continuations,
    the longest with ``width + 1`` tokens.

    * Memory: both forwards stay under ``_MAX_BATCH_TOKENS`` padded tokens.
    * Attention window: in a batch, positions are counted in the padded layout, so a sliding (or chunked) window
      would hide or show other tokens than it does for the question alone, and the sliding cache would drop the
      oldest padded positions. That cannot happen when no continuation token is ``window`` or more positions after
      position 0 (longest context + width <= window), nor when all contexts are equally long (no padding), nor
      without a second forward (width 0).
    """
    if max(questions * longest_ctx, rows * (longest_ctx + width)) > _MAX_BATCH_TOKENS:
        return False
    return window is None or width == 0 or longest_ctx + width <= window or longest_ctx == shortest_ctx


def _cheapest_split(n: int, runs_ending_at: Callable[[int], Iterable[tuple[int, float]]]) -> list[tuple[int, int]]:
    """Split items ``0..n-1`` into consecutive runs ``[i, j)`` with the least total cost (dynamic programming).

    ``runs_ending_at(j)`` yields ``(i, cost)`` for every allowed run ``[i, j)``; it must allow ``[j - 1, j)``.
    """
    best = [0.0] + [math.inf] * n          # best[j]: least cost of splitting items 0..j-1
    start = [0] * (n + 1)                  # start[j]: where the last run of that split starts
    for j in range(1, n + 1):
        for i, cost in runs_ending_at(j):
            if best[i] + cost < best[j]:
                best[j], start[j] = best[i] + cost, i
    runs = []
    while n > 0:
        runs.append((start[n], n))
        n = start[n]
    return runs[::-1]


def _plan_batches(encoded: Sequence[EncodedRequest], batch_size: int, window: int | None) -> list[list[int]]:
    """Request indices grouped into batches of at most ``batch_size`` that ``_fits`` accepts.

    Requests are taken longest context first (a memory problem shows at once) and cut into consecutive runs that
    minimise the estimated cost: ``_FORWARD_COST_TOKENS`` per forward (one for the contexts, one more when there are
    multi-token continuations) plus the padded context tokens. Continuation padding is left out: ``_score_batch``
    runs the continuations in chunks of similar length, so it barely depends on the grouping.
    """
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].context_ids), i))
    n_ctx = [len(encoded[i].context_ids) for i in order]
    rows = [sum(len(c) > 1 for c in encoded[i].continuation_ids) for i in order]
    width = [max(len(c) for c in encoded[i].continuation_ids) - 1 for i in order]

    def runs_ending_at(j: int) -> Iterable[tuple[int, float]]:
        run_rows = run_width = 0
        for i in range(j - 1, max(j - batch_size, 0) - 1, -1):
            run_rows += rows[i]
            run_width = max(run_width, width[i])
            # growing a run to the left only adds a longer context, rows and width: once it does not fit, no
            # longer run ending at j does
            if i < j - 1 and not _fits(questions=j - i, longest_ctx=n_ctx[i], shortest_ctx=n_ctx[j - 1],
                                       rows=run_rows, width=run_width, window=window):
                return
            yield i, _FORWARD_COST_TOKENS * (1 + (run_rows > 0)) + (j - i) * n_ctx[i]

    return [order[i:j] for i, j in _cheapest_split(len(order), runs_ending_at)]


def _cache_rows(cache: Any, index: torch.Tensor) -> Any:
    """A cache holding rows ``index`` of ``cache`` (repeats allowed); ``cache`` itself is left as it is.

    Shallow copies suffice: the only layers admitted (``_attention_layout``: ``DynamicLayer`` and
    ``DynamicSlidingWindowLayer``) replace their key/value tensors on row selection and on update, never write into
    them.
    """
    rows = copy.copy(cache)
    rows.layers = [copy.copy(layer) for layer in cache.layers]
    rows.batch_select_indices(index)
    return rows


def _score_batch(model: torch.nn.Module, batch: Sequence[EncodedRequest],
                 cache_kwarg: str) -> list[tuple[list[float], list[bool]]]:
    """``score_encoded`` for several questions: one forward for their right-padded contexts, then their multi-token
    continuations on copies of their questions' cache rows, in a few chunks of similar length.

    The caller makes sure padding cannot change results (``_attention_layout``, ``_fits``); the results then equal
    ``score_encoded``'s up to float rounding. Runs inside ``torch.inference_mode()`` with the model in eval mode.
    """
    device = _model_device(model)
    n_ctx = [len(e.context_ids) for e in batch]
    longest = max(n_ctx)

    # 1) the contexts, right-padded to (B, longest): padding after the real tokens changes none of them, and the
    # default positions 0..longest-1 are right for every row. Only each row's last real position gets logits.
    contexts = torch.zeros(len(batch), longest, dtype=torch.long)
    ctx_mask = torch.zeros(len(batch), longest, dtype=torch.long)
    last = torch.zeros(len(batch), longest, dtype=torch.bool)
    for q, e in enumerate(batch):
        contexts[q, :n_ctx[q]] = torch.tensor(e.context_ids)
        ctx_mask[q, :n_ctx[q]] = 1
        last[q, n_ctx[q] - 1] = True
    last = last.to(device)
    with output_head_only_at(model, last) as packed:
        out = model(input_ids=contexts.to(device), attention_mask=ctx_mask.to(device), use_cache=True)
    logits = out.logits[0] if packed() else out.logits[last]              # (B, vocab)
    first_logp = logits.float().log_softmax(-1)
    first_greedy = first_logp.argmax(-1)                                    # (B,)
    results = []
    for q, e in enumerate(batch):
        first_ids = torch.tensor([c[0] for c in e.continuation_ids], device=device)
        results.append((first_logp[q, first_ids].double().tolist(), (first_ids == first_greedy[q]).tolist()))

    # 2) the rest of the multi-token continuations (token j is predicted at input position j - 1). Longest first,
    # cut into chunks of similar length: padding costs as much as real tokens, one more forward about
    # _FORWARD_COST_TOKENS of them.
    rows = sorted(((q, k) for q, e in enumerate(batch) for k, c in enumerate(e.continuation_ids) if len(c) > 1),
                  key=lambda row: -len(batch[row[0]].continuation_ids[row[1]]))
    if not rows:
        return results
    cache = _output_cache(out, needs="batch_select_indices")
    del out, logits
    lengths = [len(batch[q].continuation_ids[k]) - 1 for q, k in rows]
    chunks = _cheapest_split(len(rows), lambda j: ((i, _FORWARD_COST_TOKENS + (j - i) * lengths[i])
                                                   for i in range(j - 1, -1, -1)))
    for i, j in chunks:
        for (q, k), loglik, greedy in zip(rows[i:j], *_score_continuations(
                model, cache, batch, rows[i:j], ctx_mask, cache_kwarg)):
            results[q][0][k] += loglik
            results[q][1][k] = results[q][1][k] and greedy
    return results


def _score_continuations(model: torch.nn.Module, cache: Any, batch: Sequence[EncodedRequest],
                         rows: Sequence[tuple[int, int]], ctx_mask: torch.Tensor,
                         cache_kwarg: str) -> tuple[list[float], list[bool]]:
    """Sum of log-probabilities of tokens 1.. of continuation ``k`` of question ``q`` for each row ``(q, k)``, and
    whether they are all greedy; one forward over the rows on copies of their questions' rows of the context
    ``cache``, whose right-padded layout ``ctx_mask`` (B, longest context) gives."""
    device = _model_device(model)
    conts = [batch[q].continuation_ids[k] for q, k in rows]
    lengths = [len(c) - 1 for c in conts]
    width = max(lengths)
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, (cont, n) in enumerate(zip(conts, lengths)):
        inputs[r, :n] = torch.tensor(cont[:-1])
        targets[r, :n] = torch.tensor(cont[1:])
        valid[r, :n] = True
    question = torch.tensor([q for q, _ in rows])                           # (R,) row -> question in the batch
    # attention (R, longest + width): the question's context (zeros on its padding), then the continuation's real
    # tokens; positions (R, width) count from the question's own context length, not the padded one
    attention = torch.cat([ctx_mask[question], valid.long()], dim=1)
    positions = ctx_mask.sum(1)[question, None] + torch.arange(width)

    valid = valid.to(device)
    with output_head_only_at(model, valid) as packed:
        out = model(input_ids=inputs.to(device), attention_mask=attention.to(device),
                    position_ids=positions.to(device), use_cache=True,
                    **{cache_kwarg: _cache_rows(cache, question.to(device))})
    logits = out.logits[0] if packed() else out.logits[valid]             # (real positions, vocab), row-major
    if logits.shape[0] != int(valid.sum()):
        raise RuntimeError(f"unexpected logits shape {tuple(out.logits.shape)} for {int(valid.sum())} positions")
    del out
    logits = logits.float()
    flat_targets = targets.to(device)[valid]
    # the log-softmax at the targets only: a full (positions, vocab) log-softmax would double the logits' memory
    token_logp = (logits.gather(-1, flat_targets[:, None])[:, 0] - logits.logsumexp(-1)).double().cpu()
    token_greedy = (logits.argmax(-1) == flat_targets).cpu()
    logliks, greedy = [], []
    start = 0
    for n in lengths:
        logliks.append(float(token_logp[start:start + n].sum()))
        greedy.append(bool(token_greedy[start:start + n].all()))
        start += n
    return logliks, greedy


#: Questions per scoring batch unless a caller asks for another number (recorded in result files).
SCORING_BATCH_SIZE = 16


def _rank_share(batches: Sequence[list[int]], encoded: Sequence[EncodedRequest]) -> list[list[int]]:
    """This rank's batches of the plan: each batch, costliest first, goes to the rank with the least estimated work
    so far (ties: the lowest rank). Every rank computes the same plan and so the same shares: disjoint, covering
    every batch, each batch whole (never a question's choices apart)."""
    world = distributed.world_size()
    if world == 1:
        return list(batches)

    def cost(batch: list[int]) -> float:
        # as in _plan_batches: a forward costs _FORWARD_COST_TOKENS tokens, contexts are padded to the longest,
        # plus the continuation tokens fed in after them
        longest = max(len(encoded[i].context_ids) for i in batch)
        fed = sum(len(c) - 1 for i in batch for c in encoded[i].continuation_ids)
        return _FORWARD_COST_TOKENS * (1 + (fed > 0)) + len(batch) * longest + fed

    costs = [cost(b) for b in batches]
    load = [0.0] * world
    owner = [0] * len(batches)
    for b in sorted(range(len(batches)), key=lambda b: (-costs[b], b)):
        owner[b] = min(range(world), key=lambda r: (load[r], r))
        load[owner[b]] += costs[b]
    return [batch for batch, r in zip(batches, owner) if r == distributed.rank()]


def score_requests(model: torch.nn.Module, tokenizer: Any, requests: Sequence[ChoiceRequest], *,
                   max_length: int | None = None, progress: bool = True,
                   batch_size: int = SCORING_BATCH_SIZE, sharded: bool = False) -> list[ChoiceScores]:
    """Score every choice of every request; results are in request order.

    Questions go through the model in batches of up to ``batch_size`` with similar context lengths: one forward for
    their right-padded contexts, then their multi-token continuations on their questions' KV cache rows, in a few
    chunks of similar length. ``batch_size=1`` runs ``score_encoded`` (the reference) per question. Batches are cut
    smaller where padding could change results (wider than a sliding attention window) or would take too much
    memory; models whose KV cache cannot be batched this way get one question at a time. The results equal
    one-at-a-time scoring up to float rounding.

    ``sharded``: under a launcher with several processes, every rank calls this with the same requests and scores
    its share of the batches (planned as on one process, so every question is scored in the same batch and gets
    the one-process score); the scores are gathered and every rank returns all of them. On one process, or
    without it, this process scores everything.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    add_bos = tokenizer_adds_bos(tokenizer)
    cache_kwarg = _cache_kwarg(model)
    encoded = [encode_request(tokenizer, r, add_bos=add_bos, max_length=max_length) for r in requests]
    scored: list[tuple[list[float], list[bool]] | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    sharded = sharded and distributed.world_size() > 1
    try:
        with torch.inference_mode():
            batchable, window = False, None
            if batch_size > 1 and len(encoded) > 1:
                batchable, window = _attention_layout(model, encoded[0].context_ids)
            batches = (_plan_batches(encoded, batch_size, window) if batchable
                       else [[i] for i in range(len(encoded))])
            if sharded:
                batches = _rank_share(batches, encoded)
            with tqdm(total=sum(map(len, batches)), desc="scoring", unit="q",
                      disable=not progress or not distributed.is_main()) as bar:
                for batch in batches:
                    if len(batch) == 1:
                        scored[batch[0]] = score_encoded(model, encoded[batch[0]], cache_kwarg=cache_kwarg)
                    else:
                        for i, result in zip(batch, _score_batch(model, [encoded[i] for i in batch], cache_kwarg)):
                            scored[i] = result
                    bar.update(len(batch))
    finally:
        model.train(was_training)
    if sharded:   # every rank's {request index: (logliks, greedy flags)}; together they cover every request
        for share in distributed.all_gather_objects({i: scored[i] for batch in batches for i in batch}):
            for i, result in share.items():
                scored[i] = result
    return [ChoiceScores(loglik=tuple(loglik), is_greedy=tuple(greedy),
                         num_tokens=tuple(len(c) for c in e.continuation_ids),
                         num_chars=r.choice_lengths)
            for r, e, (loglik, greedy) in zip(requests, encoded, scored)]


# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------

def argmax_first(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (like ``numpy.argmax``)."""
    if len(values) == 0:
        raise ValueError("argmax of an empty sequence")
    best = 0
    for i in range(1, len(values)):
        if values[i] > values[best]:
            best = i
    return best


def _mean_stderr(values: Sequence[float]) -> float:
    """Sample standard deviation over sqrt(n); NaN below two values."""
    if len(values) < 2:
        return float("nan")
    return statistics.stdev(values) / math.sqrt(len(values))


def multiple_choice_metrics(scores: Sequence[ChoiceScores], golds: Sequence[int]) -> dict[str, float | int]:
    """``acc``, ``acc_norm`` (per-character normalisation), their standard errors and ``n``."""
    if len(scores) != len(golds):
        raise ValueError(f"{len(scores)} scores but {len(golds)} golds")
    if not scores:
        raise ValueError("no scores")
    acc = [float(s.pred == int(g)) for s, g in zip(scores, golds)]
    acc_norm = [float(s.pred_norm == int(g)) for s, g in zip(scores, golds)]
    return {
        "acc": statistics.fmean(acc),
        "acc_stderr": _mean_stderr(acc),
        "acc_norm": statistics.fmean(acc_norm),
        "acc_norm_stderr": _mean_stderr(acc_norm),
        "n": len(scores),
    }


def item_records(requests: Sequence[ChoiceRequest], scores: Sequence[ChoiceScores]) -> list[dict[str, Any]]:
    """One plain (JSON-friendly) dict per item: its position (``doc_id``), ids, the prompt and continuations, gold,
    predictions by acc and acc_norm, 0/1 correctness and each choice's log-likelihood (sum), token and character
    counts."""
    if len(requests) != len(scores):
        raise ValueError(f"{len(requests)} requests but {len(scores)} scores")
    records = []
    for doc_id, (req, s) in enumerate(zip(requests, scores)):
        records.append({
            "doc_id": doc_id, "item_id": req.item_id, "subject": req.subject,
            "prompt": req.context, "continuations": list(req.continuations), "gold": req.gold,
            "pred": s.pred, "pred_norm": s.pred_norm,
            "acc": int(s.pred == req.gold), "acc_norm": int(s.pred_norm == req.gold),
            "loglik": list(s.loglik), "is_greedy": list(s.is_greedy),
            "num_tokens": list(s.num_tokens), "num_chars": list(s.num_chars),
        })
    return records


def aggregate_by_subject(per_item_records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-subject and overall accuracy from records with ``subject``, ``acc`` and ``acc_norm`` (0/1 or bool).

    Returns ``{"subjects": {name: {"acc", "acc_norm", "n"}}, "macro": {"acc", "acc_norm", "num_subjects"},
    "micro": {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}}``: macro is the mean of the subject
    accuracies (every subject counts the same), micro the mean over all items.
    """
    by_subject: dict[str, tuple[list[float], list[float]]] = {}
    all_acc: list[float] = []
    all_norm: list[float] = []
    for rec in per_item_records:
        subject = rec.get("subject")
        if subject is None:
            raise ValueError(f"record {rec.get('item_id', '?')!r} has no subject")
        accs, norms = by_subject.setdefault(str(subject), ([], []))
        accs.append(float(rec["acc"]))
        norms.append(float(rec["acc_norm"]))
        all_acc.append(float(rec["acc"]))
        all_norm.append(float(rec["acc_norm"]))
    if not all_acc:
        raise ValueError("no records")
    subjects = {
        name: {"acc": statistics.fmean(a), "acc_norm": statistics.fmean(n), "n": len(a)}
        for name, (a, n) in sorted(by_subject.items())
    }
    return {
        "subjects": subjects,
        "macro": {
            "acc": statistics.fmean(s["acc"] for s in subjects.values()),
            "acc_norm": statistics.fmean(s["acc_norm"] for s in subjects.values()),
            "num_subjects": len(subjects),
        },
        "micro": {
            "acc": statistics.fmean(all_acc), "acc_stderr": _mean_stderr(all_acc),
            "acc_norm": statistics.fmean(all_norm), "acc_norm_stderr": _mean_stderr(all_norm),
            "n": len(all_acc),
        },
    }


# --------------------------------------------------------------------------------------------------------------------
# Entry points: datasets in, results out
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _TaskRequests:
    config: Any                 # the EvalConfig, with the task's default template filled in
    task: Task
    requests: list[ChoiceRequest]
    split_items: list[Any]      # the split's items before limit/per_subject_limit (n-samples' "original")
    seconds: float              # loading and building them


def _task_requests(config: Any) -> _TaskRequests:
    start = time.time()
    config = with_task_template(config)
    task = get_task(config.task, config.fields)
    split = normalize_split(config.task, config.split)
    split_items = load_task(config.task, split, subjects=config.subjects, fields=config.fields)
    items = split_items
    if config.item_set is not None:
        stored = read_item_set(config.item_set)
        by_id = {item.id: item for item in split_items}
        missing = [i for i in stored["ids"] if i not in by_id]
        if missing:
            raise DataError(f"item set {config.item_set}: {len(missing)} of its ids are not in {config.task}:{split} "
                            f"(e.g. {missing[0]}); it was made for {stored.get('task')}:{stored.get('split')}")
        items = [by_id[i] for i in stored["ids"]]
    if config.per_subject_limit is not None:
        seen: dict[Any, int] = {}
        kept = []
        for item in items:
            seen[item.subject] = seen.get(item.subject, 0) + 1
            if seen[item.subject] <= config.per_subject_limit:
                kept.append(item)
        items = kept
    if config.offset:
        items = items[config.offset:]
        if not items:
            raise ConfigError(f"offset {config.offset} skips every item of {config.task}:{config.split} "
                              f"({len(split_items)} items)")
    if config.limit is not None:
        items = items[: config.limit]
    shots_pool: list[Any] = []
    if config.num_fewshot > 0:
        if task.fewshot_split is None:      # a file: shots come from its other rows
            shots_pool = split_items
        elif task.fewshot_split == split:
            raise ConfigError(f"few-shot examples come from the {split} split; evaluate another split")
        else:
            shots_pool = load_task(config.task, task.fewshot_split, subjects=config.subjects)
    requests = []
    for index, item in enumerate(items):
        shots = fewshot_examples(shots_pool, config.num_fewshot, seed=config.fewshot_seed + index,
                                 exclude_id=item.id, subject=item.subject if task.by_subject else None)
        requests.append(ChoiceRequest(context=build_context(item, config.template, shots, task.description(config.template)),
                                      continuations=item_continuations(item, config.template), gold=item.gold,
                                      item_id=item.id, subject=item.subject, delimiter=TARGET_DELIMITER))
    return _TaskRequests(config, task, requests, split_items, time.time() - start)


def build_requests(config: Any) -> list[ChoiceRequest]:
    """Scoring requests of a task split under ``config`` (an :class:`~textdistill.config.EvalConfig`: template,
    few-shot, limit, subjects, a file task's fields).

    Few-shot examples come from the task's few-shot split (ARC: train; MMLU: dev, same subject; a file: its other
    rows), drawn with a fixed seed per question, never the question itself.
    """
    return _task_requests(config).requests


def _evaluate(model: torch.nn.Module, tokenizer: Any, prepared: _TaskRequests,
              progress: bool, sharded: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``evaluate_model``'s result and the per-item records of ``prepared`` requests (``sharded``: as in
    :func:`score_requests`)."""
    start = time.time()
    config, requests = prepared.config, prepared.requests
    with autocast_context(config.precision, _model_device(model)):
        scores = score_requests(model, tokenizer, requests, max_length=config.max_length, progress=progress,
                                sharded=sharded)
    records = item_records(requests, scores)
    result: dict[str, Any] = dict(multiple_choice_metrics(scores, [r.gold for r in requests]))
    if prepared.task.by_subject:
        result.update(aggregate_by_subject(records))
    result.update({"task": config.task, "split": config.split, "template": config.template,
                   "num_fewshot": config.num_fewshot, "limit": config.limit, "offset": config.offset,
                   "item_set": config.item_set,
                   "per_subject_limit": config.per_subject_limit,
                   "seconds": round(prepared.seconds + time.time() - start, 1)})
    return result, records


def evaluate_with_records(model: torch.nn.Module, tokenizer: Any, config: Any, *,
                          progress: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """:func:`evaluate_model`'s metrics and the per-item records (:func:`item_records`) they come from."""
    return _evaluate(model, tokenizer, _task_requests(config), progress)


def question_margins(records: Sequence[Mapping[str, Any]]) -> list[float]:
    """Per item (records as :func:`item_records` writes them), the gold choice's log-likelihood minus the best other
    choice's: positive exactly where the item is answered right (ties aside)."""
    return [r["loglik"][r["gold"]] - max(x for i, x in enumerate(r["loglik"]) if i != r["gold"]) for r in records]


def mean_margin(margins: Sequence[float], cap: float | None = None) -> float:
    """The mean of per-question margins (:func:`question_margins`), each counted up to ``cap`` when one is given:
    with a cap, a question already answered right by at least ``cap`` adds nothing more, so only wrong or close
    questions can raise the mean (what accuracy, which counts each margin's sign, rewards)."""
    if not margins:
        raise ValueError("no margins")
    if cap is None:
        return sum(margins) / len(margins)
    return sum(min(m, cap) for m in margins) / len(margins)


def choice_figures(records: Sequence[Mapping[str, Any]]) -> dict[str, float | int]:
    """What a model's choice log-likelihoods say about items (records as :func:`item_records` writes them): ``acc``
    and ``acc_norm``; ``gold_loglik_per_token`` (the gold continuations' log-likelihood over their tokens, what a
    response loss measures); ``mean_choice_loglik`` (every choice's, per item); ``mc_cross_entropy`` (softmax over
    the choices' summed log-likelihoods, gold's negative log-probability); and ``gold_minus_best_other``, the mean
    margin of the gold choice's log-likelihood over the best other choice's: positive on an item answered right,
    and unlike the response loss it cannot rise by making every choice likelier."""
    if not records:
        raise ValueError("no records")
    n = len(records)
    gold = [r["loglik"][r["gold"]] for r in records]
    normaliser = [max(r["loglik"]) + math.log(sum(math.exp(x - max(r["loglik"])) for x in r["loglik"]))
                  for r in records]
    return {"n": n, "acc": sum(r["acc"] for r in records) / n, "acc_norm": sum(r["acc_norm"] for r in records) / n,
            "gold_loglik_per_token": sum(gold) / sum(r["num_tokens"][r["gold"]] for r in records),
            "mean_choice_loglik": sum(sum(r["loglik"]) / len(r["loglik"]) for r in records) / n,
            "mc_cross_entropy": sum(z - g for z, g in zip(normaliser, gold)) / n,
            "gold_minus_best_other": mean_margin(question_margins(records))}


def evaluate_model(model: torch.nn.Module, tokenizer: Any, config: Any, *, progress: bool = True,
                   sharded: bool = False) -> dict[str, Any]:
    """Evaluate a loaded model on ``config``'s task split; returns metrics (``acc``, ``acc_norm``, their standard
    errors, ``n``, ``seconds``; per-subject, macro and micro results for MMLU).

    ``sharded``: every rank of a launch calls this with the same model and they split the questions
    (:func:`score_requests`); every rank returns the metrics."""
    return _evaluate(model, tokenizer, _task_requests(config), progress, sharded)[0]


def format_table(result: Mapping[str, Any]) -> str:
    """A small fixed-width table of a result (MMLU: per subject, then the averages)."""
    lines = [f"{'task':<34} {'n':>6} {'acc':>7} {'acc_norm':>9}"]
    subjects = result.get("subjects") or {}
    for name, row in sorted(subjects.items()):
        lines.append(f"{name:<34} {row['n']:>6} {row['acc']:>7.4f} {row['acc_norm']:>9.4f}")
    label = f"{result['task']}:{result['split']} ({result['template']}, {result['num_fewshot']}-shot)"
    lines.append(f"{label:<34} {result['n']:>6} {result['acc']:>7.4f} {result['acc_norm']:>9.4f}")
    lines.append(f"time {result['seconds']:.1f} s")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Result files in lm-evaluation-harness's structure
# --------------------------------------------------------------------------------------------------------------------

def _stderr_or_na(values: Sequence[float]) -> float | str:
    """The standard error of the mean, or "N/A" below two values (as the harness writes it)."""
    return _mean_stderr(values) if len(values) > 1 else "N/A"


def _harness_metrics(name: str, alias: str, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One ``results`` entry: acc and acc_norm with their standard errors under the harness's ``metric,filter``
    keys."""
    acc = [float(r["acc"]) for r in records]
    acc_norm = [float(r["acc_norm"]) for r in records]
    return {"name": name, "alias": alias, "sample_len": len(records),
            "acc,none": statistics.fmean(acc), "acc_stderr,none": _stderr_or_na(acc),
            "acc_norm,none": statistics.fmean(acc_norm), "acc_norm_stderr,none": _stderr_or_na(acc_norm)}


def _task_config(config: Any, task: Task) -> dict[str, Any]:
    """``configs[T]``: the resolved evaluation config and what the task is (source, few-shot split, delimiter,
    version); a file task's field names and the file's sha256."""
    entry = {**to_jsonable(config), "source": task.source, "fewshot_split": task.fewshot_split or config.split,
             "target_delimiter": TARGET_DELIMITER, "output_type": "multiple_choice",
             "metadata": {"version": task.version}}
    if task.name not in TASKS:
        entry["fields"] = to_jsonable(config.fields or TaskFields())
        entry["source_sha256"] = sha256_file(task.source) if Path(task.source).is_file() else None
    return entry


def _harness_results(runs: Sequence[tuple[_TaskRequests, list[dict[str, Any]]]], run_config: dict[str, Any],
                     seconds: float) -> dict[str, Any]:
    """The result document of ``textdistill eval`` in lm-evaluation-harness's structure, from (requests, item
    records) per task: ``results``, ``configs``, ``versions``, ``n-shot``, ``higher_is_better`` and
    ``n-samples`` per task (MMLU's subjects also as subtasks ``mmlu_<subject>``, listed in ``group_subtasks``),
    ``config`` (``run_config``: the model and the run), and ``textdistill``: library versions and the machine."""
    doc: dict[str, Any] = {key: {} for key in ("results", "group_subtasks", "configs", "versions", "n-shot",
                                               "higher_is_better", "n-samples")}

    def add(name: str, alias: str, config: Any, task: Task, records: list[dict[str, Any]], original: int) -> None:
        doc["results"][name] = _harness_metrics(name, alias, records)
        doc["configs"][name] = _task_config(config, task)
        doc["versions"][name] = task.version
        doc["n-shot"][name] = config.num_fewshot
        doc["higher_is_better"][name] = {"acc": True, "acc_norm": True}
        doc["n-samples"][name] = {"original": original, "effective": len(records)}

    for prepared, records in runs:
        config = prepared.config
        add(config.task, config.task, config, prepared.task, records, len(prepared.split_items))
        if prepared.task.by_subject:
            subjects = sorted({r["subject"] for r in records})
            doc["group_subtasks"][config.task] = [f"{config.task}_{s}" for s in subjects]
            for subject in subjects:
                add(f"{config.task}_{subject}", f" - {subject}", dataclasses.replace(config, subjects=(subject,)),
                    prepared.task, [r for r in records if r["subject"] == subject],
                    sum(item.subject == subject for item in prepared.split_items))
    doc["config"] = run_config
    doc["date"] = time.time()
    doc["total_evaluation_time_seconds"] = str(round(seconds, 1))
    doc["textdistill"] = {"versions": environment_versions(), "machine": machine_description()}
    return doc


def _samples_path(output: str | Path, task: str) -> Path:
    """``samples_<task>.jsonl`` beside the result file; a file task is named by its file name without the suffix."""
    name = task if task in TASKS else Path(task).stem
    return Path(output).parent / f"samples_{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.jsonl"


#: Scores prepared requests: ``(model, tokenizer, prepared, progress) -> (result, item records)``, as ``_evaluate``.
Scorer = Callable[[torch.nn.Module, Any, _TaskRequests, bool], tuple[dict[str, Any], list[dict[str, Any]]]]


def evaluate(*, model_name: str, configs: Sequence[Any], adapter: str | None = None, output: str | None = None,
             log_samples: bool = False, device: str = "auto", trust_remote_code: bool = False,
             progress: bool = True, backend: str = "textdistill", scorer: Scorer | None = None,
             dtype: str = "fp32") -> dict[str, Any]:
    """Entry of ``textdistill eval``: load the model (plus a LoRA adapter or a fine-tuned folder), evaluate each
    task of ``configs`` (one :class:`~textdistill.config.EvalConfig` per task), print a table per task, and return
    the result document in lm-evaluation-harness's structure (``results[task]["acc,none"]`` ...), also written to
    ``output``. ``log_samples`` writes each task's item records to ``samples_<task>.jsonl`` beside it (a file task:
    its file name without the suffix).

    ``scorer`` replaces this module's scorer, and ``backend`` names it in the result: ``textdistill eval --backend
    lm-eval`` passes :func:`textdistill.harness.evaluate_prepared` (lm-evaluation-harness itself; this module never
    imports it). A scorer's result may carry an ``lm_eval`` entry, kept as ``lm_eval[task]``.

    Under ``torchrun``/``accelerate launch`` every rank runs this with the same arguments and scores its share of
    each task's questions (whole questions, in the batches one process would use); the scores are gathered, and
    rank 0 alone prints the tables and writes ``output``, the same document as one process would (times aside).
    Every rank returns the document. Another backend's scorer runs on one process only."""
    if (scorer is None) != (backend == "textdistill"):
        raise ValueError(f"backend {backend!r} needs its scorer, and only another backend takes one")
    distributed.init(device)
    if scorer is not None and distributed.world_size() > 1:
        raise ConfigError(f"--backend {backend} scores on one process; run it without torchrun/accelerate launch")
    tasks = [c.task for c in configs]
    if not tasks or len(set(tasks)) != len(tasks):
        raise ConfigError(f"name each task once, got {', '.join(tasks) or 'none'}")
    if log_samples and not output:
        raise ConfigError("--log-samples writes samples_<task>.jsonl beside the result file: give --output FILE.json")
    if log_samples and len({_samples_path(output, t) for t in tasks}) < len(tasks):
        raise ConfigError(f"tasks {', '.join(tasks)} would share a samples file (same file name): rename one")
    start = time.time()
    prepared = [_task_requests(c) for c in configs]   # every task's data read and checked before the model loads
    device = str(resolve_device(device))
    tokenizer = load_tokenizer(model_name, trust_remote_code=trust_remote_code)
    if dtype == "fp16" and torch.device(device).type == "cpu":
        raise ConfigError("--dtype fp16 needs a GPU (CPU kernels for fp16 are slow and partly missing); use bf16 "
                          "or fp32")
    # bf16 / fp16 halve the weights' memory; the result records the dtype (model_dtype)
    model = load_model(model_name, dtype=dtype, device=device, attn_implementation="sdpa", adapter=adapter,
                       trust_remote_code=trust_remote_code)
    runs = []
    harness_entries = {}
    for requests in prepared:
        if scorer is None:
            result, records = _evaluate(model, tokenizer, requests, progress, sharded=True)
        else:
            result, records = scorer(model, tokenizer, requests, progress)
        if "lm_eval" in result:
            harness_entries[requests.config.task] = result["lm_eval"]
        if distributed.is_main():
            print(format_table(result))
        runs.append((requests, records))
    # one command: every task shares the model settings and the limit
    run_config = {"model": model_name, "adapter": adapter, "model_dtype": to_jsonable(next(model.parameters()).dtype),
                  "device": device, "batch_size": SCORING_BATCH_SIZE, "limit": configs[0].limit,
                  "precision": configs[0].precision, "backend": backend}
    doc = _harness_results(runs, run_config, seconds=time.time() - start)
    if harness_entries:
        doc["lm_eval"] = harness_entries      # the harness's version, generated task name and its own results
    if output and distributed.is_main():
        atomic_write_json(output, doc)
        if log_samples:
            for requests, records in runs:
                write_jsonl(_samples_path(output, requests.config.task), records)
    return doc
