"""``QuantConfig``: how a pretrained model's linears are frozen, in bitsandbytes' / transformers' terms."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ._array import QUANT_TYPES, check_quant_args
from ._int8 import check_threshold

KERNELS = ("auto", "pallas", "triton", "cpu", "xla")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """transformers' ``BitsAndBytesConfig`` in this library's names (../shared/contracts.md).

    quant_type / blocksize / double_quant / double_quant_blocksize: the 4-bit format.
    compute_dtype: dtype of the 4-bit matmuls (bnb_4bit_compute_dtype); inputs are cast to it
      and results cast back, as bitsandbytes' Linear4bit does.
    load_in_8bit: LLM.int8() instead of 4 bits (then quant_type, blocksize, double quantization and
      compute_dtype do not apply: an 8-bit linear computes in its input's dtype, as
      Linear8bitLt); load_in_4bit: transformers' other switch, optional here (None: 4-bit unless
      load_in_8bit), refused together with load_in_8bit.
    llm_int8_threshold: LLM.int8()'s outlier threshold (6.0 as transformers; 0.0 turns the
      decomposition off), stored with each 8-bit weight.
    llm_int8_skip_modules: module names kept in full precision (transformers applies the same
      list to 4-bit loading).
    kernel: the quantized-linear backend ("auto" | "pallas" | "triton" | "cpu" | "xla").
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    double_quant_blocksize: int = 256
    compute_dtype: str = "bfloat16"
    load_in_8bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: tuple[str, ...] | None = None
    kernel: str = "auto"
    load_in_4bit: bool | None = None

    def __post_init__(self):
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("load_in_8bit=True and load_in_4bit=True were both set; choose one (LLM.int8() or "
                             "4-bit NF4/FP4), as transformers' BitsAndBytesConfig requires")
        if not self.load_in_8bit and self.load_in_4bit is False:
            raise ValueError("load_in_4bit=False and load_in_8bit=False quantize nothing; pass quantization=None "
                             "for a full-precision model")
        object.__setattr__(self, "llm_int8_threshold", check_threshold(self.llm_int8_threshold))
        if self.load_in_8bit and self.quant_type not in ("nf4", "int8"):
            raise ValueError(f"quant_type={self.quant_type!r} does not apply with load_in_8bit=True (LLM.int8() "
                             "quantizes row-wise to int8); leave quant_type unset")
        if self.quant_type == "int8" and not self.load_in_8bit:
            raise ValueError("quant_type='int8' is chosen by load_in_8bit=True (LLM.int8()); quant_type takes "
                             f"{QUANT_TYPES} for 4-bit bases")
        if self.load_in_8bit:
            object.__setattr__(self, "quant_type", "int8")
        else:
            nested = self.double_quant_blocksize if self.double_quant else None
            check_quant_args(self.quant_type, self.blocksize, nested)
        if str(self.compute_dtype) not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r} is not supported; expected one of {COMPUTE_DTYPES}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel={self.kernel!r} is not supported; expected one of {KERNELS}")
        if self.llm_int8_skip_modules is not None:
            object.__setattr__(self, "llm_int8_skip_modules", tuple(self.llm_int8_skip_modules))

    @property
    def jnp_compute_dtype(self):
        """The dtype the quantized linears cast their inputs to; None for 8-bit (input dtype)."""
        return None if self.load_in_8bit else jnp.dtype(self.compute_dtype)

    def quantize_kwargs(self) -> dict:
        """Keyword arguments of ``quantize`` for this configuration's weights."""
        if self.load_in_8bit:
            return dict(quant_type="int8", threshold=self.llm_int8_threshold)
        return dict(quant_type=self.quant_type, blocksize=self.blocksize, double_quant=self.double_quant,
                    double_quant_blocksize=self.double_quant_blocksize)
