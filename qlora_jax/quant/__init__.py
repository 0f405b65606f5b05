"""NF4/FP4 blockwise quantization with double-quantized scales, and LLM.int8() row-wise 8-bit
quantization, bit-exact with bitsandbytes.

Public surface: ``quantize`` / ``dequantize`` (one tensor or a stack of them), the
``QuantizedArray`` (4-bit) and ``Int8Array`` (8-bit) pytree values, ``quantize_params`` /
``dequantize_params`` over whole trees with ``storage_report``, and ``to_bnb_state`` /
``from_bnb_state`` (4-bit), ``to_bnb_int8_state`` / ``from_bnb_int8_state`` (8-bit) for
bitsandbytes checkpoints.
"""

from ._array import QUANT_TYPES, QuantizedArray, dequantize, dequantize_absmax, quantize, validate
from ._bnb import from_bnb_state, to_bnb_state
from ._config import QuantConfig
from ._int8 import Int8Array, from_bnb_int8_state, to_bnb_int8_state
from ._params import (DEFAULT_SKIP_PATTERNS, StorageReport, default_rule, dequantize_params, is_quantized, path_str,
                      quantize_params, storage_report)
from ._tables import BLOCKSIZES_4BIT, BLOCKSIZES_NESTED

__all__ = [
    "BLOCKSIZES_4BIT", "BLOCKSIZES_NESTED", "DEFAULT_SKIP_PATTERNS", "Int8Array", "QUANT_TYPES", "QuantConfig",
    "QuantizedArray", "StorageReport", "default_rule", "dequantize", "dequantize_absmax", "dequantize_params",
    "from_bnb_int8_state", "from_bnb_state", "is_quantized", "path_str", "quantize", "quantize_params",
    "storage_report", "to_bnb_int8_state", "to_bnb_state", "validate",
]
