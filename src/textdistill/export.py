"""Artifacts for use outside textdistill: a LoRA adapter merged into its base model as a plain Hugging Face model
folder, and a distilled dataset as a ``datasets`` folder.

Both are written into a staging folder beside the output and renamed into place, so an interrupted export never
leaves a half-written model where a finished one is expected.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from .errors import ConfigError, DataError, ModelError, OutputError, TextDistillError


def _check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"{output} exists and is not empty; choose another --output or empty it")


def _write_folder(output: Path, write: Callable[[Path], None]) -> Path:
    """Fill ``output`` (absent or empty) through ``write(staging)`` and an atomic rename."""
    from .artifacts import output_error

    _check_output(output)
    staging = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        write(staging)
        if output.exists():
            output.rmdir()
        staging.rename(output)
    except OSError as exc:   # a read-only or full folder
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OutputError):
            raise
        raise output_error(output, exc) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _adapter_base(adapter: Path) -> str:
    """The base model a peft adapter folder names (``base_model_name_or_path`` of its ``adapter_config.json``)."""
    if not adapter.is_dir():
        raise ModelError(f"adapter folder not found: {adapter}")
    config = adapter / "adapter_config.json"
    if not config.is_file():
        raise ModelError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    try:
        recorded = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as exc:   # JSONDecodeError, UnicodeDecodeError
        raise ModelError(f"{config} is not valid JSON ({exc}); save the adapter again") from None
    if not isinstance(recorded, dict):
        raise ModelError(f"{config} is not an adapter config (a JSON object); save the adapter again")
    return str(recorded.get("base_model_name_or_path") or "")


def _is_base(recorded: str, model_name: str) -> bool:
    """Whether an adapter's recorded base is ``model_name``: the same hub id, or the same local folder (peft and
    ``textdistill train`` record the folder that was loaded, e.g. a named model's cached conversion)."""
    from .models import base_model_id, resolve_model_path

    if recorded in (model_name, base_model_id(model_name)):
        return True
    try:
        local = Path(resolve_model_path(model_name)).resolve()
    except TextDistillError:
        return False
    return Path(recorded).exists() and Path(recorded).resolve() == local


def export_model(*, model_name: str, adapter: str | Path, output: str | Path, device: str = "auto",
                 trust_remote_code: bool = False) -> Path:
    """Entry of ``textdistill export --adapter``: merge a LoRA adapter into ``model_name`` (fp32) and write a plain
    model folder (safetensors, config, the base's tokenizer) that ``AutoModelForCausalLM.from_pretrained`` loads
    without peft. Refuses an adapter that names another base model and an output folder that is not empty."""
    from transformers import AutoTokenizer

    from .assets import NAMED_MODELS
    from .models import base_model_id, load_model, resolve_model_path

    adapter, output = Path(adapter), Path(output)
    recorded = _adapter_base(adapter)
    _check_output(output)   # before the model is loaded
    if not _is_base(recorded, model_name):
        raise ModelError(f"{adapter} is an adapter for '{recorded}', not for '{model_name}' "
                         f"({base_model_id(model_name)})")
    path = resolve_model_path(model_name)
    # the base's own tokenizer files, unchanged (load_tokenizer would add the pad token training uses)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    merged = load_model(model_name, dtype="fp32", device=device, adapter=adapter,
                        trust_remote_code=trust_remote_code).merge_and_unload()
    named = NAMED_MODELS.get(model_name)

    def write(folder: Path) -> None:
        merged.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        if named is not None and named.licence_file is not None:   # Gemma's terms travel with derivatives
            shutil.copy2(Path(path) / Path(named.licence_file[1]).name, folder)

    return _write_folder(output, write)


def save_distilled_dataset(run_folder: str | Path, output: str | Path) -> Path:
    """Entry of ``textdistill export --distilled``: a distillation run's ``distilled.jsonl`` as a ``datasets``
    folder (``save_to_disk``), which ``datasets.load_from_disk`` and every textdistill dataset argument read."""
    from datasets import Dataset

    source = Path(run_folder) / "distilled.jsonl"
    if not source.is_file():
        raise DataError(f"{run_folder} has no distilled.jsonl: not a finished distillation run")
    rows = []
    try:
        for lineno, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():   # the data a user trains on (runs made before diagnostics.jsonl had both)
                row = json.loads(line)
                rows.append({"prompt": row["prompt"], "response": row["response"]})
    except json.JSONDecodeError as exc:
        raise DataError(f"{source}:{lineno}: malformed JSON line ({exc.msg}); the run's output was changed or cut "
                        f"short: distil again") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{source} is not UTF-8 text (offset {exc.start}); distil again") from None
    return _write_folder(Path(output), lambda folder: Dataset.from_list(rows).save_to_disk(str(folder)))
