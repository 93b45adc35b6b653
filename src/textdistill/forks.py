"""Denoised targets: fork runs of expert segments, whose mean end point replaces the expert's own as the target.

An expert segment theta*_t -> theta*_{t+M} is one draw of minibatches: at batch 8, a 25-step segment is 200 sample
gradients, and two runs from the same snapshot with other data orders move in directions whose cosine is only
0.2-0.4 past the first snapshot (results/README.md, section 11). A target that is mostly minibatch noise asks the
synthetic data to reproduce noise. Here, from every start snapshot t of the chosen experts, ``forks`` runs of one
segment (the experts' own recipe, other data orders) are trained, and their mean end point is written as the
denoised target of (expert, t). ``student.targets`` points the distillation, the held-out instrument (``match-eval``)
and the match selection at such a folder.

Layout of a forks folder::

    manifest.json                          the experts' identity, span M, forks, seed, the (expert, start) pairs
    run.json                               resolved config, versions, seeds, machine
    expert{e}-start{t}-fork{f}.safetensors each fork's end point (LoRA tensors)
    mean-expert{e}-start{t}.safetensors    their mean: the denoised target of (e, t)
    signal.json                            how much of a segment is signal: cosines of the forks' displacements

A rerun continues: finished forks are kept (resumable at fork granularity).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .artifacts import atomic_write_json, load_tensors, read_json, save_tensors, sha256_json, write_run_info
from .config import DataSettings, LoraSettings, TrainConfig, option
from .errors import ConfigError, TrajectoryError

__all__ = ["ForksConfig", "ForkTargets", "experts_identity", "fork_signal", "load_fork_targets", "make_forks",
           "resolve_targets"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ForksConfig:
    """Which segments are forked and how often."""

    forks: int = option(8, "fork runs per start snapshot (their mean end point is the target)")
    seed: int = option(7000, "seed of the forks' data orders (fork f of expert e at start t: seed + 1000 e + 100 t + "
                             "f while forks <= 100 and snapshots <= 10)")
    expert_epochs: int = option(1, "M: a fork runs one segment of M snapshots (the student's expert_epochs)")
    expert_runs: tuple[int, ...] | None = option(None, "the expert runs to fork (0, 1, ...); null: all of them (the "
                                                       "held-out ones too, so the instrument scores against "
                                                       "denoised targets)")
    min_start: int = option(0, "the first start snapshot forked")
    max_start: int | None = option(None, "the last start snapshot forked; null: the last with a target M ahead")

    def __post_init__(self) -> None:
        if self.forks < 1:
            raise ConfigError(f"forks must be at least 1, got {self.forks}")
        if self.expert_epochs < 1:
            raise ConfigError(f"expert_epochs must be positive, got {self.expert_epochs}")
        if self.min_start < 0:
            raise ConfigError(f"min_start must be >= 0, got {self.min_start}")


def experts_identity(manifest: dict[str, Any]) -> str:
    """What the expert snapshots depend on (not the list of finished runs, which grows as experts are added)."""
    return sha256_json({k: manifest.get(k) for k in ("model", "lora", "pool_sha256", "recipe", "snapshot_steps",
                                                     "base_seed", "data_settings")})


def fork_path(folder: Path, expert: int, start: int, fork: int) -> Path:
    return folder / f"expert{expert}-start{start}-fork{fork}.safetensors"


def mean_path(folder: Path, expert: int, start: int) -> Path:
    return folder / f"mean-expert{expert}-start{start}.safetensors"


def fork_seed(config: ForksConfig, expert: int, start: int, fork: int, num_snapshots: int) -> int:
    """A distinct seed per (expert, start, fork): seed + fork + F (start + T expert), with strides F = max(100,
    forks) and T = max(10, snapshots), which is seed + 1000 e + 100 t + f for up to 100 forks and 10 snapshots."""
    per_fork = max(100, config.forks)
    per_start = max(10, num_snapshots)
    return config.seed + fork + per_fork * (start + per_start * expert)


def expert_recipe(manifest: dict[str, Any], steps: int) -> TrainConfig:
    """The experts' recipe as a TrainConfig that runs ``steps`` optimizer steps in fp32 (a fork of one segment)."""
    recipe = manifest["recipe"]
    return TrainConfig(**{**{k: v for k, v in recipe.items() if k not in ("lora", "data")},
                          "lora": LoraSettings(**{**manifest["lora"],
                                                  "target_modules": tuple(manifest["lora"]["target_modules"])}),
                          "data": DataSettings(**manifest["data_settings"]), "max_steps": steps,
                          "precision": "fp32"})


def _cosine(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    x = torch.cat([a[k].flatten().double() for k in sorted(a)])
    y = torch.cat([b[k].flatten().double() for k in sorted(a)])
    return float(x @ y / (x.norm() * y.norm()).clamp_min(1e-300))


def _mean(tensors: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: sum(t[k] for t in tensors) / len(tensors) for k in tensors[0]}


def fork_signal(origin: dict[str, Tensor], own_end: dict[str, Tensor],
                fork_ends: Sequence[dict[str, Tensor]]) -> dict[str, Any]:
    """How much of a segment's displacement is signal (pure): the mean cosine between two forks' displacements,
    between the expert's own and each fork's, between the means of two halves of the forks, and between the
    expert's own and the forks' mean; and the mean displacement's norm relative to the expert's."""
    moves = [{k: e[k] - origin[k] for k in origin} for e in fork_ends]
    own = {k: own_end[k] - origin[k] for k in origin}
    pairs = [_cosine(moves[i], moves[j]) for i in range(len(moves)) for j in range(i + 1, len(moves))]
    half = len(moves) // 2
    norm = lambda d: float(torch.cat([v.flatten() for v in d.values()]).norm())   # noqa: E731
    return {
        "fork_pairs_mean": sum(pairs) / len(pairs) if pairs else None,
        "expert_vs_forks": [_cosine(own, m) for m in moves],
        "half_means": _cosine(_mean(moves[:half]), _mean(moves[half:])) if half >= 1 else None,
        "expert_vs_fork_mean": _cosine(own, _mean(moves)),
        "fork_mean_norm_over_expert_norm": norm(_mean(moves)) / max(norm(own), 1e-30),
    }


def run_fork(model: torch.nn.Module, start: dict[str, Tensor], examples: Sequence[Any], recipe: TrainConfig,
             pad_id: int) -> dict[str, Tensor]:
    """One segment of the experts' recipe from ``start`` (LoRA tensors by name) on ``examples`` (tokenized rows,
    in the order ``recipe.seed`` shuffles them); returns the end point. ``model`` carries a LoRA of the experts'
    shape; its LoRA tensors are overwritten."""
    from .training import train_model
    from .unroll import lora_parameters

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in start:
                p.copy_(start[name])
    train_model(model, examples, recipe, pad_id=pad_id, progress=False, data_parallel=False)
    return {k: v.detach().clone() for k, v in lora_parameters(model).items()}


def make_forks(*, experts: str | Path, output: str | Path, config: ForksConfig, device: str = "auto",
               progress: bool = True, log=print) -> Path:
    """Entry of ``textdistill forks``: fork every chosen segment ``config.forks`` times and write the mean end
    points (the denoised targets) and the signal of each segment. Returns the folder."""
    from tqdm.auto import tqdm

    from .experts import load_experts
    from .matching import load_expert_pool, load_student_model

    output = Path(output)
    trajectories = load_experts(experts)
    manifest = trajectories.manifest
    chosen = list(range(trajectories.num_experts)) if config.expert_runs is None else list(config.expert_runs)
    bad = [e for e in chosen if not 0 <= e < trajectories.num_experts]
    if bad:
        raise ConfigError(f"experts {bad} are not runs of {experts} (it has {trajectories.num_experts})")
    span = config.expert_epochs
    last = trajectories.num_snapshots - 1 - span
    max_start = last if config.max_start is None else config.max_start
    if max_start < config.min_start or max_start > last:
        raise ConfigError(f"start window [{config.min_start}, {max_start}] with expert_epochs={span} does not fit "
                          f"trajectories of {trajectories.num_snapshots} snapshots in {experts}")
    pairs = [(e, t) for e in chosen for t in range(config.min_start, max_start + 1)]
    steps = trajectories.snapshot_every * span
    header = {"format_version": FORMAT_VERSION, "experts": str(experts), "experts_identity":
              experts_identity(manifest), "expert_epochs": span, "segment_steps": steps, "forks": config.forks,
              "seed": config.seed, "batch_size": trajectories.samples_per_step}
    output.mkdir(parents=True, exist_ok=True)
    manifest_path = output / "manifest.json"
    if manifest_path.is_file():
        before = read_json(manifest_path)
        changed = [k for k in header if k != "experts" and before.get(k) != header[k]]
        if changed:
            raise ConfigError(f"{output} holds forks made with other settings ({', '.join(changed)}); use another "
                              f"--output")
        pairs = sorted(set(map(tuple, before.get("pairs", []))) | set(pairs))
    write_run_info(output, command="forks", config=config, extra={"experts": str(experts)})
    model, tokenizer = load_student_model(trajectories, device=device)
    model.train()
    _, pool = load_expert_pool(tokenizer, manifest)
    signal: dict[str, Any] = {}
    recipe = expert_recipe(manifest, steps)
    bar = tqdm(total=len(pairs) * config.forks, desc="forks", disable=not progress, dynamic_ncols=True)
    for expert, start in pairs:
        if expert >= trajectories.num_experts:
            continue
        origin = trajectories.load(expert, start)
        ends = []
        for f in range(config.forks):
            path = fork_path(output, expert, start, f)
            if not path.is_file():
                seed = fork_seed(config, expert, start, f, trajectories.num_snapshots)
                end = run_fork(model, origin, pool, dataclasses.replace(recipe, seed=seed), tokenizer.pad_token_id)
                save_tensors(path, end, metadata={"seed": str(seed)})
            ends.append(load_tensors(path))
            bar.update(1)
        save_tensors(mean_path(output, expert, start), _mean(ends))
        signal[f"{expert}-{start}"] = fork_signal(origin, trajectories.load(expert, start + span), ends)
        atomic_write_json(manifest_path, {**header, "pairs": [list(p) for p in pairs if
                                                              mean_path(output, *p).is_file()]})
    bar.close()
    atomic_write_json(output / "signal.json", {"forks": config.forks, "segment_steps": steps,
                                               "batch_size": trajectories.samples_per_step, "by_start": signal})
    log(f"{len(signal)} segments x {config.forks} forks -> {output}")
    return output


@dataclass
class ForkTargets:
    """A forks folder opened for one experts folder and span: the denoised target of (expert, start)."""

    root: Path
    manifest: dict[str, Any]

    @property
    def pairs(self) -> set[tuple[int, int]]:
        return {(int(e), int(t)) for e, t in self.manifest["pairs"]}

    def target(self, expert: int, start: int, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        if (expert, start) not in self.pairs:
            raise TrajectoryError(f"{self.root} has no denoised target for expert {expert} at start {start}; make "
                                  f"them with `textdistill forks --experts ... --output {self.root}` over the "
                                  f"student's start window")
        tensors = load_tensors(mean_path(self.root, expert, start))
        return {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in tensors.items()}

    def check_covers(self, experts: Sequence[int], min_start: int, max_start: int) -> None:
        """Refuse, in one line, a folder that lacks a target the run will ask for."""
        missing = [(e, t) for e in experts for t in range(min_start, max_start + 1) if (e, t) not in self.pairs]
        if missing:
            raise TrajectoryError(f"{self.root} lacks denoised targets for {len(missing)} (expert, start) pairs the "
                                  f"run draws, e.g. {missing[:3]}; rerun `textdistill forks` on it with those experts "
                                  f"and starts")


def load_fork_targets(path: str | Path, trajectories: Any, span: int) -> ForkTargets:
    """Open a forks folder for ``trajectories`` and a student of span ``span``, refusing one made for other experts
    or another span."""
    root = Path(path)
    if not (root / "manifest.json").is_file():
        raise TrajectoryError(f"{root} is not a forks folder (no manifest.json); make one with `textdistill forks`")
    manifest = read_json(root / "manifest.json")
    if manifest.get("experts_identity") != experts_identity(trajectories.manifest):
        raise TrajectoryError(f"the forks in {root} were made from other experts than {trajectories.root}")
    if manifest.get("expert_epochs") != span:
        raise ConfigError(f"the forks in {root} run {manifest.get('expert_epochs')} snapshot(s) per segment but the "
                          f"student's expert_epochs is {span}")
    return ForkTargets(root, manifest)


def resolve_targets(path: str | None, trajectories: Any, student: Any, experts: Sequence[int]) -> ForkTargets | None:
    """The denoised targets of ``student.targets`` (``path``) for a run that draws segments of ``experts`` over the
    student's start window (a :class:`matching.ResolvedStudent`), checked to cover them; None without a path."""
    if path is None:
        return None
    targets = load_fork_targets(path, trajectories, student.span)
    targets.check_covers(experts, student.min_start, student.max_start)
    return targets
