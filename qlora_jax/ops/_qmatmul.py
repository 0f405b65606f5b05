"""``qmatmul(x, w)``: y = x @ W^T for a dense or 4-bit quantized weight W of logical shape [out, in].

Dispatch is by the weight's type and ``backend``, never by model code. Implemented so far: the
XLA path (dequantize to ``x.dtype``, then one dot with fp32 accumulation), which serves every
platform until the fused Pallas / jax-triton kernels and the native CPU kernel are built; the
names of those backends are reserved and refused with a clear error until then.

Gradients: with respect to ``x`` only (dx = dy @ dequant(W)); the frozen quantized weight gets a
symbolic zero, so no gradient buffer of its size is ever made.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from ..quant import QuantizedArray, dequantize

BACKENDS = ("auto", "pallas", "triton", "cpu", "xla")
_BUILT = ("auto", "xla")


def _dot_t(x, w):
    """x [..., in] @ w[out, in]^T with fp32 accumulation, in x's dtype."""
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


@jax.custom_vjp
def _qmatmul_xla(x, w: QuantizedArray):
    return _dot_t(x, dequantize(w, x.dtype))


def _fwd(x, w):
    return _qmatmul_xla(x, w), w


def _bwd(w, dy):
    w_hat = dequantize(w, dy.dtype)
    dx = jax.lax.dot_general(dy, w_hat, (((dy.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(dy.dtype), None  # None: a symbolic zero for the frozen weight


_qmatmul_xla.defvjp(_fwd, _bwd)


def qmatmul(x: jax.Array, w, *, backend: str = "auto", interpret: bool = False, threshold=None) -> jax.Array:
    """``x @ W^T`` for ``W`` of logical shape [out, in], dense or a QuantizedArray.

    Args:
      x: activations [..., in]; the compute dtype (W is dequantized to it, the dot accumulates
        in fp32, the result is returned in it).
      w: a dense array [out, in] (plain dot) or an unstacked QuantizedArray [out, in]; a stacked
        one is taken slice by slice by the caller's ``nnx.scan`` / ``jax.vmap``.
      backend: "auto" | "pallas" | "triton" | "cpu" | "xla" (quantization config key ``kernel``).
      interpret: run a Pallas kernel in interpret mode (kernel backends).
      threshold: the LLM.int8() outlier threshold, for 8-bit weights only.

    Returns:
      [..., out] in ``x.dtype``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; expected one of {BACKENDS}")
    if backend not in _BUILT:
        raise ValueError(f"backend={backend!r} is not built yet; available now: {_BUILT} (the XLA path)")
    if threshold is not None:
        raise ValueError(f"threshold={threshold!r} applies to 8-bit weights only; this weight is "
                         f"{type(w).__name__}")
    if not isinstance(w, QuantizedArray):
        if w.ndim != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"weight shape {tuple(w.shape)} does not fit input [..., {x.shape[-1]}]; "
                             "expected [out, in]")
        return _dot_t(x, w.astype(x.dtype))
    if w.batch_shape or len(w.logical_shape) != 2 or w.logical_shape[1] != x.shape[-1]:
        raise ValueError(f"QuantizedArray of shape {w.shape} does not fit input [..., {x.shape[-1]}]; "
                         "expected an unstacked [out, in] weight (map stacked ones with nnx.scan / jax.vmap)")
    return _qmatmul_xla(x, w)
