"""Trajectory-matching distillation: learn pseudo prompts (continuous embeddings) followed by real responses so
that a student trained on them follows the experts; then project every vector to its nearest token.

Run folder::

    run.json              resolved config, versions, seeds
    init.json             which pool rows initialised the synthetic set
    state.safetensors     checkpoint: embeddings, learnable lr, optimizer moments, RNG (atomic; --resume reads it)
    state.json            checkpoint: iteration and a fingerprint of the settings (resume refuses other settings)
    metrics.jsonl         one row per iteration: matching loss, lr, nearest-token distance, changed fraction
    samples.jsonl         decoded prompts every few iterations
    distilled.jsonl       the projected text dataset (prompt, response, token ids, per-token distance)
    embeddings.safetensors  the learned embeddings and learning rate
    README.md             dataset card

The differentiable inner loop itself lives in :mod:`textdistill.unroll`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from tqdm.auto import tqdm

from .artifacts import (atomic_write_json, atomic_write_text, load_tensors, save_tensors, sha256_json,
                        write_jsonl, write_run_info)
from .config import DataSettings, LoraSettings
from .data import TokenizedExample, load_examples, tokenize_examples, uses_bos
from .errors import ConfigError, TrainingError, TrajectoryError
from .experts import check_compatible, load_experts
from .models import add_lora, load_model, load_tokenizer, model_identity, resolve_dtype
from .projection import (input_embedding_matrix, nearest_tokens, neighbour_regularizer, straight_through,
                         vector_distance)
from .selection import random_indices, read_selection, resolve_budget
from .unroll import SyntheticBatch, lora_parameters, matching_loss, unroll


INIT_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class RegularizerSettings:
    """Neighbour regularizer: keep learned vectors close to real token embeddings.

    ``penalty``: add ``weight`` x mean distance to the nearest token; ``straight_through``: evaluate the matching
    loss at the projected embeddings and apply its gradient to the continuous ones (PEZ); ``off``: neither.
    """

    mode: Literal["off", "penalty", "straight_through"] = "penalty"
    weight: float = 0.1
    metric: Literal["cosine", "l2"] = "cosine"
    refresh_every: int = 1  # iterations between nearest-token lookups (the lookup is the expensive part)


@dataclass(frozen=True)
class DistillConfig:
    """Options of trajectory matching. Defaults are starting points; the README says which were measured."""

    budget: str = "5%"
    iterations: int = 100
    syn_steps: int = 8  # N: student SGD steps per iteration
    expert_epochs: int = 1  # M: the target is this many snapshots after the start
    min_start: int = 0  # start snapshot t is drawn from [min_start, max_start]
    max_start: int | None = None  # default: the last snapshot that has a target M ahead
    batch_size: int = 8  # synthetic samples per student step
    init: Literal["real", "selection", "random"] = "real"
    selection: str | None = None  # selection file for init=selection
    prompt_length: int | None = None  # None: each sample's own prompt length; else fixed (random init only)
    lr_embeddings: float = 1e-3  # Adam on the pseudo prompts
    lr_lr: float = 1e-2  # Adam on log(student lr)
    student_lr: float | None = None  # initial student lr (default: the experts' lr)
    recompute: bool = False  # exact constant-memory backward through the unroll
    regularizer: RegularizerSettings = field(default_factory=RegularizerSettings)
    projection_metric: Literal["cosine", "l2"] = "cosine"
    rerank_top_k: int | None = None  # re-rank the top-k nearest tokens by the model's likelihood (readability)
    dtype: Literal["fp32", "bf16", "fp64"] = "fp32"  # weights and embeddings
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast the student's forward/backward (2-3x on CPUs with bf16)
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 10
    sample_every: int = 25

    def __post_init__(self) -> None:
        for name in ("iterations", "syn_steps", "expert_epochs", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.init == "selection" and not self.selection:
            raise ConfigError("init=selection needs a selection file (--selection FILE)")
        if self.checkpoint_every % self.regularizer.refresh_every:
            raise ConfigError("regularizer.refresh_every must divide checkpoint_every (so that resuming is exact)")
        if self.prompt_length is not None and self.init != "random":
            raise ConfigError("a fixed prompt_length applies to init=random only (real samples keep their prompts)")


@dataclass
class SyntheticSet:
    """The learnable synthetic data: S pseudo prompts and their fixed responses.

    ``prompt_embeds`` (S, P_max, H) is learned; ``prompt_lengths`` (S,) says how many rows each sample uses;
    ``fixed_prefix`` (S,) rows at the start stay fixed (a BOS token for tokenizers that need it), and so do rows
    whose initial token is special (``fixed_tokens`` (S, P_max), e.g. chat-template markers);
    ``response_ids`` (S, R_max) and ``response_lengths`` (S,) are real tokens, never learned.
    """

    prompt_embeds: torch.nn.Parameter
    prompt_lengths: torch.Tensor
    fixed_prefix: torch.Tensor
    fixed_tokens: torch.Tensor
    response_ids: torch.Tensor
    response_lengths: torch.Tensor
    init_token_ids: torch.Tensor  # (S, P_max) token ids the prompts started from (-1 on padding)

    def trainable_mask(self) -> torch.Tensor:
        """(S, P_max, 1) 1.0 on learnable rows, 0.0 on the fixed prefix and padding."""
        pos = torch.arange(self.prompt_embeds.shape[1], device=self.prompt_embeds.device)
        mask = (pos >= self.fixed_prefix[:, None]) & (pos < self.prompt_lengths[:, None]) & ~self.fixed_tokens
        return mask.unsqueeze(-1).to(self.prompt_embeds.dtype)

    def batch(self, indices: Sequence[int], embeds: torch.Tensor | None = None) -> SyntheticBatch:
        """A student minibatch of the given samples (``embeds`` replaces the prompts, e.g. straight-through)."""
        index = torch.as_tensor(list(indices), dtype=torch.long, device=self.prompt_embeds.device)
        source = self.prompt_embeds if embeds is None else embeds
        return SyntheticBatch(source[index], self.prompt_lengths[index], self.response_ids[index],
                              self.response_lengths[index])


def build_synthetic_set(tokenized: Sequence[TokenizedExample], embed_matrix: torch.Tensor, *, bos_id: int | None,
                        init: str, prompt_length: int | None, candidate_ids: torch.Tensor,
                        generator: torch.Generator) -> SyntheticSet:
    """Initialise pseudo prompts from the samples' own prompt tokens (``real``/``selection``) or from random
    vocabulary tokens (``random``), keeping a leading BOS fixed."""
    prompts, responses, prefixes = [], [], []
    for example in tokenized:
        ids = list(example.prompt_ids)
        prefix = 1 if bos_id is not None and ids and ids[0] == bos_id else 0
        if init == "random":
            length = prompt_length or max(1, len(ids) - prefix)
            pick = torch.randint(len(candidate_ids), (length,), generator=generator)
            ids = ids[:prefix] + candidate_ids[pick].tolist()
        if len(ids) <= prefix:
            raise ConfigError(f"sample {example.id} has an empty prompt: nothing to learn")
        prompts.append(ids)
        prefixes.append(prefix)
        responses.append(list(example.response_ids))
    count, p_max, r_max = len(prompts), max(map(len, prompts)), max(map(len, responses))
    token_ids = torch.full((count, p_max), -1, dtype=torch.long)
    response_ids = torch.zeros((count, r_max), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        token_ids[i, : len(p)] = torch.tensor(p)
        response_ids[i, : len(r)] = torch.tensor(r)
    device = embed_matrix.device
    embeds = embed_matrix[token_ids.clamp_min(0).to(device)] * (token_ids >= 0).unsqueeze(-1).to(device)
    return SyntheticSet(
        prompt_embeds=torch.nn.Parameter(embeds.clone()),
        prompt_lengths=torch.tensor(list(map(len, prompts)), device=device),
        fixed_prefix=torch.tensor(prefixes, device=device),
        fixed_tokens=torch.isin(token_ids, candidate_ids, invert=True).to(device) & (token_ids >= 0).to(device),
        response_ids=response_ids.to(device),
        response_lengths=torch.tensor(list(map(len, responses)), device=device),
        init_token_ids=token_ids.to(device))


def _optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Flatten an optimizer's per-parameter state into named tensors (no pickles)."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{prefix}.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def _restore_optimizer(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
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


def _save_checkpoint(run_dir: Path, loop: _Loop, fingerprint: str) -> None:
    tensors = {"prompt_embeds": loop.synthetic.prompt_embeds.detach(), "log_lr": loop.log_lr.detach(),
               "rng": loop.generator.get_state()}
    tensors.update(_optimizer_tensors("embed_opt", loop.embed_optimizer))
    tensors.update(_optimizer_tensors("lr_opt", loop.lr_optimizer))
    # the iteration travels inside the tensor file, so the two can never disagree after a crash
    save_tensors(run_dir / "state.safetensors", tensors,
                 metadata={"iteration": str(loop.iteration), "fingerprint": fingerprint})
    atomic_write_json(run_dir / "state.json", {"iteration": loop.iteration, "fingerprint": fingerprint})


def _load_checkpoint(run_dir: Path, loop: _Loop, fingerprint: str) -> None:
    from safetensors import safe_open

    with safe_open(str(run_dir / "state.safetensors"), framework="pt") as handle:
        meta = handle.metadata() or {}
    if meta.get("fingerprint") != fingerprint:
        raise ConfigError(f"--resume: the run in {run_dir} was made with other settings or samples (seed, budget, "
                          f"init, selection, learning rates, regularizer, steps); only 'iterations' and logging "
                          f"options may change on resume")
    tensors = load_tensors(run_dir / "state.safetensors")
    if tensors["prompt_embeds"].shape != loop.synthetic.prompt_embeds.shape:
        raise ConfigError(f"the checkpoint in {run_dir} has embeddings of shape "
                          f"{tuple(tensors['prompt_embeds'].shape)}, this run expects "
                          f"{tuple(loop.synthetic.prompt_embeds.shape)} (another budget or data?)")
    with torch.no_grad():
        loop.synthetic.prompt_embeds.copy_(tensors["prompt_embeds"])
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


def _sample_minibatches(count: int, batch_size: int, steps: int, generator: torch.Generator) -> list[list[int]]:
    """N minibatches drawn by walking shuffled passes over the synthetic set (each sample once per pass)."""
    size = min(batch_size, count)
    batches, order = [], []
    for _ in range(steps):
        if len(order) < size:  # start a new pass (the remainder of the last one is dropped: no repeats in a batch)
            order = torch.randperm(count, generator=generator).tolist()
        batches.append(order[:size])
        order = order[size:]
    return batches


def distill(*, experts: str | Path, output: str | Path, config: DistillConfig, resume: bool = False,
            device: str = "auto", progress: bool = True, trust_remote_code: bool = False) -> dict[str, Any]:
    """Entry of ``textdistill distill``: learn the synthetic set against the expert trajectories in ``experts``,
    project it to text and write the run folder (see the module docstring). Returns a summary dict."""
    output = Path(output)
    trajectories = load_experts(experts)
    manifest = trajectories.manifest
    if output.exists() and (output / "state.json").is_file() and not resume:
        raise ConfigError(f"{output} already holds a distillation run; pass --resume to continue it or choose "
                          f"another --output")
    if resume and not (output / "state.json").is_file():
        raise ConfigError(f"--resume: no checkpoint in {output}")
    model_name = manifest["model"]["path"]
    dtype = resolve_dtype(config.dtype)
    tokenizer = load_tokenizer(model_name, trust_remote_code=trust_remote_code)
    base = load_model(model_name, dtype=dtype, device=device, attn_implementation="eager",
                      trust_remote_code=trust_remote_code)
    lora = LoraSettings(**{**manifest["lora"], "target_modules": tuple(manifest["lora"]["target_modules"]),
                           "dropout": 0.0})
    with torch.random.fork_rng(devices=[]):  # the LoRA init is overwritten by snapshots; keep the caller's RNG
        torch.manual_seed(0)
        model = add_lora(base, lora)
    model.eval()
    lora_shapes = {k: tuple(v.shape) for k, v in lora_parameters(model).items()}
    check_compatible(trajectories, model_identity(manifest["model"]["name"], model, tokenizer), lora_shapes)

    data_settings = DataSettings(**manifest["data_settings"])
    examples = load_examples(manifest["data"], data_settings, tokenizer=tokenizer)
    if sha256_json([[e.prompt, e.response] for e in examples]) != manifest["pool_sha256"]:
        raise TrajectoryError(f"the pool '{manifest['data']}' differs from the one the experts were trained on")
    count = resolve_budget(config.budget, len(examples))
    if config.init == "selection":
        from .selection import apply_selection

        apply_selection(examples, config.selection)  # reads the file and checks that its ids belong to this pool
        chosen = read_selection(config.selection)["indices"][:count]
        if len(chosen) < count:
            raise ConfigError(f"selection {config.selection} lists {len(chosen)} rows, the budget is {count}")
    else:
        # its own random stream: the initial samples must not coincide with `select --method random --seed S`,
        # the baseline they are compared against
        chosen = random_indices(len(examples), count, config.seed + INIT_SEED_OFFSET)
    tokenized = tokenize_examples(tokenizer, [examples[i] for i in chosen], max_length=data_settings.max_length,
                                  append_eos=data_settings.append_eos)

    num_snapshots = trajectories.num_snapshots
    max_start = num_snapshots - 1 - config.expert_epochs if config.max_start is None else config.max_start
    if max_start < config.min_start or max_start + config.expert_epochs > num_snapshots - 1:
        raise ConfigError(f"start window [{config.min_start}, {max_start}] with expert_epochs={config.expert_epochs} "
                          f"does not fit trajectories of {num_snapshots} snapshots")

    # (V, H) in the space prompts are fed in; learned prompts are kept in at least fp32 for Adam
    embed_matrix = input_embedding_matrix(model).to(torch.promote_types(dtype, torch.float32))
    vocab = embed_matrix.shape[0]
    special = _special_ids(tokenizer, vocab)
    special_set = set(special)
    candidates = torch.tensor([i for i in range(min(len(tokenizer), vocab)) if i not in special_set])
    generator = torch.Generator().manual_seed(config.seed)
    synthetic = build_synthetic_set(tokenized, embed_matrix, bos_id=tokenizer.bos_token_id if uses_bos(tokenizer)
                                    else None, init=config.init, prompt_length=config.prompt_length,
                                    candidate_ids=candidates, generator=generator)
    student_lr = config.student_lr or float(manifest["lr"])
    # the learnable lr always lives in fp32 (in bf16, Adam's small steps on log(lr) round away)
    log_lr = torch.nn.Parameter(torch.tensor(math.log(student_lr), dtype=torch.promote_types(dtype, torch.float32),
                                             device=embed_matrix.device))
    loop = _Loop(synthetic=synthetic, log_lr=log_lr,
                 embed_optimizer=torch.optim.Adam([synthetic.prompt_embeds], lr=config.lr_embeddings),
                 lr_optimizer=torch.optim.Adam([log_lr], lr=config.lr_lr), generator=generator)
    output.mkdir(parents=True, exist_ok=True)
    fingerprint = sha256_json({"config": {k: v for k, v in dataclasses.asdict(config).items()
                                          if k not in ("iterations", "log_every", "checkpoint_every", "sample_every",
                                                       "rerank_top_k", "projection_metric")},
                               "chosen": chosen, "experts": manifest.get("experts"), "pool": manifest["pool_sha256"]})
    if resume:
        _load_checkpoint(output, loop, fingerprint)
    else:
        write_run_info(output, command="distill", config=config, seeds={"seed": config.seed},
                       extra={"experts": str(experts), "model": model_name, "budget_count": count,
                              "pool_size": len(examples)})
        atomic_write_json(output / "init.json", {"indices": chosen, "ids": [examples[i].id for i in chosen],
                                                 "init": config.init})
        write_jsonl(output / "metrics.jsonl", [])
        write_jsonl(output / "samples.jsonl", [])
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metrics = [m for m in metrics if m["iteration"] <= loop.iteration]
    samples = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines() if line.strip()]
    samples = [s for s in samples if s["iteration"] <= loop.iteration]

    mask = synthetic.trainable_mask()
    init_ids = synthetic.init_token_ids
    valid = (init_ids >= 0) & (mask.squeeze(-1) > 0)  # (S, P_max) learnable positions
    nearest_ids: torch.Tensor | None = None
    reg = config.regularizer
    autocast = (torch.autocast(device_type=embed_matrix.device.type, dtype=torch.bfloat16)
                if config.precision == "bf16" else contextlib.nullcontext())
    start_time = time.time()
    bar = tqdm(total=config.iterations, initial=loop.iteration, desc="distill", disable=not progress,
               dynamic_ncols=True)
    while loop.iteration < config.iterations:
        iteration = loop.iteration + 1
        # --- sample an expert segment and the student's minibatches (all from the run's own generator)
        expert = int(torch.randint(len(trajectories.snapshots), (1,), generator=loop.generator))
        start = int(torch.randint(config.min_start, max_start + 1, (1,), generator=loop.generator))
        batches_idx = _sample_minibatches(count, config.batch_size, config.syn_steps, loop.generator)
        start_params = trajectories.load(expert, start, device=embed_matrix.device, dtype=dtype)
        target_params = trajectories.load(expert, start + config.expert_epochs, device=embed_matrix.device,
                                          dtype=dtype)
        # --- nearest tokens of all prompt rows (cached between refreshes): (S, P_max)
        if nearest_ids is None or (iteration - 1) % reg.refresh_every == 0:
            nearest_ids, distances = nearest_tokens(synthetic.prompt_embeds.detach(), embed_matrix,
                                                    metric=reg.metric, exclude_ids=special)
        prompts = synthetic.prompt_embeds
        if reg.mode == "straight_through":
            prompts = torch.where(mask > 0, straight_through(prompts, embed_matrix, nearest_ids), prompts)
        batches = [synthetic.batch(b, prompts) for b in batches_idx]
        lr = loop.log_lr.exp()
        with autocast:
            student = unroll(model, start_params, batches, lr, recompute=config.recompute)
        match = matching_loss(student, start_params, target_params)
        loss = match
        reg_value = torch.zeros((), dtype=match.dtype)
        if reg.mode == "penalty" and reg.weight > 0:
            rows = prompts[valid]  # (K, H) learnable rows only
            reg_value = neighbour_regularizer(rows, embed_matrix, metric=reg.metric, nearest_ids=nearest_ids[valid])
            loss = loss + reg.weight * reg_value
        if not torch.isfinite(loss):
            write_jsonl(output / "metrics.jsonl", metrics)
            write_jsonl(output / "samples.jsonl", samples)
            _save_checkpoint(output, loop, fingerprint)  # keep the last good state on disk
            raise TrainingError(f"distillation loss became {loss.item()} at iteration {iteration}; the last good "
                                f"state is saved in {output} (lower lr_embeddings / lr_lr, or use --resume)")
        loop.embed_optimizer.zero_grad(set_to_none=True)
        loop.lr_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            synthetic.prompt_embeds.grad.mul_(mask)  # BOS prefix and padding stay fixed
        loop.embed_optimizer.step()
        loop.lr_optimizer.step()
        loop.iteration = iteration
        with torch.no_grad():
            changed = float(((nearest_ids != init_ids) & valid).sum() / valid.sum())
            mean_distance = float(distances[valid].mean())
        record = {"iteration": iteration, "matching_loss": match.item(), "regularizer": reg_value.item(),
                  "loss": loss.item(), "lr": lr.item(), "expert": expert, "start": start,
                  "nearest_distance": mean_distance, "changed_fraction": changed,
                  "seconds": round(time.time() - start_time, 2)}
        metrics.append(record)
        bar.set_postfix(match=f"{match.item():.4f}", lr=f"{lr.item():.2e}", dist=f"{mean_distance:.3f}")
        bar.update(1)
        if iteration % config.sample_every == 0 or iteration == config.iterations:
            samples.append({"iteration": iteration, "prompts": [
                tokenizer.decode([t for t in nearest_ids[i, : int(synthetic.prompt_lengths[i])].tolist()])
                for i in range(min(3, count))]})
        if iteration % config.checkpoint_every == 0 or iteration == config.iterations:
            write_jsonl(output / "metrics.jsonl", metrics)
            write_jsonl(output / "samples.jsonl", samples)
            _save_checkpoint(output, loop, fingerprint)
    bar.close()
    write_jsonl(output / "metrics.jsonl", metrics)
    return project_and_write(output=output, synthetic=synthetic, lr=loop.log_lr.exp().item(), tokenizer=tokenizer,
                             embed_matrix=embed_matrix, special=special, metric=config.projection_metric,
                             examples=[examples[i] for i in chosen], metrics=metrics, config=config,
                             manifest=manifest, experts=str(experts),
                             rerank_model=model.get_base_model() if config.rerank_top_k else None)


def project_and_write(*, output: Path, synthetic: SyntheticSet, lr: float, tokenizer: Any,
                      embed_matrix: torch.Tensor, special: list[int], metric: str, examples: Sequence[Any],
                      metrics: list[dict[str, Any]], config: DistillConfig, manifest: dict[str, Any],
                      experts: str, rerank_model: Any | None = None) -> dict[str, Any]:
    """Project every learned prompt to nearest tokens and write ``distilled.jsonl``, the embeddings and the card.

    With ``rerank_model`` (and ``config.rerank_top_k``), each position takes, among its top-k nearest tokens, the
    one the model finds most likely after the tokens chosen so far (left to right).
    """
    with torch.no_grad():
        ids, distances = nearest_tokens(synthetic.prompt_embeds.detach(), embed_matrix, metric=metric,
                                        exclude_ids=special)
        if rerank_model is not None and config.rerank_top_k:
            from .projection import rerank_by_likelihood

            for i in range(ids.shape[0]):
                first, length = int(synthetic.fixed_prefix[i]), int(synthetic.prompt_lengths[i])
                prefix = ids[i, :first] if first else None
                ids[i, first:length] = rerank_by_likelihood(
                    rerank_model, synthetic.prompt_embeds[i, first:length].detach(), embed_matrix,
                    top_k=config.rerank_top_k, metric=metric, exclude_ids=special, prefix_ids=prefix)
            # distances of the tokens actually chosen
            distances = vector_distance(synthetic.prompt_embeds.detach(), embed_matrix[ids], metric)
    # rows that never learned (special tokens such as chat markers) keep their initial token
    ids = torch.where(synthetic.fixed_tokens, synthetic.init_token_ids, ids)
    rows = []
    for i, example in enumerate(examples):
        first, length = int(synthetic.fixed_prefix[i]), int(synthetic.prompt_lengths[i])
        token_ids = ids[i, first:length].tolist()
        prompt_text = tokenizer.decode(token_ids)
        response_ids = synthetic.response_ids[i, : int(synthetic.response_lengths[i])].tolist()
        if response_ids and response_ids[-1] == tokenizer.eos_token_id:
            response_ids = response_ids[:-1]
        # the response the distillation actually learned (it differs from the source when max_length cut it)
        truncated = tokenizer(example.response, add_special_tokens=False)["input_ids"] != response_ids
        response_text = tokenizer.decode(response_ids) if truncated else example.response
        rows.append({"prompt": prompt_text, "response": response_text, "response_truncated": truncated,
                     "prompt_token_ids": token_ids,
                     "token_distance": [round(float(d), 5) for d in distances[i, first:length]],
                     "init_id": example.id, "init_prompt": example.prompt,
                     "retokenizes_exactly": tokenizer(prompt_text, add_special_tokens=False)["input_ids"] == token_ids})
    write_jsonl(output / "distilled.jsonl", rows)
    save_tensors(output / "embeddings.safetensors", {
        "prompt_embeds": synthetic.prompt_embeds.detach(), "prompt_lengths": synthetic.prompt_lengths,
        "fixed_prefix": synthetic.fixed_prefix, "response_ids": synthetic.response_ids,
        "response_lengths": synthetic.response_lengths, "lr": torch.tensor(lr)},
        metadata={"format": "textdistill.synthetic/1"})
    first_loss = metrics[0]["matching_loss"] if metrics else float("nan")
    last_loss = metrics[-1]["matching_loss"] if metrics else float("nan")
    learnable = synthetic.trainable_mask().squeeze(-1) > 0  # (S, P_max)
    changed = int(((ids != synthetic.init_token_ids) & learnable).any(dim=1).sum())
    summary = {"samples": len(rows), "learned_lr": lr, "first_matching_loss": first_loss,
               "last_matching_loss": last_loss, "iterations": len(metrics),
               "prompts_changed": changed, "mean_token_distance": float(distances[learnable].mean()),
               "retokenize_exact_fraction": sum(r["retokenizes_exactly"] for r in rows) / max(1, len(rows))}
    atomic_write_json(output / "summary.json", summary)
    atomic_write_text(output / "README.md", _dataset_card(summary, config, manifest, experts, rows))
    return summary


def _dataset_card(summary: dict[str, Any], config: DistillConfig, manifest: dict[str, Any], experts: str,
                  rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Distilled dataset (textdistill)", "",
        f"{summary['samples']} synthetic samples distilled from `{manifest['data']}` ({manifest['pool_size']} rows) "
        f"by trajectory matching against the experts in `{experts}` (model `{manifest['model']['name']}`, "
        f"LoRA r={manifest['lora']['r']} on {', '.join(manifest['lora']['target_modules'])}).", "",
        "Each row is a learned pseudo prompt, projected to its nearest tokens "
        f"({config.projection_metric}) and decoded, followed by the real response of the sample it was "
        "initialised from. Load it with `datasets.load_dataset(\"json\", data_files=\"distilled.jsonl\")`.", "",
        "| what | value |", "|---|---|",
        f"| budget | {config.budget} ({summary['samples']} samples) |",
        f"| iterations x student steps | {config.iterations} x {config.syn_steps} |",
        f"| matching loss first -> last | {summary['first_matching_loss']:.4f} -> {summary['last_matching_loss']:.4f} |",
        f"| learned student lr | {summary['learned_lr']:.4g} |",
        f"| regularizer | {config.regularizer.mode} (weight {config.regularizer.weight}, {config.regularizer.metric}) |",
        f"| init | {config.init} |",
        f"| prompts whose tokens changed | {summary['prompts_changed']} / {summary['samples']} |",
        f"| mean nearest-token distance | {summary['mean_token_distance']:.4f} |", "",
        "## First samples", "",
    ]
    for row in rows[:3]:
        lines += [f"- prompt: `{row['prompt'][:300]!r}`", f"  response: `{row['response'][:120]!r}`"]
    lines += ["", "Licence: the responses come from the source dataset; its licence applies."]
    return "\n".join(lines) + "\n"
