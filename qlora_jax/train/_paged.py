"""Paged optimizer state: kept in host memory (``pinned_host``) between steps, brought to the
device chunk by chunk for the update and written back, as bitsandbytes' paged optimizers keep
theirs in unified memory so that a memory spike does not end the run.

``paged(optimizer)`` wraps an optax transformation whose update treats every parameter leaf on its
own (AdamW, 8-bit AdamW): it keeps one inner state per chunk (a parameter leaf, e.g. one stacked
adapter matrix of every layer) and updates the chunks one after another, each chunk's state
moving to the device only after the previous chunk's state has been written back (an
optimization barrier orders them), so at most about one chunk of state is on the device at a
time. The numbers are those of the wrapped optimizer, bit for bit. The state arrays must be placed
with ``place_on_host`` (``init_opt_state`` does it) and the jitted step must name their placement
in its shardings (``state_shardings``), as ``make_train_step`` is given them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax


class PagedState(NamedTuple):
    """One inner optimizer state per parameter leaf (parameters' leaf order), in host memory."""

    chunks: tuple


class ChunkedState(NamedTuple):
    """The same, kept on the device (``paged(..., offload=False)``)."""

    chunks: tuple


def paged(optimizer: optax.GradientTransformation, *, offload: bool = True) -> optax.GradientTransformation:
    """``optimizer`` with its state paged to host memory (see the module docstring).
    ``offload=False`` runs the same chunked program with the state left on the device."""

    kind = PagedState if offload else ChunkedState

    def init(params):
        return kind(tuple(optimizer.init(p) for p in jax.tree.leaves(params)))

    def update(grads, state, params=None):
        flat_g, treedef = jax.tree.flatten(grads)
        flat_p = treedef.flatten_up_to(params) if params is not None else [None] * len(flat_g)
        if len(state.chunks) != len(flat_g):
            raise ValueError(f"paged optimizer state has {len(state.chunks)} chunks for {len(flat_g)} parameters")
        updates, chunks, written = [], [], None
        for g, p, host_state in zip(flat_g, flat_p, state.chunks):
            if written is not None:  # this chunk comes in only once the previous one has gone back
                host_state, _ = jax.lax.optimization_barrier((host_state, written))
            on_device = jax.device_put(host_state, jax.memory.Space.Device) if offload else host_state
            u, new = optimizer.update(g, on_device, p)
            written = jax.device_put(new, jax.memory.Space.Host) if offload else new
            updates.append(u)
            chunks.append(written)
        return treedef.unflatten(updates), kind(tuple(chunks))

    return optax.GradientTransformation(init, update)


def _is_paged(state) -> bool:
    return isinstance(state, PagedState)


def _host_sharding(x):
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return sharding.with_memory_kind("pinned_host")


def place_on_host(state: Any) -> Any:
    """Put every array of each ``PagedState`` in ``state`` into pinned host memory."""
    def place(node):
        if _is_paged(node):
            return jax.tree.map(lambda x: jax.device_put(x, _host_sharding(x)), node)
        return node
    return jax.tree.map(place, state, is_leaf=_is_paged)


def state_shardings(state: Any) -> Any:
    """The shardings of ``state``'s arrays (host memory for paged parts): what the jitted step
    must declare for the optimizer state, in and out."""
    return jax.tree.map(lambda x: x.sharding, state)


def memory_kinds(state: Any) -> set[str]:
    """The memory kinds the arrays of ``state`` live in (tests, diagnostics)."""
    return {x.sharding.memory_kind for x in jax.tree.leaves(state)}
