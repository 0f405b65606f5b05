"""The decoder family's hyper-parameters, read from a Hugging Face config (transformers AutoConfig)."""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """What the Flax decoder needs to know; built by ``from_hf`` from a transformers config.
    Hashable (it is static metadata of the model's graph)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None  # None: default RoPE; else rope_parameters items
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2/2.5 (and Llama with attention_bias)
    o_bias: bool  # Llama with attention_bias
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on queries and keys
    sliding_window: int | None  # Mistral (and Qwen2/3 layers with sliding attention)
    sliding_layers: tuple[bool, ...] = ()  # which layers use the window; () = all of them

    @property
    def rope_parameters(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def layer_windows(self) -> tuple[int, ...]:
        """Per layer: the sliding window, or 0 for full causal attention."""
        if not self.sliding_window:
            return (0,) * self.num_hidden_layers
        flags = self.sliding_layers or (True,) * self.num_hidden_layers
        return tuple(self.sliding_window if f else 0 for f in flags)

    @classmethod
    def from_hf(cls, hf_config) -> "DecoderConfig":
        """Map a transformers config of a supported architecture; anything else is a ValueError."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r} is not supported; supported architectures: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        theta = float(rope.pop("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"rope_type={rope_type!r} is not supported; expected 'default', 'llama3' or 'linear'")
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        sliding = getattr(hf_config, "sliding_window", None)
        layer_types = getattr(hf_config, "layer_types", None)
        sliding_layers = tuple(t == "sliding_attention" for t in layer_types) if layer_types else ()
        if model_type in ("qwen2", "qwen3") and not any(sliding_layers):
            sliding = None  # Qwen: only layers typed "sliding_attention" use the window
        return cls(
            model_type=model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            rope_theta=theta,
            rope_scaling=None if rope_type == "default" else tuple(sorted(rope.items())),
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            sliding_layers=sliding_layers if sliding else (),
        )
