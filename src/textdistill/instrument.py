"""The paired held-out instrument: the matching loss of any training set on fixed, held-out expert segments.

Trajectory matching asks of a training set: if a student starts at an expert's snapshot theta*_t and takes N SGD
steps on this set, how close does it land to the expert's theta*_{t+M}? This module answers that question for any
set (real rows, the distillation's continuous vectors, its decoded text, random subsets, a selection), on draws
that every set shares, so that two sets can be compared draw by draw (a paired difference) instead of through
different random draws:

* a *draw* is (expert, start snapshot t, the student's minibatch order over set positions 0..S-1); draws come from
  the **held-out** experts (the last ``heldout_experts`` runs), which the distillation never sees, and depend only
  on the experts, the student settings, the set size S and the seed;
* the student takes plain SGD steps in fp32 without any graph (first-order: :func:`unroll.first_order_unroll`);
* the loss of a draw is ``||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2`` (1 = no closer than the
  start; 0 = on the target);
* the *floor* of a draw replays the real rows the expert trained on in that very segment, in its order.

Entry of ``textdistill match-eval``: :func:`match_eval`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from . import distributed
from .artifacts import atomic_write_json, environment_versions, machine_description, sha256_json, to_jsonable
from .errors import ConfigError
from .unroll import SyntheticBatch, first_order_unroll, matching_loss

__all__ = [
    "Draw",
    "InstrumentConfig",
    "ResolvedStudent",
    "SampleSet",
    "Scorer",
    "ScoreCache",
    "heldout_report",
    "load_pool",
    "StudentSettings",
    "make_draws",
    "match_eval",
    "paired_difference",
    "resolve_student",
    "sample_minibatches",
]


@dataclass(frozen=True)
class StudentSettings:
    """How the student follows an expert segment; ``None`` takes the experts' own value, so that by default the
    student repeats the expert's steps (N = the expert's optimizer steps in a segment, its batch size, its lr) and
    could land exactly on the target if its data were the expert's."""

    syn_steps: int | None = None  # N student SGD steps; None: snapshot_every x expert_epochs
    batch_size: int | None = None  # samples per student step; None: the experts' batch size
    expert_epochs: int = 1  # M: the target is this many snapshots after the start
    lr: float | None = None  # the student's (starting) learning rate; None: the experts' lr
    # a line search: distill picks, among these, the lr at which its starting samples match training draws best
    lr_grid: tuple[float, ...] = ()
    min_start: int = 0  # start snapshot t is drawn from [min_start, max_start]
    max_start: int | None = None  # None: the last snapshot that has a target M ahead

    def __post_init__(self) -> None:
        for name in ("syn_steps", "batch_size", "expert_epochs"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"student.{name} must be positive, got {value}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"student.lr must be positive, got {self.lr}")
        if any(not lr > 0 for lr in self.lr_grid):
            raise ConfigError(f"student.lr_grid must hold positive learning rates, got {list(self.lr_grid)}")
        if self.lr is not None and self.lr_grid:
            raise ConfigError("set student.lr or student.lr_grid (a line search), not both")
        if self.min_start < 0:
            raise ConfigError(f"student.min_start must be >= 0, got {self.min_start}")


@dataclass(frozen=True)
class ResolvedStudent:
    """Student settings with the experts' values filled in."""

    steps: int
    batch_size: int
    span: int  # M
    lr: float
    min_start: int
    max_start: int


def resolve_student(settings: StudentSettings, trajectories: Any) -> ResolvedStudent:
    """Fill ``None`` settings from the experts' manifest and check the start window fits the trajectories."""
    span = settings.expert_epochs
    max_start = trajectories.num_snapshots - 1 - span if settings.max_start is None else settings.max_start
    if max_start < settings.min_start or max_start + span > trajectories.num_snapshots - 1:
        raise ConfigError(f"start window [{settings.min_start}, {max_start}] with expert_epochs={span} does not fit "
                          f"trajectories of {trajectories.num_snapshots} snapshots in {trajectories.root}")
    return ResolvedStudent(
        steps=settings.syn_steps or trajectories.snapshot_every * span,
        batch_size=settings.batch_size or trajectories.samples_per_step,
        span=span, lr=float(settings.lr if settings.lr is not None else trajectories.manifest["lr"]),
        min_start=settings.min_start, max_start=max_start)


@dataclass(frozen=True)
class InstrumentConfig:
    """The held-out instrument: which draws, how many, and the null distribution's size."""

    draws: int = 12  # held-out (expert, start, minibatch order) draws shared by every scored set
    seed: int = 0
    heldout_experts: int = 1  # the last K expert runs are held out from distillation and used here
    random_subsets: int = 10  # random real subsets of the same size scored as the null distribution

    def __post_init__(self) -> None:
        if self.draws < 2:
            raise ConfigError(f"instrument.draws must be at least 2 (a paired interval needs two), got {self.draws}")
        if self.random_subsets < 0:
            raise ConfigError(f"instrument.random_subsets must be >= 0, got {self.random_subsets}")


# ----------------------------------------------------------------------------------------------------------------
# Draws
# ----------------------------------------------------------------------------------------------------------------

def sample_minibatches(count: int, batch_size: int, steps: int, generator: torch.Generator) -> list[list[int]]:
    """N minibatches of set positions, walking shuffled passes over the set (each sample once per pass; the
    remainder of a pass that cannot fill a batch is dropped, so a batch never repeats a sample)."""
    size = min(batch_size, count)
    batches: list[list[int]] = []
    order: list[int] = []
    for _ in range(steps):
        if len(order) < size:
            order = torch.randperm(count, generator=generator).tolist()
        batches.append(order[:size])
        order = order[size:]
    return batches


@dataclass(frozen=True)
class Draw:
    """One segment to match: expert run, start snapshot index, and the student's minibatches (set positions)."""

    expert: int
    start: int
    batches: tuple[tuple[int, ...], ...]

    def first_use(self, position: int) -> int | None:
        """The first student step whose minibatch holds set position ``position`` (None if no step does)."""
        for step, batch in enumerate(self.batches):
            if position in batch:
                return step
        return None

    def to_json(self) -> dict[str, Any]:
        return {"expert": self.expert, "start": self.start, "batches": [list(b) for b in self.batches]}


def _seed_of(*parts: Any) -> int:
    return int(sha256_json(list(parts))[:15], 16)


def make_draws(experts: Sequence[int], student: ResolvedStudent, set_size: int, count: int, seed: int) -> list[Draw]:
    """``count`` draws over ``experts``; the same arguments always give the same draws, in the same order."""
    if set_size < 1:
        raise ConfigError("a training set needs at least one sample")
    # the draws do not depend on the lr, so sets scored at different learning rates share them
    shape = [student.steps, student.batch_size, student.span, student.min_start, student.max_start]
    generator = torch.Generator().manual_seed(_seed_of("draws", list(experts), shape, set_size, seed))
    draws = []
    for _ in range(count):
        expert = list(experts)[int(torch.randint(len(experts), (1,), generator=generator))]
        start = int(torch.randint(student.min_start, student.max_start + 1, (1,), generator=generator))
        batches = sample_minibatches(set_size, student.batch_size, student.steps, generator)
        draws.append(Draw(expert, start, tuple(tuple(b) for b in batches)))
    return draws


# ----------------------------------------------------------------------------------------------------------------
# Training sets as the student sees them
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class SampleSet:
    """S samples as the student sees them: prompt input embeddings (P_i, H) (token embeddings, or learned vectors)
    followed by response token ids (R_i,)."""

    prompts: list[Tensor]
    responses: list[Tensor]

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.responses) or not self.prompts:
            raise ValueError(f"a sample set needs as many prompts as responses (>= 1): {len(self.prompts)} vs "
                             f"{len(self.responses)}")

    def __len__(self) -> int:
        return len(self.prompts)

    def fingerprint(self) -> str:
        """Content hash of the samples (their prompt vectors and responses, in order)."""
        digest = hashlib.sha256()
        for prompt, response in zip(self.prompts, self.responses):
            digest.update(prompt.detach().float().cpu().numpy().tobytes())
            digest.update(b"|" + response.cpu().numpy().tobytes() + b";")
        return digest.hexdigest()

    def batch(self, positions: Sequence[int]) -> SyntheticBatch:
        return SyntheticBatch.from_samples([self.prompts[i] for i in positions],
                                           [self.responses[i] for i in positions])

    @classmethod
    def from_token_ids(cls, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                       embed_matrix: Tensor) -> SampleSet:
        """Samples given as token ids; prompts are looked up in ``embed_matrix`` (V, H), the space the model's
        input embedding module outputs (see :func:`projection.input_embedding_matrix`)."""
        device = embed_matrix.device
        prompts = [embed_matrix[torch.as_tensor(list(p), dtype=torch.long, device=device)] for p in prompt_ids]
        responses = [torch.as_tensor(list(r), dtype=torch.long, device=device) for r in response_ids]
        return cls(prompts, responses)

    @classmethod
    def from_tokenized(cls, tokenized: Sequence[Any], embed_matrix: Tensor) -> SampleSet:
        """From :class:`data.TokenizedExample` rows (BOS + prompt | response + EOS, as training sees them)."""
        return cls.from_token_ids([t.prompt_ids for t in tokenized], [t.response_ids for t in tokenized],
                                  embed_matrix)


class Scorer:
    """Matching losses of sample sets on fixed draws (fp32 or the model's dtype, no autocast, no graph).

    Snapshots are loaded once and kept (LoRA tensors are small)."""

    def __init__(self, model: torch.nn.Module, trajectories: Any, student: ResolvedStudent, *,
                 device: torch.device | str, dtype: torch.dtype = torch.float32):
        self.model, self.trajectories, self.student = model, trajectories, student
        self.device, self.dtype = torch.device(device), dtype
        self._params: dict[tuple[int, int], dict[str, Tensor]] = {}

    def params(self, expert: int, index: int) -> dict[str, Tensor]:
        key = (expert, index)
        if key not in self._params:
            self._params[key] = self.trajectories.load(expert, index, device=self.device, dtype=self.dtype)
        return self._params[key]

    def endpoints(self, draw: Draw) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(theta*_t, theta*_{t+M}) of a draw."""
        return self.params(draw.expert, draw.start), self.params(draw.expert, draw.start + self.student.span)

    def unroll(self, samples: SampleSet, draw: Draw, *, lr: float | None = None, from_step: int = 0,
               from_params: dict[str, Tensor] | None = None,
               keep_snapshots: bool = False) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """The student's first-order steps on ``samples`` along ``draw`` (optionally continuing at step
        ``from_step`` from ``from_params``, see :func:`unroll.first_order_unroll`)."""
        start, _ = self.endpoints(draw)
        batches = [samples.batch(b) for b in draw.batches[from_step:]]
        with torch.autocast(device_type=self.device.type, enabled=False):
            return first_order_unroll(self.model, from_params if from_params is not None else start, batches,
                                      self.student.lr if lr is None else lr, keep_snapshots=keep_snapshots)

    def loss_of(self, params: dict[str, Tensor], draw: Draw) -> float:
        start, target = self.endpoints(draw)
        return float(matching_loss(params, start, target))

    def loss(self, samples: SampleSet, draw: Draw, *, lr: float | None = None) -> float:
        """Matching loss of one draw."""
        return self.loss_of(self.unroll(samples, draw, lr=lr)[0], draw)

    def losses(self, samples: SampleSet, draws: Sequence[Draw], *, lr: float | None = None) -> list[float]:
        """Matching loss of every draw, in draw order."""
        return [self.loss(samples, d, lr=lr) for d in draws]

    def floor_loss(self, pool: Sequence[Any], draw: Draw, embed_matrix: Tensor) -> float | None:
        """The loss of the real rows the expert trained on in this draw's segment, taken in the expert's order in
        batches of the student's size (cycled if the student takes more samples than the segment holds). None for
        experts that did not record their data order."""
        segment = self.trajectories.segment_batches(draw.expert, draw.start, self.student.span)
        if segment is None:
            return None
        rows = [i for step in segment for i in step]
        size, steps = self.student.batch_size, self.student.steps
        needed = [rows[k % len(rows)] for k in range(size * steps)]
        distinct = sorted(set(needed))
        position = {row: p for p, row in enumerate(distinct)}
        samples = SampleSet.from_tokenized([pool[i] for i in distinct], embed_matrix)
        replay = Draw(draw.expert, draw.start,
                      tuple(tuple(position[r] for r in needed[k * size:(k + 1) * size]) for k in range(steps)))
        return self.loss(samples, replay)


class ScoreCache:
    """Held-out losses already computed, so that runs sharing experts (an ablation, a rerun) do not score the same
    random subsets and floor again: one small JSON per (set, draws, lr) in ``folder`` (by default
    ``<experts>/instrument_cache/``), written atomically, so concurrent runs at worst compute a value twice.

    ``scope`` names everything else a loss depends on (the experts' manifest, the student, dtype, device type, the
    cache format); a key hashes it with the set's content, the draws and the lr. A folder that cannot be written
    turns the cache off with one warning (scores are then computed as without it)."""

    VERSION = 1   # bump when the scoring itself changes, so that older values are not reused

    def __init__(self, folder: str | Path, scope: Mapping[str, Any]):
        self.folder = Path(folder)
        self.scope = sha256_json({"version": self.VERSION, **to_jsonable(dict(scope))})
        self.hits = 0
        self._writable = True

    def _path(self, kind: str, content: str, draws: Sequence[Draw], lr: float) -> Path:
        key = sha256_json([self.scope, kind, content, [d.to_json() for d in draws], float(lr)])
        return self.folder / f"{kind}-{key[:24]}.json"

    def get(self, kind: str, content: str, draws: Sequence[Draw], lr: float) -> list[float] | None:
        path = self._path(kind, content, draws, lr)
        try:
            losses = json.loads(path.read_text())["losses"]
        except (OSError, ValueError, KeyError):
            return None
        if len(losses) != len(draws):
            return None
        self.hits += 1
        return [float(x) for x in losses]

    def put(self, kind: str, content: str, draws: Sequence[Draw], lr: float, losses: Sequence[float]) -> None:
        if not self._writable:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self._path(kind, content, draws, lr), {"losses": list(losses)})
        except OSError as error:
            self._writable = False
            warnings.warn(f"the instrument's score cache in {self.folder} cannot be written ({error}); "
                          f"scores are computed without it", stacklevel=2)


# ----------------------------------------------------------------------------------------------------------------
# Paired statistics
# ----------------------------------------------------------------------------------------------------------------

def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Mean of the per-draw differences a - b with a 95% t-interval (two numbers) over the draws."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired difference needs two equal-length lists of >= 2 draws, got {len(a)}, {len(b)}")
    from scipy import stats

    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n, "draws": diffs}


def summarize_losses(losses: Sequence[float]) -> dict[str, Any]:
    return {"loss": sum(losses) / len(losses), "draws": list(losses)}


# ----------------------------------------------------------------------------------------------------------------
# Entry: textdistill match-eval
# ----------------------------------------------------------------------------------------------------------------

def load_student_model(trajectories: Any, *, device: str = "auto", dtype: str = "fp32",
                       trust_remote_code: bool = False) -> tuple[Any, Any]:
    """The experts' base model with an (empty) LoRA of their shape, in eval mode, and its tokenizer; refuses a
    model that differs from the experts' and trajectories the student cannot follow (not plain SGD)."""
    from .config import LoraSettings
    from .experts import check_compatible, check_plain_sgd
    from .models import add_lora, load_model, load_tokenizer, model_identity
    from .unroll import lora_parameters

    manifest = trajectories.manifest
    check_plain_sgd(manifest, trajectories.root)
    model_name = manifest["model"]["path"]
    tokenizer = load_tokenizer(model_name, trust_remote_code=trust_remote_code)
    base = load_model(model_name, dtype=dtype, device=device, attn_implementation="eager",
                      trust_remote_code=trust_remote_code)
    lora = LoraSettings(**{**manifest["lora"], "target_modules": tuple(manifest["lora"]["target_modules"]),
                           "dropout": 0.0})
    with torch.random.fork_rng(devices=[]):  # the LoRA init is overwritten by snapshots; keep the caller's RNG
        torch.manual_seed(0)
        model = add_lora(base, lora)
    model.eval()
    shapes = {k: tuple(v.shape) for k, v in lora_parameters(model).items()}
    check_compatible(trajectories, model_identity(manifest["model"]["name"], model, tokenizer), shapes)
    return model, tokenizer


def tokenize_for_experts(tokenizer: Any, examples: Sequence[Any], manifest: dict[str, Any]) -> list[Any]:
    """Tokenize rows exactly as the experts' training did (same max_length and EOS)."""
    from .data import tokenize_examples

    settings = manifest["data_settings"]
    return tokenize_examples(tokenizer, examples, max_length=settings["max_length"],
                             append_eos=settings.get("append_eos", True))


def load_pool(tokenizer: Any, manifest: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """The experts' pool as examples and tokenized as they saw it (checked against the recorded hash)."""
    from .config import DataSettings
    from .data import load_examples
    from .errors import TrajectoryError

    examples = load_examples(manifest["data"], DataSettings(**manifest["data_settings"]), tokenizer=tokenizer)
    if sha256_json([[e.prompt, e.response] for e in examples]) != manifest["pool_sha256"]:
        raise TrajectoryError(f"the pool '{manifest['data']}' differs from the one the experts were trained on")
    return examples, tokenize_for_experts(tokenizer, examples, manifest)


def heldout_report(scorer: Scorer, draws: Sequence[Draw], sets: Mapping[str, SampleSet | None],
                   null: Sequence[SampleSet], *, pool: Sequence[Any] | None = None, embed_matrix: Tensor | None = None,
                   cache: ScoreCache | None = None, progress: bool = True) -> dict[str, Any]:
    """Score named sets, a null distribution of random subsets and the floor on the same draws.

    ``sets`` may hold ``init`` (the starting samples), ``continuous`` (learned vectors), ``projected`` (the text)
    and any other named set (reported under ``compare``); ``None`` values are skipped. The floor needs the
    tokenized ``pool`` and ``embed_matrix``. Paired differences (mean, 95% interval) compare the text and the
    vectors with the starting samples, and the floor with the mean random subset. With a ``cache``, losses an
    earlier run computed for the same set, draws and lr are read instead of recomputed (``cached_sets`` counts
    them).

    Under ``torchrun`` / ``accelerate launch`` every rank calls it with the same arguments: each scores its share of
    the draws, the losses are gathered in order on every rank, and rank 0 alone reads and writes the cache (its
    hits are broadcast, so that every rank takes the same path).
    """
    from tqdm.auto import tqdm

    named = {name: s for name, s in sets.items() if s is not None}
    lr = scorer.student.lr
    main = distributed.is_main()
    # identical sets (e.g. a distillation that changed nothing, next to its starting samples) are scored once
    scored: dict[str, list[float]] = {}
    distinct = {s.fingerprint() for s in [*named.values(), *null]}
    bar = tqdm(total=(len(distinct) + 1) * len(draws), desc="held-out instrument", disable=not progress or not main,
               dynamic_ncols=True)
    hits_before = cache.hits if cache is not None else 0

    def cached(kind: str, key: str) -> list[float] | None:
        return distributed.broadcast_object(cache.get(kind, key, draws, lr) if cache is not None and main else None)

    def over_draws(loss_of) -> list:
        """``loss_of(draw)`` for every draw, each rank its share, gathered in draw order."""
        mine = []
        for index in distributed.shard_indices(len(draws)):
            mine.append(loss_of(draws[index]))
            bar.update(distributed.world_size())
        return distributed.merge_shards(distributed.all_gather_objects(mine), len(draws))

    def score(samples: SampleSet) -> list[float]:
        key = samples.fingerprint()
        if key not in scored:
            stored = cached("set", key)
            if stored is not None:
                bar.update(len(draws))
            else:
                stored = over_draws(lambda draw: scorer.loss(samples, draw))
                if cache is not None and main:
                    cache.put("set", key, draws, lr, stored)
            scored[key] = stored
        return list(scored[key])

    losses = {name: score(s) for name, s in named.items()}
    random_losses = [score(s) for s in null]
    floors: list[float | None] | None = cached("floor", "") if pool is not None else None
    if floors is not None:
        bar.update(len(draws))
    else:
        floors = (over_draws(lambda draw: scorer.floor_loss(pool, draw, embed_matrix)) if pool is not None
                  else [None] * len(draws))
        if cache is not None and main and pool is not None and all(f is not None for f in floors):
            cache.put("floor", "", draws, lr, floors)
    bar.close()
    report: dict[str, Any] = {"lr": lr, "draws": [d.to_json() for d in draws],
                              "cached_sets": (cache.hits - hits_before) if cache is not None else 0}
    for name in ("init", "continuous", "projected"):
        report[name] = summarize_losses(losses[name]) if name in losses else None
    report["compare"] = {name: summarize_losses(v) for name, v in losses.items()
                         if name not in ("init", "continuous", "projected")}
    report["random"] = [summarize_losses(v) for v in random_losses]
    report["floor"] = None if any(f is None for f in floors) else summarize_losses(floors)
    if "init" in losses:
        for name in ("projected", "continuous"):
            if name in losses:
                report[f"{name}_minus_init"] = paired_difference(losses[name], losses["init"])
    if "projected" in losses and random_losses:
        mine = report["projected"]["loss"]
        report["projected_rank_among_random"] = 1 + sum(r["loss"] < mine for r in report["random"])
    if report["floor"] is not None and random_losses:
        null_mean = [sum(col) / len(col) for col in zip(*random_losses)]
        report["floor_minus_random_mean"] = paired_difference(floors, null_mean)
    return report


def match_eval(*, experts: str | Path, data: str, output: str | Path | None, config: InstrumentConfig,
               student: StudentSettings, prompt_field: str = "prompt", response_field: str = "response", floor: bool = True,
               lrs: Sequence[float] = (), device: str = "auto", trust_remote_code: bool = False,
               progress: bool = True) -> dict[str, Any]:
    """Entry of ``textdistill match-eval``: the matching loss of the dataset ``data`` (any prompt/response
    dataset, e.g. a ``distilled.jsonl``, tokenized as the experts' pool was) on the held-out draws.

    Returns (and writes to ``output``) ``loss`` (mean over the draws), ``draws`` (one loss per draw, in the fixed
    draw order), the draw specifications, the floor of each draw and, with ``lrs``, the mean loss at each lr.
    """
    from tqdm.auto import tqdm

    from .config import DataSettings
    from .data import load_examples
    from .experts import load_experts
    from .models import resolve_device
    from .projection import input_embedding_matrix

    started = time.time()
    trajectories = load_experts(experts)
    manifest = trajectories.manifest
    model, tokenizer = load_student_model(trajectories, device=device, trust_remote_code=trust_remote_code)
    resolved = resolve_student(student, trajectories)
    _, heldout = trajectories.split(config.heldout_experts)
    settings = DataSettings(prompt_field=prompt_field, response_field=response_field,
                            max_length=manifest["data_settings"]["max_length"])
    examples = load_examples(data, settings, tokenizer=tokenizer)
    embed_matrix = input_embedding_matrix(model).float()
    samples = SampleSet.from_tokenized(tokenize_for_experts(tokenizer, examples, manifest), embed_matrix)
    draws = make_draws(heldout, resolved, len(samples), config.draws, config.seed)
    scorer = Scorer(model, trajectories, resolved, device=resolve_device(device))
    losses = [scorer.loss(samples, d) for d in tqdm(draws, desc="match-eval", disable=not progress)]
    result: dict[str, Any] = {
        "data": data, "experts": str(experts), "size": len(samples), "heldout_experts": heldout,
        "student": dataclasses.asdict(resolved), "seed": config.seed, **summarize_losses(losses),
        "draw_specs": [d.to_json() for d in draws]}
    if floor:
        _, pool = load_pool(tokenizer, manifest)
        floors = [scorer.floor_loss(pool, d, embed_matrix) for d in draws]
        result["floor"] = None if any(f is None for f in floors) else summarize_losses(floors)
    if lrs:
        result["lr_sweep"] = {str(lr): sum(scorer.losses(samples, draws, lr=lr)) / len(draws) for lr in lrs}
    result["seconds"] = round(time.time() - started, 1)
    # a single result file: it carries its own provenance instead of a run.json that could clobber a run folder's
    result.update({"config": to_jsonable({"instrument": config, "student": student}),
                   "versions": environment_versions(),
                   "machine": machine_description()})
    if output is not None:
        atomic_write_json(output, result)
    return result
