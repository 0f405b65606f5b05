"""Quantize or dequantize selected leaves of a whole parameter pytree, and report its storage."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from ._array import QuantizedArray, _leaf_bytes, dequantize, quantize
from ._int8 import Int8Array

Rule = Callable[[str, Any], bool]

#: Path fragments the default rule leaves in full precision, as transformers' 4-bit loading does:
#: it converts only linear layers and skips the output layer (``lm_head``); embeddings and norms
#: are not linears. Model families pass their own precise rule (``models/`` declares its linears).
DEFAULT_SKIP_PATTERNS = (r"(^|\.)lm_head(\.|$)", r"embed", r"norm")


def path_str(path) -> str:
    """A key path as a dotted string: ``model.layers.0.self_attn.q_proj.weight``."""
    return jax.tree_util.keystr(path, simple=True, separator=".")


def default_rule(path: str, x) -> bool:
    """2-D-or-more floating weights that are not embeddings, the LM head or norms."""
    if getattr(x, "ndim", 0) < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        return False
    return not any(re.search(p, path) for p in DEFAULT_SKIP_PATTERNS)


def _as_rule(rules) -> Rule:
    if rules is None:
        return default_rule
    if callable(rules):
        return rules
    if isinstance(rules, str):
        rules = [rules]
    if not isinstance(rules, Sequence) or not all(isinstance(r, str) for r in rules):
        raise ValueError(f"rules={rules!r} is not supported; expected None, a predicate (path, array) -> bool, "
                         "or a list of regular expressions matched against dotted key paths")
    compiled = [re.compile(r) for r in rules]
    return lambda path, x: any(c.search(path) for c in compiled)


def quantize_params(params, *, rules: Rule | Sequence[str] | None = None, quant_type: str = "nf4",
                    blocksize: int = 64, double_quant: bool = True, double_quant_blocksize: int = 256,
                    batch_dims: int | None = None, threshold: float | None = None):
    """Replace the selected leaves of a pytree with QuantizedArray (Int8Array for "int8").

    Args:
      params: any pytree of arrays (or ``jax.ShapeDtypeStruct`` under ``jax.eval_shape``).
      rules: which leaves to quantize: None (``default_rule``: floating leaves of rank >= 2 whose
        path does not match ``DEFAULT_SKIP_PATTERNS``), a predicate ``(dotted_path, leaf) -> bool``,
        or a list of regular expressions searched in the dotted path.
      quant_type, blocksize, double_quant, double_quant_blocksize, threshold: as ``quantize``.
      batch_dims: leading axes of a selected leaf that index separate tensors; None means all but
        the last two (a ``[layers, out, in]`` stack is one bitsandbytes tensor per layer).

    Returns:
      The same tree structure with QuantizedArray in place of the selected leaves.
    """
    rule = _as_rule(rules)

    def convert(path, x):
        if is_quantized(x) or not rule(path_str(path), x):
            return x
        nbd = max(x.ndim - 2, 0) if batch_dims is None else batch_dims
        return quantize(x, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                        double_quant_blocksize=double_quant_blocksize, batch_dims=nbd, threshold=threshold)

    return jax.tree_util.tree_map_with_path(convert, params, is_leaf=is_quantized)


def quantize_like(x, like):
    """``x`` quantized in the format of the quantized weight ``like`` (4-bit: its quant type,
    blocksizes and double quantization; 8-bit: its threshold), with ``like``'s batch axes."""
    if isinstance(like, Int8Array):
        return quantize(x, quant_type="int8", threshold=like.threshold, batch_dims=len(like.batch_shape))
    return quantize(x, quant_type=like.quant_type, blocksize=like.blocksize, double_quant=like.double_quant,
                    double_quant_blocksize=like.nested_blocksize or 256, batch_dims=len(like.batch_shape))


def is_quantized(x) -> bool:
    """A quantized weight value: a 4-bit QuantizedArray or an 8-bit Int8Array."""
    return isinstance(x, (QuantizedArray, Int8Array))



def dequantize_params(params, dtype=None):
    """Replace every quantized leaf with its dequantized array (``dtype``: default original)."""
    return jax.tree.map(lambda x: dequantize(x, dtype) if is_quantized(x) else x, params,
                        is_leaf=is_quantized)


@dataclasses.dataclass(frozen=True)
class StorageReport:
    """Storage of a parameter tree. Counts are logical parameters; bytes are stored bytes."""

    quantized_params: int
    quantized_bytes: int
    other_params: int
    other_bytes: int
    num_quantized_tensors: int

    @property
    def total_params(self) -> int:
        return self.quantized_params + self.other_params

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes

    @property
    def quantized_bits_per_param(self) -> float:
        return 8.0 * self.quantized_bytes / max(self.quantized_params, 1)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.total_bytes / max(self.total_params, 1)

    def __str__(self) -> str:
        def mib(b):
            return f"{b / 2**20:,.2f} MiB"
        rows = [
            ("quantized weights", f"{self.quantized_params:,}", mib(self.quantized_bytes),
             f"{self.quantized_bits_per_param:.3f}"),
            ("other (full precision)", f"{self.other_params:,}", mib(self.other_bytes),
             f"{8.0 * self.other_bytes / max(self.other_params, 1):.3f}"),
            ("whole model", f"{self.total_params:,}", mib(self.total_bytes), f"{self.bits_per_param:.3f}"),
        ]
        widths = [max(len(r[i]) for r in rows + [("", "params", "storage", "bits/param")]) for i in range(4)]
        header = ("", "params", "storage", "bits/param")
        lines = [f"{header[0]:<{widths[0]}}  " + "  ".join(f"{h:>{w}}" for h, w in zip(header[1:], widths[1:]))]
        for r in rows:
            lines.append(f"{r[0]:<{widths[0]}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(r[1:], widths[1:])))
        lines.append(f"({self.num_quantized_tensors} quantized tensors)")
        return "\n".join(lines)


def storage_report(params) -> StorageReport:
    """Count parameters and stored bytes of a tree, quantized leaves apart (works on eval_shape trees)."""
    leaves = jax.tree.leaves(params, is_leaf=is_quantized)
    qp = qb = op = ob = nq = 0
    for x in leaves:
        if is_quantized(x):
            nq += math.prod(x.batch_shape) if x.batch_shape else 1
            qp += x.size
            qb += x.storage_bytes
        elif hasattr(x, "shape") and hasattr(x, "dtype"):
            op += int(math.prod(x.shape))
            ob += _leaf_bytes(x)
    return StorageReport(qp, qb, op, ob, nq)
