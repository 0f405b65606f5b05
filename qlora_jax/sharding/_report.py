"""Per-device memory of a sharded train step, from shapes alone (``jax.eval_shape`` + lowering).

``step_memory(model, mesh, ...)`` places an abstract model (``abstract_model`` + LoRA) on ``mesh``
by the partition rules, lowers and compiles the train step for it with abstract arguments
(nothing is allocated: a 70B model fits in a laptop's memory this way) and reports what one
device holds: its shards of the base, the adapters and the optimizer state, and the step's
activations and working buffers as the compiler's memory analysis of the partitioned program
gives them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ._rules import bytes_per_device, opt_state_shardings, param_shardings


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes per device of one train step on a mesh.

    base, adapters, optimizer_state: the largest shard of each leaf, summed (optimizer_state:
    device-resident state; a paged state's shards are in ``optimizer_state_host``). batch: the
    token arrays' shard. temporaries: the compiled step's working memory (activations saved for
    the backward pass, gathered weights, gradients, ...), from ``memory_analysis``. peak: the
    compiler's own total (arguments + outputs - donated + temporaries) for device memory, on the
    backend that compiled it. XLA's CPU backend, which has no bf16 arithmetic, also keeps fp32
    copies of many bf16 buffers, so its figure is high for a bf16 model. estimated_peak: the
    backend-independent count of ``train.estimate_memory`` (bf16 kept as bf16, as on GPUs) for
    one device's batch, with the base, adapters, gradients and optimizer state taken per device
    as sharded; the activations are counted unsplit, an upper bound when tensor > 1."""

    mesh: dict
    base: int
    adapters: int
    optimizer_state: int
    optimizer_state_host: int
    batch: int
    temporaries: int
    peak: int
    estimated_peak: int

    def format(self) -> str:
        gib = lambda b: f"{b / 2**30:9.3f} GiB"  # noqa: E731
        rows = [("base (frozen, 4-bit)", self.base), ("LoRA adapters", self.adapters),
                ("optimizer state on device", self.optimizer_state),
                ("optimizer state in host memory", self.optimizer_state_host), ("token batch", self.batch),
                ("activations and working buffers", self.temporaries), ("compiled peak (device)", self.peak),
                ("estimated peak (bf16 as on GPU)", self.estimated_peak)]
        head = f"per device on mesh {self.mesh}:"
        return "\n".join([head] + [f"  {name:<34}{gib(b)}" for name, b in rows])

    def __str__(self) -> str:
        return self.format()


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def step_memory(model, mesh: Mesh, *, batch_size: int, seq_length: int, micro_batches: int = 1,
                optim: str = "paged_adamw_32bit") -> StepMemory:
    """Per-device memory of ``make_train_step`` on ``mesh`` for ``model`` (abstract or real, LoRA
    applied), ``batch_size`` sequences per data-parallel device (as
    ``per_device_train_batch_size``) of ``seq_length`` tokens, ``micro_batches`` accumulated."""
    from ..train import estimate_memory, make_optimizer, make_train_step, split_model
    from ..train._paged import PagedState
    from . import BATCH_AXES, batch_sharding

    parts = split_model(model)
    shapes = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)  # noqa: E731
    trainable, rngs, frozen = shapes(parts.trainable), shapes(parts.rngs), shapes(parts.frozen)
    t_sh, f_sh = param_shardings(trainable, mesh), param_shardings(frozen, mesh)
    r_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), rngs)
    tx = make_optimizer(1e-4, num_training_steps=1, optim=optim)
    state = jax.eval_shape(tx.init, trainable)
    s_sh = opt_state_shardings(state, trainable, t_sh, mesh)
    paged = lambda x: isinstance(x, PagedState)  # noqa: E731
    s_sh = jax.tree.map(lambda node, sh: jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), sh)
                        if paged(node) else sh, state, s_sh, is_leaf=paged)
    dp = 1
    for axis in BATCH_AXES:
        dp *= mesh.shape[axis]
    tokens = jax.ShapeDtypeStruct((micro_batches, batch_size * dp, seq_length), jnp.int32)
    batch = {k: tokens for k in ("input_ids", "labels", "attention_mask")}
    b_sh = {k: batch_sharding(mesh) for k in batch}
    step = make_train_step(parts.graphdef, tx, in_shardings=(t_sh, r_sh, f_sh, s_sh, b_sh),
                           out_shardings=(t_sh, r_sh, s_sh, None))
    with jax.set_mesh(mesh):  # the model's constraints (batch split, weights gathered over fsdp) apply
        compiled = step.lower(_abstract(trainable, t_sh), _abstract(rngs, r_sh), _abstract(frozen, f_sh),
                              _abstract(state, s_sh), _abstract(batch, b_sh)).compile()
    m = compiled.memory_analysis()
    host = lambda s: s.memory_kind == "pinned_host"  # noqa: E731
    state_leaves, state_shards = jax.tree.leaves(state), jax.tree.leaves(s_sh)
    on_device = [(x, s) for x, s in zip(state_leaves, state_shards) if not host(s)]
    on_host = [(x, s) for x, s in zip(state_leaves, state_shards) if host(s)]
    split = lambda pairs: bytes_per_device([x for x, _ in pairs], [s for _, s in pairs])  # noqa: E731
    peak = 0 if m is None else int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                                   + m.temp_size_in_bytes - m.host_argument_size_in_bytes
                                   - m.host_output_size_in_bytes + m.host_alias_size_in_bytes
                                   - m.host_temp_size_in_bytes)
    base, adapters = bytes_per_device(frozen, f_sh), bytes_per_device(trainable, t_sh)
    est = estimate_memory(model, batch_size=batch_size, seq_length=seq_length, micro_batches=micro_batches,
                          optimizer=optim)
    share = adapters / max(est.adapters, 1)  # the adapters' (and so their gradients' and state's) split
    estimated = int(base + share * (est.adapters + est.gradients + est.optimizer_state) + est.activations + est.batch)
    return StepMemory(mesh=dict(mesh.shape), base=base, adapters=adapters, optimizer_state=split(on_device),
                      optimizer_state_host=split(on_host), batch=bytes_per_device(batch, b_sh),
                      temporaries=0 if m is None else int(m.temp_size_in_bytes), peak=peak,
                      estimated_peak=estimated)


def abstract_lora_model(path, lora, *, quantization=None, dtype=jnp.bfloat16, gradient_checkpointing=True):
    """``abstract_model`` with ``lora`` applied, all shapes (no adapter is allocated either)."""
    from ..lora import apply_lora
    from ..models import abstract_model

    model = abstract_model(path, quantization=quantization, dtype=dtype, gradient_checkpointing=gradient_checkpointing)
    return nnx.eval_shape(lambda m: apply_lora(m, lora), model)
