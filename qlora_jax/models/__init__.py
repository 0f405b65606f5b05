"""Decoder models and Hugging Face checkpoints.

So far: locating a checkpoint (local directory or hub id), streaming its safetensors tensor by
tensor, the family's hyper-parameters from a transformers config, RoPE as transformers computes
it, and tiny random Llama checkpoints for tests and the demo. The Flax decoder family and
``from_pretrained`` build on these.
"""

from ._checkpoint import iter_tensors, resolve_checkpoint, tensor_specs
from ._config import SUPPORTED_MODEL_TYPES, DecoderConfig
from ._decoder import CausalLM, attention_bias, position_ids_from_mask
from ._loading import abstract_model, from_pretrained
from ._rope import apply_rope, rope_cos_sin, rope_inv_freq
from ._saving import save_quantized
from ._tiny import write_tiny_checkpoint, write_tiny_llama, write_tiny_tokenizer

__all__ = ["abstract_model", "CausalLM", "DecoderConfig", "attention_bias", "from_pretrained", "position_ids_from_mask", "SUPPORTED_MODEL_TYPES", "apply_rope", "iter_tensors", "resolve_checkpoint",
           "rope_cos_sin", "rope_inv_freq", "save_quantized", "tensor_specs", "write_tiny_checkpoint",
           "write_tiny_llama",
           "write_tiny_tokenizer"]
