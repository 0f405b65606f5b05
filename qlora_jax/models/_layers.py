"""Building blocks of the decoder family, numerically as transformers' eager implementation.

Every linear calls ``qlora_jax.ops.qmatmul``: a layer never knows whether its weight is a dense
array or a QuantizedArray. Weights keep Hugging Face's names and [out, in] orientation.
Shapes in names: B batch, S query length, T key length, H heads, K key/value heads, G = H / K,
D head_dim, E hidden size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..ops import qmatmul
from ..ops._residuals import stash, unstash
from ..sharding import gather_weight
from ._config import DecoderConfig
from ._rope import apply_rope


class RMSNorm(nnx.Module):
    """``weight * (x32 * rsqrt(mean(x32**2) + eps)).astype(x.dtype)``, as transformers."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        return _rms_norm(x, self.weight[...], self.eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x, w, eps):
    """RMSNorm with autodiff's gradients of its formula, saving only x in its own dtype and the rows'
    reciprocal RMS (autodiff saved x in fp32: twice the bytes of a bf16 activation in every layer's
    stack); the backward recomputes the fp32 values. The row sums of the gradient run as a batched
    dot: XLA:CPU fused that reduction into a YNNPACK kernel that took 5 ms for a [512, 2048] fp32
    RMSNorm backward (0.2 s of the 1b-preset step), the dot 0.3 ms."""
    return _rms_norm_fwd(x, w, eps)[0]


def _rms_norm_fwd(x, w, eps):
    x32 = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w * (x32 * r).astype(x.dtype), (*stash(x), w, r)


def _rms_norm_bwd(eps, res, g):
    x, w, r = res
    x, = unstash(x)
    x32 = x.astype(jnp.float32)
    c = (x32 * r).astype(x.dtype)
    wide = jnp.promote_types(w.dtype, c.dtype)  # y = w * c in the promoted dtype
    gw = g.astype(wide)
    lead = tuple(range(g.ndim - 1))
    dw = jax.lax.reduce_sum(gw * c.astype(wide), lead).astype(w.dtype)  # in the product's dtype, as autodiff
    dn = (gw * w.astype(wide)).astype(c.dtype).astype(jnp.float32)  # d(normed), from the cast's cotangent
    rows = jax.lax.dot_general(dn.reshape(-1, 1, dn.shape[-1]), x32.reshape(-1, 1, x32.shape[-1]),
                               (((2,), (2,)), ((0,), (0,)))).reshape(r.shape)  # d r
    v = jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps  # r = rsqrt(v): dv = dr * -0.5 * r / v
    dsq = (rows * (jnp.float32(-0.5) * (r / v))) / jnp.float32(x.shape[-1])  # mean's transpose
    dx32 = dn * r + (dsq * x32 + x32 * dsq)  # normed's and the square's (both factors) terms
    return dx32.astype(x.dtype), dw


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class Linear(nnx.Module):
    """y = x @ W^T (+ b) through the one quantized-linear op; W is [out, in] as in PyTorch."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, rngs: nnx.Rngs,
                 kernel: str = "auto", compute_dtype=None, row_parallel: bool = False):
        std = in_features ** -0.5
        self.weight = nnx.Param((jax.random.uniform(rngs.params(), (out_features, in_features), jnp.float32,
                                                    -std, std)).astype(dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None
        self.kernel = kernel
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
        self.row_parallel = row_parallel  # reads features split over the tensor axis (o_proj, down_proj)

    def __call__(self, x):
        # With a compute dtype (bnb_4bit_compute_dtype) the input is cast to it and the result,
        # bias included, cast back, as bitsandbytes' Linear4bit does.
        xc = x if self.compute_dtype is None else x.astype(self.compute_dtype)
        # under a mesh (jax.set_mesh): the weight gathered over fsdp, split over tensor; else as it is.
        # A weight that is not a Variable was put there by another library (Qwix's PTQ holds a
        # quantized ``WithAux`` in its place and intercepts the dot): passed on as it is.
        w = self.weight.get_value() if isinstance(self.weight, nnx.Variable) else self.weight
        y = qmatmul(xc, gather_weight(w, row_parallel=self.row_parallel), backend=self.kernel)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs, **lin):
        e, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = Linear(e, self.num_heads * d, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs, **lin)
        self.k_proj = Linear(e, self.num_kv_heads * d, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs, **lin)
        self.v_proj = Linear(e, self.num_kv_heads * d, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs, **lin)
        self.o_proj = Linear(self.num_heads * d, e, bias=cfg.o_bias, dtype=dtype, rngs=rngs, row_parallel=True, **lin)
        self.kernel = lin.get("kernel", "auto")  # "auto"/"cpu": the native CPU attention where it runs
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x_BxSxE, cos, sin, bias_BxSxT, cache=None, start=0):
        """Without ``cache``: self-attention over the S tokens. With ``cache`` = (k, v) buffers
        [B, K, T, D] (head-major): this chunk's keys and values are written at ``start`` and the queries
        attend over the whole buffer; returns (output, new cache)."""
        b, s, _ = x_BxSxE.shape
        q = self.q_proj(x_BxSxE).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x_BxSxE).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_BxSxE).reshape(b, s, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None and native_attention_takes(q, k, self.kernel):  # sequence-major, no transposes
            out = attend_native(q, k.astype(q.dtype), v.astype(q.dtype), bias_BxSxT)
            return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # head-major [B, K, S, D], as attend takes them
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), start, axis=2)
            v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), start, axis=2)
        out = self.o_proj(attend(q, k, v, bias_BxSxT).reshape(b, s, self.num_heads * self.head_dim))
        return out if cache is None else (out, (k, v))


# Attention runs head-major: q [B, K, G, S, D] (``attend`` transposes it), k and v [B, K, T, D] (the
# KV cache's layout: ``Attention`` transposes them after RoPE), so that every product below is a
# batched matmul over (B, K) whose result comes out with D or T minor. In the sequence-major layout XLA:CPU computed some gradients as [B, K, D, T]
# and transposed them element by element inside the RoPE backward's fusions (~10% of a small-preset
# train step).
_BATCH = ((0, 1), (0, 1))


def _mm(a, b, contract_a, contract_b):
    """Batched (over the leading B, K) product with fp32 accumulation: batch + a's free + b's free dims."""
    return jax.lax.dot_general(a, b, ((contract_a, contract_b), _BATCH), preferred_element_type=jnp.float32)


def _scores(q, k, bias, cd):
    """Pre-softmax scores [B, K, G, S, T] in the compute dtype ``cd``, as eager transformers makes them."""
    d = q.shape[-1]
    scores = _mm(q, k, (4,), (3,)).astype(cd) * jnp.asarray(d ** -0.5, cd)
    return scores + bias[:, None, None].astype(cd)


def _attend_fwd(q, k, v, bias):
    cd = q.dtype
    scores = _scores(q, k, bias, cd)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(cd)
    out = _mm(probs, v, (4,), (2,)).astype(cd)  # [B, K, G, S, D]
    return out, stash(q, k, v, scores)


def _attend_bwd(res, dout):
    # Autodiff of the forward would run the backward's matmuls on fp32 operands (the cotangents
    # of fp32-accumulated products): XLA:CPU's slow path. Here each gradient is rounded to the
    # compute dtype where PyTorch's bf16 autograd rounds it, and every matmul takes compute-dtype
    # operands with fp32 accumulation; in fp32 this is autodiff's arithmetic.
    q, k, v, scores = unstash(*res)
    cd, d = q.dtype, q.shape[-1]
    f32 = jnp.float32
    p32 = jax.nn.softmax(scores.astype(f32), axis=-1)
    probs = p32.astype(cd)
    dv = _mm(probs, dout, (2, 3), (2, 3)).astype(cd)  # [B, K, T, D]
    dprobs = _mm(dout, v, (4,), (3,)).astype(cd).astype(f32)  # [B, K, G, S, T]
    # the row sums of dprobs * p as a batched dot (over B, K, G, S): XLA:CPU fused a reduction with
    # its neighbours into a slow YNNPACK kernel
    rows = jax.lax.dot_general(dprobs, p32, (((4,), (4,)), ((0, 1, 2, 3), (0, 1, 2, 3))))
    dscores = (p32 * (dprobs - rows[..., None])).astype(cd)
    dscores = dscores * jnp.asarray(d ** -0.5, cd)
    dq = _mm(dscores, k, (4,), (2,)).astype(cd)  # [B, K, G, S, D]
    dk = _mm(dscores, q, (2, 3), (2, 3)).astype(cd)  # [B, K, T, D]
    return dq, dk, dv, None


@jax.custom_vjp
def _attend(q, k, v, bias):
    return _attend_fwd(q, k, v, bias)[0]


_attend.defvjp(_attend_fwd, _attend_bwd)  # the mask (bias) gets no gradient


def attend(q_BxSxHxD, k_BxKxTxD, v_BxKxTxD, bias_BxSxT):
    """Grouped-query attention, eager transformers' arithmetic: scores in the compute dtype times
    head_dim**-0.5, plus the additive mask, softmax in fp32 cast back, then the values. Keys and
    values come head-major (the KV cache's layout). The backward is written out (``_attend_bwd``)
    so its matmuls run on compute-dtype operands."""
    b, s, h, d = q_BxSxHxD.shape
    kh = k_BxKxTxD.shape[1]
    q = q_BxSxHxD.reshape(b, s, kh, h // kh, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, S, D]
    k, v = k_BxKxTxD.astype(q.dtype), v_BxKxTxD.astype(q.dtype)
    out = _attend(q, k, v, jax.lax.stop_gradient(bias_BxSxT))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)


def native_attention_takes(q_BxSxHxD, k_BxTxKxD, kernel: str) -> bool:
    """Whether ``attend_native`` runs this attention: on CPU with the native kernels built (AVX-512
    BF16), bfloat16, no mesh in context, ``kernel`` "auto" or "cpu" ("xla" keeps the XLA path)."""
    if kernel not in ("auto", "cpu") or jax.default_backend() != "cpu" or not jax.sharding.get_abstract_mesh().empty:
        return False
    from ..kernels import cpu_nf4

    return cpu_nf4.attention_supported(q_BxSxHxD.shape, k_BxTxKxD.shape, q_BxSxHxD.dtype) and \
        cpu_nf4.attention_available()


@jax.custom_vjp
def _attend_native(q, k, v, bias):
    from ..kernels import cpu_nf4

    return cpu_nf4.cpu_attention(q, k, v, bias, scale=_scale(q))[0]


def _scale(q):
    return float(np.asarray(q.shape[-1] ** -0.5, jnp.dtype(q.dtype)))  # head_dim**-0.5 in the compute dtype, as attend


def _attend_native_fwd(q, k, v, bias):
    from ..kernels import cpu_nf4

    out, stats = cpu_nf4.cpu_attention(q, k, v, bias, scale=_scale(q))
    return out, (*stash(q, k, v, bias), stats)  # no scores saved: the backward recomputes them


def _attend_native_bwd(res, dout):
    from ..kernels import cpu_nf4

    q, k, v, bias, stats = res
    q, k, v, bias = unstash(q, k, v, bias)
    dq, dk, dv = cpu_nf4.cpu_attention_bwd(q, k, v, bias, stats, dout, scale=_scale(q))
    return dq, dk, dv, None


_attend_native.defvjp(_attend_native_fwd, _attend_native_bwd)


def attend_native(q_BxSxHxD, k_BxTxKxD, v_BxTxKxD, bias_BxSxT):
    """``attend``'s arithmetic (to fp32 summation order and the last bit of exp) in the native CPU
    kernels (``kernels/cpu/attention.cc``), keys and values sequence-major as the projections make
    them: no [S, T] scores written or saved, no head-major copies. Callers check
    ``native_attention_takes`` first."""
    b, s, _, _ = q_BxSxHxD.shape
    bias = jnp.broadcast_to(jax.lax.stop_gradient(bias_BxSxT), (b, s, k_BxTxKxD.shape[1])).astype(q_BxSxHxD.dtype)
    return _attend_native(q_BxSxHxD, k_BxTxKxD, v_BxTxKxD, bias)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs, **lin):
        e, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(e, i, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs, **lin)
        self.up_proj = Linear(e, i, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs, **lin)
        self.down_proj = Linear(i, e, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs, row_parallel=True, **lin)

    def __call__(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def swiglu(gate, up):
    """``silu(gate) * up`` as transformers' ``act_fn(gate_proj(x)) * up_proj(x)`` computes it in
    PyTorch: silu in fp32, rounded to the activation dtype once, then the product. Its gradient is
    torch's (``silu_backward`` on fp32 values), saving only gate and up. In bf16 on a single CPU
    device with AVX-512 or AVX2 native kernels run both in one pass each (``kernels.cpu_nf4.cpu_swiglu``:
    XLA:CPU ran them as a dozen loops with fp32 temporaries)."""
    return _swiglu(gate, up)


def _native_swiglu(gate, up) -> bool:
    from ..kernels import cpu_nf4

    return (isinstance(gate, jax.Array) and gate.dtype == up.dtype == jnp.bfloat16 and gate.shape == up.shape
            and jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().empty
            and cpu_nf4.swiglu_available())


@jax.custom_vjp
def _swiglu(gate, up):
    from ..kernels import cpu_nf4

    return (cpu_nf4.cpu_swiglu if _native_swiglu(gate, up) else cpu_nf4.reference_swiglu)(gate, up)


def _swiglu_fwd(gate, up):
    return _swiglu(gate, up), stash(gate, up)


def _swiglu_bwd(res, dh):
    from ..kernels import cpu_nf4

    gate, up = unstash(*res)
    if _native_swiglu(gate, up) and dh.dtype == gate.dtype:
        return cpu_nf4.cpu_swiglu_bwd(gate, up, dh)
    dg, du = cpu_nf4.reference_swiglu_bwd(gate, up, dh)
    return dg.astype(gate.dtype), du.astype(up.dtype)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs, **lin):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs, **lin)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs, **lin)

    def __call__(self, x, cos, sin, bias_BxSxT, cache=None, start=0):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, bias_BxSxT, cache, start)
        if cache is not None:
            attn, cache = attn
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x if cache is None else (x, cache)
