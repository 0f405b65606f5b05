"""``linear_cross_entropy_sum``: the LM head and the token cross-entropy as one op.

transformers computes logits = h @ W^T in the compute dtype, then the loss on ``logits.float()``.
Written as two ops, JAX's autodiff runs the backward's big matmul (dlogits @ W, [tokens, vocab] x
[vocab, hidden]) on fp32 operands, with W converted to fp32 first: XLA:CPU's slow path, and an fp32
copy of the head. Here the backward is written out: softmax minus one-hot in fp32 from the saved
logits (in the compute dtype: exactly the rounded logits the loss saw), rounded to the compute
dtype where PyTorch's autograd rounds it, then compute-dtype matmuls with fp32 accumulation. In
fp32 it is autodiff's arithmetic.

On a CPU with AMX both big products (the logits and dh = g @ W) run on the native kernel
(``kernels.cpu_nf4.cpu_dense_gemm``: the same fp32 sums rounded to bf16, in another order), with
AVX-512 BF16 the logits (no fp32 [N, V] product written and converted, as XLA's dot writes it);
elsewhere, and under a mesh, XLA's dots. On a CPU with AVX-512, bf16 logits' logsumexp and
gradient run in native kernels (``cpu_xent_lse``, ``cpu_xent_grad``: one pass over the logits each,
the same arithmetic but for the row sums' order and exp's last bit); elsewhere their jnp twins.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _native(h, w, *, transpose: bool) -> bool:
    """Whether the native kernel runs this product of the head (single device, CPU, AMX or AVX-512
    BF16, bf16)."""
    from ..kernels import cpu_nf4

    # Without AMX the backward (dh = g @ W, reduced over the vocabulary) stays XLA's dot: as fast
    # there, its result is small, and the AVX-512 kernel would pack the whole [N, V] g first (65 MB
    # at 1024 x 32000, held in the thread's scratch after the call)
    return (jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().empty and w.dtype == h.dtype
            and cpu_nf4.dense_gemm_supported(*w.shape, h.dtype, transpose=transpose)
            and (not transpose or cpu_nf4.gemm_isa() == "amx_bf16"))


def _logits(h, w):
    """[N, V] in the compute dtype (h's): fp32 accumulation, rounded as transformers' logits are."""
    if _native(h, w, transpose=False):
        from ..kernels import cpu_nf4

        return cpu_nf4.cpu_dense_gemm(h, w)
    return jax.lax.dot_general(h, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(h.dtype)


def _xent_native(logits) -> bool:
    """Whether the native cross-entropy kernels take these logits (single device, CPU, bf16)."""
    from ..kernels import cpu_nf4

    return (jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().empty
            and logits.dtype == jnp.bfloat16 and cpu_nf4.xent_available())


def _fwd(h, w, labels, valid):
    from ..kernels import cpu_nf4

    logits = _logits(h, w)
    # the native backward overwrites the logits with their gradient: lse and the labels' logits come
    # from one kernel, so that nothing else reads them after it (else XLA copies them first)
    fwd = cpu_nf4.cpu_xent_fwd if _xent_native(logits) else cpu_nf4.reference_xent_fwd
    lse, picked = fwd(logits, labels)
    return jnp.sum(jnp.where(valid, lse - picked, 0.0)), (h, w, logits, lse, labels, valid)


def _bwd(res, ct):
    from ..kernels import cpu_nf4

    h, w, logits, lse, labels, valid = res
    scale = jnp.where(valid, ct, 0.0).astype(jnp.float32)
    grad = cpu_nf4.cpu_xent_grad if _xent_native(logits) else cpu_nf4.reference_xent_grad
    g = grad(logits, lse, labels, scale).astype(h.dtype)
    f32 = jnp.float32
    if _native(h, w, transpose=True):
        dh = cpu_nf4.cpu_dense_gemm(g, w, transpose=True)
    else:
        dh = jax.lax.dot_general(g, w.astype(h.dtype), (((1,), (0,)), ((), ())), preferred_element_type=f32)
    dw = jax.lax.dot_general(g, h, (((0,), (0,)), ((), ())), preferred_element_type=f32)  # unused if frozen
    return dh.astype(h.dtype), dw.astype(w.dtype), None, None


@jax.custom_vjp
def _loss_sum(h, w, labels, valid):
    return _fwd(h, w, labels, valid)[0]


_loss_sum.defvjp(_fwd, _bwd)


def linear_cross_entropy_sum(h: jax.Array, w: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
    """Sum over tokens of ``-log softmax(h @ w^T)[label]`` where ``valid``.

    Args:
      h: hidden states [..., E] in the compute dtype.
      w: the head [V, E] (dense; cast to h's dtype).
      labels: int [...], any value where not ``valid``.
      valid: bool [...].
    Returns:
      fp32 scalar; differentiable with respect to h and w.
    """
    if w.ndim != 2 or w.shape[1] != h.shape[-1]:
        raise ValueError(f"head weight shape {tuple(w.shape)} does not fit hidden states [..., {h.shape[-1]}]; "
                         "expected [vocab, hidden]")
    e = h.shape[-1]
    labels = jnp.where(valid, labels, 0).reshape(-1).astype(jnp.int32)
    return _loss_sum(h.reshape(-1, e), w.astype(h.dtype), labels, valid.reshape(-1))
