"""Rotary position embeddings exactly as transformers computes them (rotate-half convention)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """fp32 inverse frequencies [head_dim / 2]: ``1 / theta**(2i/d)``, rescaled for "llama3"
    (wavelength bands) or "linear" scaling, as ``transformers.modeling_rope_utils``."""
    # Correctly rounded (evaluated in fp64): torch's fp32 pow is a few ulps off and no libm
    # reproduces it; the logits do not notice.
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    inv_freq = (1.0 / (float(theta) ** exponents)).astype(np.float32)
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = np.float32(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).astype(np.float32)
    if kind != "llama3":
        raise ValueError(f"rope_type={kind!r} is not supported; expected 'llama3' or 'linear'")
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(position_ids: jnp.ndarray, inv_freq: np.ndarray, dtype=jnp.float32):
    """cos, sin [batch, seq, head_dim] for integer ``position_ids`` [batch, seq] (fp32, then cast)."""
    freqs = position_ids[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x_BxSxHxD: jnp.ndarray, cos_BxSxD: jnp.ndarray, sin_BxSxD: jnp.ndarray) -> jnp.ndarray:
    """``x * cos + rotate_half(x) * sin`` with cos/sin broadcast over the heads axis. In bf16 on a
    single CPU device with AVX-512 or AVX2 the native kernels run it and its gradient, bit for bit
    (``kernels.cpu_nf4.cpu_rope``: XLA:CPU ran the concatenate element by element)."""
    if _native_rope(x_BxSxHxD, cos_BxSxD, sin_BxSxD):
        return _rope_native(x_BxSxHxD, cos_BxSxD, sin_BxSxD)
    cos, sin = cos_BxSxD[:, :, None, :], sin_BxSxD[:, :, None, :]
    return x_BxSxHxD * cos + rotate_half(x_BxSxHxD) * sin


def _native_rope(x, cos, sin) -> bool:
    from ..kernels import cpu_nf4

    return (isinstance(x, jax.Array) and x.ndim == 4 and x.shape[-1] % 2 == 0
            and x.dtype == cos.dtype == sin.dtype == jnp.bfloat16
            and cos.shape == sin.shape == (*x.shape[:2], x.shape[3])
            and jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().empty and cpu_nf4.rope_available())


@jax.custom_vjp
def _rope_native(x, cos, sin):
    from ..kernels import cpu_nf4

    return cpu_nf4.cpu_rope(x, cos, sin)


def _rope_native_fwd(x, cos, sin):
    return _rope_native(x, cos, sin), (cos, sin)


def _rope_native_bwd(res, g):
    from ..kernels import cpu_nf4

    cos, sin = res
    # cos and sin come from integer positions: no gradient flows to them
    return cpu_nf4.cpu_rope_bwd(g, cos, sin), jnp.zeros_like(cos), jnp.zeros_like(sin)


_rope_native.defvjp(_rope_native_fwd, _rope_native_bwd)
