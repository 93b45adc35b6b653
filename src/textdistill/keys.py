"""What enters a key, in one place.

A stage's output (expert runs, a selection, a distillation) and an experiment cell are reused only when their key,
a content hash of everything they depend on, is unchanged. What a config contributes is decided here, from each
field's metadata (:func:`textdistill.config.option`):

* ``keyed=False``: never part of a key (how work is carried out, not what it computes);
* ``omit_when=V``: left out at value ``V`` (an option added after results were cached, whose value ``V`` keeps the
  old behaviour, so those results keep their keys);
* ``acts(*configs)`` false: the field has no effect where it stands (e.g. the token search's confirmation draws
  outside gcg mode) and drops out of result keys;
* ``None`` (an unset option) is left out of result keys, so that an option added later with a ``None`` default
  keeps the keys of runs that do not use it.

The distillation's resume fingerprint (:func:`resume_settings`) keeps ``None`` values and leaves out the fields a
resumed run may change (``resume=False``).

Two version numbers cover what the metadata cannot: :data:`KEY_SCHEMA` (bump it when a rule here, or a field's key
metadata, changes what enters a key) and :data:`STAGE_CODE_VERSIONS` (bump a stage's number when its code changes
what it produces). Both enter keys only when they differ from the versions every result under ``results/`` was made
with, so those results keep their keys (``tests/data/cell_keys.json`` pins them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .artifacts import sha256_json, to_jsonable

__all__ = ["KEY_SCHEMA", "STAGE_CODE_VERSIONS", "code_identity", "keyed", "resume_settings", "settings_key",
           "without_none"]

#: The rules of this module; bump when they (or a field's key metadata) change what enters a key.
KEY_SCHEMA = 1
#: The version of the code of each stage. Bump a stage's number (or the package version) whenever a change of code
#: changes what that stage produces: the stages and cells made by the earlier code then have other keys and are made
#: again instead of reused. A cell's key covers the code of its training and scoring ("cell") and of every stage its
#: data come from.
STAGE_CODE_VERSIONS = {"experts": 1, "random": 1, "less": 1, "match": 1, "performance": 1, "distill": 1,
                       "cell": 1}
#: The package version, stage versions and key schema every run folder under results/ was made with: keys leave the
#: versions out while they are at these, so that those folders stay reusable.
_UNVERSIONED = ("0.1.0", 1, 1)


def _field_enters(f: dataclasses.Field, value: Any, chain: tuple[Any, ...]) -> bool:
    meta = f.metadata
    if not meta.get("keyed", True):
        return False
    if "omit_when" in meta and value == meta["omit_when"]:
        return False
    acts = meta.get("acts")
    return acts is None or bool(acts(*chain))


def keyed(value: Any, *parents: Any) -> Any:
    """The part of ``value`` that result keys depend on, as plain JSON values: a config dataclass becomes the
    mapping of its fields that enter keys (see the module docstring), recursively; ``parents`` are the configs that
    enclose ``value`` (outermost first), for the fields' ``acts`` rules."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        chain = (*parents, value)
        return {f.name: keyed(getattr(value, f.name), *chain) for f in dataclasses.fields(value)
                if _field_enters(f, getattr(value, f.name), chain)}
    if isinstance(value, dict):
        return {str(k): keyed(v, *parents) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [keyed(v, *parents) for v in value]
    return to_jsonable(value)


def without_none(value: Any) -> Any:
    """``value`` with every ``None`` mapping value left out, recursively (unset options)."""
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [without_none(v) for v in value]
    return value


def settings_key(settings: Any) -> str:
    """Content hash of settings (config dataclasses are taken through :func:`keyed`), leaving out unset (``None``)
    options: an option added later with a ``None`` default keeps the keys, and so the finished work, of runs that
    do not use it."""
    parts = without_none(keyed(settings))
    if KEY_SCHEMA != _UNVERSIONED[2]:
        parts = [parts, {"key_schema": KEY_SCHEMA}]
    return sha256_json(parts)


def code_identity(*stages: str) -> list[dict[str, Any]]:
    """The part of a key that names the code of ``stages``: empty at the versions every committed result has."""
    from . import __version__

    versions = {stage: STAGE_CODE_VERSIONS[stage] for stage in stages}
    if __version__ == _UNVERSIONED[0] and all(v == _UNVERSIONED[1] for v in versions.values()):
        return []
    return [{"textdistill": __version__, "code": versions}]


def resume_settings(config: Any) -> dict[str, Any]:
    """What a distillation's resume fingerprint holds of its config: every field (``None`` values too) but those a
    resumed run may change (``resume=False``) and those at their ``omit_when`` value."""
    def walk(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out = {}
            for f in dataclasses.fields(value):
                item = getattr(value, f.name)
                if not f.metadata.get("resume", True):
                    continue
                if "omit_when" in f.metadata and item == f.metadata["omit_when"]:
                    continue
                out[f.name] = walk(item)
            return out
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        return value

    return walk(config)
