"""Partition rules: which mesh axes split which dimension of every leaf kind.

Rules read a leaf's path (Hugging Face module names, as the model's state carries them) and its
trailing dimensions; leading axes (the layer axis of a scanned model) are never split. Over a
``(data, fsdp, tensor)`` mesh:

==========================  =================================  ==================================
leaf                        column-parallel linears             row-parallel linears
                            (q/k/v/gate/up_proj, others)        (o_proj, down_proj)
==========================  =================================  ==================================
dense weight [out, in]      out: tensor, in: fsdp               out: fsdp, in: tensor
QuantizedArray codes and    flat axis (output features): tensor x fsdp, whole absmax blocks per
absmax [..., N/2], [.., NB] shard; nested absmax and offset (one fp32 per 16384 weights; one per
                            tensor) replicated
Int8Array codes [.., out,    out: tensor x fsdp (whole rows, the row scales alike)
in], scales [.., out]
bias [out]                  out: tensor                         replicated
LoRA A [r, in]              in: fsdp                            in: tensor x fsdp
LoRA B [out, r]             out: tensor x fsdp                  out: fsdp
==========================  =================================  ==================================

Embeddings and the LM head [vocab, hidden]: vocab over tensor, hidden over fsdp. Norms, RNG state
and anything else: replicated (they are small). ``data`` splits only the batch.

Quantized weights split only along output features: bitsandbytes' layout flattens the weight
row-major, so a contiguous slice of the packed codes is a band of whole rows; splitting input
features would cut every row. A shard must hold whole rows and whole absmax blocks (out rows
divisible by the axis size, rows x in divisible by the blocksize); where that fails the rules try
one axis alone and otherwise keep that weight replicated (the documented fallback, listed by
``replicated_leaves``). Where a dimension does not divide by a dense rule's axes, the same
fallback applies to that dimension. A row-parallel layer's quantized weight is therefore split
along its output features too; XLA gathers it for the matmul as FSDP gathers any weight.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..quant import Int8Array, QuantizedArray, is_quantized

ROW_PARALLEL = ("o_proj", "down_proj")
VOCAB = ("embed_tokens", "lm_head")
_QUANT_FIELDS = ("codes", "absmax", "nested_absmax", "offset")


def _names(path) -> tuple:
    """A key path (``jax.tree_util`` keys or plain names) as a tuple of str/int names."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                k = getattr(k, attr)
                break
        out.append(k if isinstance(k, int) else str(k))
    return tuple(n for n in out if n != "value")


def _axes(mesh: Mesh, axes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def _fit(mesh: Mesh, size: int, axes: tuple[str, ...], ok=None):
    """The first choice of ``axes`` together, then each alone (the larger first), that splits
    ``size`` evenly (and passes ``ok(n)``); None when nothing does (the dimension stays whole)."""
    axes = _axes(mesh, axes)
    singles = sorted(((a,) for a in axes), key=lambda c: -mesh.shape[c[0]]) if len(axes) > 1 else []
    for cand in ([axes] if axes else []) + singles:
        n = math.prod(mesh.shape[a] for a in cand)
        if size % n == 0 and (ok is None or ok(n)):
            return cand[0] if len(cand) == 1 else tuple(cand)
    return None


def _spec(ndim: int, trailing: tuple) -> P:
    if all(t is None for t in trailing):
        return P()
    return P(*((None,) * (ndim - len(trailing)) + tuple(trailing)))


def _linear(names: tuple) -> str | None:
    return next((n for n in reversed(names) if isinstance(n, str) and n.endswith("_proj")), None)


def _int8_sharding(q: Int8Array, mesh: Mesh) -> Int8Array:
    """LLM.int8() codes [..., out, in] and row scales [..., out] split along output features (the
    same axes as a 4-bit weight; every row is whole, so any divisor of out works)."""
    lead = len(q.batch_shape)
    axis = _fit(mesh, q.logical_shape[0], ("tensor", "fsdp"))
    spec = () if axis is None else (*(None,) * lead, axis)
    return dataclasses.replace(q, codes=NamedSharding(mesh, P(*spec)), scales=NamedSharding(mesh, P(*spec)))


def _quantized_sharding(names: tuple, q: QuantizedArray, mesh: Mesh) -> QuantizedArray:
    if isinstance(q, Int8Array):
        return _int8_sharding(q, mesh)
    lead = len(q.batch_shape)
    rows, in_features = q.logical_shape[0], math.prod(q.logical_shape[1:])
    axis = _fit(mesh, rows, ("tensor", "fsdp"), ok=lambda n: (rows // n * in_features) % q.blocksize == 0)
    split = NamedSharding(mesh, P() if axis is None else P(*(None,) * lead, axis))
    whole = NamedSharding(mesh, P())
    leaves = {"codes": split, "absmax": split, "nested_absmax": whole, "offset": whole}
    return dataclasses.replace(q, **{f: None if getattr(q, f) is None else leaves[f] for f in _QUANT_FIELDS})


def leaf_spec(names: tuple, shape: tuple, mesh: Mesh) -> P:
    """The PartitionSpec of a dense leaf at ``names`` (module path) with ``shape`` (see module doc)."""
    names = _names(names)
    ndim = len(shape)
    last = names[-1] if names else None
    linear = _linear(names)
    row = linear in ROW_PARALLEL
    if last in ("lora_A", "lora_B") and ndim >= 2:
        if last == "lora_A":
            return _spec(ndim, (None, _fit(mesh, shape[-1], ("tensor", "fsdp") if row else ("fsdp",))))
        return _spec(ndim, (_fit(mesh, shape[-2], ("fsdp",) if row else ("tensor", "fsdp")), None))
    if any(n in VOCAB for n in names if isinstance(n, str)) and ndim >= 2 and "lora" not in names:
        return _spec(ndim, (_fit(mesh, shape[-2], ("tensor",)), _fit(mesh, shape[-1], ("fsdp",))))
    if linear is not None and last == "weight" and ndim >= 2:
        out_axes, in_axes = (("fsdp",), ("tensor",)) if row else (("tensor",), ("fsdp",))
        return _spec(ndim, (_fit(mesh, shape[-2], out_axes), _fit(mesh, shape[-1], in_axes)))
    if linear is not None and last == "bias" and not row and ndim >= 1:
        return _spec(ndim, (_fit(mesh, shape[-1], ("tensor",)),))
    return P()


def leaf_sharding(names, value, mesh: Mesh):
    """The sharding of one leaf (a QuantizedArray or Int8Array gets one of shardings)."""
    names = _names(names)
    if is_quantized(value):
        return _quantized_sharding(names, value, mesh)
    return NamedSharding(mesh, leaf_spec(names, tuple(value.shape), mesh))


def param_shardings(tree: Any, mesh: Mesh) -> Any:
    """A tree of shardings for ``tree`` (an nnx State, a split model's part, any pytree whose
    paths name Hugging Face modules); arrays, ShapeDtypeStructs or QuantizedArrays as leaves."""
    return jax.tree_util.tree_map_with_path(lambda path, x: leaf_sharding(path, x, mesh), tree, is_leaf=is_quantized)


def shard(tree: Any, mesh: Mesh) -> Any:
    """``tree`` placed by the rules (each device receives only its shards)."""
    return jax.device_put(tree, param_shardings(tree, mesh))


def replicated_leaves(tree: Any, shardings: Any, mesh: Mesh, *, min_bytes: int = 1 << 20) -> list[str]:
    """Paths of leaves of at least ``min_bytes`` that stay whole on every device although the mesh
    has fsdp or tensor axes (the fallback of layouts that do not divide)."""
    if not _axes(mesh, ("fsdp", "tensor")):
        return []
    out = []
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    for (path, x), s in zip(flat, jax.tree.leaves(shardings)):
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        if nbytes >= min_bytes and tuple(s.shard_shape(x.shape)) == tuple(x.shape):
            out.append(jax.tree_util.keystr(path))
    return out


def bytes_per_device(tree: Any, shardings: Any) -> int:
    """Bytes of ``tree`` that one device holds under ``shardings`` (the largest shard of each leaf)."""
    return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def opt_state_shardings(state: Any, trainable: Any, trainable_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer state built leaf by leaf (``ChunkedState``/``PagedState``, as every
    ``make_optimizer`` variant): each chunk's arrays of its parameter's shape (moments, 8-bit codes)
    follow that parameter; the rest (step counts, 8-bit absmax) is replicated. Any other state:
    arrays shaped as a unique parameter shape follow it, the rest replicated."""
    from ..train._paged import ChunkedState, PagedState

    whole = NamedSharding(mesh, P())
    params = jax.tree.leaves(trainable)
    shards = jax.tree.leaves(trainable_shardings)
    by_shape: dict = {}
    for p, s in zip(params, shards):
        by_shape.setdefault(tuple(p.shape), set()).add(s)

    def chunked(node):
        if len(node.chunks) != len(params):
            raise ValueError(f"optimizer state has {len(node.chunks)} chunks for {len(params)} parameters")
        return type(node)(tuple(
            jax.tree.map(lambda x, p=p, s=s: s if tuple(x.shape) == tuple(p.shape) else whole, chunk)
            for chunk, p, s in zip(node.chunks, params, shards)))

    def visit(node):
        if isinstance(node, (ChunkedState, PagedState)):
            return chunked(node)
        found = by_shape.get(tuple(node.shape), set())
        return next(iter(found)) if len(found) == 1 else whole

    return jax.tree.map(visit, state, is_leaf=lambda x: isinstance(x, (ChunkedState, PagedState)))


# Logical activation axes -> mesh axes, for constraints inside the model.
_LOGICAL = {"batch": ("data", "fsdp"), "tensor": ("tensor",)}


def _context_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or not {"data", "fsdp", "tensor"} & set(mesh.axis_names) else mesh


def constrain(x, *logical):
    """``x`` constrained to a sharding by logical axis names ("batch", "tensor" or None per
    dimension) over the mesh in context (``jax.set_mesh``); without one, ``x`` unchanged. A
    dimension that does not divide stays whole."""
    mesh = _context_mesh()
    if mesh is None:
        return x
    spec = [None if name is None else _fit(mesh, size, tuple(a for a in _LOGICAL[name] if a in mesh.axis_names))
            for size, name in zip(x.shape, logical)]
    return jax.lax.with_sharding_constraint(x, P(*spec) if any(s is not None for s in spec) else P())


def gather_weight(w, *, row_parallel: bool):
    """A linear weight as its matmul uses it under the mesh in context: gathered over ``fsdp``
    (FSDP: the weight moves, the batch stays split) and split over ``tensor`` as Megatron does
    (column-parallel: output features; row-parallel: input features, dense weights only: a 4-bit
    row-parallel weight is gathered whole and XLA slices its input features after dequantizing).
    A QuantizedArray is gathered as packed codes and absmax, 4.5 bits per weight; an Int8Array as
    int8 codes and row scales (split over ``tensor`` like a 4-bit weight). Without a mesh in
    context, ``w`` unchanged."""
    mesh = _context_mesh()
    if mesh is None:
        return w
    if isinstance(w, Int8Array):
        axis = None if row_parallel else _fit(mesh, w.logical_shape[0], ("tensor",))
        spec = P() if axis is None else P(*(None,) * len(w.batch_shape), axis)
        return dataclasses.replace(w, codes=jax.lax.with_sharding_constraint(w.codes, spec),
                                   scales=jax.lax.with_sharding_constraint(w.scales, spec))
    if isinstance(w, QuantizedArray):
        rows, cols = w.logical_shape[0], math.prod(w.logical_shape[1:])
        whole_blocks = lambda n: (rows // n * cols) % w.blocksize == 0  # noqa: E731
        axis = None if row_parallel else _fit(mesh, rows, ("tensor",), ok=whole_blocks)
        lead = len(w.batch_shape)
        split = P() if axis is None else P(*(None,) * lead, axis)
        c = lambda a, s: None if a is None else jax.lax.with_sharding_constraint(a, s)  # noqa: E731
        return dataclasses.replace(w, codes=c(w.codes, split), absmax=c(w.absmax, split),
                                   nested_absmax=c(w.nested_absmax, P()), offset=c(w.offset, P()))
    if w.ndim < 2:
        return w
    out_axis = None if row_parallel else _fit(mesh, w.shape[-2], ("tensor",))
    in_axis = _fit(mesh, w.shape[-1], ("tensor",)) if row_parallel else None
    return jax.lax.with_sharding_constraint(w, _spec(w.ndim, (out_axis, in_axis)))
