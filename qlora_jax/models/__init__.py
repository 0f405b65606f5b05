"""Decoder models and Hugging Face checkpoints.

So far: locating a checkpoint (local directory or hub id), streaming its safetensors tensor by
tensor, and writing tiny random Llama checkpoints for tests and the demo. The Flax decoder
family and ``from_pretrained`` build on these.
"""

from ._checkpoint import iter_tensors, resolve_checkpoint, tensor_specs
from ._tiny import write_tiny_llama

__all__ = ["iter_tensors", "resolve_checkpoint", "tensor_specs", "write_tiny_llama"]
