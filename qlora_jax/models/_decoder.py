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
from ..ops._qmatmul import LayerOfStack
from ..quant import QuantizedArray
from ..sharding import constrain
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


def _reads_stacks_in_place(layers) -> bool:
    """Whether a decoding step over these scanned layers hands their 4-bit weights to the CPU GEMV as
    views of the stacks: on CPU, no mesh in context, the kernels built, and the layers hold no RNG
    state (dropout: nnx.scan carries its updates) and some 4-bit weight."""
    from ..kernels import cpu_nf4

    if not (jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().empty and cpu_nf4.available()):
        return False
    if jax.tree.leaves(nnx.state(layers, nnx.RngState)):
        return False
    leaves = jax.tree.leaves(nnx.state(layers), is_leaf=lambda v: isinstance(v, QuantizedArray))
    return any(isinstance(v, QuantizedArray) and len(v.batch_shape) == 1 for v in leaves)


def position_ids_from_mask(attention_mask_BxS):
    """Positions from a mask of 0 (padding) / 1 (tokens), or of segment ids (0 = padding, 1..k =
    examples packed into one row): each token's index among the earlier tokens of its own segment,
    so positions restart with every packed example; a 0/1 mask gives ``cumsum(mask) - 1`` on its
    tokens, as transformers. Padding before the first token gets 0; padding after a token counts
    on from that token's position, so a right-padded row gets ``arange``, as transformers'
    forward given no positions (the padded rows' hidden states then match the reference's too,
    which LLM.int8()'s outlier columns, taken over every row, see). O(S): no [S, S] comparison."""
    seg = jnp.asarray(attention_mask_BxS).astype(jnp.int32)
    b, s = seg.shape
    real = seg > 0
    count = jnp.cumsum(real.astype(jnp.int32), axis=-1)  # tokens so far, inclusive
    idx = jnp.broadcast_to(jnp.arange(s), (b, s))
    # the segment of the last token before t (0 if none): a segment starts where it changes
    last = jax.lax.cummax(jnp.where(real, idx, -1), axis=1)
    prev_last = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), last[:, :-1]], axis=1)
    prev_seg = jnp.where(prev_last >= 0, jnp.take_along_axis(seg, jnp.maximum(prev_last, 0), axis=1), 0)
    starts = real & (seg != prev_seg)
    base = jax.lax.cummax(jnp.where(starts, count - 1, 0), axis=1)  # tokens before the segment began
    pos = jnp.maximum(count - 1 - base, 0)  # padding: the position of the last token before it
    return jnp.where(real | (last < 0), pos, pos + idx - last)


def attention_bias(kv_mask_BxT, q_index_S, window, dtype):
    """Additive mask [B, S, T]: 0 where query i (at cache index ``q_index[i]``) may attend key t
    (t <= that index, key not padding, within the sliding window when ``window`` > 0, and, for a
    mask of segment ids from packing, key in the query's own segment), the dtype's minimum
    elsewhere, as transformers. A 0/1 mask is one segment: the usual padding mask."""
    t = kv_mask_BxT.shape[-1]
    q_pos = q_index_S[:, None]
    k_pos = jnp.arange(t)[None, :]
    allowed = (k_pos <= q_pos) & jnp.where(window > 0, q_pos - k_pos < window, True)
    q_seg = jnp.take(kv_mask_BxT, q_index_S, axis=1)  # [B, S]
    same = (kv_mask_BxT[:, None, :] == q_seg[:, :, None]) | (q_seg[:, :, None] <= 0)  # padding queries: as before
    allowed = allowed[None] & (kv_mask_BxT[:, None, :] > 0) & same
    return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)


class CausalLM(nnx.Module):
    """``model(input_ids, attention_mask=None, position_ids=None) -> logits [B, S, vocab]``.

    ``attention_mask`` is 0/1 (padding) as in transformers, or segment ids (0 = padding, 1..k) for
    packed rows: tokens attend only within their own segment and positions restart per segment.
    """

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
        logits, _ = self.forward(input_ids_BxS, position_ids, mask)
        return logits

    def init_cache(self, batch: int, max_length: int):
        """Zero key/value buffers for ``forward``: per layer (k, v) [B, K, T, D] (head-major;
        stacked [L, ...] when the layers are scanned)."""
        c = self.config
        shape = (batch, c.num_key_value_heads, max_length, c.head_dim)
        if self.scan_layers:
            shape = (c.num_hidden_layers, *shape)
            return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)
        return [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in range(c.num_hidden_layers)]

    def forward(self, input_ids_BxS, position_ids_BxS, kv_mask_BxT, cache=None, start=0, return_hidden=False):
        """Logits of S tokens at cache indices ``start .. start+S-1`` (positions ``position_ids``).

        ``kv_mask`` [B, T] marks the real (non-padding) keys; without ``cache``, T = S and the
        tokens attend among themselves. With ``cache`` (from ``init_cache``) their keys and values
        are written into it and they attend over all T. Returns (logits, new cache or None);
        ``return_hidden``: the final normed hidden states [B, S, E] instead of the logits.
        """
        s = input_ids_BxS.shape[1]
        cfg = self.config
        x = jnp.take(self.embed_tokens[...], input_ids_BxS, axis=0).astype(self.dtype)
        cos, sin = rope_cos_sin(position_ids_BxS, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_parameters),
                                self.dtype)
        q_index = start + jnp.arange(s)

        def run_layer(layer, h, window, kv):
            h = constrain(h, "batch", None, None)  # under a mesh: examples split over data x fsdp
            return layer(h, cos, sin, attention_bias(kv_mask_BxT, q_index, window, self.dtype), kv, start)

        if self.remat_policy is not None:
            run_layer = nnx.remat(run_layer, policy=self.remat_policy)
        windows = jnp.asarray(self.windows, jnp.int32)
        if self.scan_layers and cache is None:
            @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
            def body(h, layer, window):
                return run_layer(layer, h, window, None)

            x = body(x, self.layers, windows)
        elif self.scan_layers and _reads_stacks_in_place(self.layers):
            # Decoding on CPU: each layer's 4-bit weights reach the GEMV kernel as a view of the
            # stacks (LayerOfStack), the layer's other leaves (norms, adapters, scales) as slices.
            # nnx.scan would slice every leaf, copying all of the model's codes per token.
            graphdef, stacked = nnx.split(self.layers)
            is_4bit = lambda v: isinstance(v, QuantizedArray)  # noqa: E731

            def body_in_place(h, xs):
                i, window, kv = xs
                state = jax.tree.map(lambda v: LayerOfStack(v, i) if is_4bit(v)
                                     else jax.lax.dynamic_index_in_dim(v, i, 0, keepdims=False), stacked, is_leaf=is_4bit)
                return run_layer(nnx.merge(graphdef, state), h, window, kv)

            x, cache = jax.lax.scan(body_in_place, x, (jnp.arange(cfg.num_hidden_layers), windows, cache))
        elif self.scan_layers:
            @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))
            def body_cached(h, layer, window, kv):
                return run_layer(layer, h, window, kv)

            x, cache = body_cached(x, self.layers, windows, cache)
        else:
            new_cache = []
            for i, layer in enumerate(self.layers):
                out = run_layer(layer, x, self.windows[i], None if cache is None else cache[i])
                x, kv = (out, None) if cache is None else out
                new_cache.append(kv)
            cache = None if cache is None else new_cache
        x = self.norm(constrain(x, "batch", None, None))
        if return_hidden:
            return x, cache
        if self.lm_head is None:
            return qmatmul(x, self.embed_tokens[...].astype(self.dtype)), cache
        return self.lm_head(x), cache

    def loss_sum(self, input_ids_BxS, attention_mask, labels_BxS, ignore_index: int = -100, *, grad_scale=None):
        """(sum of token losses, number of loss tokens), transformers' causal-LM loss: token t's
        logits predict label t+1; labels equal to ``ignore_index`` count for nothing. A dense head
        (the LM head or tied embeddings, not wrapped by an adapter) runs as one op with the loss
        (``ops.linear_cross_entropy_sum``, given ``grad_scale``: the cotangent the sum will get);
        any other head through its logits."""
        from ..ops import linear_cross_entropy_sum
        from ..sharding import gather_weight

        b = input_ids_BxS.shape[0]
        mask = jnp.asarray(attention_mask)
        h, _ = self.forward(input_ids_BxS, position_ids_from_mask(mask), mask, return_hidden=True)
        labels = jnp.concatenate([labels_BxS[:, 1:], jnp.full((b, 1), ignore_index, labels_BxS.dtype)], axis=1)
        valid = labels != ignore_index
        head = self.lm_head
        if head is None:
            w = self.embed_tokens[...].astype(self.dtype)
        elif type(head) is Linear and head.bias is None and isinstance(head.weight, nnx.Variable) \
                and isinstance(head.weight.get_value(), jax.Array):
            w = gather_weight(head.weight.get_value(), row_parallel=False)
        else:
            logits = head(h).astype(jnp.float32)
            logz = jax.nn.logsumexp(logits, axis=-1)
            picked = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
            return jnp.sum(jnp.where(valid, logz - picked, 0.0)), jnp.sum(valid)
        return linear_cross_entropy_sum(h, w, labels, valid, grad_scale=grad_scale), jnp.sum(valid)
