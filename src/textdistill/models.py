"""Loading causal LMs and tokenizers by name (offline named models), hub id or local folder; LoRA adapters.

Named models (``smollm2-135m``, ``gemma3-270m``) resolve to the cached folders made by ``textdistill assets
install``; anything else goes to ``from_pretrained`` unchanged (``trust_remote_code`` only when asked).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .assets import NAMED_MODELS, named_model_path
from .config import LoraSettings
from .errors import ModelError, OutputError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64}


@contextlib.contextmanager
def output_head_only_at(model: torch.nn.Module, positions: torch.Tensor):
    """While active, the output head (``get_output_embeddings()``) sees only the hidden states at ``positions``
    ``(B, T)`` bool, packed in row-major order as ``(1, positions.sum(), hidden)``, so no logits are computed for
    prompt or padding positions: with a 262k vocabulary the head costs more than the transformer body of a small
    model. What a model does after its head (e.g. Gemma's logit soft-capping) is elementwise and still applies, and
    autograd flows through the packing. Yields a function telling whether the packing happened; when the head is
    not reachable (or is called with another shape) logits come back unpacked and the caller selects the positions.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    packed = False

    def pre_hook(module, args):
        nonlocal packed
        if args and torch.is_tensor(args[0]) and args[0].shape[:2] == positions.shape:
            packed = True
            return (args[0][positions.to(args[0].device)].unsqueeze(0), *args[1:])
        return None

    handle = head.register_forward_pre_hook(pre_hook) if isinstance(head, torch.nn.Module) else None
    try:
        yield lambda: packed
    finally:
        if handle is not None:
            handle.remove()


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``fp32``/``bf16``/``fp16``/``fp64`` (or a torch dtype) to a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ModelError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def native_bf16(device: str | torch.device | None = "auto") -> bool:
    """Whether ``precision: auto`` means bf16 autocast on ``device``: CUDA devices that support bf16, nothing else.

    Every CPU gets fp32, whatever its kind (:mod:`textdistill.hardware`). bf16 buys little where it is native: on
    a 2-core AMX Xeon the demo took 4 min 4 s in bf16 and 4 min 14 s in fp32 (issue 21); on AVX512-BF16 without
    AMX a LoRA step was 1.7x and a meta-gradient 1.5x slower (``results/bench_metagrad_precision.md``), and on
    AVX2 bf16 is emulated (about 20x slower). And bf16 on a CPU makes results, tolerances and cache keys depend on
    the machine: each kind broke the suite once that way. ``--precision bf16`` still asks for it explicitly.
    """
    device = resolve_device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return False


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: str | torch.device | None = "auto") -> str:
    """``auto`` -> ``bf16`` on a CUDA device with bf16 (see :func:`native_bf16`), ``fp32`` on every CPU and
    elsewhere; ``fp32`` and ``bf16`` are returned as they are (an explicit bf16 is honoured even where it is
    emulated)."""
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast_context(precision: str, device: str | torch.device | None = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for a resolved ``bf16`` precision (``auto`` is resolved first), else nothing."""
    device = resolve_device(device)
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when available (this rank's GPU under torchrun / accelerate launch), else CPU."""
    from .distributed import local_device

    return local_device(device)


def resolve_model_path(name_or_path: str) -> str:
    """A named model's cached folder, an existing local folder, or the string unchanged (a hub id)."""
    if name_or_path in NAMED_MODELS:
        return str(named_model_path(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} exists but has no config.json: not a Hugging Face model folder; give a "
                             f"folder saved with save_pretrained, a named model ({', '.join(NAMED_MODELS)}) or a "
                             f"hub id")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelError(f"model folder not found: {name_or_path}; check the path, or give a named model "
                         f"({', '.join(NAMED_MODELS)})")
    if "/" not in name_or_path:
        raise ModelError(f"unknown model '{name_or_path}': not a named model ({', '.join(NAMED_MODELS)}), "
                         f"not a local folder, and not a hub id of the form owner/name")
    return name_or_path


#: Files that hold a Hugging Face model's weights (a sharded model has an index beside its shards).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _refetch_hint(name_or_path: str) -> str:
    if name_or_path in NAMED_MODELS:
        return "convert it again with `textdistill assets install --force`"
    return "copy the model folder again, or save it with save_pretrained"


def _model_problem(name_or_path: str, path: str, exc: Exception) -> str:
    """What is wrong with a model that ``from_pretrained`` could not load: a local folder without weights or
    with a damaged safetensors file is named; anything else quotes the library's first line."""
    from safetensors import safe_open

    folder = Path(path)
    if folder.is_dir():
        try:
            json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except ValueError as damaged:  # JSONDecodeError, UnicodeDecodeError
            return f"{folder / 'config.json'} is not valid JSON ({damaged}); {_refetch_hint(name_or_path)}"
        if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
            return (f"{folder} has a config.json but no weights (model.safetensors or pytorch_model.bin); "
                    f"{_refetch_hint(name_or_path)}")
        for weights in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(str(weights), framework="pt"):
                    pass
            except Exception as damaged:  # SafetensorError: truncated or not safetensors at all
                return (f"{weights} is truncated or damaged ({_first_line(str(damaged))}); "
                        f"{_refetch_hint(name_or_path)}")
    return (f"could not load model '{name_or_path}' ({path}): {type(exc).__name__}: "
            f"{_first_line(str(exc)) or 'no details'}; {_refetch_hint(name_or_path)}")


def _tokenizer_problem(name_or_path: str, path: str, exc: Exception) -> str:
    """What is wrong with a tokenizer that ``from_pretrained`` could not load (a local folder: missing or damaged
    tokenizer files)."""
    folder = Path(path)
    if folder.is_dir():
        files = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
        if not any((folder / name).is_file() for name in files):
            fix = (_refetch_hint(name_or_path) if name_or_path in NAMED_MODELS
                   else "save the tokenizer into the folder with tokenizer.save_pretrained")
            return f"{folder} has no tokenizer files ({', '.join(files)}); {fix}"
        if (folder / "tokenizer.json").is_file():
            try:
                json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
            except ValueError as damaged:  # JSONDecodeError, UnicodeDecodeError
                return f"{folder / 'tokenizer.json'} is damaged ({damaged}); {_refetch_hint(name_or_path)}"
    return (f"could not load a tokenizer for '{name_or_path}' ({path}): {type(exc).__name__}: "
            f"{_first_line(str(exc)) or 'no details'}")


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, with a pad token (EOS) when it has none; right padding."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(_tokenizer_problem(name_or_path, path, exc)) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(name_or_path: str, *, dtype: str | torch.dtype = "fp32", device: str | torch.device | None = "auto",
               attn_implementation: str | None = "eager", adapter: str | Path | None = None,
               trust_remote_code: bool = False) -> Any:
    """A causal LM in eval mode on ``device``; with ``adapter``, a LoRA adapter folder loaded on top.

    Eager attention is the default because the distillation meta-gradient needs a double backward, which the
    CPU flash kernel of ``sdpa`` does not provide; evaluation and training may pass ``"sdpa"``.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:  # OSError, a damaged safetensors file, an unknown architecture (ValueError) ...
        raise ModelError(_model_problem(name_or_path, path, exc)) from exc
    model.to(resolve_device(device))
    if adapter is not None:
        model = load_adapter(model, adapter)
    model.eval()
    return model


def load_adapter(model: Any, adapter: str | Path, *, trainable: bool = False) -> Any:
    """Wrap ``model`` with a saved peft LoRA adapter folder (clear error when the folder is not an adapter)."""
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise ModelError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json); give the folder that "
                         f"training wrote (its adapter/)")
    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    except Exception as exc:  # a size mismatch (another base model), missing or damaged adapter weights ...
        try:
            base = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get(
                "base_model_name_or_path")
        except (OSError, ValueError):
            base = None
        text = str(exc)
        detail = next((line.strip() for line in text.splitlines() if "size mismatch" in line),
                      _first_line(text) or type(exc).__name__)
        made_for = f"; it was made for '{base}': load it on that model" if base else ""
        raise ModelError(f"the LoRA adapter {adapter} does not fit this model ({detail}){made_for}") from exc


def base_model_id(name_or_path: str) -> str:
    """What an adapter names as its base model: a named model's public hub id, a local folder's absolute path (so
    that it means the same from any working directory), else the hub id as given."""
    if name_or_path in NAMED_MODELS:
        return NAMED_MODELS[name_or_path].hub_id
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def save_adapter(model: Any, tokenizer: Any, folder: str | Path, model_name: str) -> Path:
    """Save a peft model's LoRA adapter into ``folder`` (safetensors, replacing an earlier one) so that
    ``PeftModel.from_pretrained`` reloads it: ``adapter_config.json`` names the base as :func:`base_model_id` does,
    and ``base_model.json`` records the base's identity, including the local folder that was actually loaded."""
    from .artifacts import atomic_write_json, output_error, read_json

    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")   # a killed save never leaves a half adapter in place
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        config = read_json(staging / "adapter_config.json")
        config["base_model_name_or_path"] = base_model_id(model_name)
        atomic_write_json(staging / "adapter_config.json", config)
        # peft's README is an unfilled template whose base_model is the local folder, not the base named above
        (staging / "README.md").unlink(missing_ok=True)
        atomic_write_json(staging / "base_model.json", model_identity(model_name, model, tokenizer))
    except OSError as exc:   # a read-only or full folder: an earlier adapter in `folder` stays as it was
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OutputError):
            raise
        raise output_error(folder, exc) from exc
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def add_lora(model: Any, settings: LoraSettings) -> Any:
    """Wrap ``model`` with a fresh LoRA adapter; only the LoRA tensors are trainable."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in settings.target_modules if m not in names]
    if missing:
        raise ModelError(f"LoRA target module(s) {', '.join(missing)} not found in {type(model).__name__}")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, config)


def model_fingerprint(model: Any) -> str:
    """Short hash of a model's architecture config and a sample of its weights, to refuse mismatched artifacts."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation",
                     "attn_implementation", "use_cache"):
        config.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    embedding = base.get_input_embeddings().weight
    # rounded to bf16 so that the same weights loaded in fp32, bf16 or fp64 give the same fingerprint
    sample = embedding[:: max(1, embedding.shape[0] // 64)].detach().to(torch.bfloat16).float()
    digest.update(sample.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Short hash of a tokenizer's vocabulary."""
    vocab = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelIdentity:
    """What an artifact records about the model it was made with."""

    name: str
    path: str
    architecture: str
    fingerprint: str
    tokenizer_fingerprint: str
    vocab_size: int
    hidden_size: int


def model_identity(name: str, model: Any, tokenizer: Any) -> ModelIdentity:
    """Identity record of a loaded model and tokenizer."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings().weight
    path = name
    try:
        path = resolve_model_path(name)
    except ModelError:
        pass
    return ModelIdentity(name=name, path=str(path), architecture=type(base).__name__,
                         fingerprint=model_fingerprint(base), tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                         vocab_size=int(embedding.shape[0]), hidden_size=int(embedding.shape[1]))
