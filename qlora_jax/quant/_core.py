"""Blockwise 4-bit and nested 8-bit quantization of one flat fp32 vector, as bitsandbytes does it.

Everything here works on a single tensor flattened row-major; ``_array.py`` adds the pytree
value, leading (stacked) axes and validation. Shapes in names: N elements, NB first-level blocks
of ``blocksize``, NB2 nested blocks of ``nested_blocksize``.

The arithmetic mirrors bitsandbytes 0.50 step by step, because the contract is bit-exactness:
- first level (``backends/default/ops.py: quantize_4bit``): absmax per block in fp32; full blocks
  are scaled by multiplying with ``1 / max(absmax, 1e-38)``, the short last block by dividing;
  clamp to [-1, 1]; the code is the number of bucket bounds strictly below the value
  (``torch.bucketize(right=False)``: a value on a bound takes the lower code), through the argsort
  order for FP4; codes packed two per byte, first element in the high nibble.
- nested level (``compress_statistics``): ``offset = mean(absmax)``; the centred absmax is
  quantized in blocks of 256 to the signed dynamic map with bitsandbytes' CUDA rounding rule
  (``dQuantize``: a 7-step binary search, then a midpoint comparison), emulated exactly below.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import _tables

# fp32(1 / fp32(1e-38)): what bitsandbytes multiplies an all-zero block by. XLA on CPU treats the
# subnormal 1e-38 as zero, so the constant is taken here instead of computing 1 / max(absmax, 1e-38).
_RECIP_OF_TINY = np.float32(1.0) / np.float32(1e-38)
# fp32(1e-38) itself, a subnormal: only ever moved (selected), never computed with, so XLA's
# flush-to-zero on CPU cannot touch it.
_TINY = np.float32(1e-38)


def num_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def _pad_to_blocks(x_N: jnp.ndarray, blocksize: int) -> jnp.ndarray:
    n = x_N.shape[0]
    nb = num_blocks(n, blocksize)
    return jnp.pad(x_N, (0, nb * blocksize - n)).reshape(nb, blocksize)


def _true_divide(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """IEEE ``a / b``. XLA's simplifier rewrites a division by a constant or a broadcast scalar into
    a multiplication by its reciprocal (two roundings); torch divides. The barrier hides ``b``, made
    as wide as ``a`` before it: through a select on ``a`` (always ``b``), so that under vmap the
    divisor is batched inside the barrier too (a plain broadcast is left unbatched by vmap, which
    then broadcasts the barrier's output over the batch: the rewrite happened again)."""
    b = jnp.where(jnp.ones(jnp.shape(a), bool), jnp.asarray(b, jnp.float32), a)
    return a / jax.lax.optimization_barrier(b)


def _scale_blocks(x_NBxB: jnp.ndarray, absmax_NB: jnp.ndarray, n: int) -> jnp.ndarray:
    """x / absmax per block, rounded exactly as bitsandbytes rounds it (see module docstring)."""
    nb, blocksize = x_NBxB.shape
    recip_NB = jnp.where(absmax_NB > 0, 1.0 / jnp.where(absmax_NB > 0, absmax_NB, 1.0), _RECIP_OF_TINY)
    scaled = x_NBxB * recip_NB[:, None]
    if n % blocksize:  # the short last block divides instead of multiplying by the reciprocal
        last = absmax_NB[-1]
        scaled = scaled.at[-1].set(_true_divide(x_NBxB[-1], jnp.where(last > 0, last, 1.0)))
    return jnp.clip(scaled, -1.0, 1.0)


def _bucketize(v: jnp.ndarray, bounds: np.ndarray) -> jnp.ndarray:
    """Number of ``bounds`` strictly below ``v`` (torch.bucketize, right=False), as uint8.

    A running sum of one comparison per bound: XLA fuses it into a single elementwise loop, so
    memory stays at one value per element (no [..., 16] broadcast against the table).
    """
    idx = jnp.zeros(v.shape, jnp.uint8)
    for b in bounds:
        idx = idx + (v > b).astype(jnp.uint8)
    return idx


def quantize_4bit_flat(x_N: jnp.ndarray, quant_type: str, blocksize: int):
    """Returns (packed codes uint8 [ceil(N/2)], absmax fp32 [NB])."""
    n = x_N.shape[0]
    x_NBxB = _pad_to_blocks(x_N.astype(jnp.float32), blocksize)
    absmax_NB = jnp.max(jnp.abs(x_NBxB), axis=1)
    # XLA's max skips NaN on CPU (fast min/max); torch's propagates it. Keep NaN visible, as in
    # bitsandbytes: a block holding one dequantizes to NaN.
    absmax_NB = jnp.where(jnp.isnan(x_NBxB).any(axis=1), jnp.nan, absmax_NB)
    scaled = _scale_blocks(x_NBxB, absmax_NB, n).reshape(-1)
    if n % blocksize:  # bitsandbytes stores the short last block's absmax clamped to 1e-38
        last = absmax_NB[-1]
        absmax_NB = absmax_NB.at[-1].set(jnp.where(last > 0, last, _TINY))
    if quant_type == "nf4":
        q = _bucketize(scaled, _tables.NF4_MIDPOINTS)
    else:
        q = _lookup(_tables.FP4_ORDER, _bucketize(scaled, _tables.FP4_MIDPOINTS))
    # Padding elements are zeros: for odd N the low nibble of the last byte holds the code of 0.0,
    # which is what bitsandbytes pads with.
    q = q[: 2 * num_blocks(n, 2)].reshape(-1, 2)
    packed = (q[:, 0] << 4) | q[:, 1]
    return packed, absmax_NB


def _lookup(table: np.ndarray, idx: jnp.ndarray) -> jnp.ndarray:
    """``table[idx]`` for indices known to be in range (uint8 codes): no clamping in the gather."""
    return jnp.asarray(table).at[idx.astype(jnp.int32)].get(mode="promise_in_bounds")


# byte -> (code of the high nibble, code of the low nibble), fp32 [256, 2]
_PAIR_TABLES = {name: np.stack([t[np.arange(256) >> 4], t[np.arange(256) & 0xF]], axis=-1)
                for name, t in _tables.CODE_TABLES.items()}


def dequantize_4bit_flat(packed: jnp.ndarray, absmax_NB: jnp.ndarray, n: int, quant_type: str,
                         blocksize: int) -> jnp.ndarray:
    """fp32 [N]: ``code_table[q] * absmax[block]``.

    One lookup per byte in a 256-entry table of (high, low) code pairs: on CPU this runs about
    twice as fast as unpacking the nibbles into an interleaved array first.
    """
    if n % blocksize == 0:  # whole blocks: look up [NB, B/2] bytes, scale [NB, B/2, 2] values
        pairs = _lookup(_PAIR_TABLES[quant_type], packed.reshape(-1, blocksize // 2))
        return (pairs * absmax_NB[:, None, None]).reshape(-1)
    vals = _lookup(_PAIR_TABLES[quant_type], packed).reshape(-1)
    vals_NBxB = _pad_to_blocks(vals[:n], blocksize)
    return (vals_NBxB * absmax_NB[:, None]).reshape(-1)[:n]


def _xp(x):
    """numpy for a host array, jax.numpy otherwise: the sums below run on either, in the same order
    (fp32 additions round the same on both; no FMA is involved)."""
    return np if isinstance(x, (np.ndarray, np.generic)) else jnp


def _seq_sum(x):
    """0 + x[0] + x[1] + ... along axis 0, one rounding per step (an unvectorizable running sum)."""
    acc = _xp(x).zeros(x.shape[1:], x.dtype)
    for i in range(x.shape[0]):
        acc = acc + x[i]
    return acc


def _seq_groups(x, g: int):
    """Running sums of complete groups of ``g`` along axis 0, and the running sum of the rest."""
    m = (x.shape[0] // g) * g
    full = _seq_sum(_xp(x).moveaxis(x[:m].reshape(m // g, g, *x.shape[1:]), 1, 0))
    return full, _seq_sum(x[m:])


def _multi_row_sum(rows):
    """torch's ``multi_row_sum``: a 4-level cascade of running sums over axis 0, chunks of 2**p."""
    size = rows.shape[0]
    level_step = 1 << max(4, (size - 1).bit_length() // 4 if size > 1 else 0)
    chunks, acc0 = _seq_groups(rows, level_step)       # level 0: running sum of each chunk of rows
    groups1, acc1 = _seq_groups(chunks, level_step)    # level 1: flushed every level_step chunks
    groups2, acc2 = _seq_groups(groups1, level_step)   # level 2
    acc3 = _seq_sum(groups2)                            # level 3: never flushed
    return ((acc0 + acc1) + acc2) + acc3


def _row_sum(x):
    """torch's ``row_sum`` (ilp_factor 4) over axis 0 of ``x``."""
    size_ilp = x.shape[0] // 4
    partial = _multi_row_sum(x[: size_ilp * 4].reshape(size_ilp, 4, *x.shape[1:]))
    p0 = partial[0]
    for i in range(size_ilp * 4, x.shape[0]):
        p0 = p0 + x[i]
    for k in range(1, 4):
        p0 = p0 + partial[k]
    return p0


def _torch_serial_sum(v):
    n = v.shape[0]
    lanes = 8
    if n < lanes:  # torch's scalar path: the same row_sum over scalars
        return _row_sum(v)
    nvec = n // lanes
    vec_acc = _row_sum(v[: nvec * lanes].reshape(nvec, lanes))
    acc = _xp(v).zeros((), np.float32)
    for i in range(nvec * lanes, n):
        acc = acc + v[i]
    for k in range(lanes):
        acc = acc + vec_acc[k]
    return acc


_TORCH_GRAIN_SIZE = 32768


def torch_sum(v, num_threads: int = 1):
    """The fp32 sum of a 1-D vector in exactly the order torch's CPU kernel adds it.

    ``torch.sum`` / ``mean`` on CPU (``aten/src/ATen/native/cpu/SumKernel.cpp: cascade_sum``, the
    AVX2 kernel, which AVX-512 machines also run) accumulates 8-lane vectors in a 4-level cascade
    of running sums, then the scalar tail, then the 8 lanes. From 32768 elements on, torch splits
    the vector into one contiguous chunk per thread and sums the per-thread results the same way
    (``two_pass_reduction``); ``num_threads`` is torch's thread count.

    Reproducing the order makes the double-quantization offset bit-identical to bitsandbytes'
    ``absmax.mean()`` on CPU. A correctly rounded sum would not do: torch's cascade can sit 2 ulps
    from the exact mean.

    A numpy ``v`` is summed on the host by numpy (the same additions in the same order: the same
    bits), a jax one by XLA: the cascade is a few hundred scalar-sized operations, cheap in numpy
    but as traced XLA ops it was most of the tracing and compile time of quantizing a weight.
    """
    xp = _xp(v)
    v = v.astype(np.float32)
    n = v.shape[0]
    if num_threads <= 1 or n < _TORCH_GRAIN_SIZE:
        return _torch_serial_sum(v)
    used = min(num_threads, -(-n // _TORCH_GRAIN_SIZE))
    chunk = -(-n // used)
    partials = [_torch_serial_sum(v[t * chunk:(t + 1) * chunk]) for t in range(used) if t * chunk < n]
    buffer = xp.stack(partials + [xp.zeros((), np.float32)] * (num_threads - len(partials)))
    return _torch_serial_sum(buffer)


def torch_mean(v, num_threads: int = 1):
    """torch's ``v.mean()`` on CPU (``torch_sum`` / n, one IEEE division), on numpy or jax arrays."""
    total = torch_sum(v, num_threads)
    if _xp(v) is np:
        return np.float32(total) / np.float32(v.shape[0])
    return _true_divide(total, jnp.float32(v.shape[0]))


def _dquantize_cuda(x: jnp.ndarray, code: np.ndarray) -> jnp.ndarray:
    """bitsandbytes' CUDA ``dQuantize<0>`` (nearest code of a sorted 256-entry map), vectorized.

    A 7-step binary search from pivot 127, then a comparison with the midpoint to the neighbour
    on the side of ``x``. A NaN (0 * 1/0 in an all-zero block) falls through to code 0, as on CUDA.
    """
    pivot = jnp.full(x.shape, 127, jnp.int32)
    lower_pivot = jnp.zeros(x.shape, jnp.int32)
    upper_pivot = jnp.full(x.shape, 255, jnp.int32)
    lower = jnp.full(x.shape, -1.0, jnp.float32)
    upper = jnp.full(x.shape, 1.0, jnp.float32)
    val = _lookup(code, pivot)
    step = 64
    while step > 0:
        gt = x > val
        lower_pivot = jnp.where(gt, pivot, lower_pivot)
        lower = jnp.where(gt, val, lower)
        upper_pivot = jnp.where(gt, upper_pivot, pivot)
        upper = jnp.where(gt, upper, val)
        pivot = jnp.where(gt, pivot + step, pivot - step)
        val = _lookup(code, pivot)
        step //= 2
    upper = jnp.where(upper_pivot == 255, code[255], upper)
    lower = jnp.where(lower_pivot == 0, code[0], lower)
    gt = x > val
    up = jnp.where(x > (upper + val) * 0.5, upper_pivot, pivot)
    down = jnp.where(x < (lower + val) * 0.5, lower_pivot, pivot)
    return jnp.where(gt, up, down).astype(jnp.uint8)


def quantize_nested_flat(absmax_NB: jnp.ndarray, nested_blocksize: int, offset=None):
    """Double quantization of the first-level absmax.

    Returns (codes uint8 [NB], nested absmax fp32 [NB2], offset fp32 scalar). ``offset`` may be
    given (tests pass bitsandbytes' own to check every other bit under the same offset).
    """
    nb = absmax_NB.shape[0]
    if offset is None:
        offset = torch_mean(absmax_NB)  # torch's absmax.mean()
    offset = jnp.asarray(offset, jnp.float32)
    centred = absmax_NB - offset
    c_NB2xB = _pad_to_blocks(centred, nested_blocksize)
    absmax2_NB2 = jnp.max(jnp.abs(c_NB2xB), axis=1)
    # CUDA multiplies every block (the short last one too) by 1/absmax2; 0 * (1/0) = NaN -> code 0.
    scaled = jnp.clip(c_NB2xB * (1.0 / absmax2_NB2)[:, None], -1.0, 1.0)
    codes = _dquantize_cuda(scaled.reshape(-1)[:nb], _tables.DYNAMIC_MAP)
    return codes, absmax2_NB2, offset


def dequantize_nested_flat(codes_NB: jnp.ndarray, absmax2_NB2: jnp.ndarray, offset: jnp.ndarray,
                           nested_blocksize: int) -> jnp.ndarray:
    """fp32 [NB]: ``dynamic_map[code] * absmax2[block] + offset`` (two roundings, as bitsandbytes)."""
    nb = codes_NB.shape[0]
    vals = _pad_to_blocks(_lookup(_tables.DYNAMIC_MAP, codes_NB), nested_blocksize)
    scaled = (vals * absmax2_NB2[:, None]).reshape(-1)[:nb]
    # XLA would contract the multiply-add into an FMA (one rounding); bitsandbytes rounds twice.
    # An optimization barrier does not survive to code generation; a select between the product
    # and a constant (equal to it for every non-NaN value) does.
    scaled = jnp.where(scaled == scaled, scaled, 0.0)
    return scaled + offset
