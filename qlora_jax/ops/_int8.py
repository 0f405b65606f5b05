"""LLM.int8() matmul: ``x @ W^T`` for an ``Int8Array`` W, as bitsandbytes' ``MatMul8bitLt``.

Forward (bitsandbytes' CUDA semantics, also its CPU eval-mode path), x as [M, K]:
1. x is cast to float16; with ``threshold > 0`` every element with ``|x16| >= threshold`` is an
   outlier: zeroed before the row-wise quantization, and each column holding one is an outlier
   column, zeroed in the int8 codes of every row after rounding;
2. x16 is quantized row-wise as the weights are (``SCA = max|row|``, codes = round(x16 * 127/SCA));
3. int8 x int8 -> int32 product, rescaled ``(acc * (SCA * SCB)) * 6.200124e-05`` in fp32 and cast
   to x's dtype;
4. the outlier columns are added back in x's dtype: ``x[:, cols] @ dequant(W)[:, cols]^T``
   (shapes stay static under jit: the outlier columns are gathered into fixed-size slots,
   ``OUTLIER_SLOTS``; beyond the largest a column mask runs over the whole x; nothing runs when no
   column holds an outlier: ``lax.switch``).
``threshold == 0``: steps 1 and 4 drop out (no decomposition).

Backward: dx = dy @ (CB * (SCB / 127)) in x's dtype with fp32 accumulation (MatMul8bitLt's
gradient for the input; large weights a band of rows at a time, ``ops._chunked``); no gradient for
the frozen weight.

On a GPU the int8 product is an s8 x s8 -> s32 dot, which XLA's GPU compiler hands to cuBLASLt's
int8 tensor-core GEMM; on CPU XLA runs it through its own integer dot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..quant._int8 import INV_127, MM_DEQUANT, Int8Array, backward_weight, round_codes
from ._chunked import band_rows, input_grad


def _dot_t(x, w, preferred):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=preferred)


def quantize_activations(x2, threshold: float):
    """Steps 1-2 for [M, K] x: (int8 codes with outlier columns zeroed, fp32 SCA [M], outlier
    column mask [K] or None without decomposition)."""
    # x rounded to float16 as bitsandbytes does, then held in fp32 (exactly): XLA:CPU has no native
    # float16 arithmetic, and on float16 values abs, max and comparisons give the same results
    x16 = x2.astype(jnp.float16).astype(jnp.float32)
    cols = None
    if threshold > 0.0:
        outliers = jnp.abs(x16) >= jnp.float32(np.float16(threshold))  # torch compares in float16
        cols = jnp.any(outliers, axis=0)
        x16 = jnp.where(outliers, jnp.float32(0), x16)
    sca = jnp.max(jnp.abs(x16), axis=-1)
    scale = (jnp.float32(1.0) / sca) * jnp.float32(127.0)
    ca = round_codes(x16 * scale[:, None])
    if cols is not None:
        ca = jnp.where(cols[None, :], jnp.int8(0), ca)
    return ca, sca, cols


#: Slot sizes (static) for gathering the outlier columns of the outlier product: the smallest
#: that holds them runs; more columns than the largest and the product runs over the whole masked
#: input. LLM.int8()'s outliers sit in a few feature dimensions (the paper: about 7 at 6.7B).
OUTLIER_SLOTS = (16, 256)


def _forward(x2, codes, scales, threshold: float):
    m = x2.shape[0]
    if m == 1:  # XLA:CPU's integer matrix-vector product is ~20x slower than with two rows
        x2 = jnp.pad(x2, ((0, 1), (0, 0)))
    ca, sca, cols = quantize_activations(x2, threshold)
    acc = _dot_t(ca, codes, jnp.int32)
    out = ((acc.astype(jnp.float32) * (sca[:, None] * scales[None, :])) * MM_DEQUANT).astype(x2.dtype)
    if cols is not None:
        out = _add_outliers(out, x2, codes, scales, cols)
    return out[:m]


def _add_outliers(out, x2, codes, scales, cols):
    """``out + x[:, cols] @ dequant(W)[:, cols]^T`` in x's dtype with one rounding (torch's addmm):
    nothing when no column holds an outlier; the outlier columns gathered into the smallest slot of
    OUTLIER_SLOTS that holds them (static size, unused places zero); more: the whole input masked
    against the whole dequantized weight."""
    k = x2.shape[1]
    slots = sorted({min(k, c) for c in OUTLIER_SLOTS})
    count = jnp.sum(cols, dtype=jnp.int32)

    def add(sub):
        return (out.astype(jnp.float32) + sub).astype(x2.dtype)

    def gathered(size):
        def run():
            idx = jnp.nonzero(cols, size=size, fill_value=0)[0]
            used = jnp.arange(size) < count
            xs = jnp.where(used[None, :], x2[:, idx], jnp.zeros((), x2.dtype))
            ws = ((codes[:, idx].astype(jnp.float32) * scales[:, None]) * INV_127).astype(x2.dtype)
            # fp32 operands: the products of two bf16/fp16 values are exact in fp32, so this is the
            # x-dtype product with fp32 accumulation (XLA:CPU's runtime lacks bf16 x bf16 -> f32 here)
            return add(_dot_t(xs.astype(jnp.float32), ws.astype(jnp.float32), jnp.float32))
        return run

    def masked():
        w_hat = ((codes.astype(jnp.float32) * scales[:, None]) * INV_127).astype(x2.dtype)
        return add(_dot_t(jnp.where(cols[None, :], x2, jnp.zeros((), x2.dtype)), w_hat, jnp.float32))

    branch = jnp.int32(len(slots) + 1)
    for i, size in reversed(list(enumerate(slots))):
        branch = jnp.where(count <= size, i + 1, branch)
    branch = jnp.where(count == 0, 0, branch)
    return jax.lax.switch(branch, [lambda: out, *(gathered(c) for c in slots), masked])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def int8_matmul(x2, w: Int8Array, threshold: float):
    """[M, K] x against an unstacked Int8Array [N, K] -> [M, N] in x's dtype (module doc)."""
    return _forward(x2, w.codes, w.scales, threshold)


def _fwd(x2, w, threshold):
    return int8_matmul(x2, w, threshold), w


def _bwd(threshold, w, dy):
    m = dy.shape[0]
    padded = jnp.pad(dy, ((0, 1), (0, 0))) if m == 1 else dy  # as the forward: no matrix-vector product
    n, k = w.logical_shape

    def band(r0, r):  # MatMul8bitLt's backward weight, a band of rows (large weights: ops._chunked)
        codes = jax.lax.dynamic_slice_in_dim(w.codes, r0, r, 0)
        return backward_weight(codes, jax.lax.dynamic_slice_in_dim(w.scales, r0, r, 0), dy.dtype)

    dx = input_grad(padded, n, k, band_rows(n, k), band)
    return dx[:m], None  # None: a symbolic zero for the frozen weight


int8_matmul.defvjp(_fwd, _bwd)
