"""Command-line flags generated from a stage's config dataclass: the one surface of every config.

Every field, nested ones too, is one flag spelled as its key in a YAML config: the dotted path with underscores
(``--student.lr_grid``, ``--lora.r``, ``--max_steps``). Its help is the field's ``help`` metadata
(:func:`textdistill.config.option`) and its default. Values are read as YAML (``--max_steps 200``,
``--student.lr_grid [0.01,0.03]``, ``--search.confirm_draws null``), a list field also takes comma-separated text
(``--subjects anatomy,astronomy``), a true/false field may stand alone (``--recompute``), and the dataclass checks
the value when the config is built.

A command may give a field short aliases (``--lr`` for the experts' ``--train.lr``, ``--max-steps`` for
``--max_steps``): they are other names of the same flag, listed beside it in ``--help``, not flags of their own.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

#: Prefix of the argparse destinations of generated flags (never a valid attribute name, so no clash).
DEST_PREFIX = "config:"


def _is_config(tp: Any) -> type | None:
    """The dataclass a field's annotation names (``Foo`` or ``Foo | None``), else None."""
    candidates = typing.get_args(tp) or (tp,)
    for candidate in candidates:
        if dataclasses.is_dataclass(candidate) and isinstance(candidate, type):
            return candidate
    return None


def config_fields(cls: type, default: Any = None, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """Every leaf field of config dataclass ``cls`` as ``(dotted name, annotation, default, help)``, nested
    configs walked (their defaults taken from ``default``, an instance, or the class's own defaults)."""
    default = default if default is not None else cls()
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        nested = _is_config(hints[f.name])
        if nested is not None:
            rows += config_fields(nested, value if value is not None else nested(), f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", hints[f.name], value, f.metadata.get("help", "")))
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


def _kinds(tp: Any) -> set[Any]:
    """The plain types an annotation admits (``bool``, ``tuple``, ...), optional and Literal unwrapped."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in args if a is not type(None)))
    if origin is typing.Literal:
        return {type(a) for a in args}
    return {origin or tp}


def _choices(tp: Any) -> tuple | None:
    """The values a Literal annotation admits (``None`` too for an optional one), else None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return args
    if origin in (typing.Union, types.UnionType):
        inner = [_choices(a) for a in args if a is not type(None)]
        if len(inner) == 1 and inner[0] is not None:
            return (*inner[0], *((None,) if type(None) in args else ()))
    return None


def _value_parser(annotation: Any):
    """Read a flag's text as YAML; for a list field, comma-separated text is a list too; a field of fixed choices
    refuses any other value at once (a usage error naming the flag)."""
    listy = bool(_kinds(annotation) & {tuple, list})
    choices = _choices(annotation)

    def parse(text: str) -> Any:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if choices is not None and value not in choices:
            shown = ", ".join("null" if c is None else str(c) for c in choices)
            raise argparse.ArgumentTypeError(f"must be one of {shown}, got {text!r}")
        if listy and isinstance(value, str) and "," in value:
            return [part.strip() for part in value.split(",") if part.strip()]
        if listy and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return [value]
        return value

    return parse


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, title: str, prefix: str = "",
                     default: Any = None, aliases: Mapping[str, Sequence[str]] | None = None) -> None:
    """Add one flag per field of ``cls`` (see the module docstring) in an argument group ``title``; ``aliases``
    maps a dotted field name to other option strings of its flag (e.g. ``{"train.lr": ["--lr"]}``)."""
    group = parser.add_argument_group(title, f"every field of {cls.__name__}; values are YAML (null, [a, b], true)")
    aliases = dict(aliases or {})
    for name, annotation, value, description in config_fields(cls, default, prefix):
        shown = "null" if value is None else (list(value) if isinstance(value, tuple) else value)
        text = f"{description}; default: {shown}" if description else f"default: {shown}"
        extra = {}
        if _kinds(annotation) == {bool}:   # --recompute alone means true; --recompute false also parses
            extra = {"nargs": "?", "const": True}
        group.add_argument(f"--{name}", *aliases.pop(name, ()), dest=DEST_PREFIX + name,
                           type=_value_parser(annotation), default=argparse.SUPPRESS,
                           metavar=_type_name(annotation).replace("%", "%%"), help=text.replace("%", "%%"), **extra)
    if aliases:
        raise ValueError(f"aliases for fields {cls.__name__} does not have: {', '.join(sorted(aliases))}")


def given_config_flags(args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The generated flags the user gave, by dotted name (a YAML null really means None); with ``prefix``, only
    those under it, with the prefix taken off."""
    given = {k[len(DEST_PREFIX):]: v for k, v in vars(args).items() if k.startswith(DEST_PREFIX)}
    return {k.removeprefix(prefix): v for k, v in given.items() if k.startswith(prefix)}
