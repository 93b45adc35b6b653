"""Model resolution: named models, local folders, hub ids, clear errors."""

from __future__ import annotations

import pytest

from textdistill.config import LoraSettings
from textdistill.errors import ModelError
from textdistill.models import add_lora, load_model, model_fingerprint, resolve_model_path


def test_unknown_model_name_and_missing_folder():
    with pytest.raises(ModelError, match="unknown model 'gpt-17'"):
        resolve_model_path("gpt-17")
    with pytest.raises(ModelError, match="model folder not found"):
        resolve_model_path("./no/such/folder")
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_local_tiny_folder_loads_and_lora_targets_are_checked(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir), device="cpu")
    fp = model_fingerprint(model)
    peft_model = add_lora(model, LoraSettings(r=2, alpha=4))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert model_fingerprint(peft_model) == fp
    with pytest.raises(ModelError, match="not found"):
        add_lora(load_model(str(tiny_llama_dir), device="cpu"), LoraSettings(target_modules=("c_attn",)))


@pytest.mark.parametrize("capabilities, level, kind", [
    ({"amx_bf16": True, "avx512_bf16": True}, "AVX512", "amx"),
    ({"amx_bf16": False, "avx512_bf16": True}, "AVX512", "avx512_bf16"),
    ({}, "AVX512", "avx512"),
    ({"amx_bf16": True, "avx512_bf16": True}, "AVX2", "avx2"),     # kernels held at AVX2 (ATEN_CPU_CAPABILITY)
    ({"avx2": True}, "AVX2", "avx2"),
])
def test_the_probe_names_the_kind_and_auto_is_fp32_on_every_cpu(monkeypatch, capabilities, level, kind):
    """What torch reports maps to one kind; ``auto`` is fp32 on each (bf16 only when asked for by name)."""
    import torch

    from textdistill.hardware import CPU_KIND_VARIABLE, cpu_has_native_bf16, cpu_kind
    from textdistill.models import autocast_context, resolve_precision

    monkeypatch.delenv(CPU_KIND_VARIABLE, raising=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: level)
    assert cpu_kind() == kind and cpu_has_native_bf16() == (kind == "amx")
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    with autocast_context("auto", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
    with pytest.raises(ModelError, match="unknown precision"):
        resolve_precision("fp8", "cpu")


@pytest.mark.parametrize("bf16_supported", [True, False])
def test_auto_is_bf16_on_cuda_devices_that_support_it(monkeypatch, bf16_supported):
    import torch

    from textdistill import models

    monkeypatch.setattr(models, "resolve_device", lambda device: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    assert models.resolve_precision("auto", "cuda") == ("bf16" if bf16_supported else "fp32")


def test_the_probe_can_be_set_and_refuses_an_unknown_kind(monkeypatch):
    from textdistill.hardware import CPU_KIND_VARIABLE, CPU_KINDS, cpu_kind, kernel_env

    for kind in CPU_KINDS:
        monkeypatch.setenv(CPU_KIND_VARIABLE, kind)
        assert cpu_kind() == kind
        assert kernel_env(kind)[CPU_KIND_VARIABLE] == kind
    assert kernel_env("avx2")["ATEN_CPU_CAPABILITY"] == "avx2" and "DNNL_MAX_CPU_ISA" not in kernel_env("amx")
    monkeypatch.setenv(CPU_KIND_VARIABLE, "sse2")
    with pytest.raises(ValueError, match="not a CPU kind"):
        cpu_kind()
