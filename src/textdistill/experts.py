"""Expert trajectories: several LoRA fine-tuning runs over the whole pool, with snapshots of the LoRA tensors.

Layout of an experts folder::

    manifest.json                 base model identity, tokenizer, LoRA shape, pool and its hash, recipe, snapshots
    run.json                      resolved config, versions, seeds, machine
    expert_00/step_000000.safetensors, step_000050.safetensors, ...
    expert_00/data_order.json     the pool rows of every optimizer step, in order (what the expert trained on)

An expert whose last snapshot exists is skipped on a rerun (resumable at expert granularity).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from . import distributed
from .artifacts import (atomic_write_json, load_tensors, read_json, save_tensors, sha256_json, to_jsonable,
                        write_run_info)
from .checkpoint import TrainCheckpointer
from .config import TrainConfig, option
from .data import load_examples, tokenize_examples
from .errors import ConfigError, TrajectoryError
from .keys import keyed
from .models import ModelIdentity, add_lora, load_model, load_tokenizer, model_identity
from .reporting import LiveCurves
from .training import base_dtype, planned_steps, train_model
from .unroll import lora_parameters

MANIFEST_VERSION = 1
DATA_ORDER = "data_order.json"


@dataclass(frozen=True)
class ExpertsConfig:
    """How expert trajectories are made: E runs of one recipe with different seeds (and so data orders)."""

    num_experts: int = option(3, "expert runs (seeds seed, seed + 1, ...: other LoRA inits and data orders)")
    snapshot_every: int | None = option(None, "optimizer steps between snapshots; null: once per epoch")
    train: TrainConfig = option(factory=lambda: TrainConfig(
        optimizer="sgd", lr=1e-2, schedule="constant", warmup_ratio=0.0, epochs=2.0, batch_size=8,
        max_grad_norm=None), help="the experts' recipe (plain SGD, so that the student can follow it)")

    def __post_init__(self) -> None:
        if self.num_experts <= 0:
            raise ConfigError(f"num_experts must be positive, got {self.num_experts}")
        if self.snapshot_every is not None and self.snapshot_every <= 0:
            raise ConfigError(f"snapshot_every must be positive, got {self.snapshot_every}")


@dataclass(frozen=True)
class ExpertTrajectories:
    """A loaded experts folder: the manifest and the paths of each expert's snapshots in step order."""

    root: Path
    manifest: dict[str, Any]
    snapshots: tuple[tuple[Path, ...], ...]  # [expert][snapshot index]

    @property
    def num_snapshots(self) -> int:
        return min(len(s) for s in self.snapshots)

    @property
    def num_experts(self) -> int:
        return len(self.snapshots)

    @property
    def snapshot_every(self) -> int:
        """Optimizer steps between two snapshots (every segment has the same length)."""
        steps = self.manifest["snapshot_steps"]
        return int(steps[1] - steps[0])

    @property
    def samples_per_step(self) -> int:
        return int(self.manifest["batch_size"]) * int(self.manifest.get("grad_accum", 1))

    def split(self, heldout: int) -> tuple[list[int], list[int]]:
        """(experts the distillation may use, held-out experts for the instrument): the last ``heldout`` runs are
        held out. With ``heldout=0`` every expert is in both lists (nothing is held out)."""
        if heldout < 0 or heldout >= self.num_experts:
            raise ConfigError(f"heldout_experts={heldout} must leave at least one of the {self.num_experts} expert "
                              f"runs in {self.root} for distillation (make more experts or hold out fewer)")
        everyone = list(range(self.num_experts))
        if heldout == 0:
            return everyone, everyone
        return everyone[:-heldout], everyone[-heldout:]

    def segment_batches(self, expert: int, start: int, span: int) -> list[list[int]] | None:
        """Pool indices of every optimizer step of expert ``expert`` between snapshot ``start`` and snapshot
        ``start + span``, in training order (one list per step); None for experts made before the data order was
        recorded."""
        path = self.root / f"expert_{expert:02d}" / DATA_ORDER
        if not path.is_file():
            return None
        steps = self.manifest["snapshot_steps"]
        order = read_json(path)["batch_indices"]          # order[k] = rows of optimizer step k + 1
        return order[steps[start]: steps[start + span]]

    def load(self, expert: int, index: int, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """LoRA tensors of one snapshot, by parameter name."""
        tensors = load_tensors(self.snapshots[expert][index])
        return {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in tensors.items()}


#: Manifest entries a rerun on an existing experts folder must agree with (what the trajectories depend on).
_RESUME_KEYS = ("model", "lora", "pool_sha256", "snapshot_steps", "optimizer", "lr", "batch_size", "recipe",
                "base_seed", "data_settings")


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def _finished(folder: Path, last_step: int) -> bool:
    """Whether an expert run finished: its last snapshot exists and its checkpoint, removed last (after the data
    order and the manifest), is gone."""
    return (folder / snapshot_name(last_step)).is_file() and not (folder / "checkpoint").is_dir()


def snapshot_name(step: int) -> str:
    return f"step_{step:06d}.safetensors"


def make_experts(*, model_name: str, data: str, output: str | Path, config: ExpertsConfig, device: str = "auto",
                 trust_remote_code: bool = False, progress: bool = True, checkpoint_every: int | None = None,
                 checkpoint_seconds: float | None = 300.0) -> ExpertTrajectories:
    """Entry of ``textdistill experts``: train ``config.num_experts`` LoRA runs over ``data`` and save snapshots.

    A rerun on the same folder continues: finished experts are skipped, and an interrupted one resumes exactly from
    its ``expert_NN/checkpoint/`` (the full training state, written every ``checkpoint_every`` steps and every
    ``checkpoint_seconds`` seconds), so its snapshots are bit-identical on CPU to an uninterrupted run's.

    Under ``torchrun``/``accelerate launch`` every rank runs this with the same arguments: expert ``i`` trains on
    rank ``i % world`` alone, in rounds of ``world`` experts; after each round rank 0 writes the manifest with the
    round's experts (a barrier first), and only then does each rank remove its expert's checkpoint, so a finished
    expert is in the manifest as on one process. Rank 0 holds the lock and writes ``run.json``; every rank returns
    the trajectories."""
    with distributed.main_process_owns(Path(output) / ".lock", f"the experts folder {output}", device):
        return _make_experts(model_name=model_name, data=data, output=output, config=config, device=device,
                             trust_remote_code=trust_remote_code, progress=progress,
                             checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds)


def _make_experts(*, model_name: str, data: str, output: str | Path, config: ExpertsConfig, device: str = "auto",
                  trust_remote_code: bool = False, progress: bool = True, checkpoint_every: int | None = None,
                  checkpoint_seconds: float | None = 300.0) -> ExpertTrajectories:
    output = Path(output)
    tokenizer = load_tokenizer(model_name, trust_remote_code=trust_remote_code)
    recipe = config.train
    examples = load_examples(data, recipe.data, tokenizer=tokenizer)
    tokenized = tokenize_examples(tokenizer, examples, max_length=recipe.data.max_length,
                                  append_eos=recipe.data.append_eos)
    total = planned_steps(len(tokenized), recipe)
    every = config.snapshot_every or max(1, planned_steps(len(tokenized), dataclasses.replace(recipe, epochs=1.0,
                                                                                             max_steps=None)))
    # Snapshots sit at multiples of `every` only, so every segment of the trajectory has the same length
    # (trailing steps past the last multiple still train but are not matched against).
    steps = list(range(0, total + 1, every))
    if len(steps) < 2:
        raise ConfigError(f"snapshot_every={every} is longer than the whole run ({total} steps): no trajectory")
    pool_hash = sha256_json([[e.prompt, e.response] for e in examples])
    output.mkdir(parents=True, exist_ok=True)
    manifest_path = output / "manifest.json"
    base = load_model(model_name, dtype=base_dtype(recipe, device), device=device, attn_implementation="sdpa",
                      trust_remote_code=trust_remote_code)
    identity = model_identity(model_name, base, tokenizer)
    manifest = {
        "format_version": MANIFEST_VERSION, "model": dataclasses.asdict(identity), "lora": dataclasses.asdict(recipe.lora),
        "data": data, "data_settings": dataclasses.asdict(recipe.data), "pool_size": len(examples),
        "pool_sha256": pool_hash, "optimizer": recipe.optimizer, "lr": recipe.lr, "momentum": recipe.momentum,
        "batch_size": recipe.batch_size, "grad_accum": recipe.grad_accum, "schedule": recipe.schedule,
        # what the trajectories depend on (keys.keyed: not report_to), less the seed (each expert's is recorded)
        "recipe": {k: v for k, v in keyed(recipe).items() if k != "seed"}, "base_seed": recipe.seed,
        "total_steps": total, "snapshot_steps": steps, "num_experts": config.num_experts,
        "experts": [],
    }
    manifest = to_jsonable(manifest)  # tuples -> lists, so it compares equal to a manifest read back from disk
    if manifest_path.is_file():
        previous = read_json(manifest_path)
        for key in _RESUME_KEYS:
            # options added later with a None default (recipe.dtype) are absent from older manifests
            if _without_none(previous.get(key)) != _without_none(manifest.get(key)):
                raise TrajectoryError(f"{output} holds experts made with a different '{key}'; "
                                      f"use another --output or delete it")
        manifest["experts"] = previous.get("experts", [])
    finished = [e for e in range(config.num_experts) if _finished(output / f"expert_{e:02d}", steps[-1])]
    distributed.barrier()   # every rank decides on the folder as it was, before any of them writes into it
    if len(finished) == config.num_experts and manifest["experts"]:
        warnings.warn(f"{output}: all {config.num_experts} experts are finished; nothing to do", stacklevel=3)
        return load_experts(output)
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0
    if main:
        write_run_info(output, command="experts", config=config,
                       seeds={f"expert_{e}": recipe.seed + e for e in range(config.num_experts)},
                       extra={"model": model_name, "data": data})
    for first in range(0, config.num_experts, world):
        # one round: expert first + rank on this rank (past the last expert, or finished already: nothing)
        expert = first + rank
        folder = output / f"expert_{expert:02d}"
        entry, checkpointer = None, None
        if expert < config.num_experts and not _finished(folder, steps[-1]):
            torch.manual_seed(recipe.seed + expert)  # LoRA A initialisation differs per expert
            model = add_lora(base, recipe.lora)
            wanted = set(steps)

            def save_snapshot(step: int, model: Any, optimizer: Any, folder: Path = folder) -> None:
                if step in wanted:
                    save_tensors(folder / snapshot_name(step), lora_parameters(model), metadata={"step": str(step)})

            checkpointer = TrainCheckpointer(folder / "checkpoint", every_steps=checkpoint_every,
                                             every_seconds=checkpoint_seconds,
                                             fingerprint={"manifest": {k: manifest[k] for k in _RESUME_KEYS},
                                                          "expert": expert})
            start = time.time()
            curves = LiveCurves(recipe.report_to, folder)   # each rank writes its own expert's folder
            try:
                result = train_model(model, tokenized, dataclasses.replace(recipe, seed=recipe.seed + expert),
                                     pad_id=tokenizer.pad_token_id, on_step=save_snapshot, progress=progress and main,
                                     checkpointer=checkpointer, data_parallel=False, curves=curves)
            finally:
                curves.close()
            atomic_write_json(folder / DATA_ORDER, {"batch_indices": result.batch_indices})
            entry = {"index": expert, "seed": recipe.seed + expert, "folder": folder.name,
                     "seconds": round(time.time() - start, 1), "first_loss": result.losses[0],
                     "last_loss": result.losses[-1], "precision": result.precision}
            # drop the LoRA layers: the next expert starts from the base, which training never changed (it is
            # frozen), so nothing but the LoRA tensors is ever copied (a copy of a 7B base would double its memory)
            base = model.unload()
        # the round's entries, in expert order as one process appends them (the gather waits for every rank)
        done = [e for e in distributed.all_gather_objects(entry) if e is not None]
        if main:
            for new in done:
                manifest["experts"] = [e for e in manifest["experts"] if e["index"] != new["index"]] + [new]
            atomic_write_json(manifest_path, manifest)
        distributed.barrier()
        if checkpointer is not None:
            checkpointer.remove()   # only now: the expert counts as finished once its last snapshot is written
    if main:
        atomic_write_json(manifest_path, manifest)
    distributed.barrier()   # the manifest is complete before any rank reads it
    return load_experts(output)


def load_experts(path: str | Path) -> ExpertTrajectories:
    """Open an experts folder, checking that every expert has every snapshot and the same tensor layout."""
    root = Path(path)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise TrajectoryError(f"{root} is not an experts folder (no manifest.json); run `textdistill experts` first")
    manifest = read_json(manifest_path)
    steps = manifest.get("snapshot_steps") or []
    snapshots = []
    for expert in range(manifest.get("num_experts", 0)):
        folder = root / f"expert_{expert:02d}"
        paths = tuple(folder / snapshot_name(s) for s in steps)
        if all(p.is_file() for p in paths):
            snapshots.append(paths)
    if not snapshots:
        raise TrajectoryError(f"{root} has no complete expert trajectory")
    if len(steps) < 2:
        raise TrajectoryError(f"{root}: a trajectory needs at least 2 snapshots, found {len(steps)}")
    reference = {k: tuple(v.shape) for k, v in load_tensors(snapshots[0][0]).items()}
    for paths in snapshots[1:]:
        shapes = {k: tuple(v.shape) for k, v in load_tensors(paths[-1]).items()}
        if shapes != reference:
            raise TrajectoryError(f"{paths[-1]} has LoRA tensors of another layout than {snapshots[0][0]}")
    return ExpertTrajectories(root=root, manifest=manifest, snapshots=tuple(snapshots))


def check_plain_sgd(manifest: dict[str, Any], root: Path | str) -> None:
    """The student of trajectory matching takes plain SGD steps with one learning rate; refuse trajectories made
    with anything else (its steps could not follow them), naming what differs."""
    recipe = manifest.get("recipe", {})
    problems = []
    if recipe.get("optimizer", manifest.get("optimizer")) != "sgd":
        problems.append(f"optimizer {recipe.get('optimizer', manifest.get('optimizer'))}")
    if recipe.get("momentum", 0.0):
        problems.append(f"momentum {recipe['momentum']}")
    if recipe.get("weight_decay", 0.0):
        problems.append(f"weight_decay {recipe['weight_decay']}")
    if recipe.get("max_grad_norm"):
        problems.append(f"gradient clipping (max_grad_norm {recipe['max_grad_norm']})")
    if recipe.get("schedule", "constant") != "constant":
        problems.append(f"a {recipe['schedule']} lr schedule")
    if recipe.get("warmup_ratio", 0.0):
        problems.append(f"warm-up (warmup_ratio {recipe['warmup_ratio']})")
    if problems:
        raise TrajectoryError(
            f"the experts in {root} were trained with {', '.join(problems)}, but the student takes plain SGD "
            f"steps; make experts with optimizer sgd, momentum 0, weight_decay 0, schedule constant, "
            f"warmup_ratio 0 and max_grad_norm null")


def check_compatible(trajectories: ExpertTrajectories, identity: ModelIdentity, lora_names: dict[str, Sequence[int]]) -> None:
    """Refuse trajectories made with another base model, tokenizer or LoRA shape, naming what differs."""
    recorded = trajectories.manifest["model"]
    for key, label in (("fingerprint", "base model weights/architecture"), ("tokenizer_fingerprint", "tokenizer"),
                       ("vocab_size", "vocabulary size"), ("hidden_size", "hidden size")):
        if recorded.get(key) != getattr(identity, key):
            raise TrajectoryError(f"the expert trajectories in {trajectories.root} were made with another "
                                  f"{label} ({recorded.get('name')}: {recorded.get(key)} vs {identity.name}: "
                                  f"{getattr(identity, key)}); distil with the model they were made with "
                                  f"({recorded.get('name')}) or make experts with this one (textdistill experts "
                                  f"--model {identity.name})")
    snapshot = {k: tuple(v.shape) for k, v in load_tensors(trajectories.snapshots[0][0]).items()}
    expected = {k: tuple(v) for k, v in lora_names.items()}
    if snapshot != expected:
        missing = sorted(set(expected) - set(snapshot))[:3]
        extra = sorted(set(snapshot) - set(expected))[:3]
        shapes = [k for k in expected if k in snapshot and expected[k] != snapshot[k]][:3]
        raise TrajectoryError(f"the expert LoRA tensors in {trajectories.root} do not match this model's LoRA "
                              f"(missing {missing}, unexpected {extra}, other shapes {shapes}); use the experts' "
                              f"lora settings ({trajectories.manifest.get('lora')}) or make experts again")
