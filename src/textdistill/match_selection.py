"""Selection by the matching objective: the real rows whose gradients best reproduce the experts' displacements.

A student that starts at an expert snapshot theta*_t and takes SGD steps on a set S moves, to first order, along
``-sum_{i in S} g_i(theta*_t)``; the expert moved by ``D = theta*_{t+M} - theta*_t``. At the best learning rate
the matching loss of that first-order move is ``1 - cos^2(-sum g_i, D)``. This module picks S greedily to
maximise the mean over segments of ``cos(-sum_{i in S} g_i, D)``, over a few segments of the experts the
distillation may use (never the held-out ones), as SELECT does in "Approximating language model training data
from weights" (Morris et al., 2025). It is a baseline arm of its own and the distillation's initialiser.

Per-example LoRA gradients (``less.per_example_grads``) are compressed with a count sketch (each coordinate
hashed to one of ``sketch_dim`` buckets with a random sign): inner products are preserved in expectation, it costs
O(parameters) per vector and needs no projection matrix.

Entry: :func:`select_by_matching` (``textdistill select --method match --experts DIR``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .config import option
from .errors import ConfigError
from .forks import resolve_targets
from .matching import StudentSettings, resolve_student

__all__ = ["CountSketch", "MatchSelectionConfig", "cut_selection", "greedy_match", "select_by_matching"]


@dataclass(frozen=True)
class MatchSelectionConfig:
    """Selection by gradient alignment with the experts' segments."""

    # which segments: how many, of which experts, over which start window
    segments: int = option(4, "(expert, start) segments of the non-held-out experts whose displacement is matched")
    heldout_experts: int = option(1, "the last K experts are never used (they are the instrument's)")
    student: StudentSettings = option(factory=StudentSettings, help="expert_epochs and the start window")
    seed: int = option(0, "seed of the segments and the sketch")
    # how rows are matched to them
    sketch_dim: int = option(8192, "count-sketch width of the per-example gradients")
    greedy: bool = option(True, "greedy on the summed gradient; false: top rows by their own alignment")
    batch_size: int = option(8, "rows per vmap'ed per-example gradient pass")

    def __post_init__(self) -> None:
        if self.student.objective != "trajectory":
            raise ConfigError("select --method match matches the experts' segments (student.objective trajectory); "
                              "the performance objective scores sets in distill and match-eval")
        for name in ("segments", "sketch_dim", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"match.{name} must be positive, got {getattr(self, name)}")


class CountSketch:
    """A seeded count sketch ``R^in_dim -> R^out_dim``: coordinate j goes to bucket h(j) with sign s(j), so that
    E[<Sx, Sy>] = <x, y>."""

    def __init__(self, in_dim: int, out_dim: int, *, seed: int = 0, device: torch.device | str = "cpu"):
        generator = torch.Generator().manual_seed(seed)
        self.out_dim = out_dim
        self.bucket = torch.randint(out_dim, (in_dim,), generator=generator).to(device)                  # (P,)
        self.sign = (torch.randint(2, (in_dim,), generator=generator) * 2 - 1).to(device, torch.float32)  # (P,)

    def __call__(self, x: Tensor) -> Tensor:
        """(n, P) -> (n, out_dim) float32."""
        out = torch.zeros((x.shape[0], self.out_dim), device=x.device)
        return out.index_add_(1, self.bucket, x.float() * self.sign)


def greedy_match(features: Tensor, targets: Tensor, count: int, *, greedy: bool = True) -> tuple[list[int], list[float]]:
    """Choose ``count`` rows so that the sum of their features points along each target.

    ``features`` (C, n, k): the sketched *descent directions* (-gradient) of n rows at C segments; ``targets``
    (C, k): the sketched displacements. Greedy: add, one at a time, the row that most raises the mean over
    segments of ``cos(sum of chosen rows, target)``. Not greedy: the rows with the highest mean ``cos(row,
    target)``. Returns the rows in the order chosen and the objective after each addition.
    """
    segments, n, _ = features.shape
    if count > n:
        raise ConfigError(f"cannot choose {count} rows out of {n}")
    features, targets = features.double(), targets.double()
    target_unit = targets / targets.norm(dim=-1, keepdim=True).clamp_min(1e-30)       # (C, k)
    along = torch.einsum("cnk,ck->cn", features, target_unit)                          # (C, n) <f_i, t>
    sq_norm = features.square().sum(-1)                                                # (C, n)
    if not greedy:
        alone = (along / sq_norm.sqrt().clamp_min(1e-30)).mean(0)                     # (n,)
        order = alone.argsort(descending=True, stable=True)[:count].tolist()
        return order, [float(alone[i]) for i in order]
    total = torch.zeros_like(targets)                                                  # (C, k) sum of chosen
    total_along = torch.zeros(segments, dtype=torch.float64)                           # (C,) <sum, t>
    total_sq = torch.zeros(segments, dtype=torch.float64)                              # (C,) |sum|^2
    chosen: list[int] = []
    objective: list[float] = []
    available = torch.ones(n, dtype=torch.bool)
    for _ in range(count):
        cross = torch.einsum("cnk,ck->cn", features, total)                            # (C, n) <f_i, sum>
        new_sq = (total_sq.unsqueeze(1) + 2 * cross + sq_norm).clamp_min(1e-30)
        gain = ((total_along.unsqueeze(1) + along) / new_sq.sqrt()).mean(0)           # (n,) mean cosine
        gain = gain.masked_fill(~available, float("-inf"))
        best = int(gain.argmax())
        chosen.append(best)
        objective.append(float(gain[best]))
        available[best] = False
        total += features[:, best]
        total_along += along[:, best]
        total_sq = total.square().sum(-1)
    return chosen, objective


def _segments(trajectories: Any, experts: Sequence[int], student: Any, count: int, seed: int) -> list[tuple[int, int]]:
    """``count`` distinct (expert, start) pairs from ``experts`` and the student's start window (all if fewer)."""
    pairs = [(e, t) for e in experts for t in range(student.min_start, student.max_start + 1)]
    if len(pairs) <= count:
        return pairs
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(pairs), generator=generator)[:count].tolist()
    return [pairs[i] for i in sorted(pick)]


def select_by_matching(*, experts: str | Path, budget: str | int, output: str | Path, config: MatchSelectionConfig,
                       device: str = "auto", trust_remote_code: bool = False, progress: bool = True) -> dict[str, Any]:
    """Entry of ``textdistill select --method match``: choose ``budget`` rows of the experts' pool by gradient
    alignment with their segments and write a selection file (rows in the order chosen)."""
    from tqdm.auto import tqdm

    from .experts import load_experts
    from .matching import load_expert_pool, load_student_model
    from .less import flatten_grads, per_example_grads
    from .selection import resolve_budget, write_selection
    from .training import collate

    started = time.time()
    trajectories = load_experts(experts)
    manifest = trajectories.manifest
    student = resolve_student(config.student, trajectories)
    usable, _ = trajectories.split(config.heldout_experts)
    model, tokenizer = load_student_model(trajectories, device=device, trust_remote_code=trust_remote_code)
    examples, pool = load_expert_pool(tokenizer, manifest)
    count = resolve_budget(budget, len(examples))
    segments = _segments(trajectories, usable, student, config.segments, config.seed)
    denoised = resolve_targets(config.student.targets, trajectories, student, usable)
    device_ = next(model.parameters()).device
    names = None
    sketch = None
    features, targets = [], []
    bar = tqdm(total=len(segments) * len(pool), desc="match gradients", disable=not progress, dynamic_ncols=True)
    for expert, start in segments:
        theta = trajectories.load(expert, start, device=device_)
        target = (trajectories.load(expert, start + student.span, device=device_) if denoised is None
                  else denoised.target(expert, start, device=device_))
        names = names or list(theta)
        if sketch is None:
            sketch = CountSketch(sum(t.numel() for t in theta.values()), config.sketch_dim, seed=config.seed,
                                 device=device_)
        displacement = torch.cat([(target[n] - theta[n]).flatten() for n in names]).unsqueeze(0)   # (1, P)
        targets.append(sketch(displacement)[0])
        rows = []
        for lo in range(0, len(pool), config.batch_size):
            batch = collate(pool[lo:lo + config.batch_size], tokenizer.pad_token_id, device_)
            with torch.autocast(device_type=device_.type, enabled=False):
                grads = per_example_grads(model, theta, batch)
            rows.append(sketch(-flatten_grads(grads, names)).cpu())     # descent directions (B, k)
            bar.update(len(batch["input_ids"]))
        features.append(torch.cat(rows))
    bar.close()
    chosen, objective = greedy_match(torch.stack(features), torch.stack(targets).cpu(), count, greedy=config.greedy)
    write_selection(output, method="match", data=manifest["data"], budget=budget, seed=config.seed,
                    examples=examples, indices=chosen, scores=objective,
                    extra={"experts": str(experts), "segments": [list(s) for s in segments],
                           "config": dataclasses.asdict(config), "student": dataclasses.asdict(student),
                           "order": "greedy order" if config.greedy else "alignment descending",
                           "seconds": round(time.time() - started, 1)})
    return {"count": count, "indices": chosen, "scores": objective}


def cut_selection(source: str | Path, budget: str | int, output: str | Path, examples: Sequence[Any]) -> dict[str, Any]:
    """A smaller budget of an earlier match selection: greedy choices are made one at a time, so the first k rows
    of a larger greedy selection are exactly the greedy selection of k rows (no model work)."""
    from .selection import apply_selection, read_selection, resolve_budget, write_selection

    record = read_selection(source)
    if record.get("method") != "match" or not record.get("config", {}).get("greedy", False):
        raise ConfigError(f"{source} is not a greedy match selection; it cannot be cut to another budget")
    apply_selection(examples, source)   # checks that its rows belong to this pool
    count = resolve_budget(budget, len(examples))
    if count > record["count"]:
        raise ConfigError(f"{source} holds {record['count']} rows, fewer than the {count} asked for")
    extra = {k: v for k, v in record.items() if k in ("experts", "segments", "config", "student", "order")}
    extra["cut_from"] = str(source)
    write_selection(output, method="match", data=record["data"], budget=budget, seed=record["seed"],
                    examples=examples, indices=record["indices"][:count], scores=record["scores"][:count],
                    extra=extra)
    return {"count": count, "indices": record["indices"][:count], "scores": record["scores"][:count]}
