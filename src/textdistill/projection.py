"""From continuous pseudo-prompt embeddings back to tokens.

Nearest-token search over a vocabulary embedding matrix (chunked, so memory stays bounded for 256k vocabularies),
a regulariser pulling embeddings towards their nearest tokens, and a PEZ-style straight-through projection.

The embedding space is the one the model's input embedding *module* outputs: for Gemma that is the weight times
``sqrt(hidden_size)`` (see :func:`input_embedding_matrix`), which is the space :mod:`textdistill.unroll` feeds
pseudo prompts in.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "input_embedding_matrix",
    "nearest_tokens",
    "neighbour_regularizer",
    "rerank_by_likelihood",
    "straight_through",
    "vector_distance",
]

METRICS = ("cosine", "l2")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _exclusion_mask(exclude_ids: Tensor | Iterable[int] | None, vocab: int, device: torch.device) -> Tensor | None:
    """(V,) bool, True for excluded ids (None if nothing is excluded)."""
    if exclude_ids is None:
        return None
    ids = torch.as_tensor(list(exclude_ids) if not torch.is_tensor(exclude_ids) else exclude_ids,
                          dtype=torch.long, device=device).flatten()
    if ids.numel() == 0:
        return None
    if bool((ids < 0).any()) or bool((ids >= vocab).any()):
        raise ValueError(f"exclude_ids must lie in [0, {vocab}), got min {int(ids.min())} max {int(ids.max())}")
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask[ids] = True
    if bool(mask.all()):
        raise ValueError("every token id is excluded")
    return mask


def vector_distance(vectors: Tensor, targets: Tensor, metric: str) -> Tensor:
    """Row-wise distance (..., H) x (..., H) -> (...): 1 - cosine or squared L2 (differentiable)."""
    if metric == "cosine":
        return 1.0 - F.cosine_similarity(vectors, targets, dim=-1)
    return (vectors - targets).square().sum(-1)


@torch.no_grad()
def nearest_tokens(vectors: Tensor, embedding_matrix: Tensor, *, metric: str = "cosine",
                   exclude_ids: Tensor | Iterable[int] | None = None,
                   chunk_size: int = 8192) -> tuple[Tensor, Tensor]:
    """For each vector (..., H), the id of the nearest row of ``embedding_matrix`` (V, H) and its distance.

    Distance is ``1 - cosine`` (metric="cosine") or squared L2 (metric="l2"). The vocabulary is scanned
    ``chunk_size`` rows at a time (extra memory O(N * chunk_size) for N vectors); ids in ``exclude_ids`` are never
    returned; ties go to the lowest id. Scores are computed in at least float32; the returned distances are
    recomputed directly between each vector and its chosen row, so an exact token embedding gives ~0.

    Returns:
        token_ids (...) long and distances (...) in at least float32, on the vectors' device.
    """
    _check_metric(metric)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    vocab, hidden = embedding_matrix.shape
    if vectors.shape[-1] != hidden:
        raise ValueError(f"vectors have width {vectors.shape[-1]}, embedding matrix {hidden}")
    device = vectors.device
    dtype = torch.promote_types(torch.promote_types(vectors.dtype, embedding_matrix.dtype), torch.float32)
    lead = vectors.shape[:-1]
    flat = vectors.reshape(-1, hidden).to(dtype)                       # (N, H)
    excluded = _exclusion_mask(exclude_ids, vocab, device)              # (V,) or None
    if metric == "cosine":
        query = F.normalize(flat, dim=-1)                               # (N, H)
    else:
        query = flat
        q_sq = flat.square().sum(-1, keepdim=True)                      # (N, 1)
    best = torch.full((flat.shape[0],), float("inf"), dtype=dtype, device=device)   # (N,)
    best_ids = torch.zeros(flat.shape[0], dtype=torch.long, device=device)          # (N,)
    for start in range(0, vocab, chunk_size):
        rows = embedding_matrix[start:start + chunk_size].to(device=device, dtype=dtype)   # (C, H)
        if metric == "cosine":
            scores = 1.0 - query @ F.normalize(rows, dim=-1).T          # (N, C)
        else:
            scores = q_sq - 2.0 * (query @ rows.T) + rows.square().sum(-1)   # (N, C)
        if excluded is not None:
            scores = scores.masked_fill(excluded[start:start + rows.shape[0]], float("inf"))
        chunk_best, chunk_ids = scores.min(dim=-1)                      # (N,), first minimum on ties
        better = chunk_best < best                                      # strict: earlier chunks win ties
        best = torch.where(better, chunk_best, best)
        best_ids = torch.where(better, chunk_ids + start, best_ids)
    chosen = embedding_matrix[best_ids.to(embedding_matrix.device)].to(device=device, dtype=dtype)   # (N, H)
    distances = vector_distance(flat, chosen, metric)
    if metric == "l2":
        distances = distances.clamp_min(0.0)
    return best_ids.reshape(lead), distances.reshape(lead)


def neighbour_regularizer(vectors: Tensor, embedding_matrix: Tensor, *, metric: str = "cosine",
                          exclude_ids: Tensor | Iterable[int] | None = None,
                          nearest_ids: Tensor | None = None) -> Tensor:
    """Mean distance of each vector (..., H) to its nearest token embedding (a scalar, differentiable w.r.t.
    ``vectors``; the embedding matrix is treated as a constant).

    ``nearest_ids`` (...) may be passed in from an earlier :func:`nearest_tokens` call (the search is the
    expensive part); otherwise it is computed here.
    """
    _check_metric(metric)
    if nearest_ids is None:
        nearest_ids, _ = nearest_tokens(vectors, embedding_matrix, metric=metric, exclude_ids=exclude_ids)
    elif nearest_ids.shape != vectors.shape[:-1]:
        raise ValueError(f"nearest_ids shape {tuple(nearest_ids.shape)} does not match vectors "
                         f"{tuple(vectors.shape[:-1])}")
    targets = embedding_matrix.detach()[nearest_ids.to(embedding_matrix.device)].to(vectors)   # (..., H)
    return vector_distance(vectors, targets, metric).mean()


def straight_through(vectors: Tensor, embedding_matrix: Tensor, nearest_ids: Tensor) -> Tensor:
    """Forward: the projected embeddings ``embedding_matrix[nearest_ids]`` (exactly); backward: the gradient
    goes to ``vectors`` unchanged (PEZ). Shapes: vectors (..., H), nearest_ids (...) -> (..., H)."""
    if nearest_ids.shape != vectors.shape[:-1]:
        raise ValueError(f"nearest_ids shape {tuple(nearest_ids.shape)} does not match vectors "
                         f"{tuple(vectors.shape[:-1])}")
    projected = embedding_matrix.detach()[nearest_ids.to(embedding_matrix.device)].to(vectors)   # (..., H)
    # v - v.detach() is exactly 0 in the forward (finite v) and the identity in the backward
    return projected + (vectors - vectors.detach())


def input_embedding_matrix(model: nn.Module) -> Tensor:
    """(V, H) rows as the model's input embedding module outputs them: the weight, times ``embed_scale`` when the
    module has one (Gemma multiplies by sqrt(hidden_size)). Detached."""
    embed = model.get_input_embeddings()
    weight = embed.weight.detach()
    scale = getattr(embed, "embed_scale", None)
    if scale is None:
        return weight
    return weight * torch.as_tensor(scale, device=weight.device).to(weight.dtype)


@torch.no_grad()
def rerank_by_likelihood(model: nn.Module, vectors: Tensor, embedding_matrix: Tensor, *, top_k: int = 8,
                         metric: str = "cosine", exclude_ids: Tensor | Iterable[int] | None = None,
                         prefix_ids: Tensor | None = None, chunk_size: int = 8192) -> Tensor:
    """Project one pseudo prompt (P, H) to token ids (P,), greedily left to right: at each position take the
    ``top_k`` nearest tokens (by ``metric``) and keep the one the LM finds most likely after the tokens chosen
    so far (after ``prefix_ids`` (L,), if given). The first position without a prefix keeps the nearest token.

    Uses the model's own forward with ``input_ids`` (one forward per position; short prompts only).
    """
    _check_metric(metric)
    if vectors.dim() != 2:
        raise ValueError(f"vectors must be (P, H), got {tuple(vectors.shape)}")
    candidates = _top_k_tokens(vectors, embedding_matrix, top_k=top_k, metric=metric, exclude_ids=exclude_ids,
                               chunk_size=chunk_size)                   # (P, k), nearest first
    device = model.get_input_embeddings().weight.device
    chosen = [] if prefix_ids is None else [int(t) for t in prefix_ids.flatten()]
    n_prefix = len(chosen)
    for pos in range(vectors.shape[0]):
        cand = candidates[pos]
        if not chosen:
            chosen.append(int(cand[0]))
            continue
        ids = torch.tensor([chosen], dtype=torch.long, device=device)   # (1, L)
        logits = model(input_ids=ids, use_cache=False).logits[0, -1]    # (V,)
        logp = torch.log_softmax(logits.float(), dim=-1)[cand.to(device)]   # (k,)
        chosen.append(int(cand[int(logp.argmax())]))
    return torch.tensor(chosen[n_prefix:], dtype=torch.long, device=vectors.device)


def _top_k_tokens(vectors: Tensor, embedding_matrix: Tensor, *, top_k: int, metric: str,
                  exclude_ids: Tensor | Iterable[int] | None, chunk_size: int) -> Tensor:
    """(N, H) -> (N, k) ids of the k nearest non-excluded rows, nearest first (chunked like nearest_tokens)."""
    vocab, hidden = embedding_matrix.shape
    device = vectors.device
    dtype = torch.promote_types(torch.promote_types(vectors.dtype, embedding_matrix.dtype), torch.float32)
    excluded = _exclusion_mask(exclude_ids, vocab, device)
    allowed = vocab - (0 if excluded is None else int(excluded.sum()))
    k = min(top_k, allowed)
    if k < 1:
        raise ValueError(f"top_k must be positive, got {top_k}")
    flat = vectors.reshape(-1, hidden).to(dtype)
    query = F.normalize(flat, dim=-1) if metric == "cosine" else flat
    best = torch.full((flat.shape[0], 0), float("inf"), dtype=dtype, device=device)
    best_ids = torch.zeros((flat.shape[0], 0), dtype=torch.long, device=device)
    for start in range(0, vocab, chunk_size):
        rows = embedding_matrix[start:start + chunk_size].to(device=device, dtype=dtype)
        if metric == "cosine":
            scores = 1.0 - query @ F.normalize(rows, dim=-1).T
        else:
            scores = flat.square().sum(-1, keepdim=True) - 2.0 * (flat @ rows.T) + rows.square().sum(-1)
        if excluded is not None:
            scores = scores.masked_fill(excluded[start:start + rows.shape[0]], float("inf"))
        ids = torch.arange(start, start + rows.shape[0], device=device).expand_as(scores)
        merged, order = torch.cat([best, scores], 1).sort(dim=-1, stable=True)
        best = merged[:, :k]
        best_ids = torch.cat([best_ids, ids], 1).gather(1, order[:, :k])
    return best_ids
