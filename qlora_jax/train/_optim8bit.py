"""AdamW with 8-bit blockwise-quantized moments, as bitsandbytes' ``AdamW8bit`` (``adamw_8bit``).

Each moment of a parameter with at least ``min_8bit_size`` elements (bitsandbytes: 4096) is kept
as uint8 codes plus one fp32 absmax per block of 256 elements (of the flattened tensor): the first
moment in the signed dynamic map, the second in the unsigned one. Smaller tensors keep fp32
moments (bitsandbytes' 32-bit path for them). One update, as bitsandbytes' blockwise kernel:
dequantize the moments, ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, decoupled weight
decay ``p *= 1 - lr wd``, ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`` with
the fp32 moments, then requantize them (per block: absmax, nearest code). State bytes: about 2 per
parameter against 8 for fp32 AdamW.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..quant._tables import DYNAMIC_MAP, UDYNAMIC_MAP

BLOCKSIZE = 256
MIN_8BIT_SIZE = 4096


class Blockwise8bit(NamedTuple):
    """A tensor as uint8 codes (its shape) and fp32 absmax per block of 256 flattened elements."""

    codes: jax.Array
    absmax: jax.Array


def _nearest(x: jax.Array, table: np.ndarray) -> jax.Array:
    """Index of the nearest value of the sorted ``table``: bitsandbytes' rule (``bucketize`` on the
    fp32 midpoints; a value on a midpoint takes the lower code)."""
    mid = ((table[1:] + table[:-1]) / np.float32(2)).astype(np.float32)
    return jnp.searchsorted(jnp.asarray(mid), x, side="left").astype(jnp.uint8)


def quantize_8bit(x: jax.Array, table: np.ndarray) -> Blockwise8bit:
    """Blockwise 8-bit quantization as bitsandbytes' ``quantize_blockwise``: per block of 256
    the absmax, the values times its reciprocal (clamped to [-1, 1]), the nearest code."""
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    nb = -(-n // BLOCKSIZE)
    blocks = jnp.pad(flat, (0, nb * BLOCKSIZE - n)).reshape(nb, BLOCKSIZE)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    scaled = jnp.clip(blocks * (1.0 / jnp.maximum(absmax, 1e-38))[:, None], -1.0, 1.0)
    codes = _nearest(scaled, table).reshape(-1)[:n].reshape(x.shape)
    return Blockwise8bit(codes, absmax)


def dequantize_8bit(q: Blockwise8bit, table: np.ndarray) -> jax.Array:
    flat = jnp.asarray(table)[q.codes.reshape(-1).astype(jnp.int32)]
    n = flat.shape[0]
    nb = q.absmax.shape[0]
    blocks = jnp.pad(flat, (0, nb * BLOCKSIZE - n)).reshape(nb, BLOCKSIZE) * q.absmax[:, None]
    return blocks.reshape(-1)[:n].reshape(q.codes.shape)


class Adam8bitState(NamedTuple):
    count: jax.Array  # int32: steps taken
    mu: Any  # per leaf: Blockwise8bit (signed map) or fp32 array
    nu: Any  # per leaf: Blockwise8bit (unsigned map) or fp32 array


def _is_8bit(p, min_8bit_size: int) -> bool:
    return p.size >= min_8bit_size


def adamw_8bit(learning_rate: float | optax.Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 0.0, *, min_8bit_size: int = MIN_8BIT_SIZE) -> optax.GradientTransformation:
    """bitsandbytes' 8-bit blockwise AdamW as an optax transformation (see the module docstring)."""

    def init(params):
        def one(p, table):
            zeros = jnp.zeros(p.shape, jnp.float32)
            return quantize_8bit(zeros, table) if _is_8bit(p, min_8bit_size) else zeros
        return Adam8bitState(jnp.zeros((), jnp.int32), jax.tree.map(lambda p: one(p, DYNAMIC_MAP), params),
                             jax.tree.map(lambda p: one(p, UDYNAMIC_MAP), params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("adamw_8bit needs the parameters (decoupled weight decay)")
        count = state.count + 1
        t = count.astype(jnp.float32)
        lr = learning_rate(state.count) if callable(learning_rate) else jnp.float32(learning_rate)
        correction1 = 1.0 - b1 ** t
        correction2 = jnp.sqrt(1.0 - b2 ** t)

        def one(g, p, m, v):
            quantized = isinstance(m, Blockwise8bit)
            m32 = dequantize_8bit(m, DYNAMIC_MAP) if quantized else m
            v32 = dequantize_8bit(v, UDYNAMIC_MAP) if quantized else v
            g32 = g.astype(jnp.float32)
            m32 = m32 * b1 + (1.0 - b1) * g32
            v32 = v32 * b2 + (1.0 - b2) * g32 * g32
            p32 = p.astype(jnp.float32)
            new = p32 * (1.0 - lr * weight_decay) if weight_decay else p32
            new = new - (lr / correction1) * m32 / (jnp.sqrt(v32) / correction2 + eps)
            step = (new - p32).astype(p.dtype)
            if quantized:
                return step, quantize_8bit(m32, DYNAMIC_MAP), quantize_8bit(v32, UDYNAMIC_MAP)
            return step, m32, v32

        leaf = lambda x: isinstance(x, Blockwise8bit)  # noqa: E731
        flat_g, treedef = jax.tree.flatten(grads)
        flat_p = treedef.flatten_up_to(params)
        flat_m = jax.tree.leaves(state.mu, is_leaf=leaf)
        flat_v = jax.tree.leaves(state.nu, is_leaf=leaf)
        out = [one(*args) for args in zip(flat_g, flat_p, flat_m, flat_v)]
        updates = treedef.unflatten([o[0] for o in out])
        mu = jax.tree.unflatten(jax.tree.structure(state.mu, is_leaf=leaf), [o[1] for o in out])
        nu = jax.tree.unflatten(jax.tree.structure(state.nu, is_leaf=leaf), [o[2] for o in out])
        return updates, Adam8bitState(count, mu, nu)

    return optax.GradientTransformation(init, update)
