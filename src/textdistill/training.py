"""Fine-tuning: an explicit loop (no HF Trainer), LoRA through peft or full fine-tuning, response-only loss.

:func:`train_model` is the loop (reused by the expert runs, which hook a callback into every step);
:func:`train` is the entry of ``textdistill train``: it loads model and data, runs the loop and writes the run folder.
Under ``torchrun``/``accelerate launch`` the loop is data-parallel: each rank computes the gradients of its share of
every micro-batch, weighted so that their sum over the ranks (all-reduce) is the one-process gradient.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from . import distributed
from .artifacts import (atomic_write_json, read_json, sha256_json, write_jsonl,
                        write_run_info)
from .checkpoint import STATE_FILE, LoopPosition, TrainCheckpointer
from .config import TrainConfig
from .data import TokenizedExample, load_examples, tokenize_examples
from .errors import ConfigError, TrainingError
from .keys import keyed
from .models import add_lora, autocast_context, load_model, load_tokenizer, output_head_only_at, resolve_precision
from .reporting import LiveCurves
from .selection import apply_selection

MAX_FAULTS_IN_A_ROW = 3   # NaN/inf steps skipped in a row before training stops


def collate(examples: Sequence[TokenizedExample], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``/``attention_mask``/``labels``, each (B, T_max); labels are -100 on the
    prompt and on padding so the loss covers response tokens only."""
    longest = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    labels = torch.full((len(examples), longest), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        ids = example.input_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor(example.labels)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}


def response_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over response tokens, and the number of those tokens.

    Logits are computed only at the positions that predict a response token (see ``output_head_only_at``): the
    prompt and padding never reach the output head, which for a large vocabulary is most of the cost."""
    labels = batch["labels"]                                   # (B, T), -100 on prompt and padding
    targets = labels[:, 1:]                                    # (B, T-1): position t predicts token t + 1
    predicting = targets != -100                               # (B, T-1)
    count = int(predicting.sum())
    if count == 0:
        raise TrainingError("a batch has no response tokens to learn (all labels masked)")
    positions = torch.zeros_like(labels, dtype=torch.bool)    # (B, T)
    positions[:, :-1] = predicting
    with output_head_only_at(model, positions) as packed:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[0] if packed() else logits[positions]      # (count, V), row-major like targets[predicting]
    loss = torch.nn.functional.cross_entropy(logits.float(), targets[predicting])
    return loss, count


def mean_response_loss(model: Any, rows: Sequence[TokenizedExample], pad_id: int, batch_size: int = 16) -> float:
    """Token-mean response loss of ``rows`` under ``model`` as it is (eval mode, no graph, the model's own dtype):
    the score performance matching gives a trained receiver."""
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i:i + batch_size], pad_id, next(model.parameters()).device)
            loss, count = response_loss(model, batch)
            total += float(loss) * count
            tokens += count
    return total / tokens


def lr_multiplier(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate factor at optimizer step ``step`` (0-based): linear warmup, then constant/linear/cosine decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"unknown schedule '{schedule}'")


def make_optimizer(params: Sequence[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (with optional momentum) over ``params``."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    raise ConfigError(f"unknown optimizer '{config.optimizer}'")


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Shuffled example order of one epoch, reproducible from (seed, epoch)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def planned_steps(num_examples: int, config: TrainConfig) -> int:
    """Optimizer steps the recipe takes on ``num_examples`` examples."""
    if config.max_steps is not None:
        return config.max_steps
    per_epoch = math.ceil(num_examples / (config.batch_size * config.grad_accum))
    return max(1, math.ceil(per_epoch * config.epochs))


@dataclass
class TrainResult:
    """What a training loop did."""

    steps: int
    tokens: int
    seconds: float
    losses: list[float]
    precision: str = "fp32"  # what ``auto`` resolved to on this device
    examples: int = 0  # how many examples it trained on
    batch_indices: list[list[int]] = field(default_factory=list)  # example indices of each step, in order


StepCallback = Callable[[int, Any, torch.optim.Optimizer], None]

# Gradient elements summed over the ranks per all-reduce: a full fine-tune sends its gradients in pieces of at most
# 128 MiB (fp32) rather than one flat copy of all of them.
_ALL_REDUCE_ELEMENTS = 1 << 25


def _example_sizes(example: Any) -> tuple[int, int]:
    """(loss terms, tokens) of one training example: the response tokens its loss averages over (every response
    token but a first one with no prompt before it) and all its tokens."""
    if isinstance(example, TokenizedExample):
        return len(example.response_ids) - (len(example.prompt_ids) == 0), len(example.input_ids)
    terms, tokens = example
    return int(terms), int(tokens)


def _sum_gradients(params: Sequence[torch.nn.Parameter], present: Sequence[bool]) -> None:
    """Sum the gradients of ``params`` over the ranks, in place. ``present[i]``: some rank has a gradient for
    parameter i; a rank without one (none of its examples reached it) adds zeros, and a parameter no rank reached
    keeps ``grad = None``, as on one process (AdamW skips it rather than decaying it)."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
    for p, has in zip(params, present):
        if has:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in groups.values():   # torch.cat needs one dtype and device per flat buffer
        start = 0
        while start < len(group):
            bucket, size = [], 0
            while start < len(group) and (not bucket or size + group[start].numel() <= _ALL_REDUCE_ELEMENTS):
                bucket.append(group[start])
                size += group[start].numel()
                start += 1
            flat = distributed.all_reduce_sum(torch.cat([p.grad.reshape(-1) for p in bucket]))   # (size,)
            offset = 0
            for p in bucket:
                p.grad.copy_(flat[offset: offset + p.numel()].view_as(p.grad))
                offset += p.numel()


def train_model(model: Any, examples: Sequence[Any], config: TrainConfig, *, pad_id: int,
                on_step: StepCallback | None = None, progress: bool = True,
                metrics_log: list[dict[str, Any]] | None = None,
                batch_loss: Callable[[list[int]], tuple[torch.Tensor, int]] | None = None,
                checkpointer: TrainCheckpointer | None = None, data_parallel: bool = True,
                curves: Any | None = None) -> TrainResult:
    """Train the model's trainable parameters on ``examples`` with ``config``'s recipe, in place.

    ``examples`` are :class:`TokenizedExample` rows, or, with ``batch_loss``, one ``(loss terms, tokens)`` pair per
    example: ``batch_loss(indices)`` then returns the mean loss of those examples over their loss terms (the
    tokens it predicts) and the number of tokens it processed.

    ``on_step(step, model, optimizer)`` runs after every optimizer step (step counts from 1) and once before the
    first with step 0 (the expert runs save their snapshots there). A step whose loss or gradients are NaN/inf is
    skipped (no update; the schedule and the step count go on, and its metrics record says ``skipped``);
    MAX_FAULTS_IN_A_ROW such steps in a row raise TrainingError, naming the step, before any bad update is applied.

    ``checkpointer`` saves the loop's full state (trainable parameters, optimizer, scheduler, RNGs, data position,
    losses and metrics so far) when it is due; when it already holds a checkpoint the loop continues from there,
    exactly (``on_step`` is then called for the remaining steps only). The caller removes it once its outputs are
    written.

    Under a launcher with several processes the loop is data-parallel (``data_parallel``): every rank calls it with
    the same model, examples and recipe, and computes the gradient of its share of every micro-batch (examples
    ``rank, rank + world, ...`` of it); each share's mean loss is weighted by its share of the micro-batch's loss
    terms, and the gradients and losses are summed over the ranks, so every step is the one-process step up to
    float rounding and every rank keeps the same parameters. Only rank 0 writes checkpoints; every rank restores
    from them. (LoRA dropout draws its masks per share, so with dropout the run is the one-process run in
    distribution only.) ``data_parallel=False`` trains on this process alone, as the expert runs do, one run per
    rank. On one process both are the plain loop.
    """
    if not examples:
        raise TrainingError("no training examples")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    optimizer = make_optimizer(params, config)
    total = planned_steps(len(examples), config)
    warmup = int(round(config.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total, warmup, config.schedule))
    torch.manual_seed(config.seed)
    precision = resolve_precision(config.precision, device)
    autocast = autocast_context(precision, device)
    model.train()
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    shard = data_parallel and distributed.world_size() > 1
    rank, world = distributed.rank(), distributed.world_size()
    sizes = [_example_sizes(e) for e in examples] if shard else []
    position = LoopPosition()
    if checkpointer is not None and checkpointer.exists:
        position = checkpointer.restore(named, optimizer, scheduler)
        if metrics_log is not None:
            metrics_log[:] = position.records
    elif on_step is not None:
        on_step(0, model, optimizer)
    losses, batch_indices, tokens = position.losses, position.batch_indices, position.tokens
    start = time.time() - position.seconds
    micro = config.batch_size
    epoch, cursor = position.epoch, position.cursor
    order = epoch_order(len(examples), config.seed, epoch)
    faults_in_a_row = position.faults_in_a_row
    bar = tqdm(total=total, initial=position.step, desc="train", disable=not progress or (shard and rank != 0),
               dynamic_ncols=True)
    for step in range(position.step + 1, total + 1):
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_tokens, fault = 0.0, 0, None
        batch_indices.append([])
        parts = torch.zeros(config.grad_accum, dtype=torch.float64)   # (grad_accum,): this rank's part of each loss
        for k in range(config.grad_accum):
            if cursor >= len(order):
                epoch, cursor = epoch + 1, 0
                order = epoch_order(len(examples), config.seed, epoch)
            batch_indices[-1] += order[cursor: cursor + micro]
            indices = order[cursor: cursor + micro]
            cursor += micro
            if shard:
                # every rank knows every example's size, so the micro-batch's loss terms and tokens need no message
                terms = sum(sizes[i][0] for i in indices)
                mine = indices[rank::world]
                mine_terms = sum(sizes[i][0] for i in mine)
                step_tokens += sum(sizes[i][1] for i in indices)
                if terms == 0:
                    raise TrainingError("a batch has no response tokens to learn (all labels masked)")
                if mine_terms == 0:
                    continue   # none of the micro-batch's loss is this rank's: its part stays 0
                with autocast:
                    loss = (batch_loss(mine)[0] if batch_loss is not None
                            else response_loss(model, collate([examples[i] for i in mine], pad_id, device))[0])
                # sum over ranks of (mean over my terms) x (my terms / all terms) = the micro-batch's mean
                part = loss * (mine_terms / terms)
                parts[k] = part.item()
                if torch.isfinite(part):
                    (part / config.grad_accum).backward()
                continue
            with autocast:
                if batch_loss is not None:
                    loss, count = batch_loss(indices)
                else:
                    batch = collate([examples[i] for i in indices], pad_id, device)
                    loss, _ = response_loss(model, batch)
                    count = int(batch["attention_mask"].sum())
            step_tokens += count
            if not torch.isfinite(loss):
                fault = f"loss became {loss.item()}"
                continue   # the rest of the step's data is still read, so the data order stays as planned
            (loss / config.grad_accum).backward()
            step_loss += loss.item() / config.grad_accum
        if shard:
            # one message for the micro-batch losses and which parameters got a gradient anywhere, then the
            # gradients themselves (unless the step is skipped anyway): every rank takes the same decisions
            stats = torch.cat([parts, torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float64)])
            distributed.all_reduce_sum(stats)               # (grad_accum + number of trainable tensors,)
            for value in stats[:config.grad_accum].tolist():
                if math.isfinite(value):
                    step_loss += value / config.grad_accum
                else:
                    fault = f"loss became {value}"
            if fault is None:
                _sum_gradients(params, [bool(x > 0) for x in stats[config.grad_accum:].tolist()])
        if fault is None and not all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None):
            fault = "a gradient became NaN/inf"
        faults_in_a_row = faults_in_a_row + 1 if fault else 0
        if faults_in_a_row >= MAX_FAULTS_IN_A_ROW:
            raise TrainingError(f"{fault} at step {step} ({MAX_FAULTS_IN_A_ROW} faulty steps in a row, lr "
                                f"{scheduler.get_last_lr()[0]:.3g}); lower the learning rate or use fp32")
        if fault:
            warnings.warn(f"training step {step} skipped: {fault}", stacklevel=2)
            optimizer.zero_grad(set_to_none=True)
        else:
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
        scheduler.step()
        losses.append(math.nan if fault else step_loss)
        tokens += step_tokens
        elapsed = time.time() - start
        record = {"step": step, "epoch": epoch, "loss": None if fault else step_loss, "lr": scheduler.get_last_lr()[0],
                  "tokens": tokens, "seconds": round(elapsed, 3)}
        if fault:
            record["skipped"] = fault
        if metrics_log is not None:
            metrics_log.append(record)
        if curves is not None:
            curves.log(step, {"train/loss": record["loss"], "train/lr": record["lr"], "train/tokens": tokens})
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
        bar.update(1)
        if on_step is not None:
            on_step(step, model, optimizer)
        # data-parallel ranks hold the same state: rank 0 writes it for all of them
        if checkpointer is not None and step < total and (rank == 0 or not shard) and checkpointer.due(step):
            checkpointer.save(named, optimizer, scheduler, LoopPosition(
                step=step, epoch=epoch, cursor=cursor, tokens=tokens, faults_in_a_row=faults_in_a_row,
                seconds=time.time() - start, losses=losses, batch_indices=batch_indices,
                records=metrics_log if metrics_log is not None else []))
    bar.close()
    if all(math.isnan(x) for x in losses):
        raise TrainingError(f"every one of the {total} training steps was skipped for NaN/inf ({fault}); lower the "
                            f"learning rate or use fp32")
    model.eval()
    return TrainResult(steps=total, tokens=tokens, seconds=time.time() - start, losses=losses, precision=precision,
                       batch_indices=batch_indices, examples=len(examples))


def base_dtype(config: TrainConfig, device: str) -> str:
    """The dtype the recipe loads the frozen base model in: ``config.dtype`` (fp32 when unset); fp16 only on a GPU
    (CPU kernels for fp16 are slow or missing)."""
    from .models import resolve_device

    dtype = config.dtype or "fp32"
    if dtype == "fp16" and resolve_device(device).type == "cpu":
        raise ConfigError("dtype fp16 needs a GPU; use bf16 or fp32 on a CPU")
    return dtype


def train_on_examples(*, model_name: str, examples: Sequence[Any], config: TrainConfig, device: str = "auto",
                      trust_remote_code: bool = False, progress: bool = True,
                      metrics_log: list[dict[str, Any]] | None = None,
                      tokenizer: Any | None = None,
                      checkpointer: TrainCheckpointer | None = None,
                      curves: Any | None = None, data_parallel: bool = True) -> tuple[Any, Any, TrainResult]:
    """Load ``model_name``, add LoRA (or unfreeze everything for full fine-tuning) and train on ``examples``
    (prompt/response pairs, tokenized here with the model's own tokenizer, loaded unless given).
    ``data_parallel=False``: this process trains alone under a launcher (:func:`train_model`).
    Returns (model, tokenizer, result)."""
    tokenizer = tokenizer or load_tokenizer(model_name, trust_remote_code=trust_remote_code)
    tokenized = tokenize_examples(tokenizer, examples, max_length=config.data.max_length,
                                  append_eos=config.data.append_eos)
    model = load_model(model_name, dtype=base_dtype(config, device), device=device,
                       attn_implementation="sdpa", trust_remote_code=trust_remote_code)
    torch.manual_seed(config.seed)  # the LoRA initialisation follows the recipe's seed, not the RNG's history
    if config.method == "lora":
        model = add_lora(model, config.lora)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    result = train_model(model, tokenized, config, pad_id=tokenizer.pad_token_id, progress=progress,
                         metrics_log=metrics_log, checkpointer=checkpointer, curves=curves,
                         data_parallel=data_parallel)
    return model, tokenizer, result


def train_on_embeddings(*, model_name: str, embeddings: str | Path, config: TrainConfig, device: str = "auto",
                        trust_remote_code: bool = False, progress: bool = True,
                        checkpointer: TrainCheckpointer | None = None) -> tuple[Any, Any, TrainResult]:
    """Fine-tune ``model_name`` (LoRA as the recipe says) on a distillation's learned prompt *vectors* followed by
    their response tokens (``embeddings.safetensors`` of a distill run): the continuous arm, which says whether the
    objective or the projection to text is what limits the distilled data. Returns (model, tokenizer, result);
    ``result.examples`` is the number of samples."""
    from .artifacts import load_tensors
    from .unroll import SyntheticBatch, student_loss

    tensors = load_tensors(embeddings)
    tokenizer = load_tokenizer(model_name, trust_remote_code=trust_remote_code)
    model = load_model(model_name, dtype=base_dtype(config, device), device=device,
                       attn_implementation="sdpa", trust_remote_code=trust_remote_code)
    hidden = model.get_input_embeddings().weight.shape[1]
    if tensors["prompt_embeds"].shape[-1] != hidden:
        raise ConfigError(f"{embeddings} holds vectors of width {tensors['prompt_embeds'].shape[-1]}, model "
                          f"'{model_name}' has width {hidden}: learned vectors only fit the model they were learned "
                          f"with")
    torch.manual_seed(config.seed)
    if config.method != "lora":
        raise ConfigError("training on learned vectors supports LoRA recipes only")
    model = add_lora(model, config.lora)
    target = next(model.parameters()).device
    prompts = tensors["prompt_embeds"].to(target)             # (S, P_max, H), in the input-embedding space
    lengths, responses = tensors["prompt_lengths"].to(target), tensors["response_ids"].to(target)
    response_lengths = tensors["response_lengths"].to(target)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def batch_loss(indices: list[int]) -> tuple[torch.Tensor, int]:
        index = torch.tensor(indices, device=target)
        batch = SyntheticBatch(prompts[index], lengths[index], responses[index], response_lengths[index])
        return student_loss(model, trainable, batch), int((lengths[index] + response_lengths[index]).sum())

    # per sample: the response tokens its loss averages over (a first one with no prompt before it is not
    # predicted) and its tokens, which weigh each rank's share of a micro-batch under a launcher
    sizes = list(zip((response_lengths - (lengths == 0).long()).tolist(), (lengths + response_lengths).tolist()))
    result = train_model(model, sizes, config, pad_id=tokenizer.pad_token_id, progress=progress,
                         batch_loss=batch_loss, checkpointer=checkpointer)
    result.examples = prompts.shape[0]
    return model, tokenizer, result


def train(*, model_name: str, data: str, output: str | Path, config: TrainConfig, device: str = "auto",
          selection: str | Path | None = None, evaluate_on: Sequence[tuple[str, str]] = (), eval_limit: int | None = None,
          trust_remote_code: bool = False, progress: bool = True, resume: bool = False,
          checkpoint_every: int | None = None, checkpoint_seconds: float | None = 300.0) -> dict[str, Any]:
    """Entry of ``textdistill train``: fine-tune ``model_name`` on dataset ``data`` and save into ``output``.

    ``output`` receives the adapter (LoRA) or the full model, ``run.json`` (resolved config, versions, seeds),
    ``metrics.jsonl`` (one row per step) and, written last as the mark of a finished run, ``summary.json``.
    ``selection`` restricts the data to the rows a selection file lists. ``evaluate_on`` lists (task, split) pairs
    evaluated after training.

    While it trains, ``output/checkpoint/`` holds the full training state, written every ``checkpoint_every`` steps
    and every ``checkpoint_seconds`` seconds; ``resume=True`` continues from it exactly (bit-identical on CPU to an
    uninterrupted run), starts over when there is none, and returns the summary unchanged when the run is finished.

    Under ``torchrun``/``accelerate launch`` every rank runs this with the same arguments: training is
    data-parallel (:func:`train_model`), rank 0 alone holds the lock and writes the run folder and checkpoints (the
    others restore from the same checkpoint on ``resume``), ``evaluate_on`` is scored by all ranks together, and
    every rank returns the summary.
    """
    with distributed.main_process_owns(Path(output) / ".lock", f"the training run {output}", device):
        return _train(model_name=model_name, data=data, output=output, config=config, device=device,
                      selection=selection, evaluate_on=evaluate_on, eval_limit=eval_limit,
                      trust_remote_code=trust_remote_code, progress=progress, resume=resume,
                      checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds)


def _train(*, model_name: str, data: str, output: str | Path, config: TrainConfig, device: str = "auto",
           selection: str | Path | None = None, evaluate_on: Sequence[tuple[str, str]] = (),
           eval_limit: int | None = None,
           trust_remote_code: bool = False, progress: bool = True, resume: bool = False,
           checkpoint_every: int | None = None, checkpoint_seconds: float | None = 300.0) -> dict[str, Any]:
    output = Path(output)
    summary_path = output / "summary.json"
    checkpoint_dir = output / "checkpoint"
    if resume and summary_path.is_file():
        warnings.warn(f"{output} holds a finished run; nothing to resume", stacklevel=2)
        return read_json(summary_path)
    if not resume and (checkpoint_dir / STATE_FILE).is_file():
        raise ConfigError(f"{output} holds an interrupted training run; pass --resume to continue it or choose "
                          f"another --output")
    if not resume and ((output / "adapter_model.safetensors").exists() or (output / "model.safetensors").exists()):
        raise ConfigError(f"{output} already holds a trained model; choose another --output or delete it")
    tokenizer = load_tokenizer(model_name, trust_remote_code=trust_remote_code)
    examples = load_examples(data, config.data, tokenizer=tokenizer)
    if selection is not None:
        examples = apply_selection(examples, selection)
    distributed.barrier()   # every rank decides on the folder as it was, before rank 0 writes into it
    main = distributed.is_main()
    checkpointer = TrainCheckpointer(
        checkpoint_dir, every_steps=checkpoint_every, every_seconds=checkpoint_seconds,
        fingerprint={"model": model_name, "config": keyed(config),
                     "data_sha256": sha256_json([[e.prompt, e.response] for e in examples])})
    if main:
        output.mkdir(parents=True, exist_ok=True)
        write_run_info(output, command="train", config=config, seeds={"seed": config.seed},
                       extra={"model": model_name, "data": data, "num_examples": len(examples),
                              "selection": str(selection) if selection else None,
                              "resumed_from_step": read_json(checkpoint_dir / STATE_FILE)["position"]["step"]
                              if checkpointer.exists else None})
    log: list[dict[str, Any]] = []
    curves = LiveCurves(config.report_to, output, active=main)
    try:
        model, tokenizer, result = train_on_examples(model_name=model_name, examples=examples, config=config,
                                                     device=device, trust_remote_code=trust_remote_code,
                                                     progress=progress, metrics_log=log, tokenizer=tokenizer,
                                                     checkpointer=checkpointer, curves=curves)
    finally:
        curves.close()
        if log and main:
            write_jsonl(output / "metrics.jsonl", log)
    if main:
        model.save_pretrained(output, safe_serialization=True)
        if config.method == "full":
            tokenizer.save_pretrained(output)
    summary: dict[str, Any] = {"model": model_name, "data": data, "examples": len(examples), "steps": result.steps,
                               "tokens": result.tokens, "train_seconds": round(result.seconds, 1),
                               "precision": result.precision,
                               "first_loss": result.losses[0], "last_loss": result.losses[-1]}
    if evaluate_on:
        from .config import EvalConfig
        from .evaluation import evaluate_model

        summary["eval"] = {}
        for task, split in evaluate_on:
            eval_config = EvalConfig(task=task, split=split, limit=eval_limit, template=config.data.template
                                     if config.data.template in ("rc", "mc") else "rc")
            summary["eval"][f"{task}:{split}"] = evaluate_model(model, tokenizer, eval_config, progress=progress,
                                                                sharded=True)
    if main:
        atomic_write_json(summary_path, summary)
        checkpointer.remove()
    return summary
