"""The matching objective's parts, shared by the distillation, the held-out instrument, the match selection and the
validity study: how a student follows an expert segment, the draws (expert, start snapshot, the student's minibatch
order), training sets as the student sees them, and the scorer of a set's matching loss on a draw.

Trajectory matching asks of a training set: if a student starts at an expert's snapshot theta*_t and takes N SGD
steps on this set, how close does it land to the expert's theta*_{t+M}? The loss of a draw is
``||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2`` (1 = no closer than the start; 0 = on the
target). The student takes plain SGD steps in fp32 without any graph here (first-order:
:func:`unroll.first_order_unroll`); the differentiable steps live in :mod:`textdistill.unroll`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor

from .artifacts import atomic_write_json, sha256_json, to_jsonable
from .config import option
from .errors import ConfigError
from .unroll import SyntheticBatch, first_order_unroll, matching_loss, rows_loss

__all__ = ["Draw", "ResolvedStudent", "SampleSet", "ScoreCache", "Scorer", "StudentSettings", "load_expert_pool",
           "load_objective_rows", "load_student_model", "make_draws", "resolve_student", "sample_minibatches",
           "tokenize_for_experts"]


@dataclass(frozen=True)
class StudentSettings:
    """How the student follows an expert segment; ``None`` takes the experts' own value, so that by default the
    student repeats the expert's steps (N = the expert's optimizer steps in a segment, its batch size, its lr) and
    could land exactly on the target if its data were the expert's."""

    syn_steps: int | None = option(None, "N student SGD steps; null: snapshot_every x expert_epochs")
    batch_size: int | None = option(None, "samples per student step; null: the experts' batch size")
    expert_epochs: int = option(1, "M: the target is this many snapshots after the start")
    lr: float | None = option(None, "the student's (starting) learning rate; null: the experts' lr")
    lr_grid: tuple[float, ...] = option(
        (), "a line search: distill picks, among these, the lr at which its starting samples match training draws "
            "best")
    min_start: int = option(0, "start snapshot t is drawn from [min_start, max_start]")
    max_start: int | None = option(None, "null: the last snapshot that has a target M ahead")
    targets: str | None = option(None, "a forks folder (textdistill forks): each target is the mean end point of "
                                       "its fork runs (denoised targets); null: the expert's own snapshot M ahead",
                                 omit_when=None)
    objective: Literal["trajectory", "performance"] = option(
        "trajectory", "what the student's end point is judged by: trajectory (its distance to the expert's target, "
                      "relative to the start's) or performance (the response loss of objective_rows, relative to "
                      "the start's)", omit_when="trajectory")
    objective_rows: str | None = option(None, "performance: held-out rows (arc-easy:validation, a .jsonl ...), "
                                              "never the questions you report", omit_when=None)
    objective_offset: int = option(0, "performance: the first row of objective_rows used", omit_when=0)
    objective_limit: int | None = option(None, "performance: how many rows of objective_rows are used (each one is "
                                               "scored after every unroll); null: all", omit_when=None)

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
        if self.objective == "performance":
            if not self.objective_rows:
                raise ConfigError("student.objective performance needs student.objective_rows (held-out rows, e.g. "
                                  "arc-easy:validation)")
            if self.targets is not None:
                raise ConfigError("student.targets (denoised targets) has no effect with student.objective "
                                  "performance; leave it null")
        elif self.objective_rows is not None:
            raise ConfigError("student.objective_rows is read only with student.objective performance")
        if self.objective_offset < 0 or (self.objective_limit is not None and self.objective_limit < 1):
            raise ConfigError(f"student.objective_offset must be >= 0 and objective_limit >= 1, got "
                              f"{self.objective_offset} and {self.objective_limit}")


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

    #: objective rows per forward of the performance objective
    ROWS_CHUNK = 16

    def __init__(self, model: torch.nn.Module, trajectories: Any, student: ResolvedStudent, *,
                 device: torch.device | str, dtype: torch.dtype = torch.float32, targets: Any | None = None,
                 rows: SampleSet | None = None):
        self.model, self.trajectories, self.student = model, trajectories, student
        self.device, self.dtype = torch.device(device), dtype
        self.targets = targets   # forks.ForkTargets: denoised targets in place of the expert's own snapshots
        # the performance objective's held-out rows, in chunks of ROWS_CHUNK (None: the trajectory objective)
        self.row_batches = None if rows is None else [
            rows.batch(range(i, min(i + self.ROWS_CHUNK, len(rows)))) for i in range(0, len(rows), self.ROWS_CHUNK)]
        self._params: dict[tuple[int, int], dict[str, Tensor]] = {}
        self._targets: dict[tuple[int, int], dict[str, Tensor]] = {}
        self._start_rows_loss: dict[tuple[int, int], float] = {}

    @property
    def objective(self) -> str:
        return "trajectory" if self.row_batches is None else "performance"

    def params(self, expert: int, index: int) -> dict[str, Tensor]:
        key = (expert, index)
        if key not in self._params:
            self._params[key] = self.trajectories.load(expert, index, device=self.device, dtype=self.dtype)
        return self._params[key]

    def target(self, expert: int, start: int) -> dict[str, Tensor]:
        """The target of the segment from snapshot ``start``: theta*_{t+M}, or its denoised version."""
        if self.targets is None:
            return self.params(expert, start + self.student.span)
        key = (expert, start)
        if key not in self._targets:
            self._targets[key] = self.targets.target(expert, start, device=self.device, dtype=self.dtype)
        return self._targets[key]

    def endpoints(self, draw: Draw) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(theta*_t, target) of a draw: the target is theta*_{t+M} or, with denoised targets, its forks' mean."""
        return self.params(draw.expert, draw.start), self.target(draw.expert, draw.start)

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

    def objective_loss(self, params: Mapping[str, Tensor], draw: Draw) -> Tensor:
        """The objective of the student's end point ``params`` on a draw, relative to the start's (a scalar;
        differentiable w.r.t. ``params`` where grad is enabled): trajectory, ``matching_loss``; performance, the
        objective rows' loss at ``params`` over their loss at theta*_t (1 = no better than the start)."""
        start, _ = self.endpoints(draw)
        if self.row_batches is None:
            return matching_loss(params, start, self.target(draw.expert, draw.start))
        key = (draw.expert, draw.start)
        if key not in self._start_rows_loss:
            with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=False):
                self._start_rows_loss[key] = float(rows_loss(self.model, start, self.row_batches))
        return rows_loss(self.model, params, self.row_batches) / self._start_rows_loss[key]

    def loss_of(self, params: dict[str, Tensor], draw: Draw) -> float:
        with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=False):
            return float(self.objective_loss(params, draw))

    def loss(self, samples: SampleSet, draw: Draw, *, lr: float | None = None) -> float:
        """The objective (matching loss, or relative rows loss) of one draw."""
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


def load_objective_rows(settings: StudentSettings, tokenizer: Any, manifest: dict[str, Any],
                        embed_matrix: Tensor) -> SampleSet | None:
    """The performance objective's held-out rows as the student sees them (the experts' template and tokenization;
    rows objective_offset .. + objective_limit of objective_rows); None for the trajectory objective."""
    if settings.objective != "performance":
        return None
    from .config import DataSettings
    from .data import load_examples

    # the experts' template and fields, not the pool's own limit or sample
    data = DataSettings(**{**manifest["data_settings"], "limit": None, "sample": None})
    examples = load_examples(settings.objective_rows, data, tokenizer=tokenizer)
    end = None if settings.objective_limit is None else settings.objective_offset + settings.objective_limit
    examples = examples[settings.objective_offset: end]
    if not examples:
        raise ConfigError(f"student.objective_rows {settings.objective_rows} has no rows from "
                          f"{settings.objective_offset} on")
    return SampleSet.from_tokenized(tokenize_for_experts(tokenizer, examples, manifest), embed_matrix)


def load_expert_pool(tokenizer: Any, manifest: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """The experts' pool as examples and tokenized as they saw it (checked against the recorded hash)."""
    from .config import DataSettings
    from .data import load_examples
    from .errors import TrajectoryError

    examples = load_examples(manifest["data"], DataSettings(**manifest["data_settings"]), tokenizer=tokenizer)
    if sha256_json([[e.prompt, e.response] for e in examples]) != manifest["pool_sha256"]:
        raise TrajectoryError(f"the pool '{manifest['data']}' differs from the one the experts were trained on")
    return examples, tokenize_for_experts(tokenizer, examples, manifest)
