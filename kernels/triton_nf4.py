"""The fused 4-bit dequantize + matmul as a plain Triton kernel, for jax-triton (GEMM case).

Same layout and numerics as the Pallas kernel (``nf4_matmul``): codes ``[N, K/2]`` uint8 (high
nibble first), absmax ``[N, K/blocksize]`` fp32 or uint8 codes into the dynamic map with nested
fp32 scales (blocks of ``NESTED_BS`` absmax values, row-major) and an offset, decoded in the
kernel with the product rounded before the offset is added; ``y = x @ dequant(W)^T`` with fp32
accumulation. This module imports Triton only: the kernel runs under Triton's interpreter
(``TRITON_INTERPRET=1``, torch CPU tensors) and compiles for sm_90 on a machine without a GPU;
``triton_matmul`` calls it from JAX through jax-triton (imported when called: it needs a GPU).
"""

from __future__ import annotations

import triton
import triton.language as tl

@triton.jit
def _nf4(c):
    """NF4 value of 4-bit codes ``c`` (int32): a select tree on the bits, no memory access."""
    b0 = (c & 1) != 0
    b1 = (c & 2) != 0
    b2 = (c & 4) != 0
    b3 = (c & 8) != 0
    lo = tl.where(b2,
                  tl.where(b1, tl.where(b0, 0.0, -0.09105003625154495), tl.where(b0, -0.18477343022823334,
                                                                                -0.28444138169288635)),
                  tl.where(b1, tl.where(b0, -0.39491748809814453, -0.5250730514526367),
                           tl.where(b0, -0.6961928009986877, -1.0)))
    hi = tl.where(b2,
                  tl.where(b1, tl.where(b0, 1.0, 0.7229568362236023), tl.where(b0, 0.5626170039176941,
                                                                              0.44070982933044434)),
                  tl.where(b1, tl.where(b0, 0.33791524171829224, 0.24611230194568634),
                           tl.where(b0, 0.16093020141124725, 0.07958029955625534)))
    return tl.where(b3, hi, lo)


@triton.jit
def _fp4(c):
    """FP4 value of 4-bit codes (bitsandbytes' FP4 table): sign bit 3, magnitude from bits 0-2."""
    b0 = (c & 1) != 0
    b1 = (c & 2) != 0
    b2 = (c & 4) != 0
    mag = tl.where(b2,
                   tl.where(b1, tl.where(b0, 0.25, 0.16666667), tl.where(b0, 0.5, 0.33333333)),
                   tl.where(b1, tl.where(b0, 1.0, 0.66666667), tl.where(b0, 0.005208333333, 0.0)))
    return tl.where((c & 8) != 0, -mag, mag)


@triton.jit
def nf4_matmul_kernel(x_ptr, codes_ptr, absmax_ptr, nested_ptr, offset_ptr, map_ptr, y_ptr, M, N, K,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                      IS_NF4: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of y; K walked in steps of BLOCK_K (<= BLOCKSIZE, one absmax
    per row and step). x [M, K], y [M, N] row-major, in x's dtype."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    half = tl.arange(0, BLOCK_K // 2)
    kb_count = K // BLOCKSIZE
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rows[:, None] * K + k0 + tl.arange(0, BLOCK_K)[None, :], mask=row_ok[:, None],
                    other=0.0)
        c = tl.load(codes_ptr + cols[:, None] * (K // 2) + k0 // 2 + half[None, :], mask=col_ok[:, None],
                    other=0).to(tl.int32)
        kb = k0 // BLOCKSIZE
        if DOUBLE_QUANT:
            a_code = tl.load(absmax_ptr + cols * kb_count + kb, mask=col_ok, other=0).to(tl.int32)
            scale = tl.load(map_ptr + a_code) * tl.load(nested_ptr + (cols * kb_count + kb) // NESTED_BS,
                                                         mask=col_ok, other=0.0)
            scale = tl.where(scale == scale, scale, 0.0)  # keeps the product rounded: no FMA with the add
            a = scale + tl.load(offset_ptr)
        else:
            a = tl.load(absmax_ptr + cols * kb_count + kb, mask=col_ok, other=0.0)
        if IS_NF4:
            w_hi = _nf4(c >> 4)
            w_lo = _nf4(c & 15)
        else:
            w_hi = _fp4(c >> 4)
            w_lo = _fp4(c & 15)
        w = tl.join(w_hi, w_lo).reshape(BLOCK_N, BLOCK_K)  # interleave: element 2j high, 2j+1 low
        w = (w * a[:, None]).to(x.dtype)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")  # fp32 inputs: no TF32 (exact products)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def triton_matmul(x, codes, absmax, nested_absmax=None, offset=None, *, quant_type: str, blocksize: int,
                  nested_blocksize: int | None = None, block_m: int = 64, block_n: int = 64, num_warps: int = 4,
                  num_stages: int = 3):
    """``x [M, K] @ dequant(W)^T`` through jax-triton (GPU only); operands as ``pallas_matmul``."""
    import jax
    import jax.numpy as jnp
    import jax_triton as jt

    from qlora_jax.quant._tables import DYNAMIC_MAP

    m, k = x.shape
    n = codes.shape[0]
    double = nested_absmax is not None
    nested = nested_absmax.reshape(-1).astype(jnp.float32) if double else jnp.zeros((1,), jnp.float32)
    off = jnp.reshape(offset, (1,)).astype(jnp.float32) if double else jnp.zeros((1,), jnp.float32)
    return jt.triton_call(
        x, codes, absmax if double else absmax.astype(jnp.float32), nested, off,
        jnp.asarray(DYNAMIC_MAP, jnp.float32), m, n, k,
        kernel=nf4_matmul_kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(triton.cdiv(m, block_m), triton.cdiv(n, block_n)),
        num_warps=num_warps, num_stages=num_stages,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(64, blocksize), BLOCKSIZE=blocksize,
        NESTED_BS=nested_blocksize or 256, DOUBLE_QUANT=double, IS_NF4=quant_type == "nf4")
