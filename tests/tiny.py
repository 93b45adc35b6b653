"""Tiny randomly initialised causal LMs shaped like the real ones (Llama, Gemma-3), for tests.

They are built from a config, never downloaded. Vocabulary sizes follow the tokenizer handed in, so that the real
SmolLM2 / Gemma tokenizers can drive them.
"""

from __future__ import annotations

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM


def make_tiny_llama(vocab_size: int, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    hidden_size: int = 32, num_layers: int = 2) -> LlamaForCausalLM:
    """A 2-layer Llama (tied embeddings, like SmolLM2) with eager attention so double backward works."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True, attn_implementation="eager",
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def make_tiny_gemma(vocab_size: int, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    hidden_size: int = 32, num_layers: int = 2) -> Gemma3ForCausalLM:
    """A 2-layer Gemma-3 text model (sliding + global attention layers) with eager attention."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=512, sliding_window=16, attn_implementation="eager",
        layer_types=["sliding_attention", "full_attention"][:num_layers] + ["full_attention"] * max(0, num_layers - 2),
    )
    return Gemma3ForCausalLM(config).to(dtype).eval()
