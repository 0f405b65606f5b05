"""qlora_jax: QLoRA fine-tuning in JAX/Flax.

The base is frozen in 4-bit NormalFloat with double-quantized scales (``quantize``,
``quantize_params``), or in LLM.int8() (``quantize(w, quant_type="int8")``), bit-exact with
bitsandbytes; see ``qlora_jax.quant``.
"""

from .generate import generate
from .lora import (LoraConfig, apply_lora, load_adapter, merge_adapters, print_trainable_parameters, save_adapter,
                   set_adapter, trainable_mask, unmerge_adapters)
from .models import from_pretrained
from .quant import (Int8Array, QuantConfig, QuantizedArray, StorageReport, dequantize, dequantize_params,
                    from_bnb_state, quantize, quantize_params, storage_report, to_bnb_state)

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "apply_lora", "load_adapter", "merge_adapters", "print_trainable_parameters", "save_adapter",
    "set_adapter", "trainable_mask", "unmerge_adapters",
    "Int8Array", "QuantConfig", "QuantizedArray", "from_pretrained", "generate", "StorageReport", "dequantize",
    "dequantize_params", "from_bnb_state", "quantize", "quantize_params", "storage_report", "to_bnb_state",
]
