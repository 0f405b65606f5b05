"""Fused 4-bit dequantize + matmul in Pallas (Triton lowering): y = x @ dequant(W)^T.

The weight stays in bitsandbytes' layout (../shared/contracts.md): codes ``[N, K/2]`` uint8 (two
4-bit codes per byte, the first element of a pair in the high nibble) and one absmax per
``blocksize`` consecutive elements of a row, ``[N, K/blocksize]``: fp32, or, with double
quantization, uint8 codes into the dynamic map with one fp32 scale per ``nested_blocksize``
absmax values (row-major over the absmax array) and one offset, decoded in the kernel exactly as
``dequantize`` does (``dynamic_map[code] * scale + offset``, two roundings). The kernel never
writes the dequantized weight anywhere: each program owns a ``[block_m, block_n]`` tile of y and
walks K in steps of ``block_k`` (64, or the blocksize when smaller, so one absmax per row and
step), turning a ``[block_n, block_k/2]`` byte tile into a ``[block_n, block_k]`` weight tile in
registers (code values by a select tree on the nibble's bits, as bitsandbytes' Triton backend;
high/low nibbles interleaved with ``stack`` + ``reshape``, Triton's ``join``) and feeding it to
one ``dot`` with fp32 accumulation.

Numerics are those of the XLA path: ``code * absmax`` in fp32, cast to x's dtype, dot in fp32,
result cast to x's dtype; only the order of the fp32 accumulation differs.

The Triton lowering is chosen (``CompilerParams`` of ``pallas.triton``) over Mosaic GPU: it
runs on Ampere and Hopper alike, takes ``dot`` on register tiles (Mosaic GPU's warpgroup model
does not lower a plain ``jnp.dot``), and masks ragged M / N tails in its loads and stores. Shapes
need K a multiple of ``block_k`` and of the blocksize (every model linear; the op sends others
to the XLA path). ``interpret=True`` runs the same kernel on CPU (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from qlora_jax.quant._tables import CODE_TABLES, DYNAMIC_MAP

QUANT_TYPES = ("nf4", "fp4")


def code_values(c: jax.Array, quant_type: str) -> jax.Array:
    """fp32 table value of each 4-bit code in ``c`` (any integer dtype, values 0..15): a binary
    select tree on the code's bits (no gather), exactly the table's fp32 constants."""
    table = np.asarray(CODE_TABLES[quant_type], np.float32)
    c = c.astype(jnp.int32)
    bits = [(c & (1 << b)) != 0 for b in range(4)]  # bit 0 = least significant

    def tree(lo: int, width: int):
        if width == 1:
            return jnp.float32(table[lo])
        half = width // 2
        return jnp.where(bits[half.bit_length() - 1], tree(lo + half, half), tree(lo, half))

    return tree(0, 16)


def _two_roundings(product: jax.Array, offset: jax.Array) -> jax.Array:
    """``product + offset`` with the product rounded first, as bitsandbytes: a select keeps the
    compiler (XLA, or Triton's LLVM with fp contraction) from fusing the two into one FMA."""
    return jnp.where(product == product, product, 0.0) + offset


def absmax_values(absmax: jax.Array, nested_absmax: jax.Array | None = None, offset: jax.Array | None = None, *,
                  nested_blocksize: int | None = None) -> jax.Array:
    """The fp32 absmax [N, KB]: ``absmax`` itself, or decoded from its 8-bit codes."""
    if nested_absmax is None:
        return absmax.astype(jnp.float32)
    flat = jnp.arange(absmax.size).reshape(absmax.shape) // nested_blocksize
    scale = jnp.asarray(DYNAMIC_MAP, jnp.float32)[absmax.astype(jnp.int32)] * nested_absmax.reshape(-1)[flat]
    return _two_roundings(scale, offset.reshape(()))


def _dequantized(codes, absmax, nested_absmax, offset, quant_type, blocksize, nested_blocksize, dtype):
    n, k = codes.shape[0], codes.shape[1] * 2
    a = absmax_values(absmax, nested_absmax, offset, nested_blocksize=nested_blocksize)
    w = jnp.stack([code_values(codes >> 4, quant_type), code_values(codes & 0xF, quant_type)], axis=-1)
    return (w.reshape(n, k // blocksize, blocksize) * a[:, :, None]).reshape(n, k).astype(dtype)


def reference_matmul(x: jax.Array, codes: jax.Array, absmax: jax.Array, nested_absmax: jax.Array | None = None,
                     offset: jax.Array | None = None, *, quant_type: str, blocksize: int,
                     nested_blocksize: int | None = None) -> jax.Array:
    """The pure-jnp twin: dequantize ``codes`` [N, K/2] with ``absmax`` [N, K/blocksize] (fp32,
    or 8-bit codes with ``nested_absmax`` and ``offset``) to x's dtype, then ``x @ W^T`` with fp32
    accumulation, in x's dtype."""
    w = _dequantized(codes, absmax, nested_absmax, offset, quant_type, blocksize, nested_blocksize, x.dtype)
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _load_absmax(scale_refs, row0: int, block: int, kb, ok, kb_count: int, nested_blocksize: int | None):
    """fp32 absmax of rows ``row0 .. row0+block`` at absmax column ``kb`` -> [block]."""
    if nested_blocksize is None:
        (absmax_ref,) = scale_refs
        return pltriton.load(absmax_ref.at[pl.ds(row0, block), kb], mask=ok, other=0)
    codes_ref, nested_ref, offset_ref, map_ref = scale_refs
    c = pltriton.load(codes_ref.at[pl.ds(row0, block), kb], mask=ok, other=0).astype(jnp.int32)
    flat = (row0 + jnp.arange(block)) * kb_count + kb
    scale = pltriton.load(map_ref.at[c]) * pltriton.load(nested_ref.at[flat // nested_blocksize], mask=ok, other=0)
    return _two_roundings(scale, pltriton.load(offset_ref.at[pl.ds(0, 1)]))  # [1]: broadcasts


def _weight_tile(c: jax.Array, a: jax.Array, quant_type: str, dtype) -> jax.Array:
    """Bytes [rows, block_k/2] and their rows' absmax [rows] -> the weight tile [rows, block_k]
    in ``dtype``: code values, nibbles interleaved (high first), ``value * absmax`` in fp32."""
    w = jnp.stack([code_values(c >> 4, quant_type), code_values(c & 0xF, quant_type)], axis=-1)
    return (w.reshape(c.shape[0], 2 * c.shape[1]) * a[:, None]).astype(dtype)


def _kernel(x_ref, codes_ref, *refs, m: int, n: int, k: int, block_m: int, block_n: int, block_k: int,
            blocksize: int, quant_type: str, nested_blocksize: int | None):
    *scale_refs, o_ref = refs
    i, j = pl.program_id(0), pl.program_id(1)
    rows = i * block_m + jnp.arange(block_m)
    cols = j * block_n + jnp.arange(block_n)
    row_ok, col_ok = rows < m, cols < n

    def step(t, acc):
        k0 = t * block_k
        x = pltriton.load(x_ref.at[pl.ds(i * block_m, block_m), pl.ds(k0, block_k)], mask=row_ok[:, None],
                          other=0)
        c = pltriton.load(codes_ref.at[pl.ds(j * block_n, block_n), pl.ds(k0 // 2, block_k // 2)],
                          mask=col_ok[:, None], other=0)
        a = _load_absmax(scale_refs, j * block_n, block_n, k0 // blocksize, col_ok, k // blocksize,
                         nested_blocksize)
        w = _weight_tile(c, a, quant_type, x.dtype)
        return acc + pltriton.dot(x, w, trans_b=True)

    acc = jax.lax.fori_loop(0, k // block_k, step, jnp.zeros((block_m, block_n), jnp.float32))
    pltriton.store(o_ref.at[pl.ds(i * block_m, block_m), pl.ds(j * block_n, block_n)], acc.astype(o_ref.dtype),
                   mask=row_ok[:, None] & col_ok[None, :])


def supported(k: int, blocksize: int) -> bool:
    """Whether the kernel takes a weight with K input features (else the op uses the XLA path)."""
    return k % 2 == 0 and k % blocksize == 0 and k % min(64, blocksize) == 0


_STATIC = ("quant_type", "blocksize", "nested_blocksize", "block_m", "block_n", "num_warps", "num_stages",
           "interpret")


def _scale_operands(n: int, k: int, absmax, nested_absmax, offset, blocksize: int, nested_blocksize):
    """Checked scale operands for the kernels, and the nested blocksize they use (None without
    double quantization): ((absmax fp32,), None) or ((codes, nested, offset[1], map), nested_blocksize)."""
    if k % 2 or absmax.shape != (n, k // blocksize):
        raise ValueError(f"absmax of shape {absmax.shape} does not fit a [{n}, {k}] weight with blocksize {blocksize}; "
                         f"expected ({n}, {k // blocksize})")
    if not supported(k, blocksize):
        raise ValueError(f"K={k} is not a multiple of the blocksize {blocksize} and of 64: use the XLA path")
    if nested_absmax is None:
        return (absmax.astype(jnp.float32),), None
    if absmax.dtype != jnp.uint8 or nested_blocksize is None or offset is None:
        raise ValueError("double quantization needs uint8 absmax codes, nested_absmax, offset and nested_blocksize")
    expected = -(-absmax.size // nested_blocksize)
    if nested_absmax.size != expected:
        raise ValueError(f"nested_absmax has {nested_absmax.size} values; expected {expected}")
    return (absmax, nested_absmax.reshape(-1).astype(jnp.float32), jnp.reshape(offset, (1,)).astype(jnp.float32),
            jnp.asarray(DYNAMIC_MAP, jnp.float32)), nested_blocksize


def _check_blocks(block_m: int, block_n: int, quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r}; expected one of {QUANT_TYPES}")
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name}={b} must be a power of two >= 16")


@functools.partial(jax.jit, static_argnames=_STATIC)
def pallas_matmul(x: jax.Array, codes: jax.Array, absmax: jax.Array, nested_absmax: jax.Array | None = None,
                  offset: jax.Array | None = None, *, quant_type: str, blocksize: int,
                  nested_blocksize: int | None = None, block_m: int = 64, block_n: int = 64, num_warps: int = 4,
                  num_stages: int = 3, interpret: bool = False) -> jax.Array:
    """``x [M, K] @ dequant(codes [N, K/2], absmax [N, K/blocksize])^T -> [M, N]`` in x's dtype.

    ``absmax`` is fp32, or (double quantization) uint8 codes with ``nested_absmax``, ``offset`` and
    ``nested_blocksize``, decoded in the kernel. ``block_m`` / ``block_n`` (powers of two, at least
    16 for the dot) tile the output; ragged tails are masked. See the module docstring.
    """
    _check_blocks(block_m, block_n, quant_type)
    m, k = x.shape
    n = codes.shape[0]
    if codes.shape != (n, k // 2):
        raise ValueError(f"codes of shape {codes.shape} do not fit x {x.shape}; expected ({n}, {k // 2})")
    scales, nbs = _scale_operands(n, k, absmax, nested_absmax, offset, blocksize, nested_blocksize)
    block_k = min(64, blocksize)
    kernel = functools.partial(_kernel, m=m, n=n, k=k, block_m=block_m, block_n=block_n, block_k=block_k,
                               blocksize=blocksize, quant_type=quant_type, nested_blocksize=nbs)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, block_m), pl.cdiv(n, block_n)),
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"{quant_type}_matmul",
    )(x, codes, *scales)


def reference_matmul_t(dy: jax.Array, codes: jax.Array, absmax: jax.Array, nested_absmax: jax.Array | None = None,
                       offset: jax.Array | None = None, *, quant_type: str, blocksize: int,
                       nested_blocksize: int | None = None) -> jax.Array:
    """The pure-jnp twin of the backward: ``dy [M, N] @ dequant(W) [N, K]`` in dy's dtype."""
    w = _dequantized(codes, absmax, nested_absmax, offset, quant_type, blocksize, nested_blocksize, dy.dtype)
    y = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(dy.dtype)


def _kernel_t(dy_ref, codes_ref, *refs, m: int, n: int, k: int, block_m: int, block_n: int, block_k: int,
              blocksize: int, quant_type: str, nested_blocksize: int | None):
    """dx tile [block_m, block_k] at (i, kt): walks N (the weight's rows) in steps of block_n; the
    weight tile is read along its rows, its packed layout is never transposed in memory."""
    *scale_refs, o_ref = refs
    i, kt = pl.program_id(0), pl.program_id(1)
    rows = i * block_m + jnp.arange(block_m)
    row_ok = rows < m
    k0 = kt * block_k

    def step(t, acc):
        n0 = t * block_n
        w_rows = n0 + jnp.arange(block_n)
        w_ok = w_rows < n
        g = pltriton.load(dy_ref.at[pl.ds(i * block_m, block_m), pl.ds(n0, block_n)],
                          mask=row_ok[:, None] & w_ok[None, :], other=0)
        c = pltriton.load(codes_ref.at[pl.ds(n0, block_n), pl.ds(k0 // 2, block_k // 2)], mask=w_ok[:, None],
                          other=0)
        a = _load_absmax(scale_refs, n0, block_n, k0 // blocksize, w_ok, k // blocksize, nested_blocksize)
        w = _weight_tile(c, a, quant_type, g.dtype)
        return acc + pltriton.dot(g, w)

    acc = jax.lax.fori_loop(0, pl.cdiv(n, block_n), step, jnp.zeros((block_m, block_k), jnp.float32))
    pltriton.store(o_ref.at[pl.ds(i * block_m, block_m), pl.ds(k0, block_k)], acc.astype(o_ref.dtype),
                   mask=row_ok[:, None])


@functools.partial(jax.jit, static_argnames=_STATIC)
def pallas_matmul_t(dy: jax.Array, codes: jax.Array, absmax: jax.Array, nested_absmax: jax.Array | None = None,
                    offset: jax.Array | None = None, *, quant_type: str, blocksize: int,
                    nested_blocksize: int | None = None, block_m: int = 64, block_n: int = 64, num_warps: int = 4,
                    num_stages: int = 3, interpret: bool = False) -> jax.Array:
    """The backward: ``dy [M, N] @ dequant(codes [N, K/2], absmax) -> [M, K]`` in dy's dtype,
    fused the same way (``block_n`` here tiles the reduction over N); scales as ``pallas_matmul``."""
    _check_blocks(block_m, block_n, quant_type)
    m, n = dy.shape
    k = codes.shape[1] * 2
    if codes.shape[0] != n:
        raise ValueError(f"codes of shape {codes.shape} do not fit dy {dy.shape}; expected {n} rows")
    scales, nbs = _scale_operands(n, k, absmax, nested_absmax, offset, blocksize, nested_blocksize)
    block_k = min(64, blocksize)
    kernel = functools.partial(_kernel_t, m=m, n=n, k=k, block_m=block_m, block_n=block_n, block_k=block_k,
                               blocksize=blocksize, quant_type=quant_type, nested_blocksize=nbs)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, block_m), k // block_k),
        out_shape=jax.ShapeDtypeStruct((m, k), dy.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"{quant_type}_matmul_t",
    )(dy, codes, *scales)


def _kernel_gemv(x_ref, codes_ref, *refs, m: int, n: int, k: int, block_n: int, block_k: int, blocksize: int,
                 quant_type: str, nested_blocksize: int | None):
    """y [m, block_n] for m <= 16 tokens: no tensor-core dot (at least 16 rows, mostly padding
    here) but multiply-adds on [m, block_n, block_k] and a reduction over K; each program streams
    ``block_n`` weight rows once for all m tokens."""
    *scale_refs, o_ref = refs
    j = pl.program_id(0)
    cols = j * block_n + jnp.arange(block_n)
    col_ok = cols < n

    def step(t, acc):
        k0 = t * block_k
        x = pltriton.load(x_ref.at[:, pl.ds(k0, block_k)]).astype(jnp.float32)  # [m, block_k]
        c = pltriton.load(codes_ref.at[pl.ds(j * block_n, block_n), pl.ds(k0 // 2, block_k // 2)],
                          mask=col_ok[:, None], other=0)
        a = _load_absmax(scale_refs, j * block_n, block_n, k0 // blocksize, col_ok, k // blocksize,
                         nested_blocksize)
        w = _weight_tile(c, a, quant_type, x_ref.dtype).astype(jnp.float32)
        return acc + jnp.sum(x[:, None, :] * w[None, :, :], axis=-1)

    acc = jax.lax.fori_loop(0, k // block_k, step, jnp.zeros((m, block_n), jnp.float32))
    pltriton.store(o_ref.at[:, pl.ds(j * block_n, block_n)], acc.astype(o_ref.dtype), mask=col_ok[None, :])


GEMV_MAX_M = 16


@functools.partial(jax.jit, static_argnames=("quant_type", "blocksize", "nested_blocksize", "block_n", "num_warps",
                                             "num_stages", "interpret"))
def pallas_gemv(x: jax.Array, codes: jax.Array, absmax: jax.Array, nested_absmax: jax.Array | None = None,
                offset: jax.Array | None = None, *, quant_type: str, blocksize: int,
                nested_blocksize: int | None = None, block_n: int = 32, num_warps: int = 4, num_stages: int = 3,
                interpret: bool = False) -> jax.Array:
    """The skinny variant of ``pallas_matmul`` for decode: ``x [M, K]`` with M a power of two up
    to 16 (the op pads to one), same operands and numerics (products in fp32, summed in fp32)."""
    _check_blocks(16, block_n, quant_type)
    m, k = x.shape
    n = codes.shape[0]
    if m > GEMV_MAX_M or m & (m - 1):
        raise ValueError(f"pallas_gemv takes M a power of two <= {GEMV_MAX_M} rows; got M={m}")
    if codes.shape != (n, k // 2):
        raise ValueError(f"codes of shape {codes.shape} do not fit x {x.shape}; expected ({n}, {k // 2})")
    scales, nbs = _scale_operands(n, k, absmax, nested_absmax, offset, blocksize, nested_blocksize)
    kernel = functools.partial(_kernel_gemv, m=m, n=n, k=k, block_n=block_n, block_k=min(64, blocksize),
                               blocksize=blocksize, quant_type=quant_type, nested_blocksize=nbs)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, block_n),),
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"{quant_type}_gemv",
    )(x, codes, *scales)
