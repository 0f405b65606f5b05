"""Orbax checkpoints of a run: adapters, optimizer state, RNG state, step and data position.

Orbax writes each step into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` only when
every item is written, so a run killed mid-save leaves the previous checkpoints readable and the
partial one invisible (a temporary, removed when the directory is next opened); restoring picks the
latest complete step. Saving runs in the background: a failure (a full disk, say) surfaces at the
next ``save``, ``wait`` or ``close`` as an ``OSError`` naming the step that failed and the last
complete one. The frozen base is never saved: it comes from the base checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# tensorstore (array data) and safetensors report the OS error in their message, not as an OSError
_DISK_FULL_TEXT = re.compile("No space left on device|Disk quota exceeded|"
                             + "|".join(rf"os_error_code='{n}'|os error {n}\b" for n in _DISK_FULL_ERRNOS))


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error``, or an exception it chains, says the file system is out of space or quota."""
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS or _DISK_FULL_TEXT.search(str(e)):
            return True
        stack += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return False


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
    """``save(step, trees, meta)`` / ``restore(step, targets)`` over an Orbax CheckpointManager at
    ``<directory>``, keeping the last ``max_to_keep`` steps. ``trees`` maps names to pytrees
    (nnx.State, optax states, arrays); ``meta`` is JSON-serialisable. Temporaries left by a killed
    or failed save are removed on opening (one writer per directory)."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = None):
        self.directory = Path(directory).absolute()
        self.max_to_keep = max_to_keep
        self.manager = self._open()
        self._pending: int | None = None  # the step being written in the background

    def _open(self) -> ocp.CheckpointManager:
        """A manager over the directory as it is on disk, without the partial steps of earlier saves."""
        from .distributed import is_main_process, sync

        if is_main_process():  # one writer removes them; every process then opens the same steps
            for partial in ocp.path.step.all_temporary_paths(self.directory):
                shutil.rmtree(partial.get(), ignore_errors=True)
        sync("qlora_jax.checkpoints.cleaned")
        options = ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True)
        return ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint; one still being written in the background is not one."""
        if self._pending is None:
            return self.manager.latest_step()
        # Orbax lists a step as its save starts (and drops those it will rotate out): ask the disk
        return max(ocp.utils.checkpoint_steps(self.directory), default=None)

    def save(self, step: int, trees: dict, meta: dict) -> None:
        """Start writing ``step`` in the background, after the previous save has finished (its
        failure is raised here). Raises OSError if the save cannot start (a full disk, say)."""
        self.wait()
        # an empty tree (no dropout: no RNG state) has nothing to write; Orbax refuses empty items
        args = {name: ocp.args.StandardSave(_to_saveable(tree)) for name, tree in trees.items()
                if jax.tree.leaves(tree)}
        args["meta"] = ocp.args.JsonSave(meta)
        try:
            self.manager.save(step, args=ocp.args.Composite(**args))
        except Exception as e:
            if isinstance(e, OSError) or is_disk_full(e):
                raise self._failure(step, e) from e
            raise
        self._pending = step

    def wait(self) -> None:
        """Block until the background save has finished; raises OSError naming its step if it failed."""
        step = self._pending
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failure(step, e) from e
        self._pending = None

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
        """Finish the background save (raising its failure, as ``wait``) and release Orbax's threads."""
        try:
            self.wait()
        except BaseException:
            with contextlib.suppress(Exception):
                self.manager.close()
            raise
        self.manager.close()

    def _failure(self, step: int | None, error: BaseException) -> OSError:
        """The OSError to raise for a failed save of ``step``: what happened, where, what is safe. Resets the
        manager: Orbax reports one failed save from several threads, one error per call (``close`` until clean),
        and has already forgotten the steps it meant to rotate out; reopening reads the disk and drops the
        partial step."""
        self._pending = None
        for _ in range(8):
            try:
                self.manager.close()
                break
            except Exception:  # another symptom of the same failure
                continue
        with contextlib.suppress(Exception):
            self.manager = self._open()
        last = max(ocp.utils.checkpoint_steps(self.directory), default=None)
        what = f"checkpoint step {step}" if step is not None else "a checkpoint"
        if last is None:
            safe = f"there is no complete checkpoint yet; the partial {what} was discarded. Run again to start over"
        elif last == step:  # written and committed; Orbax failed afterwards (removing old steps, say)
            safe = f"{what} itself is complete ({self.directory / str(last)}). Run again to resume from it"
        else:
            safe = (f"the last complete checkpoint is step {last} ({self.directory / str(last)}); the partial {what} "
                    f"was discarded. Run again to resume from step {last}")
        if is_disk_full(error):
            return OSError(errno.ENOSPC, f"the disk is full (no space left on device) while saving {what} to "
                                         f"{self.directory}. Nothing already saved was lost: {safe} once space is "
                                         "freed.")
        code = next((e.errno for e in (error, error.__cause__, error.__context__) if isinstance(e, OSError)), None)
        message = (f"saving {what} to {self.directory} failed ({type(error).__name__}: {error}). {safe} once the "
                   "cause is fixed.")
        return OSError(code, message) if code is not None else OSError(message)


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
