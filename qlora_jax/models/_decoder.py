"""The causal decoder (Llama / Mistral / Qwen2 / Qwen3) as a Flax NNX module.

Layers are stacked with ``nnx.vmap`` and run with ``nnx.scan`` (``scan_layers=True``, the
default: compile time does not grow with depth), or kept as a list and unrolled
(``scan_layers=False``, for tools such as Qwix that wrap modules one by one). Each layer may be
rematerialized in the backward pass (``gradient_checkpointing``: a ``jax.checkpoint_policies``
name, or True for ``nothing_saveable``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..ops import qmatmul
from ._config import DecoderConfig
from ._layers import DecoderLayer, Linear, RMSNorm
from ._rope import rope_cos_sin, rope_inv_freq


def _policy(gradient_checkpointing):
    if gradient_checkpointing in (None, False):
        return None
    name = "nothing_saveable" if gradient_checkpointing is True else gradient_checkpointing
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None or not isinstance(name, str):
        names = [n for n in dir(jax.checkpoint_policies) if not n.startswith("_")]
        raise ValueError(f"gradient_checkpointing={gradient_checkpointing!r} is not a jax.checkpoint_policies "
                         f"name; expected True, False or one of {names}")
    return policy


def position_ids_from_mask(attention_mask_BxS):
    """Positions counted over the real tokens (left padding gets 0), as transformers' generate."""
    return jnp.maximum(jnp.cumsum(attention_mask_BxS.astype(jnp.int32), axis=-1) - 1, 0)


def attention_bias(attention_mask_BxT, s: int, window, dtype):
    """Additive mask [B, S, T]: 0 where a query may attend (causal, key not padding, inside the
    sliding window when ``window`` > 0), the dtype's minimum elsewhere, as transformers."""
    t = attention_mask_BxT.shape[-1]
    q_pos = jnp.arange(s)[:, None] + (t - s)
    k_pos = jnp.arange(t)[None, :]
    allowed = (k_pos <= q_pos) & jnp.where(window > 0, q_pos - k_pos < window, True)
    allowed = allowed[None] & (attention_mask_BxT[:, None, :] > 0)
    return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)


class CausalLM(nnx.Module):
    """``model(input_ids, attention_mask=None, position_ids=None) -> logits [B, S, vocab]``."""

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, scan_layers: bool = True,
                 gradient_checkpointing=None, kernel: str = "auto", compute_dtype=None):
        lin = dict(kernel=kernel, compute_dtype=compute_dtype)  # the decoder layers' linears
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.scan_layers = scan_layers
        self.remat_policy = _policy(gradient_checkpointing)
        self.gradient_checkpointing = gradient_checkpointing
        self.embed_tokens = nnx.Param((jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size))
                                       * 0.02).astype(dtype))
        if scan_layers:
            @nnx.split_rngs(splits=cfg.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(r):
                return DecoderLayer(cfg, dtype=dtype, rngs=r, **lin)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs, **lin)
                                    for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        self.windows = cfg.layer_windows()  # static: per layer, the sliding window or 0

    def __call__(self, input_ids_BxS, attention_mask=None, position_ids=None):
        b, s = input_ids_BxS.shape
        mask = jnp.ones((b, s), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
        if position_ids is None:
            position_ids = (jnp.broadcast_to(jnp.arange(s), (b, s)) if attention_mask is None
                            else position_ids_from_mask(mask))
        x = jnp.take(self.embed_tokens[...], input_ids_BxS, axis=0).astype(self.dtype)
        cfg = self.config
        cos, sin = rope_cos_sin(position_ids, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
                                self.dtype)

        def run_layer(layer, h, window):
            return layer(h, cos, sin, attention_bias(mask, s, window, self.dtype))

        if self.remat_policy is not None:
            run_layer = nnx.remat(run_layer, policy=self.remat_policy)
        if self.scan_layers:
            @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
            def body(h, layer, window):
                return run_layer(layer, h, window)

            x = body(x, self.layers, jnp.asarray(self.windows, jnp.int32))
        else:
            for layer, window in zip(self.layers, self.windows):
                x = run_layer(layer, x, window)
        x = self.norm(x)
        if self.lm_head is None:
            return qmatmul(x, self.embed_tokens[...].astype(self.dtype))
        return self.lm_head(x)
