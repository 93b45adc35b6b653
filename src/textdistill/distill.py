"""Trajectory-matching distillation: learn the prompts of a few real samples so that a student trained on them
follows the experts, then write them as an ordinary text dataset and measure them on the held-out instrument.

A synthetic sample is a pseudo prompt followed by a real response. Each iteration draws a segment of a (non
held-out) expert run, starts the student at its snapshot theta*_t, takes N SGD steps on minibatches of the
synthetic set (:mod:`textdistill.unroll`, the one differentiable inner loop) and compares theta_N with
theta*_{t+M}. Three ways to learn the prompts (``mode``):

* ``gcg`` (greedy coordinate gradient, token space): the prompts are tokens all along. The meta-gradient at the
  exact token embeddings ranks, per learnable position, the tokens by first-order gain ``g . (e_v - e_current)``;
  a batch of single-token swaps drawn from those top-k lists is scored by the true matching loss of the draw
  (first-order unroll, fp32); the best swap (or the improving swaps together, when that is better still) is kept
  only if it lowers that loss and also lowers it on a second, independent draw. The text is exactly what was
  scored: a swap whose prompt does not re-tokenize to itself is never tried.
* ``straight_through`` (PEZ): continuous vectors, but every forward uses their nearest tokens and the gradient
  is applied to the vectors; the Adam step is a fraction (``lr_embeddings``) of the median token-embedding norm,
  so it means the same for every model (Gemma scales its embeddings by sqrt(hidden)).
* ``continuous``: continuous vectors with a neighbour penalty, projected to the nearest tokens once at the end
  (the paper's reading; kept as the ablation baseline: its vectors usually never leave their token's cell).

The template scaffolding ("Question:", "\\nAnswer:", option labels), a leading BOS and special tokens never change.

Run folder::

    run.json              resolved config, versions, seeds, machine
    init.json             which pool rows initialised the synthetic set
    state.safetensors     checkpoint: prompts (vectors or token ids), learnable lr, optimizer moments, RNG
    state.json            checkpoint: iteration and a fingerprint of the settings (resume refuses other settings)
    metrics.jsonl         one row per iteration
    samples.jsonl         decoded prompts every few iterations
    distilled.jsonl       the text dataset: prompt and response, nothing else
    diagnostics.jsonl     per row: token ids before and after, which tokens changed, the marked prompt, the source
    embeddings.safetensors  the final prompt vectors and learning rate
    heldout.json          the instrument: every scored set's loss per held-out draw, and the paired differences
    summary.json, README.md (dataset card)
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed
from .artifacts import (atomic_write_json, atomic_write_text, load_tensors, read_json, save_tensors,
                        sha256_json, write_jsonl, write_run_info)
from .config import option
from .data import Example, TokenizedExample, scaffold_mask, stable_token_ids, uses_bos
from .errors import ConfigError, DataError, TrainingError
from .instrument import InstrumentConfig, heldout_report
from .keys import resume_settings
from .forks import resolve_targets
from .matching import (Draw, SampleSet, ScoreCache, Scorer, StudentSettings, load_expert_pool, load_objective_rows,
                       load_student_model, make_draws, resolve_student, sample_minibatches, tokenize_for_experts)
from .models import autocast_context, resolve_dtype, resolve_precision
from .reporting import LiveCurves
from .projection import (input_embedding_matrix, nearest_tokens, neighbour_regularizer, straight_through,
                         vector_distance)
from .selection import random_indices, read_selection, resolve_budget
from .unroll import SyntheticBatch, unroll

#: The distillation's own random streams: its starting samples and its null subsets must not coincide with
#: ``select --method random --seed S``, the baseline they are compared against.
INIT_SEED_OFFSET = 1_000_003
# the fixed confirmation draws of search.confirm_draws (the same number as NULL_SEED_OFFSET, but it seeds another
# generator: a torch.Generator of draws, not the random subsets' indices; kept, so committed runs replay exactly)
CONFIRM_SEED_OFFSET = 2_000_003
DIAGNOSTICS_FILE = "diagnostics.jsonl"
MAX_FAULTS_IN_A_ROW = 3            # consecutive iterations skipped for NaN/inf before the run stops
NULL_SEED_OFFSET = 2_000_003
#: Training draws on which the student lr is line-searched (``student.lr_grid``), and their seed offset.
LR_SEARCH_DRAWS = 4
LR_SEARCH_SEED_OFFSET = 3_000_017

MODES = ("gcg", "straight_through", "continuous")


def _searching(distill: Any, search: Any) -> bool:
    """Whether the token search's confirmation draws act: gcg mode with the confirmation on (``acts`` below)."""
    return getattr(distill, "mode", "gcg") == "gcg" and search.confirm


@dataclass(frozen=True)
class RegularizerSettings:
    """Neighbour penalty of the ``continuous`` mode: ``weight`` x mean distance of each learned vector to its
    nearest token (0 turns it off)."""

    weight: float = option(0.1, "continuous mode: weight of the neighbour penalty (0: off)")
    metric: Literal["cosine", "l2"] = option("cosine", "distance of a vector to its nearest token")
    refresh_every: int = option(1, "iterations between nearest-token lookups (the lookup is the expensive part)")

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"regularizer.weight must be >= 0, got {self.weight}")
        if self.refresh_every <= 0:
            raise ConfigError(f"regularizer.refresh_every must be positive, got {self.refresh_every}")


@dataclass(frozen=True)
class TokenSearchSettings:
    """Greedy coordinate gradient search (``mode: gcg``)."""

    top_k: int = option(32, "candidate tokens per position, by first-order gain")
    candidates: int = option(8, "single-token swaps scored exactly per iteration")
    combine: int = option(4, "the best improving swaps (at most this many) are also tried together")
    confirm: bool = option(True, "keep a proposal only if it also lowers the loss on a second, independent draw")
    confirm_draws: int | None = option(
        6, "K: the proposal must lower the mean loss over K training draws fixed for the whole run (paired: the "
           "same draws judge every proposal, so draw noise cannot accept one; the best mode on the held-out "
           "instrument, results/README section 7.4); null: one fresh draw per proposal (the runs made before it)",
        omit_when=None, acts=lambda *configs: _searching(configs[-2] if len(configs) > 1 else None, configs[-1]))
    fluent_top_k: int | None = option(None, "only tokens among the model's own top-k next tokens there (readable "
                                            "text)")

    def __post_init__(self) -> None:
        for name in ("top_k", "candidates", "combine"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"search.{name} must be positive, got {getattr(self, name)}")
        for name in ("fluent_top_k", "confirm_draws"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"search.{name} must be positive, got {getattr(self, name)}")
        if self.confirm_draws is not None and not self.confirm:
            raise ConfigError("search.confirm_draws sets the draws of the confirmation; it needs search.confirm: "
                              "true")


@dataclass(frozen=True)
class DistillConfig:
    """Options of trajectory matching. The README says which were measured and how."""

    budget: str = option("5%", "synthetic samples: a count or a percentage of the pool, e.g. 113 or 5%")
    mode: Literal["gcg", "straight_through", "continuous"] = option(
        "gcg", "token search (gcg), straight-through projection, or continuous vectors")
    iterations: int = option(100, "outer iterations", resume=False)
    student: StudentSettings = option(factory=StudentSettings, help="how the student follows an expert segment")
    init: Literal["real", "selection", "random"] = option(
        "real", "starting samples: random real rows, a selection file's rows, or random tokens")
    selection: str | None = option(None, "selection file for init=selection")
    prompt_length: int | None = option(None, "null: each sample's own prompt length; else fixed (random init only)")
    freeze_scaffold: bool = option(True, "template scaffolding (\"Question:\", \"\\nAnswer:\") never changes")
    lr_embeddings: float = option(
        1e-3, "continuous: Adam lr of the vectors; straight_through: the Adam step as a fraction of the median "
              "token norm")
    lr_lr: float = option(1e-2, "Adam on log(student lr); 0 keeps the student lr fixed")
    recompute: bool = option(False, "exact constant-memory backward through the unroll")
    checkpoint_layers: bool = option(
        False, "with recompute: differentiate each student step decoder layer by decoder layer (about a tenth of "
               "the memory at 1.8x the time; same meta-gradients up to rounding; results/bench_checkpoint_layers.md)",
        omit_when=False)
    micro_batch: int | None = option(
        None, "with recompute: differentiate each student step this many samples at a time (memory of a step's "
              "graph shrinks with the group; same meta-gradients up to rounding); null: the whole minibatch",
        omit_when=None)
    segments: int | None = option(
        None, "expert segments matched per iteration (the mean of their losses); null: one per process, so that "
              "under torchrun / accelerate launch each rank draws its own (a number is shared out over the ranks)",
        resume=False)
    regularizer: RegularizerSettings = option(factory=RegularizerSettings, help="continuous mode's neighbour penalty")
    search: TokenSearchSettings = option(factory=TokenSearchSettings, help="gcg mode's token search")
    projection_metric: Literal["cosine", "l2"] = option("cosine", "nearest-token projection of vectors",
                                                        resume=False)
    rerank_top_k: int | None = option(None, "continuous/straight_through: re-rank the k nearest tokens by "
                                            "likelihood", resume=False)
    dtype: Literal["fp32", "bf16", "fp64"] = option("fp32", "weights and embeddings")
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "autocast of the meta-gradient (auto: bf16 on CUDA devices with bf16, fp32 on CPUs)")
    instrument: InstrumentConfig = option(factory=InstrumentConfig, help="the held-out instrument", resume=False)
    seed: int = option(0, "seed of the starting samples and the draws")
    checkpoint_every: int = option(10, "iterations between checkpoints (resume points)", resume=False)
    sample_every: int = option(25, "iterations between decoded samples in samples.jsonl", resume=False)
    report_to: tuple[str, ...] = option((), "live curves of the matching loss, lr and accepted swaps: tensorboard "
                                            "(event files in <output>/runs/); metrics.jsonl is always written",
                                        keyed=False, resume=False)

    def __post_init__(self) -> None:
        from .reporting import check_report_to

        check_report_to(self.report_to)
        for name in ("iterations", "checkpoint_every", "sample_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.segments is not None and self.segments <= 0:
            raise ConfigError(f"segments must be positive (or null: one per process), got {self.segments}")
        if self.lr_embeddings <= 0 or self.lr_lr < 0:
            raise ConfigError(f"lr_embeddings must be > 0 and lr_lr >= 0, got {self.lr_embeddings}, {self.lr_lr}")
        if self.init == "selection" and not self.selection:
            raise ConfigError("init=selection needs a selection file (--selection FILE)")
        if self.checkpoint_every % self.regularizer.refresh_every:
            raise ConfigError("regularizer.refresh_every must divide checkpoint_every (so that resuming is exact)")
        if self.prompt_length is not None and self.init != "random":
            raise ConfigError("a fixed prompt_length applies to init=random only (real samples keep their prompts)")
        if self.micro_batch is not None and (self.micro_batch <= 0 or not self.recompute):
            raise ConfigError(f"micro_batch must be a positive number of samples and needs recompute: true "
                              f"(--recompute), got {self.micro_batch} with recompute {self.recompute}")
        if self.checkpoint_layers and not self.recompute:
            raise ConfigError("checkpoint_layers bounds the memory of the recompute mode's one student step; it "
                              "needs recompute: true (--recompute)")
        if self.rerank_top_k is not None and self.mode == "gcg":
            raise ConfigError("rerank_top_k re-ranks a projection; mode gcg has tokens all along (use "
                              "search.fluent_top_k for readable candidates)")


# ----------------------------------------------------------------------------------------------------------------
# The synthetic set
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class SyntheticSet:
    """The learnable synthetic data: S pseudo prompts and their fixed responses.

    ``prompt_embeds`` (S, P_max, H) are the prompt vectors (learned in the continuous modes; the embeddings of
    ``token_ids`` in gcg); ``token_ids`` (S, P_max) the current tokens (-1 on padding); ``learnable`` (S, P_max)
    says which positions may change (not a leading BOS, special token, template scaffolding or padding);
    ``prompt_lengths`` (S,) how many rows each sample uses; ``fixed_prefix`` (S,) how many leading rows are a BOS;
    ``response_ids`` (S, R_max) and ``response_lengths`` (S,) are real tokens, never learned.
    """

    prompt_embeds: torch.nn.Parameter
    token_ids: Tensor
    init_token_ids: Tensor
    learnable: Tensor
    prompt_lengths: Tensor
    fixed_prefix: Tensor
    response_ids: Tensor
    response_lengths: Tensor

    def trainable_mask(self) -> Tensor:
        """(S, P_max, 1) 1.0 on learnable rows, else 0.0 (multiplies gradients)."""
        return self.learnable.unsqueeze(-1).to(self.prompt_embeds.dtype)

    def batch(self, indices: Sequence[int], embeds: Tensor | None = None) -> SyntheticBatch:
        """A student minibatch of the given samples (``embeds`` (S, P_max, H) replaces the prompt vectors)."""
        index = torch.as_tensor(list(indices), dtype=torch.long, device=self.prompt_embeds.device)
        source = self.prompt_embeds if embeds is None else embeds
        return SyntheticBatch(source[index], self.prompt_lengths[index], self.response_ids[index],
                              self.response_lengths[index])

    def prompt_ids(self, sample: int, ids: Tensor | None = None) -> list[int]:
        """Token ids of one sample's prompt (BOS included), from ``ids`` (default: the current tokens)."""
        source = self.token_ids if ids is None else ids
        return source[sample, : int(self.prompt_lengths[sample])].tolist()

    def text_ids(self, sample: int, ids: Tensor | None = None) -> list[int]:
        """The prompt ids a user's text holds (without the leading BOS, which the tokenizer adds back)."""
        return self.prompt_ids(sample, ids)[int(self.fixed_prefix[sample]):]

    def sample_set(self, embed_matrix: Tensor, embeds: Tensor | None = None, ids: Tensor | None = None) -> SampleSet:
        """The samples as the instrument scores them: the given vectors, or the token embeddings of ``ids``
        (default: the current tokens)."""
        ids = self.token_ids if ids is None else ids
        prompts = []
        for i in range(len(self.prompt_lengths)):
            length = int(self.prompt_lengths[i])
            if embeds is None:
                prompts.append(embed_matrix[ids[i, :length]])
            else:
                prompts.append(embeds[i, :length].detach())
        responses = [self.response_ids[i, : int(self.response_lengths[i])] for i in range(len(prompts))]
        return SampleSet(prompts, responses)


def build_synthetic_set(tokenized: Sequence[TokenizedExample], prompts: Sequence[str], embed_matrix: Tensor, *,
                        tokenizer: Any, init: str, prompt_length: int | None, allowed_ids: Tensor,
                        freeze_scaffold: bool, generator: torch.Generator) -> SyntheticSet:
    """Initialise pseudo prompts from the samples' own prompt tokens (``real``/``selection``) or from random
    allowed tokens (``random``). A leading BOS, tokens outside ``allowed_ids`` (special tokens) and, with
    ``freeze_scaffold``, the template scaffolding are never learnable."""
    bos_id = tokenizer.bos_token_id if uses_bos(tokenizer) else None
    rows, masks, responses, prefixes = [], [], [], []
    for example, text in zip(tokenized, prompts):
        ids = list(example.prompt_ids)
        prefix = 1 if bos_id is not None and ids and ids[0] == bos_id else 0
        frozen = scaffold_mask(tokenizer, text, ids) if freeze_scaffold else [False] * len(ids)
        if init == "random":
            length = prompt_length or max(1, len(ids) - prefix)
            pick = torch.randint(len(allowed_ids), (length,), generator=generator)
            ids = ids[:prefix] + allowed_ids[pick].tolist()
            frozen = [True] * prefix + [False] * length
        frozen = [f or k < prefix for k, f in enumerate(frozen)]
        if all(frozen):
            raise ConfigError(f"sample {example.id} has no learnable prompt token (empty prompt, or scaffolding "
                              f"only)")
        rows.append(ids)
        masks.append(frozen)
        prefixes.append(prefix)
        responses.append(list(example.response_ids))
    count, p_max, r_max = len(rows), max(map(len, rows)), max(map(len, responses))
    token_ids = torch.full((count, p_max), -1, dtype=torch.long)
    frozen_mask = torch.ones((count, p_max), dtype=torch.bool)
    response_ids = torch.zeros((count, r_max), dtype=torch.long)
    for i, (p, f, r) in enumerate(zip(rows, masks, responses)):
        token_ids[i, : len(p)] = torch.tensor(p)
        frozen_mask[i, : len(f)] = torch.tensor(f)
        response_ids[i, : len(r)] = torch.tensor(r)
    device = embed_matrix.device
    token_ids = token_ids.to(device)
    special = torch.isin(token_ids, allowed_ids.to(device), invert=True) & (token_ids >= 0)
    learnable = ~frozen_mask.to(device) & ~special & (token_ids >= 0)
    embeds = embed_matrix[token_ids.clamp_min(0)] * (token_ids >= 0).unsqueeze(-1)
    return SyntheticSet(
        prompt_embeds=torch.nn.Parameter(embeds.clone()), token_ids=token_ids.clone(), init_token_ids=token_ids,
        learnable=learnable, prompt_lengths=torch.tensor(list(map(len, rows)), device=device),
        fixed_prefix=torch.tensor(prefixes, device=device), response_ids=response_ids.to(device),
        response_lengths=torch.tensor(list(map(len, responses)), device=device))


# ----------------------------------------------------------------------------------------------------------------
# Token search (pure maths)
# ----------------------------------------------------------------------------------------------------------------

def top_k_swaps(grads: Tensor, current_ids: Tensor, embed_matrix: Tensor, allowed: Tensor, k: int,
                chunk_size: int = 8192) -> tuple[Tensor, Tensor]:
    """Per position, the ``k`` tokens whose swap lowers the loss most to first order.

    ``grads`` (K, H): the meta-gradient at each position's current embedding; ``current_ids`` (K,);
    ``embed_matrix`` (V, H); ``allowed`` (V,) bool. The first-order change of a swap to token v is
    ``g . (e_v - e_current)``. Returns ids (K, k') and gains (K, k'), most negative first (k' = min(k, allowed)),
    never the current token.
    """
    if grads.shape[0] != current_ids.shape[0]:
        raise ValueError(f"{grads.shape[0]} gradients for {current_ids.shape[0]} positions")
    k = min(k, int(allowed.sum()))
    grads = grads.float()
    base = (grads * embed_matrix[current_ids].float()).sum(-1, keepdim=True)       # (K, 1)
    best = torch.full((grads.shape[0], 0), float("inf"), device=grads.device)
    best_ids = torch.zeros((grads.shape[0], 0), dtype=torch.long, device=grads.device)
    for start in range(0, embed_matrix.shape[0], chunk_size):
        rows = embed_matrix[start:start + chunk_size].float()                      # (C, H)
        gains = grads @ rows.T - base                                              # (K, C)
        ids = torch.arange(start, start + rows.shape[0], device=grads.device).expand_as(gains)
        blocked = ~allowed[start:start + rows.shape[0]].unsqueeze(0) | (ids == current_ids.unsqueeze(1))
        gains = gains.masked_fill(blocked, float("inf"))
        merged, order = torch.cat([best, gains], 1).sort(dim=1, stable=True)
        best = merged[:, :k]
        best_ids = torch.cat([best_ids, ids], 1).gather(1, order[:, :k])
    return best_ids, best


@dataclass(frozen=True)
class Swap:
    """Replace the token at (sample, position) by ``token``."""

    sample: int
    position: int
    token: int


def sample_swaps(positions: Tensor, candidate_ids: Tensor, gains: Tensor, count: int,
                 generator: torch.Generator) -> list[Swap]:
    """GCG's candidate batch: ``count`` distinct swaps, each a uniformly drawn position (row of ``positions``
    (K, 2) = (sample, position)) and a uniformly drawn token among that position's candidates (K, k) whose
    first-order gain is finite."""
    swaps: list[Swap] = []
    seen: set[tuple[int, int, int]] = set()
    finite = torch.isfinite(gains)
    usable = finite.any(dim=1).nonzero().flatten()
    if usable.numel() == 0:
        return swaps
    for _ in range(count * 8):
        if len(swaps) == count:
            break
        row = int(usable[int(torch.randint(len(usable), (1,), generator=generator))])
        options = finite[row].nonzero().flatten()
        token = int(candidate_ids[row, int(options[int(torch.randint(len(options), (1,), generator=generator))])])
        key = (int(positions[row, 0]), int(positions[row, 1]), token)
        if key not in seen:
            seen.add(key)
            swaps.append(Swap(*key))
    return swaps


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------

def _optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """Flatten an optimizer's per-parameter state into named tensors (no pickles)."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{prefix}.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def _restore_optimizer(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    state_dict = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)


@dataclass
class _Loop:
    """Mutable state of a distillation run (saved and restored as a whole)."""

    synthetic: SyntheticSet
    log_lr: torch.nn.Parameter
    embed_optimizer: torch.optim.Optimizer
    lr_optimizer: torch.optim.Optimizer
    generator: torch.Generator
    iteration: int = 0
    # search.confirm_draws: the current set's (loss, parameter snapshots) on each fixed confirmation draw at the
    # student lr of the key; a cache, emptied whenever a swap is accepted (never saved: recomputed after a resume)
    confirm_bases: dict[tuple[int, float], tuple[float, list[dict[str, Tensor]]]] = field(default_factory=dict)


def _save_checkpoint(run_dir: Path, loop: _Loop, fingerprint: str) -> None:
    tensors = {"prompt_embeds": loop.synthetic.prompt_embeds.detach(), "token_ids": loop.synthetic.token_ids,
               "log_lr": loop.log_lr.detach(), "rng": loop.generator.get_state()}
    tensors.update(_optimizer_tensors("embed_opt", loop.embed_optimizer))
    tensors.update(_optimizer_tensors("lr_opt", loop.lr_optimizer))
    # the iteration travels inside the tensor file, so the two can never disagree after a crash
    save_tensors(run_dir / "state.safetensors", tensors,
                 metadata={"iteration": str(loop.iteration), "fingerprint": fingerprint})
    atomic_write_json(run_dir / "state.json", {"iteration": loop.iteration, "fingerprint": fingerprint})


def _load_checkpoint(run_dir: Path, loop: _Loop, fingerprints: Sequence[str]) -> None:
    from safetensors import safe_open

    tensors = load_tensors(run_dir / "state.safetensors")   # DataError naming the file when it is damaged
    with safe_open(str(run_dir / "state.safetensors"), framework="pt") as handle:
        meta = handle.metadata() or {}
    if meta.get("fingerprint") not in fingerprints:
        raise ConfigError(f"--resume: the run in {run_dir} was made with other settings or samples (seed, budget, "
                          f"mode, init, selection, learning rates, student, search, segments: by default one per "
                          f"process); only 'iterations' and logging options may change on resume")
    if tensors["prompt_embeds"].shape != loop.synthetic.prompt_embeds.shape:
        raise ConfigError(f"the checkpoint in {run_dir} has embeddings of shape "
                          f"{tuple(tensors['prompt_embeds'].shape)}, this run expects "
                          f"{tuple(loop.synthetic.prompt_embeds.shape)} (another budget or data?)")
    with torch.no_grad():
        loop.synthetic.prompt_embeds.copy_(tensors["prompt_embeds"])
        loop.synthetic.token_ids.copy_(tensors["token_ids"])
        loop.log_lr.copy_(tensors["log_lr"])
    loop.generator.set_state(tensors["rng"])
    _restore_optimizer("embed_opt", loop.embed_optimizer, tensors)
    _restore_optimizer("lr_opt", loop.lr_optimizer, tensors)
    loop.iteration = int(meta["iteration"])


def _special_ids(tokenizer: Any, vocab_size: int) -> list[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, tok in added.items() if getattr(tok, "special", False))
    return sorted(i for i in ids if 0 <= i < vocab_size)


# ----------------------------------------------------------------------------------------------------------------
# One iteration of each mode
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class _Context:
    """What every iteration needs and never changes during a run."""

    model: Any
    tokenizer: Any
    config: DistillConfig
    scorer: Scorer
    embed_matrix: Tensor            # (V, H) in the space prompts are fed in (fp32 or wider)
    allowed: Tensor                 # (V,) bool: tokens a prompt position may take
    special: list[int]
    train_experts: list[int]
    autocast: Any
    segments: int = 1               # expert segments per iteration, over all ranks
    confirm_draws: list[Draw] = field(default_factory=list)   # search.confirm_draws fixed training draws


def _draw(context: _Context, count: int, generator: torch.Generator, include: Sequence[int] = ()) -> Draw:
    """A training draw: (expert, start, minibatches) from the experts distillation may use. Samples in
    ``include`` that the draw left out replace a random member of a random minibatch (a swap is confirmed on a
    draw that uses it)."""
    student = context.scorer.student
    experts = context.train_experts
    expert = experts[int(torch.randint(len(experts), (1,), generator=generator))]
    start = int(torch.randint(student.min_start, student.max_start + 1, (1,), generator=generator))
    batches = sample_minibatches(count, student.batch_size, student.steps, generator)
    for sample in dict.fromkeys(include):
        if any(sample in b for b in batches):
            continue
        while True:   # a slot that holds none of the samples to include
            step = int(torch.randint(len(batches), (1,), generator=generator))
            slot = int(torch.randint(len(batches[step]), (1,), generator=generator))
            if batches[step][slot] not in include or len(include) >= count:
                break
        batches[step][slot] = sample
    return Draw(expert, start, tuple(tuple(b) for b in batches))


def _draws(context: _Context, count: int, generator: torch.Generator) -> list[Draw]:
    """The iteration's training draws, one per segment. Every rank makes all of them from the same generator (so
    all agree on them and on the generator's state) and later works on its share (:func:`distributed.shard_indices`)."""
    return [_draw(context, count, generator) for _ in range(context.segments)]


def _sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Each value summed over the ranks (float64); the values themselves on one process."""
    if distributed.world_size() == 1:
        return list(values)
    return distributed.all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def _reduce_grads(*params: Tensor) -> None:
    """Sum the gradients of ``params`` over the ranks (a rank that used no segment contributes zeros), so that
    every rank takes the same optimizer step."""
    if distributed.world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        distributed.all_reduce_sum(p.grad)


def _segments_record(draws: Sequence[Draw]) -> dict[str, Any]:
    """The draws' experts and starts for metrics.jsonl (the first one's as before; all of them when several)."""
    record: dict[str, Any] = {"expert": draws[0].expert, "start": draws[0].start}
    if len(draws) > 1:
        record["segments"] = [[d.expert, d.start] for d in draws]
    return record


def _meta_loss(context: _Context, synthetic: SyntheticSet, prompts: Tensor, draw: Draw, lr: Tensor) -> Tensor:
    """The objective of a draw (the matching loss, or the objective rows' relative loss), differentiable w.r.t.
    ``prompts`` (S, P_max, H) and ``lr`` (through every student step). The objective itself is computed as the
    scorer computes it (no autocast), so that a meta-loss and a candidate's score measure the same thing."""
    start, _ = context.scorer.endpoints(draw)
    batches = [synthetic.batch(b, prompts) for b in draw.batches]
    with context.autocast:
        student = unroll(context.model, start, batches, lr, recompute=context.config.recompute,
                         checkpoint_layers=context.config.checkpoint_layers, micro_batch=context.config.micro_batch)
    with torch.autocast(device_type=context.scorer.device.type, enabled=False):
        return context.scorer.objective_loss(student, draw)


def _finite(*values: Tensor | None) -> bool:
    """Whether every given tensor (None: absent, fine) holds only finite numbers."""
    return all(v is None or bool(torch.isfinite(v).all()) for v in values)


def _fault(reason: str, draws: Sequence[Draw], lr: Tensor) -> dict[str, Any]:
    """The record of an iteration skipped for a numerical fault: nothing was changed by it (``matching_loss`` is
    None, so that metrics.jsonl stays strict JSON)."""
    return {"matching_loss": None, "lr": lr.item(), **_segments_record(draws), "fault": reason, "accepted": False}


def _accumulate_meta_gradient(context: _Context, synthetic: SyntheticSet, draws: Sequence[Draw], log_lr: Tensor,
                              prompt_leaf: Tensor, prompts_of: Any, extra_loss: Any = None,
                              what: str = "distillation loss") -> tuple[float, str | None]:
    """Backward of the mean matching loss over ``draws``, this rank's share of them, one segment at a time (one
    unroll graph alive at once); ``prompts_of()`` rebuilds the (S, P_max, H) prompts fed in (their graph is freed
    by each backward) from ``prompt_leaf`` and ``extra_loss(prompts)`` (the regularizer) is added once, on rank 0.
    The gradients of ``prompt_leaf`` and ``log_lr`` are then summed over the ranks. Returns the mean matching loss
    over all draws and a fault reason (the same on every rank), or None."""
    share = distributed.shard_indices(len(draws))
    match_sum, fault = 0.0, None
    for j, d in enumerate(share):
        lr = log_lr.exp()
        prompts = prompts_of()
        match = _meta_loss(context, synthetic, prompts, draws[d], lr)
        loss = match / len(draws)
        if j == 0 and extra_loss is not None:
            loss = loss + extra_loss(prompts)
        if not _finite(loss):
            fault = f"non-finite {what} ({loss.item()})"
            break
        loss.backward()
        match_sum += match.item()
    match_total, faults = _sum_over_ranks([match_sum, float(fault is not None)])
    if faults and fault is None:
        fault = f"non-finite {what} on another rank"
    _reduce_grads(prompt_leaf, log_lr)
    return match_total / len(draws), fault


def _gradient_iteration(context: _Context, loop: _Loop, iteration: int, nearest: dict[str, Tensor]) -> dict[str, Any]:
    """One Adam step of the continuous or straight-through modes (on the mean loss of the iteration's segments)."""
    config, synthetic = context.config, loop.synthetic
    draws = _draws(context, len(synthetic.prompt_lengths), loop.generator)
    reg = config.regularizer
    if "ids" not in nearest or (iteration - 1) % reg.refresh_every == 0:
        nearest["ids"], nearest["distances"] = nearest_tokens(synthetic.prompt_embeds.detach(), context.embed_matrix,
                                                              metric=reg.metric, exclude_ids=context.special)
    learnable = synthetic.learnable
    # positions that never learn keep their token (a frozen row's nearest token is itself unless rows coincide)
    nearest_ids = torch.where(learnable, nearest["ids"], synthetic.init_token_ids.clamp_min(0))

    def prompts_of() -> Tensor:   # (S, P_max, H), rebuilt for every segment's backward
        prompts = synthetic.prompt_embeds
        if config.mode == "straight_through":
            prompts = torch.where(learnable.unsqueeze(-1),
                                  straight_through(prompts, context.embed_matrix, nearest_ids), prompts)
        return prompts

    reg_value = torch.zeros((), dtype=synthetic.prompt_embeds.dtype)

    def regularizer(prompts: Tensor) -> Tensor:
        nonlocal reg_value
        reg_value = neighbour_regularizer(prompts[learnable], context.embed_matrix, metric=reg.metric,
                                          nearest_ids=nearest_ids[learnable])
        return reg.weight * reg_value

    use_regularizer = config.mode == "continuous" and reg.weight > 0 and distributed.is_main()
    loop.embed_optimizer.zero_grad(set_to_none=True)
    loop.lr_optimizer.zero_grad(set_to_none=True)
    match, fault = _accumulate_meta_gradient(context, synthetic, draws, loop.log_lr, synthetic.prompt_embeds,
                                             prompts_of, regularizer if use_regularizer else None)
    lr = loop.log_lr.exp()
    if fault is None and not _finite(synthetic.prompt_embeds.grad, loop.log_lr.grad):
        fault = "non-finite meta-gradient"   # a finite loss can still have NaN gradients
    if fault is not None:
        loop.embed_optimizer.zero_grad(set_to_none=True)
        loop.lr_optimizer.zero_grad(set_to_none=True)
        return _fault(fault, draws, lr)
    with torch.no_grad():
        synthetic.prompt_embeds.grad.mul_(synthetic.trainable_mask())   # BOS, scaffolding and padding stay fixed
    loop.embed_optimizer.step()
    if config.lr_lr > 0:
        loop.lr_optimizer.step()
    synthetic.token_ids.copy_(torch.where(synthetic.init_token_ids >= 0, nearest_ids, synthetic.init_token_ids))
    # the regularizer is computed on rank 0 only; its value is shared for the record
    reg_shown = _sum_over_ranks([reg_value.item()])[0]
    return {"matching_loss": match, "regularizer": reg_shown, "lr": lr.item(), **_segments_record(draws),
            "nearest_distance": float(nearest["distances"][learnable].mean())}


def _retokenizes(tokenizer: Any, ids: list[int]) -> bool:
    """Whether the text of these prompt ids reads back as exactly these ids."""
    return list(tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"]) == ids


def _fluent_allowed(context: _Context, synthetic: SyntheticSet, samples: Sequence[int], k: int) -> dict[int, Tensor]:
    """Per sample, (P, k) ids of the model's own top-k next tokens at each prompt position (given the tokens before
    it), for readable candidates."""
    base = context.model.get_base_model() if hasattr(context.model, "get_base_model") else context.model
    out = {}
    with torch.no_grad(), torch.autocast(device_type=context.embed_matrix.device.type, enabled=False):
        for s in samples:
            ids = torch.tensor([synthetic.prompt_ids(s)], device=context.embed_matrix.device)
            logits = base(input_ids=ids, use_cache=False).logits[0]                 # (P, V): position p predicts p+1
            topk = logits.topk(min(k, logits.shape[-1]), dim=-1).indices            # (P, k)
            # the candidates of position p come from the prediction at p - 1; position 0 has none
            out[s] = torch.cat([torch.full_like(topk[:1], -1), topk[:-1]])
    return out


def _gcg_iteration(context: _Context, loop: _Loop, iteration: int) -> dict[str, Any]:
    """One greedy-coordinate-gradient step: rank swaps by the meta-gradient, score a batch of them exactly on the
    same draw, and keep the best proposal (the best swap, or the improving swaps together when that is better)
    if it lowers the loss there and on a second draw."""
    config, synthetic, search = context.config, loop.synthetic, context.config.search
    count = len(synthetic.prompt_lengths)
    draws = _draws(context, count, loop.generator)
    # meta-gradient at the exact token embeddings: (S, P_max, H), zero on padding
    ids = synthetic.token_ids
    exact = (context.embed_matrix[ids.clamp_min(0)] * (ids >= 0).unsqueeze(-1)).detach().requires_grad_(True)
    loop.lr_optimizer.zero_grad(set_to_none=True)
    match, fault = _accumulate_meta_gradient(context, synthetic, draws, loop.log_lr, exact, lambda: exact,
                                             what="matching loss")
    lr = loop.log_lr.exp()
    if fault is None and not _finite(exact.grad, loop.log_lr.grad):
        fault = "non-finite meta-gradient"
    if fault is not None:
        loop.lr_optimizer.zero_grad(set_to_none=True)
        return _fault(fault, draws, lr)
    if config.lr_lr > 0:
        loop.lr_optimizer.step()
    grads = exact.grad.detach()
    # eligible positions: learnable, in a sample some draw uses: (K, 2) = (sample, position)
    used = sorted({i for draw in draws for b in draw.batches for i in b})
    in_draw = torch.zeros(count, dtype=torch.bool, device=grads.device)
    in_draw[used] = True
    positions = (synthetic.learnable & in_draw.unsqueeze(1)).nonzero()
    record: dict[str, Any] = {"matching_loss": match, "lr": lr.item(), **_segments_record(draws), "accepted": False}
    if positions.numel() == 0:
        return record
    current = synthetic.token_ids[positions[:, 0], positions[:, 1]]
    allowed = context.allowed
    candidate_ids, gains = top_k_swaps(grads[positions[:, 0], positions[:, 1]], current, context.embed_matrix,
                                       allowed, search.top_k)
    if search.fluent_top_k:
        fluent = _fluent_allowed(context, synthetic, used, search.fluent_top_k)
        keep = torch.stack([torch.isin(candidate_ids[r], fluent[int(s)][int(p)])
                            for r, (s, p) in enumerate(positions.tolist())])
        gains = gains.masked_fill(~keep, float("inf"))
    # candidate prompts that read back as themselves (the text a user loads is what is scored)
    swaps = []
    for swap in sample_swaps(positions, candidate_ids, gains, search.candidates * 2, loop.generator):
        ids = synthetic.token_ids.clone()
        ids[swap.sample, swap.position] = swap.token
        if _retokenizes(context.tokenizer, synthetic.text_ids(swap.sample, ids)):
            swaps.append(swap)
        if len(swaps) == search.candidates:
            break
    # every rank built the same list from the same summed gradient; rank 0's makes sure (a GPU kernel that rounds
    # otherwise would change the size of the collectives below and hang the ranks)
    swaps = distributed.broadcast_object(swaps)
    record["candidates"] = len(swaps)
    if not swaps:
        return record
    step_lr = float(lr.detach())
    bases: dict[int, tuple[float, list[dict[str, Tensor]]]] = {}   # this rank's draws' unrolls of the current set
    base_loss, losses = _score_on_draws(context, synthetic, draws, [[swap] for swap in swaps], step_lr, bases)
    if not math.isfinite(base_loss):
        return {**record, **_fault(f"non-finite loss of the current set ({base_loss})", draws, lr)}
    losses = [loss if math.isfinite(loss) else math.inf for loss in losses]   # a diverged candidate never wins
    record["current_loss"] = base_loss
    ranked = sorted(zip(losses, range(len(swaps))))
    record["best_candidate_loss"] = ranked[0][0]
    improving = [swaps[i] for loss, i in ranked if loss < base_loss]
    if not improving:
        return record
    proposal, proposal_loss = [improving[0]], ranked[0][0]
    # the improving swaps of distinct positions together: kept when they beat the best single swap
    combined = list({(w.sample, w.position): w for w in reversed(improving[:search.combine])}.values())
    if len(combined) > 1:
        _, (together,) = _score_on_draws(context, synthetic, draws, [combined], step_lr, bases)
        record["combined_loss"] = together if math.isfinite(together) else None
        if together < proposal_loss:   # False for NaN
            proposal, proposal_loss = combined, together
    record["proposal_loss"] = proposal_loss
    if search.confirm:
        if context.confirm_draws:
            confirm_base, confirm_loss = _score_on_fixed_draws(context, loop, proposal, step_lr)
        else:
            second = _draw(context, count, loop.generator, include=[w.sample for w in proposal])
            confirm_base, (confirm_loss,) = _score_on_draws(context, synthetic, [second], [proposal], step_lr, {})
        if not math.isfinite(confirm_base):
            return {**record, **_fault("non-finite loss on the confirmation draws", draws, lr)}
        # a candidate that diverges there is rejected, as before, not counted as a fault (None keeps strict JSON)
        record.update({"confirm_current_loss": confirm_base,
                       "confirm_candidate_loss": confirm_loss if math.isfinite(confirm_loss) else None})
        if not confirm_loss < confirm_base:
            return record
    loop.confirm_bases.clear()   # the set changes: its losses on the fixed draws are stale
    record.update({"accepted": True, "swaps": []})
    for swap in proposal:
        old = int(synthetic.token_ids[swap.sample, swap.position])
        synthetic.token_ids[swap.sample, swap.position] = swap.token
        with torch.no_grad():
            synthetic.prompt_embeds[swap.sample, swap.position] = context.embed_matrix[swap.token]
        record["swaps"].append({"sample": swap.sample, "position": swap.position,
                                "from": context.tokenizer.decode([old]),
                                "to": context.tokenizer.decode([swap.token])})
    return record


def _score_on_fixed_draws(context: _Context, loop: _Loop, proposal: Sequence[Swap], lr: float) -> tuple[float, float]:
    """Mean matching loss of the current set and of ``proposal`` over the fixed confirmation draws (the current
    set's unrolls are cached in ``loop.confirm_bases`` until the set or the lr changes)."""
    if any(key[1] != lr for key in loop.confirm_bases):   # a learned lr moved: the cached unrolls are stale
        loop.confirm_bases.clear()
    bases = {index: base for (index, _), base in loop.confirm_bases.items()}
    current, (candidate,) = _score_on_draws(context, loop.synthetic, context.confirm_draws, [proposal], lr, bases,
                                            unused_is_current=True)
    loop.confirm_bases = {(index, lr): base for index, base in bases.items()}
    return current, candidate


def _score_on_draws(context: _Context, synthetic: SyntheticSet, draws: Sequence[Draw],
                    proposals: Sequence[Sequence[Swap]], lr: float,
                    bases: dict[int, tuple[float, list[dict[str, Tensor]]]], *,
                    unused_is_current: bool = False) -> tuple[float, list[float]]:
    """Mean matching loss over ``draws`` of the current set and of each proposal; each rank scores its share of
    the draws and the sums are added over the ranks. On a draw that uses none of a proposal's samples the proposal
    scores as the current set (the swap changes nothing there); a proposal no draw uses scores inf (or as the
    current set, with ``unused_is_current``), and so does one whose loss is not finite. ``bases`` (draw index ->
    the current set's unroll on it) is read and filled."""
    base_sum, sums, uses = 0.0, [0.0] * len(proposals), [0.0] * len(proposals)
    for d in distributed.shard_indices(len(draws)):
        draw = draws[d]
        base_loss, losses, bases[d] = _score_proposals(context, synthetic, draw, proposals, lr, base=bases.get(d))
        base_sum += base_loss
        for i, (proposal, loss) in enumerate(zip(proposals, losses)):
            if any(draw.first_use(w.sample) is not None for w in proposal):
                sums[i] += loss
                uses[i] += 1
            else:
                sums[i] += base_loss
    totals = _sum_over_ranks([base_sum, *sums, *uses])
    n, k = len(draws), len(proposals)
    means = [totals[1 + i] / n if totals[1 + k + i] > 0 or unused_is_current else math.inf for i in range(k)]
    return totals[0] / n, [m if math.isfinite(m) else math.inf for m in means]


def _score_proposals(context: _Context, synthetic: SyntheticSet, draw: Draw, proposals: Sequence[Sequence[Swap]],
                     lr: float, base: tuple[float, list[dict[str, Tensor]]] | None = None,
                     ) -> tuple[float, list[float], tuple[float, list[dict[str, Tensor]]]]:
    """The matching loss on ``draw`` of the current set and of each proposal (a list of single-token swaps applied
    together). A proposal changes nothing before the first minibatch that holds one of its samples, so its unroll
    continues from the current set's parameters there. A proposal whose samples the draw never uses scores inf.

    Returns the current set's loss, the proposals' losses, and ``base`` = (that loss, the current set's parameters
    before each step), which a later call on the same draw and set takes instead of unrolling again."""
    samples = synthetic.sample_set(context.embed_matrix)
    scorer = context.scorer
    if base is None:
        final, snapshots = scorer.unroll(samples, draw, lr=lr, keep_snapshots=True)
        base = (scorer.loss_of(final, draw), snapshots)
    base_loss, snapshots = base
    losses = []
    for proposal in proposals:
        uses = [step for step in (draw.first_use(w.sample) for w in proposal) if step is not None]
        if not uses:
            losses.append(float("inf"))
            continue
        step = min(uses)
        changed = SampleSet(list(samples.prompts), samples.responses)
        for swap in proposal:
            prompt = changed.prompts[swap.sample].clone()
            prompt[swap.position] = context.embed_matrix[swap.token]
            changed.prompts[swap.sample] = prompt
        params, _ = scorer.unroll(changed, draw, lr=lr, from_step=step, from_params=snapshots[step])
        losses.append(scorer.loss_of(params, draw))
    return base_loss, losses, base


# ----------------------------------------------------------------------------------------------------------------
# Entry
# ----------------------------------------------------------------------------------------------------------------

def distill(*, experts: str | Path, output: str | Path, config: DistillConfig, resume: bool = False,
            compare: Mapping[str, str | Path] | None = None, device: str = "auto", progress: bool = True,
            trust_remote_code: bool = False) -> dict[str, Any]:
    """Entry of ``textdistill distill``: learn the synthetic set against the expert trajectories in ``experts``,
    write it as text, score it on the held-out instrument and write the run folder (see the module docstring).

    ``compare`` names selection files (e.g. ``{"less": path}``) whose rows are scored on the same held-out draws.
    Returns the summary dict.

    Under ``torchrun`` / ``accelerate launch`` every rank runs this with the same arguments: the ranks share out
    each iteration's segments (``config.segments``, by default one per rank) and sum their meta-gradients and
    candidate losses, so all hold the same synthetic set; rank 0 alone writes the run folder (which every rank must
    be able to read, for ``resume``), scores the held-out instrument and returns the summary; the others return
    ``{"rank": r}``.
    """
    with distributed.main_process_owns(Path(output) / ".lock", f"the distillation run {output}", device) as device:
        return _distill(experts=experts, output=output, config=config, resume=resume, compare=compare, device=device,
                        progress=progress, trust_remote_code=trust_remote_code)


@dataclass
class _Run:
    """One distillation run as its three steps share it (:func:`_prepare`, :func:`_search`, :func:`_finish`)."""

    experts: Path
    output: Path
    config: DistillConfig
    resume: bool
    main: bool                 # this process writes the run folder (rank 0, or the only one)
    progress: bool
    trajectories: Any
    student: Any               # the resolved student (its lr after the line search)
    train_experts: list[int]
    heldout_experts: list[int]
    tokenizer: Any
    examples: list[Example]    # the pool as text
    pool: list[Any]            # the pool tokenized as the experts saw it
    chosen: list[int]          # the starting samples' pool rows
    embed_matrix: Tensor       # (V, H)
    synthetic: SyntheticSet
    loop: _Loop
    context: _Context
    scorer: Scorer
    lr_search: dict[str, Any] | None
    fingerprint: str           # of everything a resumed run must share with the run it continues
    precision: str

    @property
    def manifest(self) -> dict[str, Any]:
        return self.trajectories.manifest


def _distill(*, experts: str | Path, output: str | Path, config: DistillConfig, resume: bool = False,
             compare: Mapping[str, str | Path] | None = None, device: str = "auto", progress: bool = True,
             trust_remote_code: bool = False) -> dict[str, Any]:
    """The run in three steps: prepare (the model, the starting samples, the checkpoint to resume), search
    (the outer iterations), finish (the text, the held-out instrument, the summary)."""
    run = _prepare(experts=experts, output=output, config=config, resume=resume, device=device, progress=progress,
                   trust_remote_code=trust_remote_code)
    if isinstance(run, dict):   # a finished run: its summary
        return run
    metrics, distill_seconds = _search(run)
    return _finish(run, metrics, distill_seconds, compare)


def _prepare(*, experts: str | Path, output: str | Path, config: DistillConfig, resume: bool, device: str,
             progress: bool, trust_remote_code: bool) -> _Run | dict[str, Any]:
    """Load the experts and the student model, choose the starting samples, search the student lr, and resume
    the checkpoint or start the run folder (rank 0)."""
    from .experts import load_experts

    output = Path(output)
    trajectories = load_experts(experts)
    manifest = trajectories.manifest
    if output.exists() and (output / "state.json").is_file() and not resume:
        raise ConfigError(f"{output} already holds a distillation run; pass --resume to continue it or choose "
                          f"another --output")
    if resume and not (output / "state.json").is_file():
        raise ConfigError(f"--resume: no checkpoint in {output}")
    if (resume and (output / "summary.json").is_file()
            and read_json(output / "state.json")["iteration"] >= config.iterations):
        warnings.warn(f"{output} holds a finished distillation of {config.iterations} iterations; nothing to "
                      f"resume (raise 'iterations' to continue its search)", stacklevel=3)
        return read_json(output / "summary.json")
    main = distributed.is_main()
    progress = progress and main
    student = resolve_student(config.student, trajectories)
    train_experts, heldout_experts = trajectories.split(config.instrument.heldout_experts)
    dtype = resolve_dtype(config.dtype)
    model, tokenizer = load_student_model(trajectories, device=device, dtype=config.dtype,
                                          trust_remote_code=trust_remote_code)
    examples, pool = load_expert_pool(tokenizer, manifest)
    count = resolve_budget(config.budget, len(examples))
    if config.init == "selection":
        from .selection import apply_selection

        apply_selection(examples, config.selection)  # reads the file and checks that its ids belong to this pool
        chosen = read_selection(config.selection)["indices"][:count]
        if len(chosen) < count:
            raise ConfigError(f"selection {config.selection} lists {len(chosen)} rows, the budget is {count}")
    else:
        chosen = random_indices(len(examples), count, config.seed + INIT_SEED_OFFSET)

    # (V, H) in the space prompts are fed in; prompts are kept in at least fp32 for Adam
    embed_matrix = input_embedding_matrix(model).to(torch.promote_types(dtype, torch.float32))
    vocab = embed_matrix.shape[0]
    special = _special_ids(tokenizer, vocab)
    allowed_ids = torch.tensor(stable_token_ids(tokenizer, vocab, exclude=special))
    allowed = torch.zeros(vocab, dtype=torch.bool, device=embed_matrix.device)
    allowed[allowed_ids.to(embed_matrix.device)] = True
    generator = torch.Generator().manual_seed(config.seed)
    synthetic = build_synthetic_set([pool[i] for i in chosen], [examples[i].prompt for i in chosen], embed_matrix,
                                    tokenizer=tokenizer, init=config.init, prompt_length=config.prompt_length,
                                    allowed_ids=allowed_ids, freeze_scaffold=config.freeze_scaffold,
                                    generator=generator)
    # the learnable lr always lives in fp32 (in bf16, Adam's small steps on log(lr) round away)
    log_lr = torch.nn.Parameter(torch.tensor(math.log(student.lr), dtype=torch.promote_types(dtype, torch.float32),
                                             device=embed_matrix.device))
    embed_lr = config.lr_embeddings
    if config.mode == "straight_through":   # a fraction of the typical token norm per Adam step (per row, in L2)
        embed_lr *= float(embed_matrix[allowed].norm(dim=-1).median()) / math.sqrt(embed_matrix.shape[1])
    loop = _Loop(synthetic=synthetic, log_lr=log_lr,
                 embed_optimizer=torch.optim.Adam([synthetic.prompt_embeds], lr=embed_lr),
                 lr_optimizer=torch.optim.Adam([log_lr], lr=config.lr_lr), generator=generator)
    precision = resolve_precision(config.precision, embed_matrix.device)
    # the student's LoRA tensors stay fp32 master copies over a bf16 base: in bf16 an SGD step of relative size
    # 1e-3 would mostly round away (8 bits of mantissa); peft runs an fp32 adapter on a bf16 layer's input
    targets = resolve_targets(config.student.targets, trajectories, student, train_experts + heldout_experts)
    scorer = Scorer(model, trajectories, student, device=embed_matrix.device,
                    dtype=torch.promote_types(dtype, torch.float32), targets=targets,
                    rows=load_objective_rows(config.student, tokenizer, manifest, embed_matrix))
    lr_search = None
    if config.student.lr_grid:
        if resume and (output / "init.json").is_file():   # the search was made when the run started
            lr_search = read_json(output / "init.json")["lr_search"]
        else:
            lr_search = search_lr(scorer, synthetic.sample_set(embed_matrix), train_experts, config.student.lr_grid,
                                  draws=LR_SEARCH_DRAWS, seed=config.seed, progress=progress)
        student = dataclasses.replace(student, lr=lr_search["lr"])
        scorer.student = student
        with torch.no_grad():
            log_lr.fill_(math.log(student.lr))
    context = _Context(model=model, tokenizer=tokenizer, config=config, scorer=scorer, embed_matrix=embed_matrix,
                       allowed=allowed, special=special, train_experts=train_experts,
                       autocast=autocast_context(precision, embed_matrix.device),
                       segments=config.segments or distributed.world_size())
    if config.mode == "gcg" and config.search.confirm_draws:
        # from their own generator, so that they are the same on resume and do not shift the search's draws
        fixed = torch.Generator().manual_seed(config.seed + CONFIRM_SEED_OFFSET)
        context.confirm_draws = [_draw(context, count, fixed) for _ in range(config.search.confirm_draws)]
    if main:
        output.mkdir(parents=True, exist_ok=True)
    settings = resume_settings(config)
    identity = {"chosen": chosen, "experts": manifest.get("experts"), "pool": manifest["pool_sha256"],
                "precision": precision}
    if context.segments != 1:   # how many segments, not how they are shared out over ranks (runs of one resume)
        identity["segments"] = context.segments
    if scorer.dtype != dtype:   # a half-precision base with the student's LoRA in fp32 (runs before it had it in bf16)
        identity["student_lora_dtype"] = str(scorer.dtype)
    # runs checkpointed before the selection's path left the fingerprint resume when given the same path
    legacy_fingerprint = sha256_json({"config": settings, **identity})
    # the selection's rows are fingerprinted ("chosen"), not how its path was written (relative, absolute, moved)
    settings.pop("selection")
    fingerprint = sha256_json({"config": settings, **identity})
    if resume:
        _load_checkpoint(output, loop, (fingerprint, legacy_fingerprint))
    elif main:
        write_run_info(output, command="distill", config=config, seeds={"seed": config.seed},
                       extra={"experts": str(experts), "model": manifest["model"]["name"], "budget_count": count,
                              "pool_size": len(examples), "precision": precision,
                              "student": dataclasses.asdict(student), "train_experts": train_experts,
                              "heldout_experts": heldout_experts, "segments": context.segments,
                              "world_size": distributed.world_size()})
        atomic_write_json(output / "init.json", {"indices": chosen, "ids": [examples[i].id for i in chosen],
                                                 "init": config.init, "lr_search": lr_search})
        write_jsonl(output / "metrics.jsonl", [])
        write_jsonl(output / "samples.jsonl", [])
    return _Run(experts=Path(experts), output=output, config=config, resume=resume, main=main, progress=progress,
                trajectories=trajectories, student=student, train_experts=train_experts,
                heldout_experts=heldout_experts, tokenizer=tokenizer, examples=examples, pool=pool, chosen=chosen,
                embed_matrix=embed_matrix, synthetic=synthetic, loop=loop, context=context, scorer=scorer,
                lr_search=lr_search, fingerprint=fingerprint, precision=precision)


def _search(run: _Run) -> tuple[list[dict[str, Any]], float]:
    """The outer iterations from where the run stands; checkpoints every ``checkpoint_every``. Returns the metrics
    of every iteration and the search's seconds (a resumed run's included)."""
    config, output, loop, context, synthetic = run.config, run.output, run.loop, run.context, run.synthetic
    main, resume, count = run.main, run.resume, len(run.chosen)
    metrics = _read_jsonl(output / "metrics.jsonl", loop.iteration) if resume or main else []
    samples = _read_jsonl(output / "samples.jsonl", loop.iteration) if resume or main else []
    learnable_count = int(synthetic.learnable.sum())
    nearest: dict[str, Tensor] = {}
    # seconds count on from a resumed run's last record, so that distill_seconds is the search's whole time
    start_time = time.time() - (metrics[-1]["seconds"] if metrics else 0.0)
    bar = tqdm(total=config.iterations, initial=loop.iteration, desc=f"distill ({config.mode})",
               disable=not run.progress, dynamic_ncols=True)
    curves = LiveCurves(config.report_to, output, active=main)
    faults_in_a_row = 0
    try:
        while loop.iteration < config.iterations:
            iteration = loop.iteration + 1
            if config.mode == "gcg":
                record = _gcg_iteration(context, loop, iteration)
            else:
                record = _gradient_iteration(context, loop, iteration, nearest)
            # a faulty iteration changed nothing and is logged; only a run of them stops the distillation
            faults_in_a_row = faults_in_a_row + 1 if "fault" in record else 0
            if faults_in_a_row >= MAX_FAULTS_IN_A_ROW:
                metrics.append({"iteration": iteration, **record})
                last = int(read_json(output / "state.json")["iteration"]) if (output / "state.json").is_file() else 0
                raise TrainingError(f"{MAX_FAULTS_IN_A_ROW} iterations in a row ended in a numerical fault (last: "
                                    f"{record['fault']} at iteration {iteration}); the checkpoint of iteration "
                                    f"{last} is intact: lower the student lr, lr_lr or lr_embeddings and --resume")
            if "fault" in record:
                warnings.warn(f"distill iteration {iteration} skipped: {record['fault']}", stacklevel=2)
            loop.iteration = iteration
            changed = int(((synthetic.token_ids != synthetic.init_token_ids) & synthetic.learnable).sum())
            record = {"iteration": iteration, **record, "tokens_changed_fraction": changed / learnable_count,
                      "seconds": round(time.time() - start_time, 2)}
            metrics.append(record)
            curves.log(iteration, {f"distill/{k}": v for k, v in record.items() if k != "iteration"})
            shown = math.nan if record["matching_loss"] is None else record["matching_loss"]
            bar.set_postfix(match=f"{shown:.4f}", lr=f"{record['lr']:.2e}",
                            changed=f"{record['tokens_changed_fraction']:.3f}")
            bar.update(1)
            if iteration % config.sample_every == 0 or iteration == config.iterations:
                samples.append({"iteration": iteration, "prompts": [
                    run.tokenizer.decode(synthetic.text_ids(i)) for i in range(min(3, count))]})
            if main and (iteration % config.checkpoint_every == 0 or iteration == config.iterations):
                write_jsonl(output / "metrics.jsonl", metrics)
                write_jsonl(output / "samples.jsonl", samples)
                _save_checkpoint(output, loop, run.fingerprint)
    except TrainingError:
        if main:
            write_jsonl(output / "metrics.jsonl", metrics)
            write_jsonl(output / "samples.jsonl", samples)
        raise
    finally:
        bar.close()
        curves.close()
    return metrics, time.time() - start_time


def _finish(run: _Run, metrics: list[dict[str, Any]], distill_seconds: float,
            compare: Mapping[str, str | Path] | None) -> dict[str, Any]:
    """Write the distilled dataset, score it (and the starting samples, the vectors, ``compare``'s selections and
    random subsets) on the held-out instrument, and write the summary and dataset card. Every rank holds the same
    set: rank 0 writes it, and all score the instrument's draws together."""
    config, output, loop, context, synthetic = run.config, run.output, run.loop, run.context, run.synthetic
    main, tokenizer, manifest, examples, pool = run.main, run.tokenizer, run.manifest, run.examples, run.pool
    chosen, embed_matrix, scorer, student = run.chosen, run.embed_matrix, run.scorer, run.student
    count = len(chosen)
    rows = None
    if main:
        write_jsonl(output / "metrics.jsonl", metrics)
        rows = _write_dataset(output, context, synthetic, loop.log_lr.exp().item(), [examples[i] for i in chosen])
    # --- the held-out instrument: every set on the same draws
    heldout_start = time.time()
    projected = distributed.broadcast_object(
        [(r["prompt"], r["response"]) for r in rows] if main else None)   # the decoded text, as rank 0 wrote it
    projected = [Example(prompt=prompt, response=response) for prompt, response in projected]
    sets: dict[str, SampleSet | None] = {
        "init": synthetic.sample_set(embed_matrix, ids=synthetic.init_token_ids),
        "continuous": (synthetic.sample_set(embed_matrix, synthetic.prompt_embeds.detach())
                       if config.mode != "gcg" else None),
        "projected": SampleSet.from_tokenized(tokenize_for_experts(tokenizer, projected, manifest), embed_matrix),
    }
    from .selection import apply_selection

    for name, path in (compare or {}).items():
        picked = apply_selection(examples, path)[:count]
        sets[name] = SampleSet.from_tokenized(tokenize_for_experts(tokenizer, picked, manifest), embed_matrix)
    null = [SampleSet.from_tokenized([pool[i] for i in random_indices(len(pool), count,
                                                                       config.seed + NULL_SEED_OFFSET + r)],
                                     embed_matrix) for r in range(config.instrument.random_subsets)]
    draws = make_draws(run.heldout_experts, student, count, config.instrument.draws, config.instrument.seed)
    # runs sharing these experts (an ablation, a rerun) reuse each other's random subsets, floor and starting samples
    scope = {"manifest": manifest, "student": dataclasses.asdict(student), "dtype": str(scorer.dtype),
             "device": scorer.device.type}
    # denoised targets or the performance objective score other losses (absent otherwise: older caches stay valid)
    if scorer.targets is not None:
        scope["targets"] = scorer.targets.manifest
    if scorer.objective != "trajectory":
        scope["objective"] = {k: getattr(config.student, k) for k in ("objective", "objective_rows",
                                                                        "objective_offset", "objective_limit")}
    cache = ScoreCache(run.experts / "instrument_cache", scope)
    report = heldout_report(scorer, draws, sets, null, pool=pool, embed_matrix=embed_matrix, cache=cache,
                            progress=run.progress)
    if not main:
        return {"rank": distributed.rank()}
    report.update({"heldout_experts": run.heldout_experts, "student": dataclasses.asdict(student),
                   "seconds": round(time.time() - heldout_start, 1)})
    atomic_write_json(output / "heldout.json", report)
    summary = _summary(synthetic, loop.log_lr.exp().item(), metrics, rows, report, config, distill_seconds)
    summary.update({"student": dataclasses.asdict(student), "lr_search": run.lr_search})
    atomic_write_json(output / "summary.json", summary)
    atomic_write_text(output / "README.md", _dataset_card(summary, config, manifest, str(run.experts), rows))
    return summary


def search_lr(scorer: Scorer, samples: SampleSet, experts: Sequence[int], grid: Sequence[float], *, draws: int,
              seed: int, progress: bool = True) -> dict[str, Any]:
    """Line search of the student lr: the mean matching loss of ``samples`` on ``draws`` fixed draws of the
    (training) ``experts`` at each lr of ``grid``; returns every mean and the best lr. Under a launcher each rank
    scores its share of the draws."""
    fixed = make_draws(experts, scorer.student, len(samples), draws, seed=seed + LR_SEARCH_SEED_OFFSET)
    share = [fixed[d] for d in distributed.shard_indices(len(fixed))]
    means = {}
    for lr in tqdm(sorted(grid), desc="student lr search", disable=not progress, dynamic_ncols=True):
        means[lr] = _sum_over_ranks([sum(scorer.losses(samples, share, lr=lr))])[0] / len(fixed)
    best = min(means, key=means.get)
    return {"lr": best, "mean_loss": {str(lr): loss for lr, loss in means.items()}, "draws": draws}


def _read_jsonl(path: Path, up_to: int) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["iteration"] <= up_to]


def _final_ids(context: _Context, synthetic: SyntheticSet) -> tuple[Tensor, Tensor | None]:
    """The tokens of the final text: the current tokens (gcg), or the projection of the vectors (optionally
    re-ranked by likelihood); and each row's distance to its token (None in gcg)."""
    config = context.config
    if config.mode == "gcg":
        return synthetic.token_ids.clone(), None
    vectors = synthetic.prompt_embeds.detach()
    with torch.no_grad():
        ids, distances = nearest_tokens(vectors, context.embed_matrix, metric=config.projection_metric,
                                        exclude_ids=context.special)
        if config.rerank_top_k:
            from .projection import rerank_by_likelihood

            base = context.model.get_base_model()
            for i in range(ids.shape[0]):
                first, length = int(synthetic.fixed_prefix[i]), int(synthetic.prompt_lengths[i])
                prefix = ids[i, :first] if first else None
                ids[i, first:length] = rerank_by_likelihood(
                    base, vectors[i, first:length], context.embed_matrix, top_k=config.rerank_top_k,
                    metric=config.projection_metric, exclude_ids=context.special, prefix_ids=prefix)
            distances = vector_distance(vectors, context.embed_matrix[ids], config.projection_metric)
    # positions that never learn keep their initial token
    ids = torch.where(synthetic.learnable, ids, synthetic.init_token_ids)
    return ids, distances


def _write_dataset(output: Path, context: _Context, synthetic: SyntheticSet, lr: float,
                   examples: Sequence[Example]) -> list[dict[str, Any]]:
    """Write ``distilled.jsonl`` (the text a user trains on: prompt and response only), ``diagnostics.jsonl`` (per
    row, what changed: token ids before and after, changed positions, the marked prompt, the source row) and
    ``embeddings.safetensors``; return the rows with their diagnostics."""
    tokenizer = context.tokenizer
    ids, distances = _final_ids(context, synthetic)
    rows = []
    for i, example in enumerate(examples):
        token_ids = synthetic.text_ids(i, ids)
        init_ids = synthetic.text_ids(i, synthetic.init_token_ids)
        prompt_text = tokenizer.decode(token_ids)
        response_ids = synthetic.response_ids[i, : int(synthetic.response_lengths[i])].tolist()
        if response_ids and response_ids[-1] == tokenizer.eos_token_id:
            response_ids = response_ids[:-1]
        # the response the distillation actually learned (it differs from the source when max_length cut it)
        truncated = list(tokenizer(example.response, add_special_tokens=False)["input_ids"]) != response_ids
        first, length = int(synthetic.fixed_prefix[i]), int(synthetic.prompt_lengths[i])
        changed = [k for k, (a, b) in enumerate(zip(token_ids, init_ids)) if a != b]
        pieces = [tokenizer.decode([t]) for t in token_ids]
        marked = "".join(f"[{tokenizer.decode([init_ids[k]])}->{pieces[k]}]" if k in changed else pieces[k]
                         for k in range(len(pieces)))
        row = {"prompt": prompt_text, "response": tokenizer.decode(response_ids) if truncated else example.response,
               "response_truncated": truncated, "prompt_token_ids": token_ids, "init_token_ids": init_ids,
               "changed_positions": changed, "marked_prompt": marked, "init_id": example.id, "init_prompt": example.prompt,
               "retokenizes_exactly": _retokenizes(tokenizer, token_ids)}
        if distances is not None:
            row["token_distance"] = [round(float(d), 5) for d in distances[i, first:length]]
        rows.append(row)
    # the diagnostics go in a file of their own, so that the dataset holds only what a user trains on
    write_jsonl(output / DIAGNOSTICS_FILE, [{"index": i, **row} for i, row in enumerate(rows)])
    write_jsonl(output / "distilled.jsonl", [{"prompt": r["prompt"], "response": r["response"]} for r in rows])
    save_tensors(output / "embeddings.safetensors", {
        "prompt_embeds": synthetic.prompt_embeds.detach(), "prompt_lengths": synthetic.prompt_lengths,
        "fixed_prefix": synthetic.fixed_prefix, "learnable": synthetic.learnable,
        "response_ids": synthetic.response_ids, "response_lengths": synthetic.response_lengths,
        "lr": torch.tensor(lr)}, metadata={"format": "textdistill.synthetic/2"})
    return rows


def read_distilled_rows(folder: str | Path) -> list[dict[str, Any]]:
    """The rows of a distillation run folder with their diagnostics: ``distilled.jsonl`` (prompt, response) merged
    row by row with ``diagnostics.jsonl``. Runs made before the two were split kept everything in
    ``distilled.jsonl``."""
    folder = Path(folder)
    read = lambda path: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()  # noqa: E731
                         if line.strip()]
    rows = read(folder / "distilled.jsonl")
    if (folder / DIAGNOSTICS_FILE).is_file():
        diagnostics = read(folder / DIAGNOSTICS_FILE)
        if len(diagnostics) != len(rows):
            raise DataError(f"{folder}: {DIAGNOSTICS_FILE} has {len(diagnostics)} rows, distilled.jsonl {len(rows)}; "
                            f"the run's output was changed: distil again")
        rows = [{**extra, **row} for row, extra in zip(rows, diagnostics)]
    return rows


def _summary(synthetic: SyntheticSet, lr: float, metrics: list[dict[str, Any]], rows: list[dict[str, Any]],
             report: dict[str, Any], config: DistillConfig, seconds: float) -> dict[str, Any]:
    learnable = synthetic.learnable
    changed_tokens = sum(len(r["changed_positions"]) for r in rows)
    summary = {
        "samples": len(rows), "mode": config.mode, "iterations": len(metrics), "learned_lr": lr,
        "tokens_changed_fraction": changed_tokens / max(1, int(learnable.sum())),
        "prompts_changed": sum(bool(r["changed_positions"]) for r in rows),
        "retokenize_exact_fraction": sum(r["retokenizes_exactly"] for r in rows) / max(1, len(rows)),
        "distill_seconds": round(seconds, 1),
        "iterations_skipped_for_faults": sum("fault" in m for m in metrics),
        "heldout": {key: report[key] for key in ("init", "continuous", "projected", "random", "floor",
                                                 "projected_minus_init", "continuous_minus_init",
                                                 "projected_rank_among_random", "compare", "draws", "lr")
                    if key in report},
    }
    if config.mode == "gcg":
        summary["swaps_accepted"] = sum(len(m["swaps"]) for m in metrics if m.get("accepted"))
    else:
        distances = [d for r in rows for d in r.get("token_distance", [])]
        summary["mean_token_distance"] = sum(distances) / max(1, len(distances))
    return summary


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _card_metadata(summary: dict[str, Any], config: DistillConfig, manifest: dict[str, Any]) -> tuple[str, str]:
    """The dataset card's Hugging Face YAML front matter, and its licence line: the pool's licence when it is known
    (the prompts are edited pool rows and the responses are the pool's), else ``other`` with what applies."""
    import yaml

    arc = (["allenai/ai2_arc"], "cc-by-sa-4.0")
    known = {"arc-easy": arc, "arc-challenge": arc, "mmlu": (["cais/mmlu"], "mit"),
             # the nine sources of mcqa-pool come under different licences
             "mcqa-pool": (["allenai/ai2_arc", "allenai/openbookqa", "tau/commonsense_qa", "allenai/social_i_qa",
                            "ybisk/piqa", "Rowan/hellaswag", "allenai/winogrande", "google/boolq"], None)}
    data = manifest["data"]
    head, _, rest = data.partition(":")
    sources, licence = ([rest.partition(":")[0]], None) if head == "hub" else known.get(head, ([], None))
    count = summary["samples"]
    size = next(name for limit, name in ((1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"), (1e6, "100K<n<1M"))
                if count < limit)
    meta: dict[str, Any] = {
        "license": licence or "other", "language": ["en"], "size_categories": [size],
        "task_categories": ["text-generation"], "source_datasets": sources,
        "tags": ["dataset-distillation", "trajectory-matching"],
        "pretty_name": f"{data} distilled to {count} samples ({manifest['model']['name']}, {config.mode})",
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "distilled.jsonl"}]}],
    }
    if not sources:   # a local file: nothing public to name
        del meta["source_datasets"]
    if licence:
        note = f"Licence: {licence}, that of `{data}`: the prompts are edited from its rows, the responses are its own."
    else:
        note = (f"Licence: other. The prompts are edited from the rows of `{data}`, the responses are its own: its "
                "licence applies" + (" (each source dataset's to its rows)." if head == "mcqa-pool" else "."))
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n", note


def _dataset_card(summary: dict[str, Any], config: DistillConfig, manifest: dict[str, Any], experts: str,
                  rows: list[dict[str, Any]]) -> str:
    heldout = summary["heldout"]
    diff = heldout.get("projected_minus_init") or {}
    front_matter, licence = _card_metadata(summary, config, manifest)
    lines = [
        "# Distilled dataset (textdistill)", "",
        f"{summary['samples']} samples distilled from `{manifest['data']}` ({manifest['pool_size']} rows) by "
        f"trajectory matching against the experts in `{experts}` (model `{manifest['model']['name']}`, LoRA "
        f"r={manifest['lora']['r']} on {', '.join(manifest['lora']['target_modules'])}).", "",
        f"Each row is a real response after a prompt learned by `{config.mode}` (started from "
        f"{config.init} pool rows; template scaffolding frozen: {config.freeze_scaffold}). Load it with "
        "`datasets.load_dataset(\"json\", data_files=\"distilled.jsonl\")`: it holds `prompt` and `response` "
        "only; what changed in each row (token ids before and after, the marked prompt, the source row) is in "
        "`diagnostics.jsonl`, row by row.", "",
        "| what | value |", "|---|---|",
        f"| budget | {config.budget} ({summary['samples']} samples) |",
        f"| mode, iterations | {config.mode}, {summary['iterations']} |",
        f"| learnable prompt tokens changed | {summary['tokens_changed_fraction']:.3f} |",
        f"| prompts with a changed token | {summary['prompts_changed']} / {summary['samples']} |",
        f"| prompts that re-tokenize exactly | {summary['retokenize_exact_fraction']:.3f} |",
        f"| learned student lr | {summary['learned_lr']:.4g} |", "",
        "## Held-out matching loss (the paired instrument)", "",
        f"Mean over {len(heldout.get('draws', []))} fixed draws of held-out expert segments (lower is closer to "
        "the expert; 1 = no closer than the start). Every set is scored on the same draws, so differences are "
        "paired.", "",
        "| set | loss |", "|---|---|",
        f"| starting samples | {_fmt((heldout.get('init') or {}).get('loss'))} |",
        f"| learned vectors (before projection) | {_fmt((heldout.get('continuous') or {}).get('loss'))} |",
        f"| this text (decoded, re-tokenized) | {_fmt((heldout.get('projected') or {}).get('loss'))} |",
    ]
    random_losses = [r["loss"] for r in heldout.get("random", [])]
    if random_losses:
        lines.append(f"| {len(random_losses)} random real subsets | {min(random_losses):.4f} - "
                     f"{max(random_losses):.4f} (mean {sum(random_losses) / len(random_losses):.4f}) |")
    for name, value in (heldout.get("compare") or {}).items():
        lines.append(f"| {name} selection | {_fmt(value.get('loss'))} |")
    lines.append(f"| floor: the rows the expert trained on | {_fmt((heldout.get('floor') or {}).get('loss'))} |")
    if diff:
        lines += ["", f"Text minus starting samples: {diff['mean']:+.4f} (95% interval {diff['ci95'][0]:+.4f} to "
                      f"{diff['ci95'][1]:+.4f}); rank among the random subsets: "
                      f"{heldout.get('projected_rank_among_random')} of {len(random_losses) + 1}."]
    lines += ["", "## First samples", ""]
    for row in rows[:3]:
        lines += [f"- prompt: `{row['prompt'][:300]!r}`", f"  started from: `{row['init_prompt'][:300]!r}`",
                  f"  response: `{row['response'][:120]!r}`"]
    lines += ["", licence]
    return front_matter + "\n".join(lines) + "\n"
