"""LLM.int8() base weights: the ``Int8Array`` pytree value, bit-exact with bitsandbytes.

bitsandbytes' 8-bit linear (``Linear8bitLt``, transformers' ``load_in_8bit=True``) stores each
weight row-wise: the weight is cast to float16, ``SCB = max|row|`` (fp32) and ``CB =
round(W16 * (127 / SCB))`` (int8, half to even). torch evaluates ``127.0 / t`` as
``reciprocal(t) * 127``, which for some rows is one ulp below the IEEE quotient, so exact .5 ties
round as they do there only if the same two steps are taken here (they are). An all-zero row has
codes 0 and scale 0 (bitsandbytes' NaN codes become 0 on the cast).

Serialized (transformers): ``weight`` int8 [out, in] (= CB), ``SCB`` fp32 [out] and
``weight_format`` (uint8 0, "row").
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._array import _check_float_dtype, _leaf_bytes

#: bitsandbytes' dequantization constant (``int8_vectorwise_dequant``: codes * SCB * this): the
#: float32 nearest 1/127.
INV_127 = np.float32(7.874015718698502e-3)
#: bitsandbytes' ``int8_mm_dequant`` constant (int32 product * SCA * SCB * this); as written there
#: (1/127**2 would be 6.2000124e-05).
MM_DEQUANT = np.float32(6.200124e-05)
DEFAULT_THRESHOLD = 6.0
_FP16_MAX = float(np.finfo(np.float16).max)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales"],
    meta_fields=["logical_shape", "dtype", "threshold"],
)
@dataclasses.dataclass(frozen=True)
class Int8Array:
    """An LLM.int8() weight: int8 codes and one fp32 scale per output row, as bitsandbytes holds it.

    Leaves:
      codes: int8 [B..., out, in], bitsandbytes' ``CB``.
      scales: fp32 [B..., out], bitsandbytes' ``SCB`` (the row's absmax in float16, as fp32).
    Leading axes ``B...`` stack separate weights (one per layer of a scanned model).
    Static (aux data): ``logical_shape`` ([out, in]), ``dtype`` (the original dtype, the default
    of ``dequantize``), ``threshold`` (the outlier threshold ``qmatmul`` uses when it is given
    none: transformers' ``llm_int8_threshold``, 6.0 by default; 0.0: no decomposition).
    """

    codes: Any
    scales: Any
    logical_shape: tuple[int, ...]
    dtype: np.dtype
    threshold: float = DEFAULT_THRESHOLD

    quant_type = "int8"

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[:-2])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.batch_shape + tuple(self.logical_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    @property
    def storage_bytes(self) -> int:
        """Bytes of the leaves: one byte per weight and 4 per row."""
        return _leaf_bytes(self.codes) + _leaf_bytes(self.scales)

    @property
    def bits_per_parameter(self) -> float:
        return 8.0 * self.storage_bytes / max(self.size, 1)

    def dequantize(self, dtype=None) -> jax.Array:
        return dequantize_int8(self, dtype)

    def __repr__(self) -> str:
        if not hasattr(self.codes, "shape"):  # leaves replaced by a tree_map
            return (f"Int8Array(codes={self.codes!r}, scales={self.scales!r}, "
                    f"logical_shape={self.logical_shape})")
        return (f"Int8Array(shape={self.shape}, dtype={self.dtype.name}, threshold={self.threshold}, "
                f"{self.bits_per_parameter:.3f} bits/param)")


def check_threshold(threshold) -> float:
    """A usable LLM.int8() outlier threshold (a finite number >= 0), else ValueError."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"llm_int8_threshold={threshold!r} is not a number; expected a float >= 0 "
                         "(6.0 as transformers; 0.0 for no outlier decomposition)") from None
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"llm_int8_threshold={threshold!r} is invalid; expected a finite float >= 0 "
                         "(6.0 as transformers; 0.0 for no outlier decomposition)")
    return t


def validate_int8(q: Int8Array) -> None:
    """Raise ValueError if the leaves of ``q`` do not fit its static metadata."""
    if not isinstance(q, Int8Array):
        raise ValueError(f"expected an Int8Array, got {type(q).__name__}")
    _check_float_dtype(q.dtype)
    check_threshold(q.threshold)
    if len(q.logical_shape) != 2:
        raise ValueError(f"Int8Array logical shape {tuple(q.logical_shape)} is not [out, in]; LLM.int8() "
                         "quantizes 2-D linear weights row by row")
    batch = tuple(q.codes.shape[:-2]) if q.codes.ndim >= 2 else ()
    expected = {"codes": ((*batch, *q.logical_shape), np.int8), "scales": ((*batch, q.logical_shape[0]), np.float32)}
    for name, (shape, dtype) in expected.items():
        leaf = getattr(q, name)
        if leaf is None:
            raise ValueError(f"Int8Array.{name} is missing; expected {np.dtype(dtype).name}{list(shape)}")
        if tuple(leaf.shape) != shape or np.dtype(leaf.dtype) != np.dtype(dtype):
            raise ValueError(f"Int8Array.{name} is {np.dtype(leaf.dtype).name}{list(leaf.shape)}; expected "
                             f"{np.dtype(dtype).name}{list(shape)} for logical shape {tuple(q.logical_shape)}")


def rowwise_quantize(x16: jax.Array) -> tuple[jax.Array, jax.Array]:
    """bitsandbytes' ``int8_vectorwise_quant`` of a float16 array along its last axis, without
    outliers: (int8 codes, fp32 row absmax). The steps and roundings are torch's (module doc)."""
    absmax = jnp.max(jnp.abs(x16), axis=-1).astype(jnp.float32)
    scale = (jnp.float32(1.0) / absmax) * jnp.float32(127.0)  # torch: 127.0 / t == reciprocal(t) * 127
    return round_codes(x16.astype(jnp.float32) * scale[..., None]), absmax


def round_codes(v: jax.Array) -> jax.Array:
    """Round half to even and cast to int8; NaN (0 * inf from an all-zero row) becomes 0 as in
    bitsandbytes on the CPU."""
    return jnp.where(jnp.isnan(v), 0.0, jnp.round(v)).astype(jnp.int8)


@jax.jit
def _quantize_int8_jit(x):
    return rowwise_quantize(x.astype(jnp.float16))


def quantize_int8(x, *, threshold: float = DEFAULT_THRESHOLD, batch_dims: int | None = None) -> Int8Array:
    """LLM.int8() row-wise quantization, bit-exact with bitsandbytes'
    ``int8_vectorwise_quant(W.to(torch.float16))``.

    Args:
      x: fp32, bf16 or fp16 weights [B..., out, in]; each trailing [out, in] slice is one weight.
      threshold: the outlier threshold stored with the weight (``qmatmul``'s default for it).
      batch_dims: leading axes; None means all but the last two.

    Non-finite values or magnitudes beyond float16's range (which bitsandbytes' cast would turn
    into inf and a row of zero codes) raise ValueError outside jit.
    """
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        x = np.asarray(x)
    dtype = _check_float_dtype(x.dtype)
    threshold = check_threshold(threshold)
    batch_dims = max(x.ndim - 2, 0) if batch_dims is None else batch_dims
    if x.ndim - batch_dims != 2:
        raise ValueError(f"int8 quantization takes [out, in] weights (after batch_dims={batch_dims} leading axes); "
                         f"got shape {tuple(x.shape)}")
    if math.prod(x.shape[batch_dims:]) == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {tuple(x.shape[batch_dims:])}")
    if not isinstance(x, jax.core.Tracer):
        xa = jnp.asarray(x)
        bad = ~jnp.isfinite(xa) | (jnp.abs(xa.astype(jnp.float32)) > _FP16_MAX)
        if bool(bad.any()):
            idx = tuple(int(i) for i in np.argwhere(np.asarray(bad))[0])
            raise ValueError(f"cannot quantize to int8: {int(bad.sum())} element(s) are non-finite or beyond float16's "
                             f"range (|x| > {_FP16_MAX:g}), the first at index {idx}; LLM.int8() casts weights to "
                             "float16 first, as bitsandbytes does")
    codes, scales = _quantize_int8_jit(x)
    return Int8Array(codes, scales, logical_shape=tuple(x.shape[batch_dims:]), dtype=dtype, threshold=threshold)


def dequantize_int8(q: Int8Array, dtype=None) -> jax.Array:
    """``codes * scales * (1/127)`` in fp32, cast to ``dtype`` (default the original dtype): as
    bitsandbytes' ``int8_vectorwise_dequant`` (and PEFT's merge) compute it."""
    validate_int8(q)
    out_dtype = q.dtype if dtype is None else _check_float_dtype(dtype)
    return _dequantize_int8_jit(q.codes, q.scales, out_dtype)


@functools.partial(jax.jit, static_argnums=2)
def _dequantize_int8_jit(codes, scales, out_dtype):
    return ((codes.astype(jnp.float32) * scales[..., None]) * INV_127).astype(out_dtype)


def backward_weight(codes, scales, dtype) -> jax.Array:
    """The weight MatMul8bitLt's backward multiplies by, for int8 ``codes`` [rows, in] and their
    fp32 ``scales`` [rows]: ``CB.to(dtype) * (SCB * (1/127))``, rounded to ``dtype`` (for float32
    one ulp from ``dequantize_int8`` at most)."""
    return (codes.astype(jnp.float32) * (scales * INV_127)[..., None]).astype(dtype)


# --- transformers' serialized 8-bit state -------------------------------------------------------

WEIGHT_FORMAT_ROW = 0


def to_bnb_int8_state(q: Int8Array, prefix: str = "weight") -> dict[str, np.ndarray]:
    """transformers' 8-bit entries for one (unstacked) weight at ``prefix`` (e.g.
    ``model.layers.0.mlp.up_proj.weight``): ``prefix`` int8 [out, in], ``{module}.SCB`` fp32 [out]
    and ``{module}.weight_format`` (uint8 0: "row")."""
    validate_int8(q)
    if q.batch_shape:
        raise ValueError(f"to_bnb_int8_state takes one weight; this Int8Array is stacked {q.batch_shape} "
                         "(index it per layer first)")
    if not prefix.endswith("weight"):
        raise ValueError(f"prefix {prefix!r} should name a weight (end with 'weight')")
    module = prefix[: -len("weight")]
    return {prefix: np.array(q.codes, np.int8), f"{module}SCB": np.array(q.scales, np.float32),
            f"{module}weight_format": np.array(WEIGHT_FORMAT_ROW, np.uint8)}


def from_bnb_int8_state(codes, scb, weight_format=None, *, dtype="float16",
                        threshold: float = DEFAULT_THRESHOLD) -> Int8Array:
    """An Int8Array from transformers' serialized ``weight`` (int8 [out, in]) and ``SCB`` (fp32
    [out]); ``weight_format`` must be row-wise (0 or "row"), the only one bitsandbytes accepts.
    ``dtype``: the original dtype (the checkpoint's ``torch_dtype``)."""
    if weight_format is not None:
        wf = weight_format if isinstance(weight_format, str) else int(np.asarray(weight_format).reshape(-1)[0])
        if wf not in (WEIGHT_FORMAT_ROW, "row"):
            raise ValueError(f"weight_format={wf!r} is not supported; expected 0 ('row'), the only format "
                             "bitsandbytes 0.45+ reads")
    codes, scb = np.asarray(codes), np.asarray(scb)
    if codes.dtype != np.int8 or codes.ndim != 2:
        raise ValueError(f"8-bit weight is {codes.dtype}{list(codes.shape)}; expected int8 [out, in]")
    q = Int8Array(jnp.asarray(codes), jnp.asarray(scb.astype(np.float32) if scb.dtype != np.float32 else scb),
                  logical_shape=tuple(codes.shape), dtype=_check_float_dtype(dtype),
                  threshold=check_threshold(threshold))
    validate_int8(q)
    return q
