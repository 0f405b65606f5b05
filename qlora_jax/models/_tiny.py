"""Tiny random checkpoints with the exact files of real ones: config.json, safetensors, tokenizer.

``write_tiny_checkpoint`` has transformers itself build and save the model (any supported
architecture; needs torch, as the test extra has it). ``write_tiny_llama`` writes a Llama with
numpy alone, for the demo's torch-free environment. Both add ``write_tiny_tokenizer``'s tokenizer.
"""

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
    write_tiny_tokenizer(path)
    return path


CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def write_tiny_tokenizer(path: str | os.PathLike):
    """A byte-level tokenizer (6 special tokens + 256 bytes = 262 ids, no merges) built with
    ``tokenizers``, saved as transformers saves fast tokenizers, with a ChatML chat template.
    Any text round-trips; models need ``vocab_size >= 262``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(path)
    return fast


_CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}


def write_tiny_checkpoint(path: str | os.PathLike, arch: str = "llama", *, hidden_size: int = 64,
                          intermediate_size: int = 128, num_hidden_layers: int = 2, num_attention_heads: int = 4,
                          num_key_value_heads: int = 2, vocab_size: int = 320, seed: int = 0,
                          dtype: str = "float32", **config_kwargs) -> Path:
    """A random model of ``arch`` built and saved by transformers' own ``save_pretrained``
    (safetensors + config.json + generation_config.json), plus the tiny tokenizer."""
    import torch
    import transformers

    if arch not in _CONFIGS:
        raise ValueError(f"arch={arch!r} is not supported; expected one of {list(_CONFIGS)}")
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tiny tokenizer's 262 ids")
    path = Path(path)
    config = getattr(transformers, _CONFIGS[arch])(
        hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads, vocab_size=vocab_size,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, **config_kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.save_pretrained(path)
    write_tiny_tokenizer(path)
    return path
