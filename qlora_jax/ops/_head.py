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
AVX-512 BF16 or AVX2 the logits (no fp32 [N, V] product written and converted, as XLA's dot writes
it; the native cross-entropy then reads the bf16 logits as they are: after XLA's dot it needed
both the fp32 product and its bf16 copy in memory);
elsewhere, and under a mesh, XLA's dots. On a CPU with AVX-512 or AVX2, bf16 logits' logsumexp and
gradient run in native kernels (``cpu_xent_lse``, ``cpu_xent_grad``: one pass over the logits each,
the same arithmetic but for the row sums' order and exp's last bit); elsewhere their jnp twins.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _native(h, w, *, transpose: bool) -> bool:
    """Whether the native kernel runs this product of the head (single device, CPU, a GEMM kernel
    built, bf16)."""
    from ..kernels import cpu_nf4

    # Without AMX the backward (dh = g @ W, reduced over the vocabulary) stays XLA's dot: as fast
    # there (AVX2, Zen 3: 81 against 79 GFLOP/s at 288 x 32000 x 512), its result is small, and the
    # AVX-512 kernel would pack the whole [N, V] g first (65 MB at 1024 x 32000, held in the
    # thread's scratch after the call; AVX2's packs it in fp32)
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


def _logits_grad(logits, lse, labels, scale, dtype):
    """The logits' gradient, softmax minus one-hot times ``scale`` per row, in ``dtype`` (the native
    kernel writes it over the logits)."""
    from ..kernels import cpu_nf4

    grad = cpu_nf4.cpu_xent_grad if _xent_native(logits) else cpu_nf4.reference_xent_grad
    return grad(logits, lse, labels, scale).astype(dtype)


def _dh(g, w, h):
    """dh = g @ W in h's dtype (fp32 accumulation)."""
    from ..kernels import cpu_nf4

    if _native(h, w, transpose=True):
        return cpu_nf4.cpu_dense_gemm(g, w, transpose=True)
    dh = jax.lax.dot_general(g, w.astype(h.dtype), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dh.astype(h.dtype)


def _dw(g, h, w):
    """dW = g^T h in W's dtype (unused, and left out by XLA, when the head is frozen)."""
    return jax.lax.dot_general(g, h, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32).astype(w.dtype)


def _bwd(res, ct):
    h, w, logits, lse, labels, valid = res
    g = _logits_grad(logits, lse, labels, jnp.where(valid, ct, 0.0).astype(jnp.float32), h.dtype)
    return _dh(g, w, h), _dw(g, h, w), None, None


@jax.custom_vjp
def _loss_sum(h, w, labels, valid):
    return _fwd(h, w, labels, valid)[0]


_loss_sum.defvjp(_fwd, _bwd)

#: With ``grad_scale``, the logits of one chunk of rows stay under this many bytes (or the rows are
#: split in _MAX_CHUNKS chunks, if that takes more rows), chunks of a multiple of 32 rows.
_CHUNK_BYTES = 16 * 2 ** 20
_MAX_CHUNKS = 16


def _chunk_rows(n: int, v: int, itemsize: int) -> int:
    rows = max(_CHUNK_BYTES // max(1, v * itemsize), -(-n // _MAX_CHUNKS))
    return max(1, min(max(32, -(-rows // 32) * 32), n))


def _chunk_loss_grad(h, w, labels, valid, scale):
    """One chunk of rows: (the sum of its token losses, the logits' gradient times ``scale``)."""
    from ..kernels import cpu_nf4

    logits = _logits(h, w)
    fwd = cpu_nf4.cpu_xent_fwd if _xent_native(logits) else cpu_nf4.reference_xent_fwd
    lse, picked = fwd(logits, labels)
    return jnp.sum(jnp.where(valid, lse - picked, 0.0)), _logits_grad(logits, lse, labels, scale, h.dtype)


def _over_chunks(fn, h, w, labels, valid, scale, init):
    """``fn(carry, loss, g, h_chunk) -> (carry, out)`` over chunks of rows, in a loop (lax.scan), so
    that one chunk's [rows, V] logits are live at a time (XLA:CPU drops optimization barriers, and
    chunks with no dependency between them were all kept live at once); rows padded past N as
    invalid. Returns (carry, outputs stacked [chunks * rows, ...])."""
    n = h.shape[0]
    rows = _chunk_rows(n, w.shape[0], h.dtype.itemsize)
    chunks = -(-n // rows)
    pad = chunks * rows - n
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        labels, valid, scale = jnp.pad(labels, (0, pad)), jnp.pad(valid, (0, pad)), jnp.pad(scale, (0, pad))
    xs = tuple(a.reshape(chunks, rows, *a.shape[1:]) for a in (h, labels, valid, scale))

    def body(carry, x):
        hc, lc, vc, sc = x
        loss, g = _chunk_loss_grad(hc, w, lc, vc, sc)
        return fn(carry, loss, g, hc)

    carry, out = jax.lax.scan(body, init, xs)
    return carry, None if out is None else out.reshape(chunks * rows, *out.shape[2:])[:n]


def _scaled_fwd(h, w, labels, valid, grad_scale):
    """The loss and, chunk by chunk, dh for the cotangent ``grad_scale``: each chunk's logits are
    made, read and overwritten by their gradient, then consumed by dh = g @ W."""
    scale = jnp.where(valid, grad_scale, 0.0).astype(jnp.float32)
    total, dh = _over_chunks(lambda c, loss, g, hc: (c + loss, _dh(g, w, hc)), h, w, labels, valid, scale,
                             jnp.float32(0.0))
    return total, (h, w, labels, valid, grad_scale, dh)


def _scaled_bwd(res, ct):
    h, w, labels, valid, grad_scale, dh = res
    # linear in the cotangent: the saved dh is exact for ct == grad_scale, scaled otherwise
    ratio = jnp.where(ct == grad_scale, 1.0, ct / grad_scale).astype(jnp.float32)
    dh = jnp.where(ratio == 1.0, dh, (dh.astype(jnp.float32) * ratio).astype(dh.dtype))
    scale = jnp.where(valid, ct, 0.0).astype(jnp.float32)
    # dW recomputed chunk by chunk (left out by XLA when the head is frozen, as in LoRA)
    dw, _ = _over_chunks(lambda c, loss, g, hc: (c + jax.lax.dot_general(
        g, hc, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32), None), h, w, labels, valid, scale,
        jnp.zeros(w.shape, jnp.float32))
    return dh, dw.astype(w.dtype), None, None, jnp.zeros_like(grad_scale)


@jax.custom_vjp
def _loss_sum_scaled(h, w, labels, valid, grad_scale):
    return _scaled_fwd(h, w, labels, valid, grad_scale)[0]


_loss_sum_scaled.defvjp(_scaled_fwd, _scaled_bwd)


def linear_cross_entropy_sum(h: jax.Array, w: jax.Array, labels: jax.Array, valid: jax.Array, *,
                             grad_scale: jax.Array | float | None = None) -> jax.Array:
    """Sum over tokens of ``-log softmax(h @ w^T)[label]`` where ``valid``.

    Args:
      h: hidden states [..., E] in the compute dtype.
      w: the head [V, E] (dense; cast to h's dtype).
      labels: int [...], any value where not ``valid``.
      valid: bool [...].
      grad_scale: the cotangent the sum will get, when known (the train step's loss scale over its
        token count): the gradient with respect to h is then made in the forward, in chunks of rows
        whose logits are overwritten by their gradient and consumed at once, so that no [tokens,
        vocab] logits are kept for the backward (the same arithmetic; the gradient is exact for
        that cotangent and scaled for another); nonzero. On one device; over several, and with
        None, the logits are kept and the backward makes the gradient.
    Returns:
      fp32 scalar; differentiable with respect to h and w.
    """
    if w.ndim != 2 or w.shape[1] != h.shape[-1]:
        raise ValueError(f"head weight shape {tuple(w.shape)} does not fit hidden states [..., {h.shape[-1]}]; "
                         "expected [vocab, hidden]")
    e = h.shape[-1]
    labels = jnp.where(valid, labels, 0).reshape(-1).astype(jnp.int32)
    if grad_scale is not None and not isinstance(grad_scale, jax.core.Tracer) and float(grad_scale) == 0.0:
        raise ValueError("grad_scale=0 is not a cotangent the gradient can be scaled from; pass the "
                         "nonzero cotangent the sum will get, or None")
    # on one device (over a mesh the chunks' reshape of the sharded rows would move them), with rows
    if grad_scale is not None and jax.device_count() == 1 and jax.sharding.get_abstract_mesh().empty \
            and h.size > 0:
        return _loss_sum_scaled(h.reshape(-1, e), w.astype(h.dtype), labels, valid.reshape(-1),
                                jnp.asarray(grad_scale, jnp.float32))
    return _loss_sum(h.reshape(-1, e), w.astype(h.dtype), labels, valid.reshape(-1))
