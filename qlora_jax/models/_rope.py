"""Rotary position embeddings exactly as transformers computes them (rotate-half convention)."""

from __future__ import annotations

import math

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
    """``x * cos + rotate_half(x) * sin`` with cos/sin broadcast over the heads axis."""
    cos, sin = cos_BxSxD[:, :, None, :], sin_BxSxD[:, :, None, :]
    return x_BxSxHxD * cos + rotate_half(x_BxSxHxD) * sin
