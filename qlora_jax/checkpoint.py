"""Orbax checkpoints of a run: adapters, optimizer state, RNG state, step and data position.

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoints readable and the partial one invisible; restoring picks
the latest complete step. The frozen base is never saved: it comes from the base checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx


def _to_saveable(tree):
    """nnx.State -> nested dicts of arrays; typed PRNG keys -> their raw key data."""
    def leaf(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key_data(x)
        return x
    pure = jax.tree.map(lambda x: x, tree)
    if isinstance(pure, nnx.State):
        pure = pure.to_pure_dict()
    return jax.tree.map(leaf, pure)


class RunCheckpointer:
    """``save(step, items)`` / ``restore_latest(targets)`` over an Orbax CheckpointManager at
    ``<directory>``, keeping the last ``max_to_keep`` steps. ``items`` maps names to pytrees
    (nnx.State, optax states, arrays) and to JSON-serialisable metadata under "meta"."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = None):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, trees: dict, meta: dict) -> None:
        # an empty tree (no dropout: no RNG state) has nothing to write; Orbax refuses empty items
        args = {name: ocp.args.StandardSave(_to_saveable(tree)) for name, tree in trees.items()
                if jax.tree.leaves(tree)}
        args["meta"] = ocp.args.JsonSave(meta)
        self.manager.save(step, args=ocp.args.Composite(**args))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, step: int, targets: dict) -> tuple[dict, dict]:
        """Restore ``step`` into the structure of ``targets`` (same names and pytrees as saved)."""
        stored = {name: t for name, t in targets.items() if jax.tree.leaves(t)}
        abstract = {name: jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(t)) for name, t in stored.items()}
        args = {name: ocp.args.StandardRestore(a) for name, a in abstract.items()}
        args["meta"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        restored = {name: (_from_saveable(t, out[name]) if name in stored else t) for name, t in targets.items()}
        return restored, dict(out["meta"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _from_saveable(target, saved):
    """Put restored raw values back into the target's structure (nnx.State, PRNG keys)."""
    if isinstance(target, nnx.State):
        template = jax.tree.map(lambda x: x, target)
        flat_saved = _rekey(template.to_pure_dict(), saved)
        nnx.replace_by_pure_dict(template, flat_saved)
        return template
    return _rekey(target, saved)


def _rekey(target, saved):
    def back(t, s):
        if isinstance(t, jax.Array) and jnp.issubdtype(t.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(s, impl=jax.random.key_impl(t))
        return s
    return jax.tree.map(back, target, saved)
