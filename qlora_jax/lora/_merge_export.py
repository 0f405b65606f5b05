"""``save_merged``: a base with its adapter folded in, written as a Hugging Face checkpoint.

The adapter is merged onto the dequantized base and written in ``dtype`` (bf16 by default),
never re-quantized: a re-quantized merge loses quality (peft#2321). The drift such a merge would
have is measured and returned, so users can see what they avoid.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from ..models._checkpoint import resolve_checkpoint
from ..models._loading import _hf_key
from ..quant import dequantize, is_quantized
from ..quant._params import quantize_like
from ._inject import _merged_weight, lora_modules, merge_adapters

_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
           "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt")
_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _requantized_drift(model, adapter_name) -> float:
    """Relative RMS change a re-quantized merge (in the base's format) would add to the merged weights."""
    num = den = 0.0
    for _, m in lora_modules(model):
        w = m.base_layer.weight.get_value()
        if not is_quantized(w):
            continue
        merged = _merged_weight(m, adapter_name or m.active_adapter, jnp.float32)
        back = dequantize(quantize_like(merged, w), jnp.float32)
        num += float(jnp.sum((back - merged) ** 2))
        den += float(jnp.sum(merged ** 2))
    return math.sqrt(num / den) if den else 0.0


def save_merged(model, output_dir: str | os.PathLike, *, dtype: str = "bfloat16", adapter_name: str | None = None,
                source: str | os.PathLike | None = None) -> dict:
    """Merge the active (or named) adapter into the base and write ``output_dir`` as a Hugging Face
    checkpoint (model.safetensors, config.json without quantization_config, the tokenizer files)
    that transformers loads. Changes ``model`` in place (its adapters are folded in).

    Returns {"requantized_drift": relative RMS error a re-quantized merge would add}.
    """
    if dtype not in _NUMPY:
        raise ValueError(f"dtype={dtype!r} is not supported; expected one of {list(_NUMPY)}")
    src = resolve_checkpoint(source or getattr(model, "name_or_path", None) or "")
    drift = _requantized_drift(model, adapter_name)
    merge_adapters(model, adapter_name)
    tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, layer = _hf_key(path)
        value = var.get_value()
        if is_quantized(value):  # a quantized linear no adapter touched
            value = dequantize(value, jnp.float32)
        array = np.asarray(jnp.asarray(value, jnp.float32)).astype(_NUMPY[dtype])
        if layer == -1:
            for i in range(array.shape[0]):
                tensors[key.format(i)] = np.ascontiguousarray(array[i])
        else:
            tensors[key] = array
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = dtype
    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in _COPIED:
        if (src / name).exists():
            shutil.copy2(src / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {"requantized_drift": drift}
