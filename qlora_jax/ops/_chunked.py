"""The input gradient of a quantized linear, dx = dy @ dequant(W), a band of W's rows at a time.

A frozen weight's backward needs W dequantized. Dequantized whole, each layer's copy is a value
that depends only on the (constant) weight, so XLA may compute it whenever it likes: on XLA:CPU it
shared the forward's dequantized copy with the backward (common subexpressions), keeping every
layer's dequantized weight alive from the forward to the backward (measured: 1b preset, bf16, the
train step's temporaries 3.1 GiB, of which ~0.75 GiB such copies). Dequantized band by band inside
a loop over W's output rows, each band depends on the loop index: it exists only while its
product is taken, and the forward's copy dies after the forward. Sums run in fp32 across bands,
the product's accumulation dtype; small weights (one band) keep the single product.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

#: Weights with more elements than this are dequantized in bands of at most BAND_ELEMENTS.
BAND_ELEMENTS = 1 << 22


def band_rows(n: int, k: int, multiple_of: int = 1) -> int:
    """Rows per band for an [n, k] weight: n itself when the weight is small, else the largest
    divisor of n with at most BAND_ELEMENTS elements whose element count is a multiple of
    ``multiple_of`` (a 4-bit weight's absmax blocks stay whole); n when none is."""
    if n * k <= 2 * BAND_ELEMENTS:
        return n
    for rows in range(min(n, max(1, BAND_ELEMENTS // k)), 0, -1):
        if n % rows == 0 and (rows * k) % multiple_of == 0:
            return rows
    return n


def input_grad(dy, n: int, k: int, rows: int, dequant_band: Callable[[jax.Array, int], jax.Array]):
    """``dy [..., n] @ W [n, k]`` in dy's dtype with fp32 accumulation, where ``dequant_band(r0,
    rows)`` gives W[r0:r0 + rows] dequantized to dy's dtype (r0 may be traced)."""
    dy2 = dy.reshape(-1, n)
    if rows >= n:
        dx = jax.lax.dot_general(dy2, dequant_band(0, n), (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    else:
        def body(i, acc):
            g = jax.lax.dynamic_slice_in_dim(dy2, i * rows, rows, 1)
            return acc + jax.lax.dot_general(g, dequant_band(i * rows, rows), (((1,), (0,)), ((), ())),
                                             preferred_element_type=jnp.float32)

        dx = jax.lax.fori_loop(0, n // rows, body, jnp.zeros((dy2.shape[0], k), jnp.float32))
    return dx.reshape(*dy.shape[:-1], k).astype(dy.dtype)
