"""The QLoRA train step: a pure, jitted function of (trainable, frozen, optimizer state, batch).

Only the adapters are differentiated: the model is split into (trainable adapters, RNG state,
frozen rest) and the gradient is taken with respect to the first part, so the frozen base (NF4
codes and scales, norms, embeddings) never gets a gradient buffer or optimizer state.

Gradient accumulation runs the micro-batches in a ``lax.scan`` and normalises by the number of
loss tokens across all of them (not a mean of per-micro-batch means, the bug transformers#34191
had): k micro-batches give exactly the gradient of one k-times-larger batch.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..lora import LoraParam
from ._loss import IGNORE_INDEX


class SplitModel(NamedTuple):
    graphdef: Any
    trainable: Any  # nnx.State of the LoRA weights
    rngs: Any  # nnx.State of RNG streams (dropout)
    frozen: Any  # nnx.State of everything else


def split_model(model) -> SplitModel:
    return SplitModel(*nnx.split(model, LoraParam, nnx.RngState, ...))


def merge_model(split: SplitModel):
    return nnx.merge(split.graphdef, split.trainable, split.rngs, split.frozen)


def update_model(model, trainable, rngs=None):
    """Put trained adapters (and RNG state) back into ``model`` in place. The step donates its
    inputs, so the arrays the model held before training are gone until this is called."""
    nnx.update(model, trainable, *([] if rngs is None else [rngs]))
    return model


class LossScaleState(NamedTuple):
    """Dynamic loss scaling for fp16 compute, as torch.amp.GradScaler: the loss is multiplied by
    ``scale`` before differentiation and the gradients divided by it; a step whose gradients are
    not finite is skipped and halves the scale; ``growth_interval`` finite steps in a row double it."""

    scale: jax.Array
    good_steps: jax.Array


def init_loss_scale(init_scale: float = 2.0 ** 16) -> LossScaleState:
    return LossScaleState(jnp.float32(init_scale), jnp.int32(0))


def init_opt_state(optimizer: optax.GradientTransformation, trainable, *, loss_scaling: bool = False,
                   init_scale: float = 2.0 ** 16, sharding=None):
    """The optimizer state the step expects: with ``loss_scaling``, (LossScaleState, optax state).
    ``sharding``: None (one device), a Sharding for every leaf (a mesh's replication, say), or a
    ``Mesh``: each state leaf is then built straight onto the shards of its parameter (as the
    placed ``trainable`` is split; ``qlora_jax.sharding.opt_state_shardings``). Paged parts
    (``paged_adamw_*``) then go to host memory."""
    from jax.sharding import Mesh

    from ._paged import place_on_host

    if isinstance(sharding, Mesh):
        from ..sharding import opt_state_shardings

        shardings = opt_state_shardings(jax.eval_shape(optimizer.init, trainable), trainable,
                                        jax.tree.map(lambda x: x.sharding, trainable), sharding)
        state = jax.jit(optimizer.init, out_shardings=shardings)(trainable)
    else:
        state = optimizer.init(trainable)
    if sharding is not None and not isinstance(sharding, Mesh):
        state = jax.tree.map(lambda x: jax.device_put(x, sharding), state)
    state = place_on_host(state)
    return (init_loss_scale(init_scale), state) if loss_scaling else state


def train_step(graphdef, optimizer: optax.GradientTransformation, trainable, rngs, frozen, opt_state, batch, *,
               growth_interval: int = 2000):
    """One optimizer step over ``batch`` = {input_ids, attention_mask, labels}, each
    [micro_batches, batch, seq]. Returns (trainable, rngs, opt_state, metrics). ``opt_state`` from
    ``init_opt_state``; a (LossScaleState, state) pair turns on dynamic loss scaling (fp16)."""
    scaling = isinstance(opt_state, tuple) and len(opt_state) == 2 and isinstance(opt_state[0], LossScaleState)
    scale = opt_state[0].scale if scaling else jnp.float32(1.0)
    total = jnp.maximum(jnp.sum(batch["labels"][:, :, 1:] != IGNORE_INDEX), 1).astype(jnp.float32)

    def micro_loss(model, micro):
        # the sum's cotangent is scale / total (the transpose of the line below): the head makes
        # its gradient in the forward and keeps no [tokens, vocab] logits
        loss_sum, _ = model.loss_sum(micro["input_ids"], micro["attention_mask"], micro["labels"], IGNORE_INDEX,
                                     grad_scale=scale / total)
        return loss_sum / total * scale

    grad_fn = nnx.value_and_grad(micro_loss, argnums=nnx.DiffState(0, LoraParam))

    def accumulate(carry, micro):
        # The weights are closed over, not carried: carried, XLA's copy insertion gives the layer
        # loops inside this loop their own copies of every stacked weight (two extra copies of the
        # base with gradient checkpointing). NNX modules must be made at the trace level they run
        # in, so the closed-over states are rebuilt here (new Variables, the same arrays).
        grads, loss, rng_state = carry
        params, rest = (jax.tree.map(lambda x: x, t) for t in (trainable, frozen))
        model = nnx.merge(graphdef, params, rng_state, rest)
        l, g = grad_fn(model, micro)
        rng_state = nnx.state(model, nnx.RngState)
        return (jax.tree.map(jnp.add, grads, g), loss + l, rng_state), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
    init = (zeros, jnp.zeros((), jnp.float32), rngs)
    (grads, loss, rngs), _ = jax.lax.scan(accumulate, init, batch)
    grads = jax.tree.map(lambda g, p: (g / scale).astype(p.dtype), grads, trainable)
    grad_norm = optax.global_norm(grads)
    inner = opt_state[1] if scaling else opt_state
    updates, new_inner = optimizer.update(grads, inner, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": loss / scale, "grad_norm": grad_norm, "num_tokens": total}
    if not scaling:
        return new_trainable, rngs, new_inner, metrics
    finite = jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    ls = opt_state[0]
    grown = ls.good_steps + 1 >= growth_interval
    new_ls = LossScaleState(
        jnp.where(finite, jnp.where(grown, ls.scale * 2.0, ls.scale), ls.scale * 0.5),
        jnp.where(finite & ~grown, ls.good_steps + 1, 0).astype(jnp.int32))
    metrics.update(loss_scale=ls.scale, skipped=~finite)
    return keep(new_trainable, trainable), rngs, (new_ls, keep(new_inner, inner)), metrics


def make_train_step(graphdef, optimizer: optax.GradientTransformation, *, donate: bool = True,
                    growth_interval: int = 2000, in_shardings=None, out_shardings=None, opt_state=None,
                    trainable=None, rngs=None):
    """``step(trainable, rngs, frozen, opt_state, batch) -> (trainable, rngs, opt_state, metrics)``,
    jitted (and the host heap trimmed after the call that compiles it), with the adapters, RNG state and optimizer state donated. ``in_shardings`` /
    ``out_shardings`` (as ``jax.jit`` takes them, one entry per argument / result) place the step
    on a mesh; None leaves placement to the inputs (one device). Or pass the placed values: the
    step then keeps them where they are, in and out: ``opt_state`` (from ``init_opt_state``;
    declares a paged state's host memory), ``trainable`` and ``rngs`` (split over a mesh, say)."""
    fn = functools.partial(train_step, graphdef, optimizer, growth_interval=growth_interval)
    if opt_state is not None and in_shardings is None:  # name the placement of the state (host memory if paged)
        from ._paged import state_shardings

        keep = lambda tree: None if tree is None else jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
        in_shardings = (keep(trainable), keep(rngs), None, state_shardings(opt_state), None)
        out_shardings = (keep(trainable), keep(rngs), state_shardings(opt_state), None)
    kw = {}
    if in_shardings is not None:
        kw["in_shardings"] = in_shardings
    if out_shardings is not None:
        kw["out_shardings"] = out_shardings
    return _TrimmingStep(jax.jit(fn, donate_argnums=(0, 1, 3) if donate else (), **kw))


class _TrimmingStep:
    """A jitted step that, after a call that compiled it, gives the compiler's freed heap memory
    back to the OS (``release_memory_after_compile``; a few hundred MB on XLA:CPU, where the host
    heap is the device's memory). Everything else (``lower``, ``eval_shape``, ...) is the jitted
    function's."""

    def __init__(self, jitted):
        from ..models._checkpoint import watch_compiles

        watch_compiles()
        self._jitted = jitted
        functools.update_wrapper(self, jitted)

    def __call__(self, *args, **kwargs):
        from ..models._checkpoint import release_memory_after_compile

        out = self._jitted(*args, **kwargs)
        release_memory_after_compile(wait_for=out)
        return out

    def __getattr__(self, name):
        jitted = self.__dict__.get("_jitted")  # absent on a blank copy (copy, pickle): no recursion
        if jitted is None:
            raise AttributeError(name)
        return getattr(jitted, name)
