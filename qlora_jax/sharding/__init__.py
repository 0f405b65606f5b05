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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ._rules import (ROW_PARALLEL, bytes_per_device, constrain, gather_weight, leaf_sharding, leaf_spec, opt_state_shardings,
                     param_shardings, replicated_leaves, shard)
from ._report import StepMemory, abstract_lora_model, step_memory

__all__ = ["AXES", "BATCH_AXES", "ROW_PARALLEL", "batch_sharding", "bytes_per_device", "constrain", "gather_weight",
           "leaf_sharding", "leaf_spec",
           "make_mesh", "mesh_shape", "opt_state_shardings", "param_shardings", "place", "replicated",
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


def place(tree, sharding):
    """Every array of ``tree`` on ``sharding`` (one sharding for all: replication, say)."""
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)
