"""qlora_jax: QLoRA fine-tuning in JAX/Flax.

The base is frozen in 4-bit NormalFloat with double-quantized scales (``quantize``,
``quantize_params``), bit-exact with bitsandbytes; see ``qlora_jax.quant``.
"""

from .generate import generate
from .models import from_pretrained
from .quant import (QuantConfig, QuantizedArray, StorageReport, dequantize, dequantize_params, from_bnb_state,
                    quantize, quantize_params, storage_report, to_bnb_state)

__version__ = "0.1.0"

__all__ = [
    "QuantConfig", "QuantizedArray", "from_pretrained", "generate", "StorageReport", "dequantize", "dequantize_params", "from_bnb_state", "quantize",
    "quantize_params", "storage_report", "to_bnb_state",
]
