"""Typed, frozen configuration dataclasses with YAML presets and command-line overrides.

A config is built once (preset YAML -> user YAML -> explicit overrides), validated, and never mutated after; every
run writes the resolved config into its run folder.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


_ABSENT = object()


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
           keyed: bool = True, omit_when: Any = _ABSENT, acts: Callable[..., bool] | None = None,
           resume: bool = True) -> Any:
    """A config field that carries, in its metadata (as peft's configs carry their help), what the command line and
    the keys need to know of it:

    * ``help``: the help of its generated flag (:mod:`textdistill.flags`);
    * ``keyed=False``: never part of a key (:mod:`textdistill.keys`): how work is done, not what it computes;
    * ``omit_when``: a value at which the field is left out of keys (an option added after results were cached has
      its old behaviour there, so they keep their keys);
    * ``acts(*configs)``: False when the field has no effect (``configs``: the configs enclosing it, outermost
      first, ending with its own); it then drops out of result keys;
    * ``resume=False``: a resumed run may change it (it stays out of the distillation's resume fingerprint).
    """
    metadata: dict[str, Any] = {"help": help, "keyed": keyed, "resume": resume}
    if omit_when is not _ABSENT:
        metadata["omit_when"] = omit_when
    if acts is not None:
        metadata["acts"] = acts
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape (peft ``LoraConfig``)."""

    r: int = option(8, "LoRA rank")
    alpha: int = option(16, "LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = option(0.0, "LoRA dropout")
    target_modules: tuple[str, ...] = option(("q_proj", "v_proj"), "module names that get LoRA adapters")

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"lora.r must be positive, got {self.r}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules must name at least one module")


@dataclass(frozen=True)
class DataSettings:
    """How rows of a dataset become prompt/response text."""

    template: Literal["rc", "mc", "chat"] = option(
        "rc", "how a multiple-choice row becomes text: rc (Question/Answer + the choice's text), mc (lettered "
              "options, answer letter) or chat (the model's chat template)")
    prompt_field: str = option("prompt", "a file's prompt field")
    response_field: str = option("response", "a file's response field")
    messages_field: str = option("messages", "a file's chat field (a list of {role, content}; the last turn is "
                                             "the response)")
    max_length: int = option(256, "tokens kept per row (prompt + response)")
    append_eos: bool = option(True, "end each response with the tokenizer's EOS token")
    limit: int | None = option(None, "keep the first N rows (after sampling)")
    decontaminate: bool = option(False, "drop rows whose question is in an ARC/MMLU evaluation split")
    sample: int | None = option(None, "keep a seeded random subset of N rows, in dataset order (e.g. of the 157k "
                                      "mcqa-pool)")
    sample_seed: int = option(0, "seed of data.sample")

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ConfigError(f"data.max_length must be at least 8, got {self.max_length}")
        if self.sample is not None and (isinstance(self.sample, bool) or not isinstance(self.sample, int)
                                        or self.sample < 1):
            raise ConfigError(f"data.sample must be a positive number of rows, got {self.sample}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit must be a positive number of rows, got {self.limit}; leave it unset to "
                              f"use every row")


@dataclass(frozen=True)
class TrainConfig:
    """A fine-tuning recipe: LoRA (default) or full fine-tuning, response-only loss."""

    method: Literal["lora", "full"] = option("lora", "LoRA adapters on a frozen base, or full fine-tuning")
    lora: LoraSettings = option(factory=LoraSettings, help="the LoRA adapters")
    data: DataSettings = option(factory=DataSettings, help="how rows become text")
    optimizer: Literal["adamw", "sgd"] = option("adamw", "optimizer")
    lr: float = option(2e-4, "peak learning rate")
    weight_decay: float = option(0.0, "weight decay")
    momentum: float = option(0.0, "SGD momentum")
    schedule: Literal["constant", "linear", "cosine"] = option("linear", "learning-rate schedule after the warm-up")
    warmup_ratio: float = option(0.03, "fraction of the steps spent warming the learning rate up from 0")
    batch_size: int = option(8, "rows per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    epochs: float = option(1.0, "passes over the data (unless max_steps)")
    max_steps: int | None = option(None, "optimizer steps (overrides epochs)")
    max_grad_norm: float | None = option(1.0, "gradient clipping norm (null: none)")
    seed: int = option(0, "seed of the LoRA initialisation and the data order")
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "bf16 autocast or fp32; auto = bf16 on CUDA devices with bf16, fp32 on every CPU (bf16 was no faster "
                "with AMX, slower with AVX512-BF16 alone, ~20x slower where emulated; models.native_bf16)")
    dtype: Literal["fp32", "bf16", "fp16"] | None = option(
        None, "weights of the frozen base model (null: fp32); LoRA tensors stay fp32 (fp16: GPU only)")
    report_to: tuple[str, ...] = option((), "live curves of the loss and lr: tensorboard (event files in "
                                            "<output>/runs/); metrics.jsonl is always written", keyed=False,
                                        resume=False)

    def __post_init__(self) -> None:
        from .reporting import check_report_to

        check_report_to(self.report_to)
        if self.dtype not in (None, "fp32") and self.method == "full":
            raise ConfigError(f"dtype {self.dtype} applies to the frozen base of a LoRA recipe; full fine-tuning "
                              f"keeps fp32 weights (leave dtype unset)")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("batch_size and grad_accum must be positive")
        if self.max_steps is None and self.epochs <= 0:
            raise ConfigError("set epochs > 0 or max_steps")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"max_steps must be positive, got {self.max_steps}; leave it unset to train for "
                              f"epochs")


@dataclass(frozen=True)
class TaskFields:
    """The field names of a multiple-choice task read from a file: the question text, the list of choices and the
    answer (a 0-based index, a letter, or the text of a choice)."""

    question: str = option("question", "the question's field")
    choices: str = option("choices", "the field with the list of choices")
    answer: str = option("answer", "the answer's field (a 0-based index, a letter or the choice's text)")


@dataclass(frozen=True)
class EvalConfig:
    """Log-likelihood multiple-choice evaluation of a named task (``arc-easy``, ``arc-challenge``, ``mmlu``) or of a
    multiple-choice file (``.jsonl``/``.json``/``.csv``/``.parquet`` or a ``datasets`` folder)."""

    task: str = option("arc-easy", "arc-easy, arc-challenge, mmlu or a multiple-choice file")
    split: str = option("test", "train/validation/test (mmlu: dev/validation/test; a file is its own split)")
    template: Literal["rc", "mc"] | None = option(
        None, "rc (each choice's text as the continuation) or mc (lettered options); null: the task's default")
    num_fewshot: int = option(0, "few-shot examples before each question")
    fewshot_seed: int = option(1234, "seed of the few-shot draw")
    limit: int | None = option(None, "evaluate the first N items")
    offset: int | None = option(None, "skip the first N items (after the subject filter), before limit: offset "
                                      "1000, limit 1000 = items 1000-1999")
    item_set: str | None = option(None, "only these items, in this order: a stored set (mmlu-test-stratified-20: 20 "
                                        "test questions of each MMLU subject, seed 0) or a JSON file of item ids")
    subjects: tuple[str, ...] | None = option(None, "MMLU subject filter (a list, or comma-separated)")
    per_subject_limit: int | None = option(None, "MMLU: first N items of each subject (a fixed, stated subset)")
    max_length: int = option(2048, "longest context + continuation in tokens")
    precision: Literal["auto", "fp32", "bf16"] = option(
        "fp32", "fp32 by default so that scores do not depend on the machine; auto/bf16 trade that for speed")
    fields: TaskFields | None = option(None, "a file task's field names (null: question, choices, answer)")

    def __post_init__(self) -> None:
        for name in ("limit", "per_subject_limit"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.offset is not None and self.offset < 0:
            raise ConfigError(f"offset must be >= 0, got {self.offset}")
        if self.num_fewshot < 0:
            raise ConfigError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.max_length < 1:
            raise ConfigError(f"max_length must be a positive number of tokens, got {self.max_length}")


def _resolve_type(tp: Any) -> Any:
    return tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, raising ConfigError naming ``where`` on mismatch."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build_dataclass(tp, value, where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def build_dataclass(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build a (nested) frozen dataclass from a mapping, rejecting unknown keys with the list of known ones."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    values = dict(values)
    for f in dataclasses.fields(cls):
        # A partial mapping for a nested dataclass refines that field's own default (e.g. the experts' SGD recipe),
        # instead of starting again from the nested class's defaults.
        if isinstance(values.get(f.name), dict) and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                values[f.name] = deep_merge(_as_plain_dict(default), values[f.name])
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _as_plain_dict(instance: Any) -> dict[str, Any]:
    """A dataclass instance as nested dicts, without deep-copying tuples into lists."""
    return {f.name: (_as_plain_dict(getattr(instance, f.name)) if dataclasses.is_dataclass(getattr(instance, f.name))
                     else getattr(instance, f.name)) for f in dataclasses.fields(instance)}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base``."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with clear errors for a missing file or a non-mapping document."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at offset "
                          f"{exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        raise ConfigError(f"{where}: not valid YAML ({f'{context}: ' if context else ''}{problem}); fix that line "
                          f"(quote values that hold ': ' or ' #')") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level (key: value lines), got a "
                          f"{type(data).__name__}")
    return data


def preset_names() -> list[str]:
    """Names of the YAML presets shipped with the package."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("textdistill.presets").iterdir()
                  if p.name.endswith(".yaml"))


def read_preset(name: str) -> dict[str, Any]:
    """A shipped preset by name (without .yaml)."""
    path = resources.files("textdistill.presets").joinpath(f"{name}.yaml")
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}'; known: {', '.join(preset_names())}")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def load_config(cls: type[T], *, path: str | Path | None = None, section: str | None = None,
                keys: tuple[str, ...] | None = None, overrides: dict[str, Any] | None = None,
                sets: dict[str, Any] | None = None) -> T:
    """Resolve a config: dataclass defaults <- YAML file (optionally one top-level section, and of it only
    ``keys``: e.g. a distillation config's instrument and student) <- overrides <- sets.

    Overrides use dotted keys (``{"lora.r": 4}``) and ``None`` values are ignored; ``sets`` (the flags generated
    from the config) are applied last and a ``None`` there really sets ``None``.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values = read_yaml(path)
        if section is not None and section in values and isinstance(values[section], dict):
            values = values[section]
        elif (section is not None and section in values
              and section not in {f.name for f in dataclasses.fields(cls)}):  # type: ignore[arg-type]
            raise ConfigError(f"{path}: section '{section}' must be a mapping of settings (indented key: value "
                              f"lines), got {values[section]!r}")
        if keys is not None:
            values = {k: v for k, v in values.items() if k in keys}
    try:
        values = apply_overrides(apply_overrides(values, overrides), sets, skip_none=False)
        return build_dataclass(cls, values, cls.__name__)
    except ConfigError as exc:
        if path is None:
            raise
        raise ConfigError(f"{path}: {exc}") from None


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any] | None, *,
                    skip_none: bool = True) -> dict[str, Any]:
    """Set dotted keys (``{"lora.r": 4}``) in a nested mapping, in place; ``None`` values are skipped (an absent
    flag) unless ``skip_none`` is False."""
    for dotted, value in (overrides or {}).items():
        if value is None and skip_none:
            continue
        node = values
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return values
