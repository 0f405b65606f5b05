"""LLM.int8() matmul: ``x @ W^T`` for an ``Int8Array`` W, as bitsandbytes' ``MatMul8bitLt``.

Forward (bitsandbytes' CUDA semantics, also its CPU eval-mode path), x as [M, K]:
1. x is cast to float16; with ``threshold > 0`` every element with ``|x16| >= threshold`` is an
   outlier: zeroed before the row-wise quantization, and each column holding one is an outlier
   column, zeroed in the int8 codes of every row after rounding;
2. x16 is quantized row-wise as the weights are (``SCA = max|row|``, codes = round(x16 * 127/SCA));
3. int8 x int8 -> int32 product, rescaled ``(acc * (SCA * SCB)) * 6.200124e-05`` in fp32 and cast
   to x's dtype;
4. the outlier columns are added back in x's dtype: ``x[:, cols] @ dequant(W)[:, cols]^T``
   (here: a column mask over the whole x, so that shapes stay static under jit; the product is
   skipped by a ``lax.cond`` when no column holds an outlier).
``threshold == 0``: steps 1 and 4 drop out (no decomposition).

Backward: dx = dy @ (CB * (SCB / 127)) in x's dtype with fp32 accumulation (MatMul8bitLt's
gradient for the input); no gradient for the frozen weight.

On a GPU the int8 product is an s8 x s8 -> s32 dot, which XLA's GPU compiler hands to cuBLASLt's
int8 tensor-core GEMM; on CPU XLA runs it through its own integer dot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..quant._int8 import INV_127, MM_DEQUANT, Int8Array, backward_weight, round_codes


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


def _forward(x2, codes, scales, threshold: float):
    ca, sca, cols = quantize_activations(x2, threshold)
    acc = _dot_t(ca, codes, jnp.int32)
    out = ((acc.astype(jnp.float32) * (sca[:, None] * scales[None, :])) * MM_DEQUANT).astype(x2.dtype)
    if cols is None:
        return out

    def add_outliers(out):
        w_hat = ((codes.astype(jnp.float32) * scales[:, None]) * INV_127).astype(x2.dtype)
        sub = _dot_t(jnp.where(cols[None, :], x2, jnp.zeros((), x2.dtype)), w_hat, jnp.float32)
        return (out.astype(jnp.float32) + sub).astype(x2.dtype)  # torch's addmm: one rounding

    return jax.lax.cond(jnp.any(cols), add_outliers, lambda o: o, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def int8_matmul(x2, w: Int8Array, threshold: float):
    """[M, K] x against an unstacked Int8Array [N, K] -> [M, N] in x's dtype (module doc)."""
    return _forward(x2, w.codes, w.scales, threshold)


def _fwd(x2, w, threshold):
    return int8_matmul(x2, w, threshold), w


def _bwd(threshold, w, dy):
    dx = jax.lax.dot_general(dy, backward_weight(w, dy.dtype), (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return dx.astype(dy.dtype), None  # None: a symbolic zero for the frozen weight


int8_matmul.defvjp(_fwd, _bwd)
