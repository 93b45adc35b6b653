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


@pytest.mark.parametrize("capabilities, level, expected", [
    ({"amx_bf16": True, "avx512_bf16": True}, "AVX512", "bf16"),   # AMX: bf16 is fast
    ({"amx_bf16": False, "avx512_bf16": True}, "AVX512", "fp32"),  # AVX512-BF16 alone measured slower than fp32
    ({"amx_bf16": True, "avx512_bf16": True}, "AVX2", "fp32"),     # kernels held at AVX2 (ATEN_CPU_CAPABILITY)
    ({"avx2": True}, "AVX2", "fp32"),                               # AVX2 only: bf16 is emulated
])
def test_auto_precision_is_bf16_only_where_it_is_fast(monkeypatch, capabilities, level, expected):
    import torch

    from textdistill.models import autocast_context, resolve_precision

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: level)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    with autocast_context("auto", "cpu"):
        assert torch.is_autocast_enabled("cpu") == (expected == "bf16")
    with pytest.raises(ModelError, match="unknown precision"):
        resolve_precision("fp8", "cpu")
