"""bitsandbytes / transformers serialized 4-bit state <-> QuantizedArray.

A QuantizedArray holds exactly what bitsandbytes stores, so both directions are relabellings:
no value is recomputed. For a weight at prefix ``P`` the state dict has ``P`` (packed codes,
uint8 [N/2, 1]), ``P.absmax``, ``P.quant_map``, with double quantization ``P.nested_absmax`` and
``P.nested_quant_map``, and ``P.quant_state.bitsandbytes__nf4`` (or ``__fp4``): the UTF-8 bytes of
``json.dumps`` of the non-tensor fields, in the order ``QuantState.as_dict`` writes them.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from . import _tables
from ._array import QuantizedArray, _check_float_dtype, validate

_DTYPE_NAMES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                "bfloat16": _check_float_dtype("bfloat16")}


def _dtype_name(dtype: np.dtype) -> str:
    for name, dt in _DTYPE_NAMES.items():
        if dt == dtype:
            return name
    raise ValueError(f"dtype {dtype} has no bitsandbytes name; expected one of {list(_DTYPE_NAMES)}")


def _prefixes(prefix: str, batch_shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], str]]:
    holes = prefix.count("{}")
    if holes != len(batch_shape):
        raise ValueError(
            f"prefix {prefix!r} has {holes} '{{}}' placeholder(s) but the QuantizedArray has "
            f"{len(batch_shape)} batch axes {batch_shape}; give one '{{}}' per stacked axis, e.g. "
            "'model.layers.{}.mlp.down_proj.weight'")
    return [(idx, prefix.format(*idx)) for idx in itertools.product(*(range(b) for b in batch_shape))]


def _state_of_one(q: QuantizedArray, idx: tuple[int, ...], p: str) -> dict[str, np.ndarray]:
    def leaf(x):  # a writable copy: the caller owns what it gets
        return np.array(np.asarray(x)[idx])

    out = {
        p: leaf(q.codes).reshape(-1, 1).astype(np.uint8),
        f"{p}.absmax": leaf(q.absmax),
        f"{p}.quant_map": _tables.CODE_TABLES[q.quant_type].copy(),
    }
    meta = {"quant_type": q.quant_type, "blocksize": q.blocksize, "dtype": _dtype_name(q.dtype),
            "shape": list(q.logical_shape)}
    if q.double_quant:
        out[f"{p}.nested_absmax"] = leaf(q.nested_absmax)
        out[f"{p}.nested_quant_map"] = _tables.DYNAMIC_MAP.copy()
        meta.update(nested_blocksize=q.nested_blocksize, nested_dtype="float32",
                    nested_offset=float(leaf(q.offset)))
    out[f"{p}.quant_state.bitsandbytes__{q.quant_type}"] = np.frombuffer(
        json.dumps(meta).encode("utf-8"), dtype=np.uint8).copy()
    return out


def to_bnb_state(q: QuantizedArray, prefix: str = "weight") -> dict[str, np.ndarray]:
    """The state-dict entries transformers writes for a bitsandbytes 4-bit weight.

    Args:
      q: a QuantizedArray. If stacked, ``prefix`` holds one ``{}`` per batch axis and every slice
        gets its own keys (``"model.layers.{}.self_attn.q_proj.weight"``).
      prefix: the weight's key; the packed codes are stored under it.

    Returns:
      dict key -> numpy array, with bitsandbytes' exact dtypes and shapes (codes uint8 [N/2, 1];
      absmax uint8 with double quantization, else fp32; quant_map fp32 [16]; nested_absmax fp32;
      nested_quant_map fp32 [256]; the quant_state JSON as uint8 bytes).
    """
    validate(q)
    out: dict[str, np.ndarray] = {}
    for idx, p in _prefixes(prefix, q.batch_shape):
        out.update(_state_of_one(q, idx, p))
    return out


def _one_from_state(state: Mapping[str, object], p: str):
    def get(key):
        if key not in state:
            raise ValueError(f"bitsandbytes state has no key {key!r}; keys under the prefix: "
                             f"{sorted(k for k in state if k.startswith(p))}")
        return np.asarray(state[key])

    qs_keys = [k for k in state if k.startswith(f"{p}.quant_state.bitsandbytes__")]
    if len(qs_keys) != 1:
        raise ValueError(f"expected exactly one '{p}.quant_state.bitsandbytes__nf4|fp4' key, found {qs_keys}")
    meta = json.loads(get(qs_keys[0]).astype(np.uint8).tobytes().decode("utf-8"))
    quant_type = meta.get("quant_type")
    if qs_keys[0].rsplit("__", 1)[1] != quant_type:
        raise ValueError(f"{qs_keys[0]!r} holds quant_type={quant_type!r}; the key and the JSON disagree")
    if quant_type not in _tables.CODE_TABLES:
        raise ValueError(f"quant_type={quant_type!r} in {qs_keys[0]!r} is not supported; expected 'nf4' or 'fp4'")
    if meta.get("dtype") not in _DTYPE_NAMES:
        raise ValueError(f"dtype={meta.get('dtype')!r} in {qs_keys[0]!r} is not supported; expected one of {list(_DTYPE_NAMES)}")
    if not np.array_equal(get(f"{p}.quant_map").astype(np.float32), _tables.CODE_TABLES[quant_type]):
        raise ValueError(f"{p}.quant_map is not bitsandbytes' {quant_type} table; custom code tables are not supported")
    shape = tuple(int(s) for s in meta["shape"])
    nested = "nested_offset" in meta
    leaves = {"codes": get(p).reshape(-1).astype(np.uint8, copy=False),
              "absmax": get(f"{p}.absmax")}
    nested_blocksize = None
    if nested:
        if not np.array_equal(get(f"{p}.nested_quant_map").astype(np.float32), _tables.DYNAMIC_MAP):
            raise ValueError(f"{p}.nested_quant_map is not bitsandbytes' dynamic map; it is not supported")
        if meta.get("nested_dtype", "float32") != "float32":
            raise ValueError(f"nested_dtype={meta['nested_dtype']!r} is not supported; expected 'float32'")
        nested_blocksize = int(meta["nested_blocksize"])
        leaves["nested_absmax"] = get(f"{p}.nested_absmax")
        leaves["offset"] = np.asarray(meta["nested_offset"], np.float32)
    static = dict(logical_shape=shape, dtype=_DTYPE_NAMES[meta["dtype"]], quant_type=quant_type,
                  blocksize=int(meta["blocksize"]), nested_blocksize=nested_blocksize)
    return leaves, static


def _batch_shape_of(state: Mapping[str, object], prefix: str) -> tuple[int, ...]:
    holes = prefix.count("{}")
    if holes == 0:
        return ()
    pattern = re.compile(re.escape(prefix).replace(re.escape("{}"), r"(\d+)") + r"\.quant_state\.")
    found = [tuple(int(g) for g in m.groups()) for k in state if (m := pattern.match(k))]
    if not found:
        raise ValueError(f"no bitsandbytes quant_state key matches the prefix template {prefix!r}")
    shape = tuple(max(f[i] for f in found) + 1 for i in range(holes))
    if len(set(found)) != math.prod(shape):
        raise ValueError(f"prefix template {prefix!r} matches {len(set(found))} tensors, not a full grid {shape}")
    return shape


def from_bnb_state(state: Mapping[str, object], prefix: str = "weight") -> QuantizedArray:
    """Build a QuantizedArray from a bitsandbytes 4-bit state dict (the inverse of ``to_bnb_state``).

    Args:
      state: mapping with the keys ``to_bnb_state`` writes (numpy arrays, or anything
        ``np.asarray`` accepts, e.g. CPU torch tensors); other keys are ignored.
      prefix: the weight's key, or a template with one ``{}`` per stacked axis; the slices are
        found by scanning the keys and stacked along leading axes.
    """
    batch_shape = _batch_shape_of(state, prefix)
    parts = [_one_from_state(state, p) for _, p in _prefixes(prefix, batch_shape)]
    statics = {tuple(sorted(s.items())) for _, s in parts}
    if len(statics) != 1:
        raise ValueError(f"the tensors under {prefix!r} differ in shape, dtype or quantization settings; "
                         "they cannot be stacked into one QuantizedArray")
    static = parts[0][1]
    names = parts[0][0].keys()
    leaves = {name: jnp.asarray(np.stack([leaves[name] for leaves, _ in parts]).reshape(
        (*batch_shape, *parts[0][0][name].shape))) for name in names}
    q = QuantizedArray(leaves["codes"], leaves["absmax"], leaves.get("nested_absmax"), leaves.get("offset"),
                       **static)
    validate(q)
    return q

