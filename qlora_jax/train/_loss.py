"""The causal-LM loss, in fp32, with transformers' label shift and ignore index."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..data._sft import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "causal_lm_loss_sum"]


def causal_lm_loss_sum(logits_BxSxV, labels_BxS, ignore_index: int = IGNORE_INDEX):
    """(sum of token losses, number of loss tokens): token t's logits predict label t+1, labels equal
    to ``ignore_index`` count for nothing. Dividing by the count gives transformers' mean loss."""
    logits = logits_BxSxV[:, :-1].astype(jnp.float32)
    labels = labels_BxS[:, 1:]
    valid = labels != ignore_index
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, logz - picked, 0.0)), jnp.sum(valid)
