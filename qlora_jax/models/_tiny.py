"""Tiny random Llama checkpoints with the exact files of real ones (config.json, safetensors)."""

from __future__ import annotations

import os
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file


def write_tiny_llama(path: str | os.PathLike, *, hidden_size: int = 256, intermediate_size: int = 688,
                     num_hidden_layers: int = 4, num_attention_heads: int = 8, num_key_value_heads: int = 4,
                     vocab_size: int = 1024, tie_word_embeddings: bool = False, seed: int = 0,
                     initializer_range: float = 0.02) -> Path:
    """Write a random Llama checkpoint (bf16 safetensors + config.json) and return its directory.

    Keys, orientations ([out, in]) and metadata are those transformers writes, so the directory
    loads with ``LlamaForCausalLM.from_pretrained``. No torch is needed.
    """
    from transformers import LlamaConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads, vocab_size=vocab_size,
                         tie_word_embeddings=tie_word_embeddings, initializer_range=initializer_range,
                         dtype="bfloat16")
    config.save_pretrained(path)
    rng = np.random.default_rng(seed)
    head_dim = hidden_size // num_attention_heads
    kv = num_key_value_heads * head_dim

    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * initializer_range).astype(ml_dtypes.bfloat16)

    tensors = {"model.embed_tokens.weight": normal(vocab_size, hidden_size),
               "model.norm.weight": np.ones(hidden_size, ml_dtypes.bfloat16)}
    for i in range(num_hidden_layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": np.ones(hidden_size, ml_dtypes.bfloat16),
            p + "post_attention_layernorm.weight": np.ones(hidden_size, ml_dtypes.bfloat16),
            p + "self_attn.q_proj.weight": normal(hidden_size, hidden_size),
            p + "self_attn.k_proj.weight": normal(kv, hidden_size),
            p + "self_attn.v_proj.weight": normal(kv, hidden_size),
            p + "self_attn.o_proj.weight": normal(hidden_size, hidden_size),
            p + "mlp.gate_proj.weight": normal(intermediate_size, hidden_size),
            p + "mlp.up_proj.weight": normal(intermediate_size, hidden_size),
            p + "mlp.down_proj.weight": normal(hidden_size, intermediate_size),
        })
    if not tie_word_embeddings:
        tensors["lm_head.weight"] = normal(vocab_size, hidden_size)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path
