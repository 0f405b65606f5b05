"""Meshes and partition rules: JAX's SPMD partitioner runs the step, nothing home-made.

A mesh has the axes ``data``, ``fsdp`` and ``tensor`` (``mesh.*`` in the run config; -1 takes
the devices the other axes leave). The batch's examples are split over ``data`` x ``fsdp``; the
parameters (frozen base, adapters, optimizer state) over ``fsdp`` and ``tensor`` by the rules of
``_rules`` (QuantizedArray codes along output features with whole absmax blocks per shard). XLA's
SPMD partitioner inserts the gathers and reductions.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ._rules import (ROW_PARALLEL, bytes_per_device, constrain, gather_weight, leaf_sharding, leaf_spec,
                     opt_state_shardings, param_shardings, replicated_leaves, shard)
from ._report import StepMemory, abstract_lora_model, step_memory

__all__ = ["AXES", "BATCH_AXES", "ROW_PARALLEL", "batch_sharding", "bytes_per_device", "constrain", "gather_weight",
           "leaf_sharding", "leaf_spec",
           "make_mesh", "mesh_shape", "opt_state_shardings", "param_shardings", "place", "put_batch", "replicated",
           "replicated_leaves", "shard", "StepMemory", "abstract_lora_model", "step_memory"]

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch's examples are split over both


def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1, *, num_devices: int | None = None) -> tuple:
    """Axis sizes for ``num_devices`` (default: all devices); one size may be -1 (the rest)."""
    n = jax.device_count() if num_devices is None else num_devices
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))} do not divide the {n} devices")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh sizes {dict(zip(AXES, sizes))} use {math.prod(sizes)} devices; there are {n}")
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over every device (``jax.make_mesh``)."""
    shape = mesh_shape(data, fsdp, tensor)
    # Auto axes: the partitioner propagates shardings through the model (Explicit axes would ask
    # every gather and dot for its output sharding)
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are [micro_batches, examples, tokens]: examples split over data x fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None))


def put_batch(value, sharding: NamedSharding) -> jax.Array:
    """A host batch (numpy) as a global array on ``sharding``. In a multi-process run every process
    holds the same global batch (the same data stream and seed) and contributes only the rows its
    own devices hold (``jax.make_array_from_process_local_data``)."""
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    value = np.asarray(value)
    index = list(sharding.addressable_devices_indices_map(value.shape).values())
    box = tuple(slice(min(ix[d].indices(n)[0] for ix in index), max(ix[d].indices(n)[1] for ix in index))
                for d, n in enumerate(value.shape))
    rows = {tuple(ix[d].indices(n)[:2] for d, n in enumerate(value.shape)) for ix in index}
    held = sum(math.prod(b - a for a, b in r) for r in rows)
    if held != math.prod(s.stop - s.start for s in box):  # this process's devices hold scattered rows
        return jax.make_array_from_callback(value.shape, sharding, lambda ix: value[ix])
    return jax.make_array_from_process_local_data(sharding, value[box], value.shape)


def place(tree, sharding):
    """Every array of ``tree`` on ``sharding`` (one sharding for all: replication, say)."""
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)
