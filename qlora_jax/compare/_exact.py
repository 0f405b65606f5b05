"""Bit-exactness of our NF4 state against bitsandbytes', as ../shared/contracts.md defines it:
packed codes and nested scales identical, offset within one ulp, nested 8-bit codes identical but
for bitsandbytes' CPU lookup-table steps at near-midpoint values (its CPU quantizer indexes a
65536-entry table over [-1, 1]; ours, as its CUDA kernel, takes the nearest code)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..quant import QuantizedArray
from ..quant import _tables

LUT_STEP = 2.0 / 65535  # one step of bitsandbytes' CPU 8-bit lookup table over [-1, 1]


def nested_scaled(absmax, offset, absmax2, nested_blocksize: int) -> np.ndarray:
    """The values bitsandbytes feeds its 8-bit quantizer: (absmax - offset) / absmax2 per block."""
    centred = (np.asarray(absmax, np.float32).reshape(-1) - np.float32(offset)).astype(np.float32)
    blocks = np.repeat(np.asarray(absmax2, np.float32).reshape(-1), nested_blocksize)[: centred.size]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.clip(centred * (np.float32(1) / blocks), -1, 1)


def nested_code_mismatch(ours, theirs, scaled) -> str | None:
    """None when nested codes agree but for lookup-table steps: each disagreement by exactly one code,
    at a value within one table step of the midpoint between the two codes; else the reason."""
    ours, theirs, scaled = (np.asarray(a).reshape(-1) for a in (ours, theirs, scaled))
    diff = ours != theirs
    if not diff.any():
        return None
    o, t = ours[diff].astype(np.int64), theirs[diff].astype(np.int64)
    if not np.all(np.abs(o - t) == 1):
        return f"nested codes differ by more than one step: {list(zip(o.tolist(), t.tolist()))[:8]}"
    lo = np.minimum(o, t)
    mid = (_tables.DYNAMIC_MAP[lo] + _tables.DYNAMIC_MAP[lo + 1]) / 2
    dist = np.abs(scaled[diff] - mid)
    if not np.all(dist <= LUT_STEP):
        return f"a nested code differs away from a midpoint (distance {dist.max():.3g} > {LUT_STEP:.3g})"
    return None


def state_mismatch(ours: QuantizedArray, theirs: QuantizedArray, first_absmax=None) -> str | None:
    """None when ``ours`` meets the contract against bitsandbytes' ``theirs`` (one unstacked tensor);
    ``first_absmax``: the fp32 first-level absmax, to tell lookup-table steps in the nested codes."""
    for field in ("logical_shape", "quant_type", "blocksize", "nested_blocksize"):
        if getattr(ours, field) != getattr(theirs, field):
            return f"{field}: {getattr(ours, field)} vs {getattr(theirs, field)}"
    if not np.array_equal(np.asarray(ours.codes), np.asarray(theirs.codes)):
        n = int(np.sum(np.asarray(ours.codes) != np.asarray(theirs.codes)))
        return f"{n} packed code bytes differ"
    if ours.nested_blocksize is None:
        if not np.array_equal(np.asarray(ours.absmax), np.asarray(theirs.absmax)):
            return "absmax differs"
        return None
    o_off, t_off = np.float32(ours.offset), np.float32(theirs.offset)
    if abs(o_off - t_off) > np.spacing(np.abs(t_off)):
        return f"offset {o_off!r} vs {t_off!r}: more than one ulp apart"
    if not np.array_equal(np.asarray(ours.nested_absmax), np.asarray(theirs.nested_absmax)):
        return "nested absmax differs"
    if first_absmax is None:
        return None if np.array_equal(np.asarray(ours.absmax), np.asarray(theirs.absmax)) else "nested codes differ"
    scaled = nested_scaled(first_absmax, theirs.offset, theirs.nested_absmax, ours.nested_blocksize)
    return nested_code_mismatch(ours.absmax, theirs.absmax, scaled)


def in_torch_thread_order(q: QuantizedArray, first_absmax, torch_threads: int) -> QuantizedArray:
    """``q`` double-quantized again with the offset summed in the order torch's CPU ``mean`` takes
    on ``torch_threads`` threads (``quant._core.torch_sum``): from 32768 absmax values on, torch
    splits the sum over its threads, which ``quantize`` (single-thread order) cannot know."""
    import dataclasses

    import jax.numpy as jnp

    from ..quant import _core

    first = np.asarray(first_absmax, np.float32).reshape(-1)
    offset = _core.torch_mean(first, torch_threads)  # on the host
    codes, absmax2, offset = _core.quantize_nested_flat(jnp.asarray(first), q.nested_blocksize, offset=offset)
    return dataclasses.replace(q, absmax=codes, nested_absmax=absmax2, offset=offset)


def compare_with_bnb(model, ckpt: str | Path, bnb_base: str | Path, quant, torch_threads: int | None = None) -> dict:
    """Every quantized weight of ``model`` (loaded from ``ckpt`` with ``quant``) against the state
    bitsandbytes saved for it in ``bnb_base`` (transformers' 4-bit format). Returns {"tensors": n,
    "exact": k, "mismatches": {hf_key: reason}, "exact_in_torch_thread_order": k2, "torch_threads":
    T}: k2 counts the tensors that meet the contract once the double-quantization offset is summed
    in torch's ``torch_threads``-thread order (the reference's thread count); reads one tensor at
    a time."""
    import jax.numpy as jnp
    from flax import nnx

    from ..models._checkpoint import iter_tensors
    from ..models._loading import _bnb_groups, _hf_key
    from ..quant import _array

    if quant.load_in_8bit:
        return _compare_int8(model, bnb_base)
    ours: dict[str, QuantizedArray] = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        if not isinstance(value, QuantizedArray):
            continue
        key, layer = _hf_key(path)
        if layer == -1:  # stacked over layers: one bitsandbytes tensor per slice
            for i in range(value.batch_shape[0]):
                ours[key.format(i)] = _slice(value, i)
        else:
            ours[key] = value
    theirs = {k: v for k, v in _bnb_groups(iter_tensors(bnb_base)) if isinstance(v, QuantizedArray)}
    tensors, mismatches, thread_order = len(set(ours) | set(theirs)), {}, 0
    for key, array in iter_tensors(ckpt):
        if key not in ours:
            continue
        q = ours.pop(key)
        if key not in theirs:
            mismatches[key] = "bitsandbytes did not quantize it"
            continue
        x = jnp.asarray(array).astype(q.dtype)
        _, first = _array.quantize_first_level(x, quant_type=quant.quant_type, blocksize=quant.blocksize)
        bnb = theirs.pop(key)
        reason = state_mismatch(q, bnb, np.asarray(first))
        if reason:
            mismatches[key] = reason
            if q.nested_blocksize is not None and torch_threads and torch_threads > 1 and \
                    state_mismatch(in_torch_thread_order(q, first, torch_threads), bnb, np.asarray(first)) is None:
                thread_order += 1
    mismatches.update({key: "not in the checkpoint" for key in ours})
    mismatches.update({key: "quantized by bitsandbytes, not by qlora_jax" for key in theirs})
    exact = tensors - len(mismatches)
    return {"tensors": tensors, "exact": exact, "mismatches": mismatches, "torch_threads": torch_threads,
            "exact_in_torch_thread_order": exact + thread_order}


def _slice(q: QuantizedArray, i: int) -> QuantizedArray:
    import dataclasses

    return dataclasses.replace(q, codes=q.codes[i], absmax=q.absmax[i],
                               nested_absmax=None if q.nested_absmax is None else q.nested_absmax[i],
                               offset=None if q.offset is None else q.offset[i])


def _compare_int8(model, bnb_base) -> dict:
    """LLM.int8(): every Int8Array of ``model`` against bitsandbytes' saved CB and SCB (equal)."""
    import dataclasses

    from flax import nnx

    from ..models._checkpoint import iter_tensors
    from ..models._loading import _bnb_int8_groups, _hf_key
    from ..quant import Int8Array

    ours = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        if isinstance(value, Int8Array):
            key, layer = _hf_key(path)
            if layer == -1:
                for i in range(value.batch_shape[0]):
                    ours[key.format(i)] = dataclasses.replace(value, codes=value.codes[i], scales=value.scales[i])
            else:
                ours[key] = value
    theirs = {k: v for k, v in _bnb_int8_groups(iter_tensors(bnb_base), "float16", 6.0) if isinstance(v, Int8Array)}
    mismatches = {}
    for key in sorted(set(ours) | set(theirs)):
        if key not in theirs or key not in ours:
            mismatches[key] = "quantized by one stack only"
        elif not np.array_equal(np.asarray(ours[key].codes), np.asarray(theirs[key].codes)):
            differ = int((np.asarray(ours[key].codes) != np.asarray(theirs[key].codes)).sum())
            mismatches[key] = f"{differ} codes differ"
        elif not np.array_equal(np.asarray(ours[key].scales), np.asarray(theirs[key].scales)):
            mismatches[key] = "row scales differ"
    tensors = len(set(ours) | set(theirs))
    return {"tensors": tensors, "exact": tensors - len(mismatches), "mismatches": mismatches, "torch_threads": None,
            "exact_in_torch_thread_order": tensors - len(mismatches)}
