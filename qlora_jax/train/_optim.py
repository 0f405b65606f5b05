"""Learning-rate schedules and the optimizer, with transformers' TrainingArguments semantics."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def warmup_steps_for(num_training_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """TrainingArguments.get_warmup_steps: ``warmup_steps`` if set, else ceil(ratio * total)."""
    return warmup_steps if warmup_steps > 0 else math.ceil(num_training_steps * warmup_ratio)


def make_schedule(learning_rate: float, lr_scheduler_type: str = "linear", *, num_training_steps: int,
                  warmup_steps: int = 0, warmup_ratio: float = 0.0) -> optax.Schedule:
    """lr at optimizer step k (0-based), as transformers' ``get_scheduler`` lambdas."""
    if lr_scheduler_type not in SCHEDULES:
        raise ValueError(f"lr_scheduler_type={lr_scheduler_type!r} is not supported; expected one of {SCHEDULES}")
    warm = warmup_steps_for(num_training_steps, warmup_steps, warmup_ratio)
    if lr_scheduler_type == "constant":
        warm = 0

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = step / max(1, warm)
        progress = (step - warm) / max(1, num_training_steps - warm)
        if lr_scheduler_type in ("constant", "constant_with_warmup"):
            after = jnp.ones_like(step)
        elif lr_scheduler_type == "linear":
            after = jnp.maximum(0.0, (num_training_steps - step) / max(1, num_training_steps - warm))
        else:  # cosine, half a cycle
            after = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return learning_rate * jnp.where(step < warm, warmup, after)

    return schedule


class _EmptyState(NamedTuple):
    pass


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6))."""

    def update(updates, state, params=None):
        del params
        norm = optax.global_norm(updates)
        coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: _EmptyState(), update)


OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")  # transformers' `optim` names


def make_optimizer(learning_rate: float = 2e-4, *, num_training_steps: int, lr_scheduler_type: str = "constant",
                   warmup_steps: int = 0, warmup_ratio: float = 0.0, weight_decay: float = 0.0,
                   adam_beta1: float = 0.9, adam_beta2: float = 0.999, adam_epsilon: float = 1e-8,
                   max_grad_norm: float | None = 0.3, optim: str = "adamw") -> optax.GradientTransformation:
    """Global-norm clipping (QLoRA's 0.3 by default; None or 0 disables it), then AdamW with
    decoupled weight decay and the schedule, as transformers' Trainer with ``optim``:

    - ``adamw``: fp32 moments on the device;
    - ``adamw_8bit``: bitsandbytes' 8-bit blockwise moments (``adamw_8bit``), on the device;
    - ``paged_adamw_32bit`` / ``paged_adamw_8bit``: the same, kept in host memory between steps
      and brought to the device leaf by leaf for the update (``paged``).

    Every variant updates leaf by leaf (one inner state per parameter leaf), so a paged optimizer
    and its on-device twin run the same arithmetic: their results are equal bit for bit.
    """
    if optim not in OPTIMIZERS:
        raise ValueError(f"optim={optim!r} is not supported; expected one of {OPTIMIZERS}")
    from ._optim8bit import adamw_8bit
    from ._paged import paged

    schedule = make_schedule(learning_rate, lr_scheduler_type, num_training_steps=num_training_steps,
                             warmup_steps=warmup_steps, warmup_ratio=warmup_ratio)
    kw = dict(b1=adam_beta1, b2=adam_beta2, eps=adam_epsilon, weight_decay=weight_decay)
    inner = adamw_8bit(schedule, **kw) if optim.endswith("8bit") else optax.adamw(schedule, **kw)
    adamw = paged(inner, offload=optim.startswith("paged"))
    return optax.chain(clip_by_global_norm_torch(max_grad_norm), adamw) if max_grad_norm else adamw
