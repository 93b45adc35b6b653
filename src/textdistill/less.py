"""LESS (Xia et al., 2024), "Selecting Influential Data for Targeted Instruction Tuning", and :func:`select_less`, the
entry of ``textdistill select --method less``.

1. *Warm-up*: a fresh LoRA adapter is trained with AdamW (:func:`textdistill.training.train_model`) on a seeded
   random ``warmup_fraction`` of the pool for ``warmup_epochs`` epochs. After every epoch a
   :class:`WarmupCheckpoint` keeps the LoRA tensors, AdamW's ``exp_avg``/``exp_avg_sq`` and step, and the average
   learning rate of that epoch's optimizer steps.
2. *Gradient features* at each checkpoint: per-example gradients of the LoRA tensors (response-only loss, mean
   over the example's response tokens), computed batched with ``torch.func.vmap(torch.func.grad(...))`` over
   ``torch.func.functional_call`` (:func:`per_example_grads`). Pool gradients g become the Adam update direction
   (:func:`adam_direction`)::

       m' = b1 * exp_avg + (1 - b1) * g,   v' = b2 * exp_avg_sq + (1 - b2) * g**2,   G = m' / (sqrt(v') + eps)

   with the checkpoint's own betas/eps and *no bias correction* by default (``bias_correction=True`` divides m'
   and v' by ``1 - b**(step + 1)``; with cosine similarity this only changes how much eps matters). Target
   validation examples keep their plain gradients.
3. Both are projected to ``projection_dim`` by a seeded random matrix (:class:`RandomProjection`: Rademacher
   +-1/sqrt(d) or Gaussian, generated block by block, each block once per run and kept, Rademacher bits packed 8 to
   a byte, within ``PROJECTION_CACHE_BYTES``) and L2-normalised.
4. ``score(pool example) = sum over checkpoints of lr_c * mean over validation examples of cos(G, g_val)``; the
   ``budget`` highest scores are selected (ties go to the lower index) and written in rank order with their
   scores; ``extra`` metadata records the target, projection, seed and checkpoints, and ``all_scores`` holds the
   score of every pool row (so a smaller budget can be cut from the same run).

Pool rows whose prompt equals the prompt of an evaluation item of the target task (its validation/test splits,
MMLU dev too, a file target's rows; rendered with the rc and mc templates, and with the configured template) are
never selected; they are listed under ``excluded_eval_overlap`` (ARC-Easy's train split shares a few prompts with
its own validation/test splits).

Under ``torchrun`` / ``accelerate launch`` every rank runs :func:`select`: the warm-up is the data-parallel loop of
:func:`textdistill.training.train_model`, each rank computes the gradient features of every ``world``-th batch of
the pool and of the target rows, the features are gathered on every rank (so every rank computes the same scores),
and rank 0 alone writes the selection file and the unfinished work. Scores agree with one process to float rounding.

The options are one :class:`LessConfig`; the model, the pool and the warm-up recipe come with the call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed
from .artifacts import atomic_write_json, load_tensors, read_json, save_tensors, sha256_json, to_jsonable
from .checkpoint import TrainCheckpointer
from .config import DataSettings, TaskFields, TrainConfig, option
from .data import (TASKS, Example, TokenizedExample, get_task, item_to_example, load_examples, load_task,
                   normalize_split, rows_to_examples, tokenize_examples)
from .errors import ConfigError, DataError, TrainingError
from .models import add_lora, load_model, load_tokenizer, resolve_model_path
from .selection import reselect, resolve_budget, top_indices, write_selection
from .training import base_dtype, collate, lr_multiplier, planned_steps, train_model

IGNORE_INDEX = -100
PROJECTIONS = ("rademacher", "gaussian")
#: Rows of the random projection generated from one seed (part of the matrix's definition: changing it changes
#: the matrix). 1024 rows x 8192 columns is 32 MiB in float32.
PROJECTION_BLOCK_ROWS = 1024
#: Memory one :class:`RandomProjection` may keep its generated blocks in (per process), so that the matrix is made
#: once per run: packed Rademacher bits take in_dim * out_dim / 8 bytes (SmolLM2-135M's LoRA, 460,800 x 8192: 450
#: MiB; 4M x 8192: 4 GiB), Gaussian blocks 4 bytes an entry. Blocks past it are generated again at each use.
PROJECTION_CACHE_BYTES = 4 << 30
#: The warm-up set has at least this many rows (or the whole pool when it is smaller).
MIN_WARMUP_ROWS = 4


@dataclass(frozen=True)
class LessConfig:
    """LESS's options; the gradient model, the pool and the warm-up recipe are given to :func:`select`."""

    target: str | None = option(None, "the task split to select for: arc-easy:validation, mmlu:dev, a file")
    target_fields: TaskFields | None = option(None, "a file target's field names (null: question, choices, answer)")
    warmup_fraction: float = option(0.05, "share of the pool the warm-up trains on")
    warmup_epochs: int = option(4, "warm-up epochs, one checkpoint each")
    projection_dim: int = option(8192, "dimension of the random projection")
    max_val_examples: int | None = option(64, "target validation examples used (null: all)")
    projection: str = option("rademacher", "random projection: rademacher or gaussian", omit_when="rademacher")
    bias_correction: bool = option(False, "Adam bias correction of the pool's update directions", omit_when=False)
    batch_size: int = option(8, "examples per batched gradient pass", keyed=False)
    buffer_size: int = option(512, "raw gradient rows held before they are projected", keyed=False)
    warmup: TrainConfig | None = option(
        None, "the warm-up recipe (LoRA with AdamW; its epochs and seed are warmup_epochs and the selection's "
              "seed); null: the training defaults")
    keep_checkpoints: bool = option(False, "keep the warm-up checkpoints (LoRA tensors, Adam moments) as "
                                           "safetensors in <output stem>.less/ beside the selection", keyed=False)

    def __post_init__(self) -> None:
        if not isinstance(self.warmup_fraction, (int, float)) or not 0 < self.warmup_fraction <= 1:
            raise ConfigError(f"warmup_fraction must be in (0, 1], got {self.warmup_fraction}")
        if isinstance(self.warmup_epochs, bool) or not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 1:
            raise ConfigError(f"warmup_epochs must be a positive whole number, got {self.warmup_epochs}")
        if (isinstance(self.projection_dim, bool) or not isinstance(self.projection_dim, int)
                or self.projection_dim < 1):
            raise ConfigError(f"projection_dim must be a positive integer, got {self.projection_dim}")
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"unknown projection '{self.projection}'; use {' or '.join(PROJECTIONS)}")
        if self.max_val_examples is not None and (not isinstance(self.max_val_examples, int)
                                                  or self.max_val_examples < 1):
            raise ConfigError(f"max_val_examples must be a positive integer or None (all), got "
                              f"{self.max_val_examples}")
        if self.batch_size < 1 or self.buffer_size < 1:
            raise ConfigError(f"batch_size and buffer_size must be positive, got {self.batch_size} and "
                              f"{self.buffer_size}")


# ----------------------------------------------------------------------------------------------------------------
# Targets and decontamination
# ----------------------------------------------------------------------------------------------------------------

def parse_target(target: str | None) -> tuple[str, str]:
    """``"arc-easy:validation"`` / ``"mmlu:dev"`` / ``"questions.jsonl"`` -> (task, canonical split).

    A named task must name its split; a file is its own split (a ``datasets`` folder of several splits takes
    ``folder:split``, by default ``test``). ConfigError when no target or no split is given; DataError for an
    unknown task, a missing file or a split the task lacks.
    """
    if not target or not isinstance(target, str):
        raise ConfigError("LESS needs a target task split, e.g. target='arc-easy:validation', 'mmlu:dev' or a "
                          "multiple-choice file")
    task, _, split = target.strip().partition(":")
    if task not in TASKS:
        return task, normalize_split(task, split or "test")
    if not split:
        raise ConfigError(f"LESS target '{target}' names no split; use e.g. '{task}:{TASKS[task].splits[1]}' "
                          f"(splits: {', '.join(TASKS[task].splits)})")
    return task, normalize_split(task, split)


def _render(items: Sequence[Any], template: str, tokenizer: Any | None) -> list[Example]:
    """Benchmark items as examples with ``template`` (rc / mc, or chat through ``tokenizer``'s chat template)."""
    examples = [item_to_example(it, template if template in ("rc", "mc") else "rc") for it in items]
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("template 'chat' needs a tokenizer with a chat template (this model has none)")
        examples = rows_to_examples([{"prompt": e.prompt, "response": e.response, "id": e.id} for e in examples],
                                    chat_tokenizer=tokenizer, origin="target")
    return examples


def target_examples(task: str, split: str, *, template: str = "rc", max_examples: int | None = 64, seed: int = 0,
                    tokenizer: Any | None = None, fields: TaskFields | None = None) -> list[Example]:
    """The target's validation examples: every item of ``task:split``, or a seeded sample of ``max_examples``
    of them (kept in file order) when the split is larger. ``fields`` names a file task's fields."""
    items = load_task(task, split, fields=fields)
    if max_examples is not None and len(items) > max_examples:
        keep = sorted(random.Random(seed).sample(range(len(items)), max_examples))
        items = [items[i] for i in keep]
    return _render(items, template, tokenizer)


def target_eval_prompts(task: str, split: str, *, template: str = "rc", tokenizer: Any | None = None,
                        fields: TaskFields | None = None) -> set[str]:
    """Stripped prompts of every evaluation item of ``task`` (validation/test, MMLU dev, and ``split`` itself; a
    file's rows), rendered with the rc and mc templates and with ``template``."""
    prompts: set[str] = set()
    for name in dict.fromkeys([s for s in get_task(task, fields).splits if s != "train"] + [split]):
        items = load_task(task, name, fields=fields)
        for tmpl in dict.fromkeys(("rc", "mc", template)):
            prompts.update(e.prompt.strip() for e in _render(items, tmpl, tokenizer))
    return prompts


def eval_overlap(pool: Sequence[Example], prompts: set[str]) -> list[int]:
    """Indices of pool rows whose stripped prompt is one of ``prompts``."""
    return [i for i, e in enumerate(pool) if e.prompt.strip() in prompts]


# ----------------------------------------------------------------------------------------------------------------
# Seeded random projection
# ----------------------------------------------------------------------------------------------------------------

def _block_seed(seed: int, block: int) -> int:
    digest = hashlib.blake2b(f"textdistill-less-projection:{seed}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def pack_bits(bits: Tensor) -> Tensor:
    """0/1 entries (int8, any shape, read row-major) -> (ceil(n / 8),) uint8 whose byte k holds entry 8k + j as bit
    j (the tail padded with 0)."""
    flat = bits.reshape(-1).to(torch.int8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if sys.byteorder == "little":
        # 8 entries read as one int64 put entry j at bit 8j (all < 2**63, so >> is a plain shift); three shift-ors
        # gather them at bits 0..7 of the low byte: 2.5x faster than a weighted sum over (n, 8)
        x = flat.view(torch.int64)                                                  # (n / 8,)
        y = x | (x >> 7)            # byte k: entries k, k+1 at bits 0, 1
        y |= y >> 14                # entries k..k+3 at bits 0..3
        y |= y >> 28                # entries k..k+7 at bits 0..7
        return (y & 0xFF).to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (flat.to(torch.uint8).view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


class RandomProjection:
    """A seeded ``in_dim x out_dim`` random matrix R, applied as ``x @ R`` one block of rows at a time.

    Rows are generated in blocks of ``block_rows``; block b comes from a ``torch.Generator`` on ``device`` seeded
    with a hash of (``seed``, b). Any row range is therefore reproducible on its own, and how a caller chunks the
    rows does not change the matrix. Entries are +-1/sqrt(out_dim) (``kind="rademacher"``) or
    N(0, 1/out_dim) (``"gaussian"``), so E[<xR, yR>] = <x, y>. The same seed gives the same matrix on the same kind
    of device (CPU and CUDA generators differ).

    Each block is generated once and kept for the object's lifetime while the cache stays under ``cache_bytes``
    (blocks past the budget are generated again at each use, as every block once was): a Rademacher block is kept
    as its random bits packed 8 to a byte (1/32 of float32: a 460,800 x 8192 matrix is 450 MiB, 4M x 8192 is
    4 GiB) and expanded through a 256-entry table into a reused float32 buffer when used, a Gaussian block as
    float32. The values are exactly those of a freshly generated block, so projections do not change.
    ``blocks_generated`` counts the generator runs.
    """

    def __init__(self, in_dim: int, out_dim: int, *, seed: int = 0, kind: str = "rademacher",
                 device: str | torch.device = "cpu", block_rows: int = PROJECTION_BLOCK_ROWS,
                 cache_bytes: int = PROJECTION_CACHE_BYTES):
        if in_dim < 1 or out_dim < 1:
            raise ConfigError(f"projection dimensions must be positive, got {in_dim} -> {out_dim}")
        if kind not in PROJECTIONS:
            raise ConfigError(f"unknown projection '{kind}'; use {' or '.join(PROJECTIONS)}")
        if block_rows < 1:
            raise ConfigError(f"block_rows must be positive, got {block_rows}")
        if cache_bytes < 0:
            raise ConfigError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.in_dim, self.out_dim, self.seed, self.kind = int(in_dim), int(out_dim), int(seed), kind
        self.device = torch.device(device)
        self.block_rows = int(block_rows)
        self.cache_bytes = int(cache_bytes)
        self.blocks_generated = 0
        self._cache: dict[int, Tensor] = {}    # block -> packed bits (ceil(rows * out_dim / 8),) uint8 or float32 block
        self._cached_bytes = 0
        self._table: Tensor | None = None      # (256, 8) float32: byte value -> its 8 entries
        self._codes: Tensor | None = None      # (ceil(block_rows * out_dim / 8),) int64 scratch for index_select
        self._scratch: Tensor | None = None    # (ceil(block_rows * out_dim / 8) * 8,) float32 expanded block

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.in_dim / self.block_rows)

    @property
    def cached_bytes(self) -> int:
        """Bytes the cached blocks take."""
        return self._cached_bytes

    def _rows_of(self, index: int) -> int:
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"block {index} outside [0, {self.num_blocks})")
        return min(self.block_rows, self.in_dim - index * self.block_rows)

    def _generate(self, index: int) -> tuple[Tensor, Tensor | None]:
        """Block ``index`` as the generator makes it: (float32 (rows, out_dim), its int8 0/1 bits or None)."""
        rows = self._rows_of(index)
        self.blocks_generated += 1
        generator = torch.Generator(device=self.device)
        generator.manual_seed(_block_seed(self.seed, index))
        scale = 1.0 / math.sqrt(self.out_dim)
        if self.kind == "gaussian":
            return torch.randn((rows, self.out_dim), generator=generator, device=self.device).mul_(scale), None
        bits = torch.randint(0, 2, (rows, self.out_dim), generator=generator, device=self.device, dtype=torch.int8)
        return bits.to(torch.float32).mul_(2.0 * scale).sub_(scale), bits

    def _store(self, index: int, block: Tensor, bits: Tensor | None) -> None:
        """Keep a freshly generated block when the budget allows: a Gaussian block's float32 values, a Rademacher
        block's bits 8 to a byte ((ceil(rows * out_dim / 8),) uint8)."""
        entries = block.numel()
        size = entries * 4 if bits is None else math.ceil(entries / 8)
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[index] = block if bits is None else pack_bits(bits)
            self._cached_bytes += size

    def _expand(self, index: int, packed: Tensor) -> Tensor:
        """A cached Rademacher block as float32 (rows, out_dim), in the scratch buffer (valid until the next call)."""
        rows = self._rows_of(index)
        if self._table is None:
            scale = 1.0 / math.sqrt(self.out_dim)
            # the two entry values made by the very operations of _generate, so they are the same floats
            values = torch.tensor([0, 1], dtype=torch.int8, device=self.device).to(torch.float32)
            values = values.mul_(2.0 * scale).sub_(scale)                                   # (2,)
            codes = torch.arange(256, device=self.device).unsqueeze(1)                     # (256, 1)
            shifts = torch.arange(8, device=self.device)                                   # (8,)
            self._table = values[(codes >> shifts) & 1]                                    # (256, 8): bit j of a byte
            bytes_per_block = math.ceil(self.block_rows * self.out_dim / 8)
            self._codes = torch.empty(bytes_per_block, dtype=torch.long, device=self.device)
            # a fresh allocation used from its start: aligned like a newly generated block, for the same GEMM path
            self._scratch = torch.empty(bytes_per_block * 8, dtype=torch.float32, device=self.device)
        n = packed.numel()
        codes, scratch = self._codes[:n], self._scratch[:n * 8]
        codes.copy_(packed)
        torch.index_select(self._table, 0, codes, out=scratch.view(n, 8))                 # (n, 8) -> n * 8 entries
        return scratch[:rows * self.out_dim].view(rows, self.out_dim)

    def _block(self, index: int) -> tuple[Tensor, bool]:
        """Block ``index`` as float32 and whether the caller owns it (False: cache or scratch, read-only)."""
        kept = self._cache.get(index)
        if kept is None:
            block, bits = self._generate(index)
            self._store(index, block, bits)
            return block, bits is not None or index not in self._cache
        if self.kind == "gaussian":
            return kept, False
        return self._expand(index, kept), False

    def block(self, index: int) -> Tensor:
        """Rows ``[index * block_rows, min(in_dim, (index + 1) * block_rows))`` of R, float32 on ``device`` (a new
        tensor)."""
        block, owned = self._block(index)
        return block if owned else block.clone()

    def rows(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows ``[start, stop)`` of R (uses only the blocks they touch)."""
        stop = self.in_dim if stop is None else stop
        if not 0 <= start <= stop <= self.in_dim:
            raise IndexError(f"row range [{start}, {stop}) outside [0, {self.in_dim}]")
        parts = []
        for b in range(start // self.block_rows, math.ceil(stop / self.block_rows)):
            lo = b * self.block_rows
            block, owned = self._block(b)
            part = block[max(start, lo) - lo: min(stop, lo + block.shape[0]) - lo]
            parts.append(part if owned else part.clone())     # the scratch buffer is rewritten by the next block
        if not parts:
            return torch.zeros((0, self.out_dim), device=self.device)
        return torch.cat(parts)

    def project(self, x: Tensor) -> Tensor:
        """(n, in_dim) -> (n, out_dim) float32 on ``device``, one block of R at a time.

        The sum runs block by block in row order with one ``addmm_`` each, as it always has: the same blocks in
        the same order give bit-identical results whether a block comes from the cache or the generator."""
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"expected (n, {self.in_dim}) vectors, got {tuple(x.shape)}")
        x = x.to(device=self.device, dtype=torch.float32)
        out = torch.zeros((x.shape[0], self.out_dim), device=self.device)
        for b in range(self.num_blocks):
            lo = b * self.block_rows
            block, _ = self._block(b)                                   # (rows_b, out_dim)
            out.addmm_(x[:, lo: lo + block.shape[0]], block)             # (n, rows_b) @ (rows_b, out_dim)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Per-example gradients and the Adam direction
# ----------------------------------------------------------------------------------------------------------------

def flatten_grads(grads: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    """Per-example gradients {name: (B, *shape)} -> (B, P), concatenated in ``names`` order."""
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], dim=1)


def _first_target_position(labels: Tensor) -> int:
    """The earliest position (over the batch) whose label is learned."""
    learned = labels != IGNORE_INDEX                                           # (B, T)
    return int(learned.to(torch.int8).argmax(dim=1).min())


def example_loss(model: torch.nn.Module, params: Mapping[str, Tensor], input_ids: Tensor, attention_mask: Tensor,
                 labels: Tensor, keep: int | None = None) -> Tensor:
    """Mean next-token cross-entropy over the response tokens of ONE example (1-D ``input_ids``, ``attention_mask``,
    ``labels`` of length T, labels -100 on prompt and padding), with the LoRA tensors replaced by ``params``.

    ``keep`` (a Python int, the same for a whole batch) computes logits for the last ``keep`` positions only; it
    must cover every position that predicts a response token. Written without data-dependent Python control flow
    so that it runs under ``torch.func.vmap``.
    """
    length = input_ids.shape[0]
    keep = length if keep is None else max(1, min(int(keep), length))
    out = torch.func.functional_call(
        model, dict(params), (),
        {"input_ids": input_ids.unsqueeze(0), "attention_mask": attention_mask.unsqueeze(0), "use_cache": False,
         "logits_to_keep": keep},
        strict=False)
    logits = out.logits[0, :-1]                                               # (keep-1, V): positions T-keep..T-2
    targets = labels[length - keep + 1:]                                      # (keep-1,)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    learned = targets != IGNORE_INDEX
    losses = F.cross_entropy(logits, targets.clamp_min(0), reduction="none")  # (keep-1,)
    return (losses * learned).sum() / learned.sum()


def per_example_grads(model: torch.nn.Module, params: Mapping[str, Tensor],
                      batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Gradients of :func:`example_loss` w.r.t. ``params`` for every example of a right-padded batch (from
    :func:`textdistill.training.collate`): {name: (B, *shape)}, computed with ``vmap(grad(...))`` in one batched
    pass. The model should be in eval mode; every example needs at least one learned label."""
    labels = batch["labels"]
    learned = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
    if bool((learned == 0).any()):
        bad = (learned == 0).nonzero().flatten().tolist()
        raise DataError(f"batch rows {bad} have no response token to learn (empty prompt and a one-token response)")
    # every learned label sits at position >= first, so it is predicted from position >= first - 1
    keep = labels.shape[1] - max(1, _first_target_position(labels)) + 1

    def loss(p: Mapping[str, Tensor], ids: Tensor, mask: Tensor, lab: Tensor) -> Tensor:
        return example_loss(model, p, ids, mask, lab, keep)

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))(
        dict(params), batch["input_ids"], batch["attention_mask"], labels)


def adam_direction(grads: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8, step: int | None = None, bias_correction: bool = False) -> Tensor:
    """The Adam update direction for per-example gradients (B, P) from the optimizer moments (P,):
    ``m' / (sqrt(v') + eps)`` with ``m' = b1 m + (1 - b1) g`` and ``v' = b2 v + (1 - b2) g^2``; with
    ``bias_correction`` m' and v' are first divided by ``1 - b**(step + 1)`` (``step`` = steps taken so far)."""
    beta1, beta2 = betas
    m = exp_avg.unsqueeze(0) * beta1 + grads * (1.0 - beta1)
    v = exp_avg_sq.unsqueeze(0) * beta2 + grads.square() * (1.0 - beta2)
    if bias_correction:
        if step is None:
            raise ValueError("bias_correction needs the optimizer step")
        m = m / (1.0 - beta1 ** (step + 1))
        v = v / (1.0 - beta2 ** (step + 1))
    return m / (v.sqrt() + eps)


# ----------------------------------------------------------------------------------------------------------------
# Warm-up checkpoints
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class WarmupCheckpoint:
    """The LoRA tensors and AdamW state at the end of one warm-up epoch, and that epoch's average learning rate."""

    epoch: int
    step: int
    lr: float
    params: dict[str, Tensor]
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]
    adam_step: int
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    @property
    def names(self) -> list[str]:
        return list(self.params)

    def flat_moments(self, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """exp_avg and exp_avg_sq flattened (P,) in :attr:`names` order."""
        cat = lambda d: torch.cat([d[n].reshape(-1) for n in self.names]).to(device)  # noqa: E731
        return cat(self.exp_avg), cat(self.exp_avg_sq)

    def save(self, path: str | Path) -> Path:
        """safetensors file: ``param/``, ``exp_avg/``, ``exp_avg_sq/`` tensors; scalars in the metadata."""
        tensors = {f"{kind}/{n}": t for kind, d in (("param", self.params), ("exp_avg", self.exp_avg),
                                                    ("exp_avg_sq", self.exp_avg_sq)) for n, t in d.items()}
        meta = {"epoch": self.epoch, "step": self.step, "lr": self.lr, "adam_step": self.adam_step,
                "betas": list(self.betas), "eps": self.eps, "names": self.names}
        return save_tensors(path, tensors, metadata={"less_checkpoint": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> "WarmupCheckpoint":
        tensors = load_tensors(path)   # DataError naming the file when it is missing or damaged
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("less_checkpoint", "null") or "null")
        if not meta:
            raise DataError(f"{path} is not a LESS warm-up checkpoint")
        pick = lambda kind: {n: tensors[f"{kind}/{n}"] for n in meta["names"]}  # noqa: E731
        return cls(epoch=meta["epoch"], step=meta["step"], lr=meta["lr"], params=pick("param"),
                   exp_avg=pick("exp_avg"), exp_avg_sq=pick("exp_avg_sq"), adam_step=meta["adam_step"],
                   betas=tuple(meta["betas"]), eps=meta["eps"])


def warmup_config(base: TrainConfig | None, *, epochs: int, seed: int, data: DataSettings | None = None) -> TrainConfig:
    """The warm-up recipe: ``base`` (default :class:`TrainConfig`) with ``epochs`` whole epochs and ``seed``.
    Must be LoRA with AdamW and no ``max_steps`` (checkpoints fall at epoch ends)."""
    config = base or TrainConfig()
    if config.method != "lora":
        raise ConfigError(f"the LESS warm-up trains LoRA; got method '{config.method}'")
    if config.optimizer != "adamw":
        raise ConfigError(f"the LESS warm-up needs AdamW (its moments shape the gradients); got '{config.optimizer}'")
    if config.max_steps is not None:
        raise ConfigError("the LESS warm-up runs whole epochs; leave max_steps unset")
    changes: dict[str, Any] = {"epochs": float(epochs), "seed": seed}
    if data is not None:
        changes["data"] = data
    return dataclasses.replace(config, **changes)


def steps_per_epoch(num_examples: int, config: TrainConfig) -> int:
    """Optimizer steps in one epoch of ``num_examples`` (the checkpoint spacing of the warm-up)."""
    return planned_steps(num_examples, dataclasses.replace(config, epochs=1.0, max_steps=None))


def run_warmup(model: torch.nn.Module, examples: Sequence[TokenizedExample], config: TrainConfig, *, pad_id: int,
               progress: bool = False, work_dir: Path | None = None,
               checkpointer: TrainCheckpointer | None = None) -> list[WarmupCheckpoint]:
    """Train ``model``'s LoRA tensors on ``examples`` with ``config`` (AdamW) and return one checkpoint per epoch.

    The checkpoint's ``lr`` is the mean learning rate of the optimizer steps of its epoch (the scheduler value each
    step used). With ``work_dir``, each epoch's checkpoint is also written there as it is made
    (``warmup-epochN.safetensors``), and a warm-up whose every epoch is there is not run again; ``checkpointer``
    lets an interrupted warm-up continue exactly. Under several processes rank 0 alone writes ``work_dir`` and every
    rank returns the checkpoints read back from it.
    """
    if config.optimizer != "adamw":
        raise ConfigError("the LESS warm-up needs AdamW")
    per_epoch = steps_per_epoch(len(examples), config)
    total = planned_steps(len(examples), config)
    warmup_steps = int(round(config.warmup_ratio * total))
    epochs = total // per_epoch
    saved = [work_dir / f"warmup-epoch{e}.safetensors" for e in range(1, epochs + 1)] if work_dir else []
    # rank 0 decides for every rank (a rank that looked later could see files rank 0 has just written)
    if distributed.broadcast_object(bool(saved) and all(path.is_file() for path in saved)):
        return [WarmupCheckpoint.load(path) for path in saved]
    checkpoints: list[WarmupCheckpoint] = []

    def on_step(step: int, net: Any, optimizer: torch.optim.Optimizer) -> None:
        if step == 0 or step % per_epoch:
            return
        # the lr each step of the epoch used, as the scheduler computes it (so that a resumed warm-up, which did not
        # see the epoch's first steps, gets the same value)
        epoch_lrs = [config.lr * lr_multiplier(s - 1, total, warmup_steps, config.schedule)
                     for s in range(step - per_epoch + 1, step + 1)]
        params, avg, avg_sq, adam_step = {}, {}, {}, 0
        for name, p in net.named_parameters():
            if not p.requires_grad:
                continue
            state = optimizer.state.get(p, {})
            params[name] = p.detach().clone()
            avg[name] = state["exp_avg"].detach().clone() if "exp_avg" in state else torch.zeros_like(params[name])
            avg_sq[name] = (state["exp_avg_sq"].detach().clone() if "exp_avg_sq" in state
                            else torch.zeros_like(params[name]))
            adam_step = int(state["step"]) if "step" in state else adam_step
        group = optimizer.param_groups[0]
        checkpoint = WarmupCheckpoint(
            epoch=step // per_epoch, step=step, lr=sum(epoch_lrs) / len(epoch_lrs), params=params, exp_avg=avg,
            exp_avg_sq=avg_sq, adam_step=adam_step, betas=tuple(map(float, group["betas"])), eps=float(group["eps"]))
        if work_dir is not None and distributed.is_main():
            checkpoint.save(work_dir / f"warmup-epoch{checkpoint.epoch}.safetensors")
        checkpoints.append(checkpoint)

    train_model(model, examples, config, pad_id=pad_id, on_step=on_step, progress=progress, checkpointer=checkpointer)
    if work_dir is not None:   # epochs finished before a resume are on disk only
        distributed.barrier()  # written by rank 0: every rank then scores with rank 0's checkpoints
        return [WarmupCheckpoint.load(path) for path in saved]
    return checkpoints


# ----------------------------------------------------------------------------------------------------------------
# Features and scores
# ----------------------------------------------------------------------------------------------------------------

def length_batches(examples: Sequence[TokenizedExample], batch_size: int) -> list[list[int]]:
    """Indices of ``examples`` sorted by length (stable) and cut into batches of ``batch_size``: the batching of
    :func:`gradient_features` (a rank's share is every ``world``-th batch, so batches hold the same rows at any
    number of processes)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    return [order[s: s + batch_size] for s in range(0, len(order), batch_size)]


def gradient_features(model: torch.nn.Module, examples: Sequence[TokenizedExample], params: Mapping[str, Tensor],
                      projection: RandomProjection, *, pad_id: int, checkpoint: WarmupCheckpoint | None = None,
                      bias_correction: bool = False, batch_size: int = 8, buffer_size: int = 128,
                      progress: bool = False, desc: str = "gradients", shard: bool = False) -> Tensor:
    """L2-normalised projected per-example gradients (N, d) of ``examples`` at LoRA tensors ``params``.

    With ``checkpoint`` the gradients are first turned into the Adam direction with its moments (pool side of
    LESS); without, they stay plain gradients (validation side). Examples are batched by length
    (:func:`length_batches`, right padding); at most ``buffer_size`` raw gradient rows are held before they are
    projected (one ``projection.project`` per flush; the projection keeps its generated blocks, so the matrix is
    made once however many flushes and calls there are).

    With ``shard`` under several processes (torchrun / accelerate launch) every rank must call this: each computes
    the batches ``rank, rank + world, ...`` and the features are gathered, so every rank returns all N rows. A
    row's gradient is that of one process (same batch, same padding); only its projection is summed with other
    rows beside it, so features agree with one process to float rounding. On one process it is a no-op.
    """
    if batch_size < 1 or buffer_size < 1:
        raise ConfigError("batch_size and buffer_size must be positive")
    names = list(params)
    device = next(model.parameters()).device
    params = {n: t.to(device) for n, t in params.items()}
    moments = checkpoint.flat_moments(device) if checkpoint is not None else None
    if checkpoint is not None and checkpoint.names != names:
        raise ValueError("the checkpoint's tensors do not match the parameters")
    batches = length_batches(examples, batch_size)
    world = distributed.world_size() if shard else 1
    if world > 1:
        batches = batches[distributed.rank()::world]
        mine = [i for chunk in batches for i in chunk]
        slot = {i: k for k, i in enumerate(mine)}                                # example index -> row of out
    else:
        slot = None                                                               # out is indexed by example
    out = torch.zeros((len(examples) if slot is None else len(slot), projection.out_dim), device=projection.device)
    pending_rows: list[Tensor] = []                                               # (B_j, P) raw rows
    pending_index: list[int] = []

    def flush() -> None:
        if not pending_rows:
            return
        feats = F.normalize(projection.project(torch.cat(pending_rows)), dim=1)  # (sum B_j, d)
        out[torch.tensor(pending_index, device=out.device)] = feats
        pending_rows.clear()
        pending_index.clear()

    show = progress and distributed.is_main()
    for chunk in tqdm(batches, desc=desc, disable=not show, dynamic_ncols=True, leave=False):
        batch = collate([examples[i] for i in chunk], pad_id, device)
        grads = flatten_grads(per_example_grads(model, params, batch), names).detach()      # (B, P)
        if moments is not None:
            grads = adam_direction(grads, *moments, betas=checkpoint.betas, eps=checkpoint.eps,
                                   step=checkpoint.adam_step, bias_correction=bias_correction)
        pending_rows.append(grads)
        pending_index.extend(chunk if slot is None else [slot[i] for i in chunk])
        if sum(r.shape[0] for r in pending_rows) >= buffer_size:
            flush()
    flush()
    if slot is None:
        return out
    # every rank's (its example indices, its (n_r, d) features), moved to the CPU so that they unpickle anywhere
    full = torch.zeros((len(examples), projection.out_dim), device=projection.device)
    for index, feats in distributed.all_gather_objects((mine, out.cpu())):
        if index:
            full[torch.tensor(index, device=full.device)] = feats.to(full.device)
    return full


@dataclass
class LessScores:
    """Scores of a pool: ``scores`` (N,) = sum_c ``lrs[c]`` * ``per_checkpoint[c]``; ``per_checkpoint`` (C, N) holds
    the mean cosine similarity to the validation gradients at each checkpoint."""

    scores: Tensor
    per_checkpoint: Tensor
    lrs: list[float]


def less_scores(model: torch.nn.Module, pool: Sequence[TokenizedExample], validation: Sequence[TokenizedExample],
                checkpoints: Sequence[WarmupCheckpoint], projection: RandomProjection, *, pad_id: int,
                bias_correction: bool = False, batch_size: int = 8, buffer_size: int = 128,
                progress: bool = False, row_dir: Path | None = None) -> LessScores:
    """LESS scores of every pool example against the validation examples over the warm-up checkpoints.

    With ``row_dir``, each checkpoint's row of mean cosines is written there when done (``scores-C.safetensors``)
    and read back instead of recomputed, so an interrupted scoring loses at most one checkpoint's work.

    Under several processes every rank calls this: the features are sharded over the ranks and gathered
    (:func:`gradient_features` with ``shard``), every rank returns the same scores, and rank 0 alone reads and
    writes ``row_dir``."""
    if not checkpoints:
        raise ValueError("LESS needs at least one warm-up checkpoint")
    if not validation or not pool:
        raise ValueError("LESS needs pool and validation examples")
    model.eval()
    rows = []
    for c, checkpoint in enumerate(checkpoints, 1):
        path = row_dir / f"scores-{c}.safetensors" if row_dir is not None else None
        # rank 0 decides which checkpoints are done and hands their rows to every rank, so that all ranks skip the
        # same checkpoints (the gathers below are collective)
        done = None
        if path is not None and distributed.is_main() and path.is_file():
            done = load_tensors(path)["mean_cosine"]
        done = distributed.broadcast_object(done)
        if done is not None:
            rows.append(done)
            continue
        kwargs = dict(pad_id=pad_id, batch_size=batch_size, buffer_size=buffer_size, progress=progress, shard=True)
        val = gradient_features(model, validation, checkpoint.params, projection,
                                desc=f"LESS val grads {c}/{len(checkpoints)}", **kwargs)   # (n_val, d) on every rank
        finite = torch.isfinite(val).all(dim=1)                                   # (n_val,)
        if not bool(finite.any()):
            raise TrainingError(f"every target example's gradient is NaN/inf at LESS warm-up checkpoint {c}; lower "
                                f"the warm-up lr or use fp32")
        if not bool(finite.all()) and distributed.is_main():
            warnings.warn(f"{int((~finite).sum())} target example(s) have NaN/inf gradients at LESS checkpoint {c}; "
                          f"they are left out of the target direction", stacklevel=2)
        target = val[finite].mean(dim=0)                                          # (d,)
        feats = gradient_features(model, pool, checkpoint.params, projection, checkpoint=checkpoint,
                                  bias_correction=bias_correction, desc=f"LESS pool grads {c}/{len(checkpoints)}",
                                  **kwargs)                                       # (N, d) on every rank
        rows.append((feats @ target).cpu())                                       # (N,) mean cosine
        if path is not None and distributed.is_main():
            save_tensors(path, {"mean_cosine": rows[-1]})
        del feats
    per_checkpoint = torch.stack(rows)                                            # (C, N)
    lrs = [float(c.lr) for c in checkpoints]
    scores = (torch.tensor(lrs, dtype=per_checkpoint.dtype).unsqueeze(1) * per_checkpoint).sum(dim=0)
    return LessScores(scores=scores, per_checkpoint=per_checkpoint, lrs=lrs)


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------

def warmup_indices(pool_size: int, fraction: float, seed: int) -> list[int]:
    """The seeded random warm-up rows: ``ceil(fraction * pool_size)`` of them, at least MIN_WARMUP_ROWS (or the whole
    pool when smaller), sorted."""
    count = min(pool_size, max(MIN_WARMUP_ROWS, math.ceil(fraction * pool_size)))
    return sorted(random.Random(seed).sample(range(pool_size), count))


def select_less(*, data: str, budget: str | int, output: str | Path, seed: int = 0,
                examples: Sequence[Example] | None = None, model: str | None = None, config: LessConfig | None = None,
                data_settings: DataSettings | None = None, device: str = "auto", trust_remote_code: bool = False,
                progress: bool = True, scores_from: str | Path | None = None, checkpoint_every: int | None = None,
                checkpoint_seconds: float | None = 300.0) -> dict[str, Any]:
    """Entry of ``textdistill select --method less``: choose ``budget`` rows of ``data`` by LESS and write a
    selection file (random rows: :func:`textdistill.selection.select_random`).

    ``examples`` (optional) are the already loaded rows of ``data``; otherwise ``data`` is loaded with
    ``data_settings`` (default: the warm-up recipe's). LESS (see the module docstring) needs ``model`` and
    ``config`` (a :class:`LessConfig` naming its ``target``, e.g.
    ``"arc-easy:validation"``, ``"mmlu:dev"`` or a multiple-choice file); ``seed`` drives the warm-up rows, the LoRA
    init and warm-up order, the validation sample and the projection; ``config.warmup`` is the warm-up recipe (LoRA +
    AdamW; epochs and seed are replaced), and ``config.keep_checkpoints`` keeps the warm-up checkpoints as
    safetensors in ``<output stem>.less/`` beside the output file. ``scores_from`` cuts the budget from the
    ``all_scores`` of an earlier LESS selection file of the same data (no model work).

    Under ``torchrun`` / ``accelerate launch`` every rank runs this: the warm-up as
    :func:`textdistill.training.train_model` runs it, the gradient features sharded over the ranks and gathered,
    and rank 0 alone writes the selection file and the unfinished work; every rank returns the same result.

    LESS's unfinished work is kept in ``.<output name>.partial/`` beside the output (warm-up state every
    ``checkpoint_every`` steps / ``checkpoint_seconds`` seconds, each warm-up epoch, each checkpoint's scores); a
    rerun with the same settings continues it, and gives the same selection as an uninterrupted run.

    The pool, the budget, the model and the target are checked before a model is loaded (ConfigError / DataError /
    ModelError; ``config`` checks its own options when it is made). Returns ``{"count", "indices", "scores"}`` and
    LESS's details.
    """
    config = config or LessConfig()
    settings = data_settings or (config.warmup.data if config.warmup is not None else DataSettings())
    task = split = None
    tokenizer = None
    if scores_from is not None:
        pool = list(examples) if examples is not None else load_examples(data, settings)
        return reselect(scores_from, budget, output, pool)
    if not model:
        raise ConfigError("LESS needs a model for its gradients (model='smollm2-135m', a folder or a hub id)")
    task, split = parse_target(config.target)
    resolve_model_path(model)                       # ModelError for a missing folder / unknown name
    load_task(task, split, limit=1, fields=config.target_fields)   # the target's files exist and read
    warmup_config(config.warmup, epochs=config.warmup_epochs, seed=seed)
    if examples is None and settings.template == "chat":
        tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    pool = list(examples) if examples is not None else load_examples(data, settings, tokenizer=tokenizer)
    if not pool:
        raise DataError(f"dataset '{data}' is empty")
    count = resolve_budget(budget, len(pool))
    output = Path(output)
    # under torchrun / accelerate launch every rank joins (the features are sharded)
    with distributed.main_process_owns(output.parent / f".{output.name}.lock", f"the LESS selection {output}", device):
        return _select_less(pool=pool, count=count, data=data, budget=budget, output=output, seed=seed,
                            model_name=model, task=task, split=split, settings=settings, tokenizer=tokenizer,
                            config=config, device=device,
                            trust_remote_code=trust_remote_code, progress=progress, checkpoint_every=checkpoint_every,
                            checkpoint_seconds=checkpoint_seconds)


def _select_less(*, pool: list[Example], count: int, data: str, budget: str | int, output: Path, seed: int,
                 model_name: str, task: str, split: str, settings: DataSettings, tokenizer: Any | None,
                 config: LessConfig, device: str,
                 trust_remote_code: bool, progress: bool, checkpoint_every: int | None = None,
                 checkpoint_seconds: float | None = 300.0) -> dict[str, Any]:
    if tokenizer is None:
        tokenizer = load_tokenizer(model_name, trust_remote_code=trust_remote_code)
    validation = target_examples(task, split, template=settings.template, max_examples=config.max_val_examples,
                                 seed=seed, tokenizer=tokenizer, fields=config.target_fields)
    overlap = eval_overlap(pool, target_eval_prompts(task, split, template=settings.template, tokenizer=tokenizer,
                                                     fields=config.target_fields))
    if len(pool) - len(overlap) < count:
        raise ConfigError(f"budget {budget} ({count} rows) is larger than the {len(pool) - len(overlap)} pool rows "
                          f"left after removing {len(overlap)} that repeat {task} evaluation prompts")
    if overlap:
        warnings.warn(f"{len(overlap)} pool rows repeat a {task} evaluation prompt; LESS will not select them",
                      stacklevel=3)
    tokenize = lambda rows: tokenize_examples(tokenizer, rows, max_length=settings.max_length,  # noqa: E731
                                              append_eos=settings.append_eos)
    pool_tok, val_tok = tokenize(pool), tokenize(validation)
    for name, rows in (("pool", pool_tok), ("target", val_tok)):
        for row in rows:
            if not row.prompt_ids and len(row.response_ids) < 2:   # nothing precedes the only response token
                raise DataError(f"{name} example {row.id or '?'} has no predicted response token")
    recipe = warmup_config(config.warmup, epochs=config.warmup_epochs, seed=seed, data=settings)
    warm_rows = warmup_indices(len(pool), config.warmup_fraction, seed)

    # --- model work starts here
    target_device = distributed.init(device)   # this rank's device (resolve_device's choice); joins the group
    base = load_model(model_name, dtype=base_dtype(recipe, device), device=target_device, attn_implementation="eager",
                      trust_remote_code=trust_remote_code)
    torch.manual_seed(seed)
    net = add_lora(base, recipe.lora)
    pad_id = tokenizer.pad_token_id
    # unfinished work lives beside the output until the selection file is written: a rerun with the same settings
    # continues it (the warm-up exactly from its last checkpoint, the scores from the last finished checkpoint row)
    work_dir = output.parent / f".{output.name}.partial"
    fingerprint = {"model": model_name, "data": sha256_json([[e.prompt, e.response] for e in pool]), "seed": seed,
                   "less": to_jsonable(config), "recipe": to_jsonable(recipe), "target": f"{task}:{split}"}
    if distributed.is_main():   # the other ranks wait until the folder is settled, then read what it holds
        if (work_dir / "fingerprint.json").is_file() and read_json(work_dir / "fingerprint.json") != fingerprint:
            warnings.warn(f"{work_dir} holds unfinished LESS work of other settings; starting over", stacklevel=3)
            shutil.rmtree(work_dir)
        elif (work_dir / "fingerprint.json").is_file():
            warnings.warn(f"continuing the unfinished LESS work in {work_dir}", stacklevel=3)
        atomic_write_json(work_dir / "fingerprint.json", fingerprint)
    distributed.barrier()
    checkpoints = run_warmup(net, [pool_tok[i] for i in warm_rows], recipe, pad_id=pad_id, progress=progress,
                             work_dir=work_dir, checkpointer=TrainCheckpointer(
                                 work_dir / "warmup", fingerprint=fingerprint, every_steps=checkpoint_every,
                                 every_seconds=checkpoint_seconds))
    checkpoint_dir = None
    if config.keep_checkpoints:
        checkpoint_dir = output.parent / f"{output.stem}.less"
        for ck in checkpoints if distributed.is_main() else ():
            ck.save(checkpoint_dir / f"warmup-epoch{ck.epoch}.safetensors")
    num_params = sum(t.numel() for t in checkpoints[0].params.values())
    proj = RandomProjection(num_params, config.projection_dim, seed=seed, kind=config.projection, device=target_device)
    result = less_scores(net, pool_tok, val_tok, checkpoints, proj, pad_id=pad_id,
                         bias_correction=config.bias_correction, batch_size=config.batch_size,
                         buffer_size=config.buffer_size, progress=progress, row_dir=work_dir)
    # a pool row whose gradient was NaN/inf at some checkpoint has no score: never selected, reported
    faulty = [i for i, value in enumerate(result.scores.tolist()) if not math.isfinite(value)]
    if faulty:
        if len(faulty) == len(pool):
            raise TrainingError("every pool example's LESS gradient is NaN/inf; lower the warm-up lr or use fp32")
        if distributed.is_main():
            warnings.warn(f"{len(faulty)} pool row(s) have NaN/inf LESS gradients (e.g. {pool[faulty[0]].id}); "
                          f"they are not selected", stacklevel=3)
    indices = top_indices(result.scores, count, exclude=sorted(set(overlap) | set(faulty)))
    eval_prompts = {e.prompt.strip() for e in validation}
    chosen_overlap = [i for i in indices if i in set(overlap) or pool[i].prompt.strip() in eval_prompts]
    if chosen_overlap:  # cannot happen: top_indices excludes them; kept as a guard against future edits
        raise DataError(f"LESS selected rows that repeat {task} evaluation prompts: {chosen_overlap[:5]}")
    all_scores = [value if math.isfinite(value) else None for value in result.scores.tolist()]   # JSON has no NaN
    extra = {"model": model_name, "target": f"{task}:{split}", "projection": config.projection,
             "projection_dim": config.projection_dim, "projection_seed": seed, "num_checkpoints": len(checkpoints),
             "checkpoint_lrs": result.lrs, "checkpoint_steps": [c.step for c in checkpoints],
             "num_lora_params": num_params, "warmup_rows": len(warm_rows), "warmup_fraction": config.warmup_fraction,
             "warmup_epochs": config.warmup_epochs, "val_examples": len(val_tok),
             "adam_bias_correction": config.bias_correction, "max_length": settings.max_length,
             "template": settings.template, "excluded_eval_overlap": [pool[i].id for i in overlap],
             "order": "score descending", "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None,
             "all_scores": all_scores}
    if faulty:
        extra["gradient_faults"] = [pool[i].id for i in faulty]
    if distributed.is_main():
        write_selection(output, method="less", data=data, budget=budget, seed=seed, examples=pool, indices=indices,
                        scores=[all_scores[i] for i in indices], extra=extra)
        shutil.rmtree(work_dir, ignore_errors=True)   # the selection file is written: nothing left to resume
    distributed.barrier()   # no rank returns before the file is there
    return {"count": count, "indices": indices, "scores": [all_scores[i] for i in indices],
            "all_scores": all_scores, "checkpoint_lrs": result.lrs, "excluded": overlap,
            "checkpoint_dir": checkpoint_dir}
