"""Tests for textdistill.projection: nearest-token search, the neighbour regulariser, straight-through."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from tiny import make_tiny_gemma, make_tiny_llama  # noqa: E402

from textdistill.projection import (  # noqa: E402
    input_embedding_matrix,
    nearest_tokens,
    neighbour_regularizer,
    rerank_by_likelihood,
    straight_through,
)

V, H = 300, 16
METRICS = ["cosine", "l2"]


def random_matrix(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(V, H, generator=gen, dtype=dtype)


def brute_force(vectors, emb, metric, exclude=()):
    """Reference: full distance matrix, excluded columns set to +inf, argmin."""
    flat = vectors.reshape(-1, H).double()
    e = emb.double()
    if metric == "cosine":
        d = 1 - F.normalize(flat, dim=-1) @ F.normalize(e, dim=-1).T
    else:
        d = torch.cdist(flat, e, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    d[:, list(exclude)] = float("inf")
    dist, ids = d.min(-1)
    return ids.reshape(vectors.shape[:-1]), dist.reshape(vectors.shape[:-1])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_embeddings_map_to_their_tokens(metric, dtype):
    emb = random_matrix(dtype)
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(1))[:40].reshape(4, 10)
    found, dist = nearest_tokens(emb[ids], emb, metric=metric, chunk_size=64)
    assert found.shape == ids.shape and dist.shape == ids.shape
    assert torch.equal(found, ids)
    assert float(dist.abs().max()) < 1e-6


@pytest.mark.parametrize("metric", METRICS)
def test_excluded_ids_never_returned(metric):
    emb = random_matrix()
    excluded = [0, 1, 2, 17, 299]
    vectors = emb[excluded] + 1e-4 * torch.randn(len(excluded), H, generator=torch.Generator().manual_seed(2))
    found, dist = nearest_tokens(vectors, emb, metric=metric, exclude_ids=excluded, chunk_size=50)
    assert not any(int(t) in excluded for t in found)
    ref_ids, ref_dist = brute_force(vectors, emb, metric, exclude=excluded)
    assert torch.equal(found, ref_ids)
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-4, atol=1e-5)
    assert float(dist.min()) > 1e-3   # the true (excluded) match would have been ~0
    # exact copies of excluded rows, ids as a tensor
    found2, _ = nearest_tokens(emb[excluded], emb, metric=metric, exclude_ids=torch.tensor(excluded))
    assert not any(int(t) in excluded for t in found2)
    with pytest.raises(ValueError):
        nearest_tokens(vectors, emb, metric=metric, exclude_ids=range(V))


@pytest.mark.parametrize("metric", METRICS)
def test_chunked_equals_unchunked_and_brute_force(metric):
    emb = random_matrix(seed=3)
    vectors = torch.randn(2, 3, 5, H, generator=torch.Generator().manual_seed(4))
    ref_ids, ref_dist = brute_force(vectors, emb, metric)
    full_ids, full_dist = nearest_tokens(vectors, emb, metric=metric, chunk_size=V)
    assert torch.equal(full_ids, ref_ids)
    torch.testing.assert_close(full_dist.double(), ref_dist, rtol=1e-5, atol=1e-5)
    for chunk in (7, 64, 299, 10_000):
        ids, dist = nearest_tokens(vectors, emb, metric=metric, chunk_size=chunk)
        assert torch.equal(ids, full_ids), chunk
        torch.testing.assert_close(dist, full_dist, rtol=0, atol=0)


def test_ties_go_to_lowest_id_across_chunks():
    emb = random_matrix(seed=5)
    emb[200] = emb[30]   # duplicate row in a later chunk
    for metric in METRICS:
        for chunk in (16, 300):
            ids, _ = nearest_tokens(emb[30:31], emb, metric=metric, chunk_size=chunk)
            assert int(ids[0]) == 30


def test_mixed_dtypes_and_bad_arguments():
    emb = random_matrix().to(torch.bfloat16)
    ids = torch.tensor([3, 99, 250])
    found, dist = nearest_tokens(emb[ids].float(), emb, metric="l2")
    assert torch.equal(found, ids) and dist.dtype == torch.float32
    with pytest.raises(ValueError, match="metric"):
        nearest_tokens(emb[ids], emb, metric="dot")
    with pytest.raises(ValueError, match="width"):
        nearest_tokens(torch.zeros(2, H + 1), emb)


@pytest.mark.parametrize("metric", METRICS)
def test_neighbour_regularizer(metric):
    emb = random_matrix(torch.float64, seed=6)
    ids = torch.tensor([[5, 6, 7], [100, 200, 299]])
    exact = emb[ids].clone().requires_grad_(True)
    reg0 = neighbour_regularizer(exact, emb, metric=metric)
    assert abs(float(reg0.detach())) < 1e-12
    reg0.backward()
    assert torch.isfinite(exact.grad).all()

    off = (emb[ids] + 0.3 * torch.randn(2, 3, H, generator=torch.Generator().manual_seed(7),
                                        dtype=torch.float64)).requires_grad_(True)
    reg = neighbour_regularizer(off, emb, metric=metric)
    assert float(reg.detach()) > 0
    near, dist = nearest_tokens(off, emb, metric=metric)
    torch.testing.assert_close(reg.detach(), dist.mean(), rtol=1e-10, atol=1e-12)   # mean nearest distance
    cached = neighbour_regularizer(off, emb, metric=metric, nearest_ids=near)
    torch.testing.assert_close(cached, reg, rtol=0, atol=0)
    reg.backward()
    assert torch.isfinite(off.grad).all() and off.grad.abs().sum() > 0
    # a gradient step with a small step size lowers the regulariser
    with torch.no_grad():
        stepped = off - 1e-2 * off.grad
    assert float(neighbour_regularizer(stepped, emb, metric=metric, nearest_ids=near)) < float(reg.detach())
    # exclusion is honoured
    excl = neighbour_regularizer(exact.detach(), emb, metric=metric, exclude_ids=ids.flatten())
    assert float(excl) > 1e-3


def test_regularizer_gradient_does_not_reach_embedding_matrix():
    emb = random_matrix(seed=8).requires_grad_(True)
    vec = torch.randn(4, H, generator=torch.Generator().manual_seed(9), requires_grad=True)
    neighbour_regularizer(vec, emb, metric="l2").backward()
    assert emb.grad is None and vec.grad is not None


def test_straight_through():
    emb = random_matrix(seed=10).requires_grad_(True)
    vec = (10 * torch.randn(2, 4, H, generator=torch.Generator().manual_seed(11))).requires_grad_(True)
    ids, _ = nearest_tokens(vec, emb)
    out = straight_through(vec, emb, ids)
    assert torch.equal(out, emb.detach()[ids])   # bit-exact forward
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(12))
    out.backward(upstream)
    assert torch.equal(vec.grad, upstream)
    assert emb.grad is None
    with pytest.raises(ValueError):
        straight_through(vec, emb, ids[0])


def test_input_embedding_matrix_matches_embedding_module():
    for make in (make_tiny_llama, make_tiny_gemma):
        model = make(64)
        embed = model.get_input_embeddings()
        with torch.no_grad():
            torch.testing.assert_close(input_embedding_matrix(model), embed(torch.arange(64)), rtol=1e-6, atol=0)
    gemma = make_tiny_gemma(64)
    assert not torch.allclose(input_embedding_matrix(gemma), gemma.get_input_embeddings().weight)   # scaled


def test_rerank_by_likelihood():
    model = make_tiny_llama(64, seed=1)
    emb = input_embedding_matrix(model)
    gen = torch.Generator().manual_seed(13)
    vectors = emb[torch.tensor([5, 9, 40, 2])] + 0.5 * emb.std() * torch.randn(4, emb.shape[1], generator=gen)
    nearest, _ = nearest_tokens(vectors, emb)
    # k = 1 is plain nearest-token projection
    assert torch.equal(rerank_by_likelihood(model, vectors, emb, top_k=1), nearest)
    prefix = torch.tensor([7, 8])
    k = 5
    chosen = rerank_by_likelihood(model, vectors, emb, top_k=k, prefix_ids=prefix, exclude_ids=[0])
    assert chosen.shape == (4,) and 0 not in chosen.tolist()
    # check each greedy choice by brute force: among the k nearest (ids != 0), the most likely continuation
    sims = F.normalize(vectors, dim=-1) @ F.normalize(emb, dim=-1).T
    sims[:, 0] = -float("inf")
    context = prefix.tolist()
    with torch.no_grad():
        for pos in range(4):
            cands = sims[pos].topk(k).indices
            logp = model(input_ids=torch.tensor([context])).logits[0, -1].log_softmax(-1)
            assert int(chosen[pos]) == int(cands[logp[cands].argmax()])
            context.append(int(chosen[pos]))
