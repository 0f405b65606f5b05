"""``QuantConfig``: how a pretrained model's linears are frozen, in bitsandbytes' / transformers' terms."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ._array import QUANT_TYPES, check_quant_args

KERNELS = ("auto", "pallas", "triton", "cpu", "xla")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """transformers' ``BitsAndBytesConfig`` in this library's names (../shared/contracts.md).

    quant_type / blocksize / double_quant / double_quant_blocksize: the 4-bit format.
    compute_dtype: dtype of the quantized matmuls (bnb_4bit_compute_dtype); inputs are cast to it
      and results cast back, as bitsandbytes' Linear4bit does.
    load_in_8bit, llm_int8_threshold: LLM.int8() bases (not built yet: refused).
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

    def __post_init__(self):
        if self.load_in_8bit:
            raise ValueError("load_in_8bit=True (LLM.int8() bases) is not built yet; use 4-bit quant_type "
                             f"{QUANT_TYPES}")
        check_quant_args(self.quant_type, self.blocksize, self.double_quant_blocksize if self.double_quant else None)
        if str(self.compute_dtype) not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r} is not supported; expected one of {COMPUTE_DTYPES}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel={self.kernel!r} is not supported; expected one of {KERNELS}")
        if self.llm_int8_skip_modules is not None:
            object.__setattr__(self, "llm_int8_skip_modules", tuple(self.llm_int8_skip_modules))

    @property
    def jnp_compute_dtype(self):
        return jnp.dtype(self.compute_dtype)

    def quantize_kwargs(self) -> dict:
        return dict(quant_type=self.quant_type, blocksize=self.blocksize, double_quant=self.double_quant,
                    double_quant_blocksize=self.double_quant_blocksize)
