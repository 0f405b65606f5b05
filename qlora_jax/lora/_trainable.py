"""Trainable = adapters only, stated once as a predicate; the optimizer is built from it."""

from __future__ import annotations

import math

import jax
import optax
from flax import nnx

from ..quant import is_quantized
from ._layers import LoraLayerMask, LoraParam


def is_trainable(path, variable) -> bool:
    """The one predicate: a leaf is trainable iff it is a LoRA adapter weight."""
    del path
    return isinstance(variable, LoraParam)


def _flat_variables(params):
    state = nnx.state(params) if isinstance(params, nnx.Module) else params
    return state, nnx.to_flat_state(state)


def trainable_mask(params):
    """A tree of bools with the structure of the model's state (or of ``params``, an nnx.State):
    True on adapter weights, False on everything frozen (NF4 codes and scales, norms, embeddings)."""
    state, flat = _flat_variables(params)
    return nnx.from_flat_state([(path, is_trainable(path, var)) for path, var in flat])


def build_optimizer(tx: optax.GradientTransformation, params) -> optax.GradientTransformation:
    """``tx`` on the trainable leaves, nothing on the frozen ones: ``optax.partition`` with
    ``set_to_zero`` for the frozen partition, which keeps no optimizer state."""
    labels = jax.tree.map(lambda t: "trainable" if t else "frozen", trainable_mask(params))
    return optax.partition({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, all) parameters as PEFT counts them: a 4-bit weight counts its logical size
    (PEFT doubles the numel of the packed uint8 storage), an 8-bit one its int8 codes; scales,
    absmax and other quantization statistics are not parameters; non-parameter variables (masks,
    RNG state) do not count."""
    flat = nnx.to_flat_state(nnx.state(model))
    # a stacked adapter whose rules select some layers only counts those layers, as PEFT has them
    masks = {path[:-1]: var.get_value() for path, var in flat if isinstance(var, LoraLayerMask)}
    trainable = total = 0
    for path, var in flat:
        if not isinstance(var, nnx.Param):
            continue
        value = var.get_value()
        n = value.size if is_quantized(value) else math.prod(value.shape)
        if path[:-1] in masks:
            mask = masks[path[:-1]]
            n = n // mask.shape[0] * int(mask.sum())
        total += n
        trainable += n if is_trainable(path, var) else 0
    return trainable, total


def print_trainable_parameters(model) -> None:
    """PEFT's line: ``trainable params: 1,792 || all params: 116,800 || trainable%: 1.5342``."""
    t, a = count_parameters(model)
    print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")
