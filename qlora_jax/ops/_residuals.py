"""Residuals of 16-bit floats saved for the backward as their bits (``uint16``).

Under ``scan_layers`` every residual a layer saves is stacked over the layers: the forward loop writes
it into a [L, ...] buffer (a dynamic-update-slice) and the backward loop reads it back (a dynamic
slice). XLA:CPU computes bf16 slices in fp32 (its float normalization has no bf16 for them): each
forward write converted the whole [L, ...] stack to fp32 and back, and before the backward loop an
fp32 copy of every stack was made once (loop-invariant), then sliced and rounded back per layer:
~90 ms of the small preset's 0.76 s train step and ~130 MiB of its temporaries (Zen 4). Integer slices
run as they are; a bitcast between bf16 and uint16 costs nothing. Custom VJPs whose residuals are
bf16/fp16 activations save them through ``stash`` and read them with ``unstash``.

One activation saved by several VJPs (the input of the q, k and v adapters) must stay one residual:
JAX keeps a residual once per variable, and XLA does not merge the stacks of equal ones (three
[L, tokens, hidden] copies). ``stash`` returns the same bits for the same tracer within a trace.
"""

from __future__ import annotations

import weakref

import jax
import jax.extend.core
import jax.numpy as jnp

_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@jax.tree_util.register_pytree_node_class
class Bits:
    """A 16-bit float array held as uint16 (``bits``) with its dtype."""

    def __init__(self, bits, dtype):
        self.bits, self.dtype = bits, dtype

    def tree_flatten(self):
        return (self.bits,), self.dtype

    @classmethod
    def tree_unflatten(cls, dtype, children):
        return cls(children[0], dtype)


# the trace the memo belongs to, and id(tracer) -> (weakref to it, weakref to its bits): weak, so that
# nothing of a finished trace is kept; a new trace starts a new memo
_memo: dict = {"trace": None, "bits": {}}


def _bits(x):
    if not isinstance(x, jax.core.Tracer):
        return jax.lax.bitcast_convert_type(x, jnp.uint16)
    trace = jax.extend.core.get_opaque_trace_state(convention="qlora_jax")
    if _memo["trace"] != trace:
        _memo["trace"], _memo["bits"] = trace, {}
    memo = _memo["bits"]
    hit = memo.get(id(x))
    if hit is not None and hit[0]() is x and hit[1]() is not None:
        return hit[1]()
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16)
    if len(memo) > 1024:  # drop the entries of tracers that are gone
        for k in [k for k, (rx, _) in memo.items() if rx() is None]:
            del memo[k]
    memo[id(x)] = (weakref.ref(x), weakref.ref(bits))
    return bits


def stash(*xs):
    """``xs`` with each bf16/fp16 array replaced by its bits (``Bits``); anything else as it is. The
    same tracer gets the same bits within a trace."""
    return tuple(Bits(_bits(x), x.dtype) if getattr(x, "dtype", None) in _HALF else x for x in xs)


def unstash(*xs):
    """The arrays ``stash`` took: each ``Bits`` back to its float dtype."""
    return tuple(jax.lax.bitcast_convert_type(x.bits, x.dtype) if isinstance(x, Bits) else x for x in xs)
