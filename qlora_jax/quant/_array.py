"""The ``QuantizedArray`` pytree value and the public ``quantize`` / ``dequantize`` functions."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _core, _tables

QUANT_TYPES = ("nf4", "fp4")
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


def _leaf_bytes(leaf) -> int:
    if leaf is None:
        return 0
    return int(math.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "absmax", "nested_absmax", "offset"],
    meta_fields=["logical_shape", "dtype", "quant_type", "blocksize", "nested_blocksize"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A 4-bit (NF4/FP4) blockwise-quantized tensor in bitsandbytes' storage layout.

    One tensor of ``logical_shape`` is flattened row-major into N elements and cut into
    NB = ceil(N / blocksize) blocks (a block may span two rows). Leaves may carry leading batch
    axes ``B...`` (a stack of tensors, e.g. one per layer of a scanned model): each slice along
    them is one bitsandbytes tensor with its own absmax, nested state and offset.

    Leaves:
      codes: uint8 [B..., ceil(N/2)]: two 4-bit codes per byte, first element in the high nibble.
      absmax: per-block scale, [B..., NB]: fp32, or uint8 codes into the dynamic map when double
        quantized.
      nested_absmax: fp32 [B..., ceil(NB / nested_blocksize)], the second-level scales (double
        quantization), else None.
      offset: fp32 [B...], the mean of the first-level absmax subtracted before double
        quantization, else None.
    Static (aux data): ``logical_shape`` (one tensor's shape), ``dtype`` (the original dtype and
    the default of ``dequantize``), ``quant_type``, ``blocksize``, ``nested_blocksize`` (None
    without double quantization).
    """

    codes: Any
    absmax: Any
    nested_absmax: Any
    offset: Any
    logical_shape: tuple[int, ...]
    dtype: np.dtype
    quant_type: str
    blocksize: int
    nested_blocksize: int | None

    @property
    def double_quant(self) -> bool:
        return self.nested_blocksize is not None

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[:-1])

    @property
    def shape(self) -> tuple[int, ...]:
        """Batch axes followed by the logical shape: the shape ``dequantize`` returns."""
        return self.batch_shape + tuple(self.logical_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of logical parameters (all stacked tensors)."""
        return int(math.prod(self.shape))

    @property
    def storage_bytes(self) -> int:
        """Bytes of all leaves: packed codes, absmax, nested absmax and offset."""
        return sum(_leaf_bytes(x) for x in (self.codes, self.absmax, self.nested_absmax, self.offset))

    @property
    def bits_per_parameter(self) -> float:
        return 8.0 * self.storage_bytes / max(self.size, 1)

    def dequantize(self, dtype=None) -> jax.Array:
        return dequantize(self, dtype)

    def __repr__(self) -> str:
        if not hasattr(self.codes, "shape"):  # leaves replaced by a tree_map, e.g. with bools
            return (f"QuantizedArray(codes={self.codes!r}, absmax={self.absmax!r}, nested_absmax="
                    f"{self.nested_absmax!r}, offset={self.offset!r}, logical_shape={self.logical_shape})")
        dq = f", nested_blocksize={self.nested_blocksize}" if self.double_quant else ""
        return (f"QuantizedArray(shape={self.shape}, dtype={self.dtype.name}, quant_type={self.quant_type!r}, "
                f"blocksize={self.blocksize}{dq}, {self.bits_per_parameter:.3f} bits/param)")


def check_quant_args(quant_type, blocksize, nested_blocksize) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not supported; expected one of {QUANT_TYPES + ('int8',)}")
    if blocksize not in _tables.BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize={blocksize!r} is not supported; bitsandbytes allows {_tables.BLOCKSIZES_4BIT}")
    if nested_blocksize is not None and nested_blocksize not in _tables.BLOCKSIZES_NESTED:
        raise ValueError(f"double_quant_blocksize={nested_blocksize!r} is not supported; "
                         f"bitsandbytes allows {_tables.BLOCKSIZES_NESTED}")


def _check_float_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in _FLOAT_DTYPES:
        raise ValueError(f"dtype {dt.name} is not supported; expected float32, bfloat16 or float16 "
                         "(as bitsandbytes' quantize_4bit)")
    return dt


def validate(q: QuantizedArray) -> None:
    """Raise ValueError if the leaves of ``q`` do not fit its static metadata."""
    if not isinstance(q, QuantizedArray):
        raise ValueError(f"expected a QuantizedArray, got {type(q).__name__}")
    check_quant_args(q.quant_type, q.blocksize, q.nested_blocksize)
    _check_float_dtype(q.dtype)
    n = int(math.prod(q.logical_shape))
    nb = _core.num_blocks(n, q.blocksize)
    batch = q.batch_shape
    expected = {
        "codes": ((*batch, _core.num_blocks(n, 2)), np.uint8),
        "absmax": ((*batch, nb), np.uint8 if q.double_quant else np.float32),
    }
    if q.double_quant:
        expected["nested_absmax"] = ((*batch, _core.num_blocks(nb, q.nested_blocksize)), np.float32)
        expected["offset"] = (batch, np.float32)
    for name in ("nested_absmax", "offset"):
        if not q.double_quant and getattr(q, name) is not None:
            raise ValueError(f"QuantizedArray without double quantization has a {name} leaf; expected None")
    for name, (shape, dtype) in expected.items():
        leaf = getattr(q, name)
        if leaf is None:
            raise ValueError(f"QuantizedArray.{name} is missing; expected {np.dtype(dtype).name}{list(shape)}")
        if tuple(leaf.shape) != shape or np.dtype(leaf.dtype) != np.dtype(dtype):
            raise ValueError(
                f"QuantizedArray.{name} is {np.dtype(leaf.dtype).name}{list(leaf.shape)}; expected "
                f"{np.dtype(dtype).name}{list(shape)} for logical shape {tuple(q.logical_shape)}, "
                f"blocksize {q.blocksize}, nested_blocksize {q.nested_blocksize}")


def _over_batch(fn, batch_shape, *args):
    """Apply a single-tensor ``fn`` over flattened leading batch axes of every array in ``args``."""
    if not batch_shape:
        return fn(*args)
    flat = [None if a is None else a.reshape((-1, *a.shape[len(batch_shape):])) for a in args]
    out = jax.vmap(fn)(*flat)
    return jax.tree.map(lambda o: o.reshape((*batch_shape, *o.shape[1:])), out)


@functools.partial(jax.jit, static_argnames=("quant_type", "blocksize", "batch_dims"))
def quantize_first_level(x, *, quant_type, blocksize, batch_dims=0):
    """(packed codes, fp32 absmax) of each tensor of ``x`` (trailing axes after ``batch_dims``).
    Blocks are independent: the codes and absmax of a run of whole blocks (a band of rows, say)
    equal those of the same blocks quantized with the rest of the tensor."""
    return _over_batch(lambda t: _core.quantize_4bit_flat(t.reshape(-1), quant_type, blocksize),
                       x.shape[:batch_dims], x)


@functools.partial(jax.jit, static_argnames=("nested_blocksize", "batch_dims"))
def quantize_absmax(absmax, offset=None, *, nested_blocksize, batch_dims=0):
    """Double quantization of a whole tensor's fp32 absmax: (uint8 codes, nested fp32 scales, offset).
    ``offset`` (fp32, one per tensor: ``absmax_offset``) is computed in the program when not given."""
    fn = lambda a, o: _core.quantize_nested_flat(a, nested_blocksize, offset=o)  # noqa: E731
    return _over_batch(fn, absmax.shape[:batch_dims], absmax, offset)


def absmax_offset(absmax) -> np.ndarray:
    """The double-quantization offset of each tensor's fp32 absmax [B..., NB], computed on the host:
    torch's ``absmax.mean()`` in its CPU summation order (``_core.torch_mean``), fp32 [B...]."""
    a = np.asarray(absmax, np.float32)
    flat = a.reshape(-1, a.shape[-1])
    return np.array([_core.torch_mean(row) for row in flat], np.float32).reshape(a.shape[:-1])


@functools.partial(jax.jit, static_argnames=("quant_type", "blocksize", "batch_dims"))
def quantize_first_level_checked(x, *, quant_type, blocksize, batch_dims=0):
    """``quantize_first_level`` and whether every element of ``x`` is finite, in one program (as
    separate eager ops the check was three more programs to compile per weight shape, a third of a
    small model's load time). A block's absmax is NaN or inf where the block holds one (NaN is
    propagated explicitly), so the absmax tells, all but a short last block's NaN, whose absmax is
    then stored clamped: its few elements are checked themselves. (``isfinite(x).all()`` was a pass
    of its own over ``x``: a third of the quantization time.)"""
    codes, absmax = quantize_first_level(x, quant_type=quant_type, blocksize=blocksize, batch_dims=batch_dims)
    finite = jnp.isfinite(absmax).all()
    flat = x.reshape(*x.shape[:batch_dims], -1)
    tail = flat.shape[-1] % blocksize
    if tail:
        finite &= jnp.isfinite(flat[..., flat.shape[-1] - tail:]).all()
    return codes, absmax, finite


def raise_non_finite(x) -> None:
    """The error for an array holding NaN or inf: how many, and the first one's index."""
    bad = ~np.isfinite(np.asarray(x, np.float32))
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"cannot quantize non-finite values: {int(bad.sum())} NaN/inf element(s), the first at "
                     f"index {idx}; expected finite weights")


def _host_quantize(x, quant_type, blocksize, nested_blocksize, batch_dims):
    """``quantize``'s arrays (codes, absmax, nested absmax, offset) by the native host kernels
    (``kernels.cpu_nf4``: the XLA programs' bits, several times faster, and nothing compiled per
    weight shape), for a concrete array on the CPU: a numpy array where JAX's default backend is
    the CPU, or a jax array on one CPU device. None where that does not apply (a tracer, an
    accelerator, a sharded array, no kernel built): the XLA programs run."""
    if isinstance(x, jax.Array):
        if isinstance(x, jax.core.Tracer) or not x.is_fully_addressable or len(x.devices()) != 1:
            return None
        device = next(iter(x.devices()))
        if device.platform != "cpu":
            return None
        if not x.committed:  # placed where the XLA program's result would be: uncommitted, default device
            device = None
    elif isinstance(x, np.ndarray) and jax.default_backend() == "cpu":
        device = None
    else:
        return None
    from ..kernels import cpu_nf4

    if blocksize % 2 or not cpu_nf4.available():
        return None
    a = np.asarray(x)
    batch = a.shape[:batch_dims]
    parts = []
    for t in a.reshape(-1, *a.shape[batch_dims:]):
        codes, absmax, finite = cpu_nf4.quantize_4bit_host(t, quant_type, blocksize)
        if not finite:
            raise_non_finite(x)
        if nested_blocksize is None:
            parts.append((codes, absmax))
        else:
            offset = absmax_offset(absmax)
            parts.append((codes, *cpu_nf4.quantize_nested_host(absmax, offset, nested_blocksize), offset))
    # an uncommitted x (device None) gives an uncommitted result, as the XLA programs would; a
    # device_put compiles nothing (jnp.asarray staged one tiny program per shape and dtype)
    put = lambda v: jax.device_put(v, device)  # noqa: E731
    out = [put(np.stack(leaf).reshape(batch + np.shape(leaf[0]))) for leaf in zip(*parts)]
    return tuple(out) if nested_blocksize is not None else (*out, None, None)


def _quantize_jit(x, *, quant_type, blocksize, nested_blocksize, batch_dims):
    # the XLA path is two programs (first level, then the absmax), which banded multi-process
    # loading runs too; eager on CPU the host kernels compute the same bits
    if isinstance(x, jax.core.Tracer):
        codes, absmax = quantize_first_level(x, quant_type=quant_type, blocksize=blocksize, batch_dims=batch_dims)
    else:
        host = _host_quantize(x, quant_type, blocksize, nested_blocksize, batch_dims)
        if host is not None:
            return host
        codes, absmax, finite = quantize_first_level_checked(x, quant_type=quant_type, blocksize=blocksize,
                                                             batch_dims=batch_dims)
        if not bool(finite):  # outside jit an error (see ``quantize``)
            raise_non_finite(x)
    if nested_blocksize is None:
        return codes, absmax, None, None
    # outside jit the offset's cascade sum runs on the host (same bits; see ``_core.torch_sum``),
    # unless absmax spans other processes' devices
    host = not isinstance(x, jax.core.Tracer) and getattr(absmax, "is_fully_addressable", True)
    offset = absmax_offset(absmax) if host else None
    qabsmax, absmax2, offset = quantize_absmax(absmax, offset, nested_blocksize=nested_blocksize,
                                               batch_dims=batch_dims)
    return codes, qabsmax, absmax2, offset


def quantize(x, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
             double_quant_blocksize: int = 256, batch_dims: int = 0, threshold: float | None = None):
    """Quantize a float array to 4 bits blockwise, bit-exact with bitsandbytes' ``quantize_4bit``;
    or, with ``quant_type="int8"``, row-wise to LLM.int8() (an ``Int8Array``, bit-exact with
    bitsandbytes' ``int8_vectorwise_quant(W.to(float16))``).

    Args:
      x: fp32, bf16 or fp16 array. Its trailing ``x.ndim - batch_dims`` axes form one tensor.
      quant_type: "nf4" (QLoRA's NormalFloat), "fp4", or "int8" (LLM.int8(): [out, in] weights;
        blocksize and double quantization do not apply to it).
      blocksize: elements per absmax block; one of 32, 64, ..., 4096.
      double_quant: quantize the absmax values to 8 bits (bitsandbytes' ``compress_statistics``).
      double_quant_blocksize: absmax values per second-level block (bitsandbytes uses 256).
      batch_dims: leading axes that index separate tensors (e.g. stacked layers); each slice is
        quantized as its own bitsandbytes tensor.
      threshold: int8 only: the LLM.int8() outlier threshold stored with the weight (None: 6.0,
        transformers' ``llm_int8_threshold``).

    Returns:
      A QuantizedArray (an Int8Array for "int8"); ``dequantize(q)`` gives back an array of ``x.shape`` and ``x.dtype``.

    Non-finite values: outside jit they raise ValueError (a NaN or inf in a pretrained weight is
    corruption, and bitsandbytes would silently turn its whole block, and with double quantization
    the whole tensor, into NaN). Under jit no check is possible and the result is that NaN
    propagation.

    Example:
      >>> q = quantize(w)                    # NF4, blocks of 64, double quantization
      >>> w_hat = dequantize(q)              # same shape and dtype as w
    """
    if quant_type == "int8":
        from ._int8 import DEFAULT_THRESHOLD, quantize_int8

        return quantize_int8(x, threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
                             batch_dims=batch_dims)
    if threshold is not None:
        raise ValueError(f"threshold={threshold!r} applies to quant_type='int8' (LLM.int8()) only, not "
                         f"{quant_type!r}")
    nested_blocksize = double_quant_blocksize if double_quant else None
    check_quant_args(quant_type, blocksize, nested_blocksize)
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        x = np.asarray(x)
    dtype = _check_float_dtype(x.dtype)
    if not 0 <= batch_dims <= x.ndim:
        raise ValueError(f"batch_dims={batch_dims} is out of range for an array of rank {x.ndim}")
    if math.prod(x.shape[batch_dims:]) == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {tuple(x.shape[batch_dims:])}")
    codes, absmax, absmax2, offset = _quantize_jit(
        x, quant_type=quant_type, blocksize=blocksize, nested_blocksize=nested_blocksize, batch_dims=batch_dims)
    return QuantizedArray(codes, absmax, absmax2, offset, logical_shape=tuple(x.shape[batch_dims:]),
                          dtype=dtype, quant_type=quant_type, blocksize=blocksize,
                          nested_blocksize=nested_blocksize)


def dequantize_absmax(q: QuantizedArray) -> jax.Array:
    """The first-level fp32 absmax [B..., NB] (undoing double quantization if present)."""
    if not q.double_quant:
        return q.absmax
    fn = functools.partial(_core.dequantize_nested_flat, nested_blocksize=q.nested_blocksize)
    return _over_batch(fn, q.batch_shape, q.absmax, q.nested_absmax, q.offset)


def dequantize(q: QuantizedArray, dtype=None) -> jax.Array:
    """Reconstruct the array: ``code_table[code] * absmax`` in fp32, cast to ``dtype``.

    Args:
      q: a QuantizedArray (possibly stacked), or an Int8Array (``codes * scales / 127``).
      dtype: output dtype; default the original dtype ``q.dtype``.

    Returns:
      An array of ``q.shape``, bit-identical to bitsandbytes' ``dequantize_4bit`` (for an
      Int8Array: ``int8_vectorwise_dequant``).
    """
    from ._int8 import Int8Array, dequantize_int8

    if isinstance(q, Int8Array):
        return dequantize_int8(q, dtype)
    validate(q)
    out_dtype = q.dtype if dtype is None else _check_float_dtype(dtype)
    return _dequantize_jit(q, out_dtype)


@functools.partial(jax.jit, static_argnums=1)
def _dequantize_jit(q: QuantizedArray, out_dtype) -> jax.Array:
    n = int(math.prod(q.logical_shape))

    def one(codes, absmax):
        flat = _core.dequantize_4bit_flat(codes, absmax, n, q.quant_type, q.blocksize)
        return flat.reshape(q.logical_shape).astype(out_dtype)

    return _over_batch(one, q.batch_shape, q.codes, dequantize_absmax(q))
