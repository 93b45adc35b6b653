"""Command-line flags generated from a stage's config dataclass: every field, nested ones too, is a flag named by its
dotted path (``--student.lr_grid``, ``--lora.r``), whose help is the comment the field carries in the source and its
default. Values are read as YAML (``--max_steps 200``, ``--student.lr_grid [0.01,0.03]``, ``--search.confirm_draws
null``) and checked by the dataclass itself when the config is built.

The hand-written flags of a command (``--lr``, ``--max-steps``...) stay as shortcuts; a field whose flag name a
command already has is not declared twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import types
import typing
from typing import Any

import yaml

#: Prefix of the argparse destinations of generated flags (never a valid attribute name, so no clash).
DEST_PREFIX = "config:"


@functools.lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, str]:
    """The comment of each field of dataclass ``cls`` in its source: the trailing ``# ...`` of its line, or else the
    ``#`` lines right above it."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"(\w+)\s*:", stripped)
        if match and match.group(1) in names and match.group(1) not in comments:
            trailing = stripped.split("  # ", 1)[1].strip() if "  # " in stripped else ""
            comments[match.group(1)] = trailing or " ".join(above)
        above = []
    return comments


def _is_config(tp: Any) -> type | None:
    """The dataclass a field's annotation names (``Foo`` or ``Foo | None``), else None."""
    candidates = typing.get_args(tp) or (tp,)
    for candidate in candidates:
        if dataclasses.is_dataclass(candidate) and isinstance(candidate, type):
            return candidate
    return None


def config_fields(cls: type, default: Any = None, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """Every leaf field of config dataclass ``cls`` as ``(dotted name, annotation, default, comment)``, nested
    configs walked (their defaults taken from ``default``, an instance, or the class's own defaults)."""
    default = default if default is not None else cls()
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        nested = _is_config(hints[f.name])
        if nested is not None:
            rows += config_fields(nested, value if value is not None else nested(), f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", hints[f.name], value, comments.get(f.name, "")))
    return rows


def _type_name(tp: Any) -> str:
    """A short metavar: ``{a,b}`` for a Literal, ``list`` for a tuple or list, ``X | null`` for an optional X."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        name = " | ".join(_type_name(a) for a in kept)
        return f"{name} | null" if len(kept) < len(args) else name
    if origin in (tuple, list):
        return "list"
    return getattr(tp, "__name__", str(tp))


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, title: str, prefix: str = "",
                     default: Any = None) -> None:
    """Add a flag for every field of ``cls`` (see the module docstring) in an argument group ``title``; a field
    whose flag the parser already has is left to that flag."""
    group = parser.add_argument_group(title, f"every field of {cls.__name__}; values are YAML (null, [a, b], true)")
    for name, annotation, value, comment in config_fields(cls, default, prefix):
        flag = f"--{name}"
        shown = "null" if value is None else value
        description = f"{comment}; " if comment else ""
        existing = parser._option_string_actions.get(flag)
        if existing is not None:   # a hand-written flag of the same name (e.g. --lr) sets this field: say its default
            # (its help is already argparse text, where % is written %%)
            existing.help = (f"{existing.help or (comment or name).replace('%', '%%')}; "
                             f"default: {str(shown).replace('%', '%%')}")
            continue
        group.add_argument(flag, dest=DEST_PREFIX + name, type=_yaml_value, default=argparse.SUPPRESS,
                           metavar=_type_name(annotation).replace("%", "%%"),
                           help=f"{description}default: {shown}".replace("%", "%%"))


def given_config_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The generated flags the user gave, by dotted name (a YAML null really means None)."""
    return {k[len(DEST_PREFIX):]: v for k, v in vars(args).items() if k.startswith(DEST_PREFIX)}
