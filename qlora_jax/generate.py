"""KV-cache generation: one jitted program per (batch, prompt length, max_new_tokens, sampling knobs).

The prompt is prefilled in one pass, then a ``lax.while_loop`` decodes one token per step into a
fixed-size cache (no recompilation per token) until ``max_new_tokens`` or every row has produced
an EOS token. Left padding is handled with ``attention_mask``: positions count the real tokens, as
in transformers' ``generate``. Logits processing follows transformers' order: repetition penalty,
then temperature, top-k and top-p.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .models import CausalLM, position_ids_from_mask


def _process_logits(logits_BxV, ids_BxN, valid_BxN, *, repetition_penalty, temperature, top_k, top_p, do_sample):
    """transformers' processors: repetition penalty over the ids seen so far (``valid``), then the
    sampling warpers."""
    if repetition_penalty != 1.0:
        rows = jnp.arange(logits_BxV.shape[0])[:, None]
        seen = jnp.zeros(logits_BxV.shape, bool).at[rows, ids_BxN].max(valid_BxN)
        penalized = jnp.where(logits_BxV < 0, logits_BxV * repetition_penalty, logits_BxV / repetition_penalty)
        logits_BxV = jnp.where(seen, penalized, logits_BxV)
    if not do_sample:
        return logits_BxV
    logits_BxV = logits_BxV / temperature
    neg = jnp.finfo(logits_BxV.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth, neg, logits_BxV)
    if top_p < 1.0:
        order = jnp.argsort(logits_BxV, axis=-1)  # ascending, as transformers' TopPLogitsWarper
        sorted_logits = jnp.take_along_axis(logits_BxV, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted = remove_sorted.at[:, -1].set(False)  # keep at least one token
        remove = jnp.zeros_like(remove_sorted).at[jnp.arange(order.shape[0])[:, None], order].set(remove_sorted)
        logits_BxV = jnp.where(remove, neg, logits_BxV)
    return logits_BxV


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                                             "repetition_penalty", "eos", "pad_token_id"))
def _generate(graphdef, state, input_ids, attention_mask, key, *, max_new_tokens, do_sample, temperature, top_p,
              top_k, repetition_penalty, eos, pad_token_id):
    model = nnx.merge(graphdef, state)
    b, p = input_ids.shape
    total = p + max_new_tokens
    kv_mask = jnp.concatenate([attention_mask, jnp.ones((b, max_new_tokens), attention_mask.dtype)], axis=1)
    positions = position_ids_from_mask(attention_mask)
    # the first new token's position: one past the prompt's last real token (padding after it, if
    # a prompt has any, counts on in ``positions`` and is not taken)
    next_pos = jnp.max(jnp.where(attention_mask > 0, positions, -1), axis=-1) + 1
    logits, cache = model.forward(input_ids, positions, kv_mask, model.init_cache(b, total), 0)
    sequences = jnp.concatenate([input_ids, jnp.full((b, max_new_tokens), pad_token_id, input_ids.dtype)], axis=1)
    eos_ids = jnp.asarray(eos if eos else (-1,), input_ids.dtype)
    kw = dict(repetition_penalty=repetition_penalty, temperature=temperature, top_k=top_k, top_p=top_p,
              do_sample=do_sample)

    def step(carry):
        i, seqs, last_logits, cache, next_pos, finished, key, params = carry
        key, sub = jax.random.split(key)
        # ids seen so far: the prompt (its pads too, as transformers) and the new tokens
        valid = jnp.broadcast_to(jnp.arange(total) < p + i, seqs.shape)
        scores = _process_logits(last_logits.astype(jnp.float32), seqs, valid, **kw)
        tok = (jax.random.categorical(sub, scores, axis=-1) if do_sample else jnp.argmax(scores, axis=-1))
        tok = jnp.where(finished, pad_token_id, tok).astype(seqs.dtype)
        seqs = jax.lax.dynamic_update_slice_in_dim(seqs, tok[:, None], p + i, axis=1)
        finished = finished | jnp.isin(tok, eos_ids)
        # NNX modules are bound to the trace level they were made in: the weights ride in the carry
        step_model = nnx.merge(graphdef, params)
        logits, cache = step_model.forward(tok[:, None], next_pos[:, None], kv_mask, cache, p + i)
        return i + 1, seqs, logits[:, -1], cache, next_pos + 1, finished, key, params

    def cond(carry):
        i, *_, finished, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(finished)

    init = (jnp.int32(0), sequences, logits[:, -1], cache, next_pos, jnp.zeros((b,), bool), key, state)
    return jax.lax.while_loop(cond, step, init)[1]


def generate(model: CausalLM, input_ids, attention_mask=None, *, max_new_tokens: int = 20, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None, seed: int = 0):
    """Prompt + new tokens [B, P + max_new_tokens], as transformers' ``generate`` returns them.

    Rows that finish early (an ``eos_token_id``) are filled with ``pad_token_id`` (default: the
    first EOS id, else 0). Batched prompts are left-padded, with ``attention_mask`` marking the
    real tokens. Greedy by default; ``do_sample`` draws with ``temperature``, ``top_k`` and
    ``top_p`` from ``jax.random.key(seed)``.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length]; got shape {input_ids.shape}")
    b, p = input_ids.shape
    limit = model.config.max_position_embeddings
    if p + max_new_tokens > limit:
        raise ValueError(f"prompt length {p} + max_new_tokens {max_new_tokens} = {p + max_new_tokens} exceeds "
                         f"the model's context of {limit} positions (max_position_embeddings)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive when do_sample=True")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    mask = jnp.ones((b, p), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    eos = () if eos_token_id is None else tuple([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    graphdef, state = nnx.split(model)
    key = jax.random.key(seed)
    mesh = _multiprocess_mesh(state)
    if mesh is not None:  # weights spread over several processes: every process feeds the same prompts
        whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        input_ids, mask = (jax.device_put(np.asarray(a), whole) for a in (input_ids, mask))
        key = jax.random.wrap_key_data(jax.device_put(np.asarray(jax.random.key_data(key)), whole),
                                       impl=jax.random.key_impl(key))
    out = _generate(graphdef, state, input_ids, mask, key, max_new_tokens=max_new_tokens, do_sample=do_sample,
                    temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                    eos=eos, pad_token_id=pad)
    if mesh is not None:  # the same tokens in every process, as a local array
        from jax.experimental import multihost_utils

        out = jnp.asarray(multihost_utils.process_allgather(out, tiled=True))
    return out


def _multiprocess_mesh(state):
    """The mesh of a model whose weights span devices of several processes, else None."""
    for x in jax.tree.leaves(state):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and not x.is_fully_addressable:
            return sharding.mesh
    return None
