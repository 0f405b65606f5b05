"""Fused 4-bit dequantize + matmul in Pallas (Triton lowering): y = x @ dequant(W)^T.

The weight stays in bitsandbytes' layout (../shared/contracts.md): codes ``[N, K/2]`` uint8 (two
4-bit codes per byte, the first element of a pair in the high nibble) and one fp32 absmax per
``blocksize`` consecutive elements of a row, ``[N, K/blocksize]`` (double quantization is undone
on the small absmax array before the kernel: 1/64 of the weight's elements). The kernel never
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

from qlora_jax.quant._tables import CODE_TABLES

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


def reference_matmul(x: jax.Array, codes: jax.Array, absmax: jax.Array, *, quant_type: str,
                     blocksize: int) -> jax.Array:
    """The pure-jnp twin: dequantize ``codes`` [N, K/2] with ``absmax`` [N, K/blocksize] to
    x's dtype, then ``x @ W^T`` with fp32 accumulation, in x's dtype."""
    n, k = codes.shape[0], codes.shape[1] * 2
    w = jnp.stack([code_values(codes >> 4, quant_type), code_values(codes & 0xF, quant_type)], axis=-1)
    w = (w.reshape(n, k // blocksize, blocksize) * absmax[:, :, None]).reshape(n, k).astype(x.dtype)
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _kernel(x_ref, codes_ref, absmax_ref, o_ref, *, m: int, n: int, k: int, block_m: int, block_n: int,
            block_k: int, blocksize: int, quant_type: str):
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
        a = pltriton.load(absmax_ref.at[pl.ds(j * block_n, block_n), k0 // blocksize], mask=col_ok, other=0)
        w = jnp.stack([code_values(c >> 4, quant_type), code_values(c & 0xF, quant_type)], axis=-1)
        w = (w.reshape(block_n, block_k) * a[:, None]).astype(x.dtype)
        return acc + pltriton.dot(x, w, trans_b=True)

    acc = jax.lax.fori_loop(0, k // block_k, step, jnp.zeros((block_m, block_n), jnp.float32))
    pltriton.store(o_ref.at[pl.ds(i * block_m, block_m), pl.ds(j * block_n, block_n)], acc.astype(o_ref.dtype),
                   mask=row_ok[:, None] & col_ok[None, :])


def supported(k: int, blocksize: int) -> bool:
    """Whether the kernel takes a weight with K input features (else the op uses the XLA path)."""
    return k % 2 == 0 and k % blocksize == 0 and k % min(64, blocksize) == 0


@functools.partial(jax.jit, static_argnames=("quant_type", "blocksize", "block_m", "block_n", "num_warps",
                                             "num_stages", "interpret"))
def pallas_matmul(x: jax.Array, codes: jax.Array, absmax: jax.Array, *, quant_type: str, blocksize: int,
                  block_m: int = 64, block_n: int = 64, num_warps: int = 4, num_stages: int = 3,
                  interpret: bool = False) -> jax.Array:
    """``x [M, K] @ dequant(codes [N, K/2], absmax [N, K/blocksize])^T -> [M, N]`` in x's dtype.

    ``block_m`` / ``block_n`` (powers of two, at least 16 for the dot) tile the output; ragged
    tails are masked. See the module docstring for the layout and numerics.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r}; expected one of {QUANT_TYPES}")
    m, k = x.shape
    n = codes.shape[0]
    if codes.shape != (n, k // 2) or absmax.shape != (n, k // blocksize):
        raise ValueError(f"codes {codes.shape} / absmax {absmax.shape} do not fit x {x.shape} with blocksize "
                         f"{blocksize}; expected ({n}, {k // 2}) / ({n}, {k // blocksize})")
    if not supported(k, blocksize):
        raise ValueError(f"K={k} is not a multiple of the blocksize {blocksize} and of 64: use the XLA path")
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name}={b} must be a power of two >= 16")
    block_k = min(64, blocksize)
    kernel = functools.partial(_kernel, m=m, n=n, k=k, block_m=block_m, block_n=block_n, block_k=block_k,
                               blocksize=blocksize, quant_type=quant_type)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, block_m), pl.cdiv(n, block_n)),
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"{quant_type}_matmul",
    )(x, codes, absmax.astype(jnp.float32))


def reference_matmul_t(dy: jax.Array, codes: jax.Array, absmax: jax.Array, *, quant_type: str,
                       blocksize: int) -> jax.Array:
    """The pure-jnp twin of the backward: ``dy [M, N] @ dequant(W) [N, K]`` in dy's dtype."""
    n, k = codes.shape[0], codes.shape[1] * 2
    w = jnp.stack([code_values(codes >> 4, quant_type), code_values(codes & 0xF, quant_type)], axis=-1)
    w = (w.reshape(n, k // blocksize, blocksize) * absmax[:, :, None]).reshape(n, k).astype(dy.dtype)
    y = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(dy.dtype)


def _kernel_t(dy_ref, codes_ref, absmax_ref, o_ref, *, m: int, n: int, block_m: int, block_n: int, block_k: int,
              blocksize: int, quant_type: str):
    """dx tile [block_m, block_k] at (i, kt): walks N (the weight's rows) in steps of block_n; the
    weight tile is read along its rows, its packed layout is never transposed in memory."""
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
        a = pltriton.load(absmax_ref.at[pl.ds(n0, block_n), k0 // blocksize], mask=w_ok, other=0)
        w = jnp.stack([code_values(c >> 4, quant_type), code_values(c & 0xF, quant_type)], axis=-1)
        w = (w.reshape(block_n, block_k) * a[:, None]).astype(g.dtype)
        return acc + pltriton.dot(g, w)

    acc = jax.lax.fori_loop(0, pl.cdiv(n, block_n), step, jnp.zeros((block_m, block_k), jnp.float32))
    pltriton.store(o_ref.at[pl.ds(i * block_m, block_m), pl.ds(k0, block_k)], acc.astype(o_ref.dtype),
                   mask=row_ok[:, None])


@functools.partial(jax.jit, static_argnames=("quant_type", "blocksize", "block_m", "block_n", "num_warps",
                                             "num_stages", "interpret"))
def pallas_matmul_t(dy: jax.Array, codes: jax.Array, absmax: jax.Array, *, quant_type: str, blocksize: int,
                    block_m: int = 64, block_n: int = 64, num_warps: int = 4, num_stages: int = 3,
                    interpret: bool = False) -> jax.Array:
    """The backward: ``dy [M, N] @ dequant(codes [N, K/2], absmax [N, K/blocksize]) -> [M, K]``
    in dy's dtype, fused the same way (``block_n`` here tiles the reduction over N)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r}; expected one of {QUANT_TYPES}")
    m, n = dy.shape
    k = codes.shape[1] * 2
    if codes.shape[0] != n or absmax.shape != (n, k // blocksize):
        raise ValueError(f"codes {codes.shape} / absmax {absmax.shape} do not fit dy {dy.shape} with blocksize "
                         f"{blocksize}")
    if not supported(k, blocksize):
        raise ValueError(f"K={k} is not a multiple of the blocksize {blocksize} and of 64: use the XLA path")
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name}={b} must be a power of two >= 16")
    block_k = min(64, blocksize)
    kernel = functools.partial(_kernel_t, m=m, n=n, block_m=block_m, block_n=block_n, block_k=block_k,
                               blocksize=blocksize, quant_type=quant_type)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, block_m), k // block_k),
        out_shape=jax.ShapeDtypeStruct((m, k), dy.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"{quant_type}_matmul_t",
    )(dy, codes, absmax.astype(jnp.float32))
