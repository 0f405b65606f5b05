"""``save_quantized``: a quantized base written as the bitsandbytes checkpoint transformers writes.

A 4-bit base becomes the entries of ``Linear4bit`` (packed codes, absmax, quant maps, nested state
and the quant_state JSON, ``to_bnb_state``), an 8-bit base those of ``Linear8bitLt`` (int8
``weight``, ``SCB``, ``weight_format``); config.json carries the ``quantization_config`` that
``BitsAndBytesConfig`` writes, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads it back
quantized, as does ``qlora_jax.from_pretrained`` (without requantizing). Adapters are not part
of it (``save_adapter`` writes them). The directory is written in a temporary sibling and moved
into place, so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from ..quant import Int8Array, QuantizedArray, is_quantized, to_bnb_int8_state, to_bnb_state
from ._checkpoint import resolve_checkpoint
from ._loading import _hf_key

_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
           "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt")


def _base_state(model):
    """(path, value) of every base parameter: adapters left out, wrapped linears unwrapped."""
    from ..lora import LoraParam

    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if isinstance(var, LoraParam) or "lora" in path:
            continue
        yield tuple(p for p in path if p != "base_layer"), var.get_value()


def _entries(key: str, layer, value) -> dict[str, np.ndarray]:
    """The checkpoint entries of one leaf (a stacked leaf: one set per layer)."""
    if layer == -1:  # stacked over layers: one checkpoint tensor per layer
        count = value.batch_shape[0] if is_quantized(value) else value.shape[0]
        out = {}
        for i in range(count):
            one = dataclasses.replace(value, **_index(value, i)) if is_quantized(value) else value[i]
            out.update(_entries(key.format(i), None, one))
        return out
    if isinstance(value, Int8Array):
        return to_bnb_int8_state(value, key)
    if isinstance(value, QuantizedArray):
        return to_bnb_state(value, key)
    return {key: np.asarray(value)}


def _index(q, i: int) -> dict:
    leaves = ("codes", "scales") if isinstance(q, Int8Array) else ("codes", "absmax", "nested_absmax", "offset")
    return {f: None if getattr(q, f) is None else getattr(q, f)[i] for f in leaves}


def _quantization_config(weights: list, compute_dtype) -> dict:
    """``BitsAndBytesConfig(...).to_dict()`` for the model's quantized weights (one format)."""
    from transformers import BitsAndBytesConfig

    kinds = {(type(w).__name__, w.quant_type, getattr(w, "blocksize", None), getattr(w, "nested_blocksize", None),
              getattr(w, "threshold", None)) for w in weights}
    if len(kinds) != 1:
        raise ValueError(f"the model's quantized weights have {len(kinds)} formats {sorted(map(str, kinds))}; a "
                         "transformers checkpoint holds one")
    w = weights[0]
    if isinstance(w, Int8Array):
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=w.threshold).to_dict()
    if w.blocksize != 64 or w.nested_blocksize not in (None, 256):
        raise ValueError(f"transformers' 4-bit checkpoints use blocksize 64 (nested 256); this model has "
                         f"{w.blocksize} / {w.nested_blocksize}")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=w.quant_type,
                              bnb_4bit_use_double_quant=w.double_quant,
                              bnb_4bit_compute_dtype=jnp.dtype(compute_dtype or w.dtype).name).to_dict()


def save_quantized(model, output_dir: str | os.PathLike, *, source: str | os.PathLike | None = None) -> Path:
    """Write ``model``'s quantized base to ``output_dir`` as transformers writes a bitsandbytes
    checkpoint (module doc): model.safetensors, config.json with ``quantization_config``, and the
    tokenizer files of ``source`` (default: the checkpoint the model was loaded from)."""
    src = resolve_checkpoint(source or getattr(model, "name_or_path", None) or "")
    tensors: dict[str, np.ndarray] = {}
    quantized = []
    dense_dtype = None
    for path, value in _base_state(model):
        key, layer = _hf_key(path)
        if is_quantized(value):
            quantized.append(value)
        elif key.endswith("embed_tokens.weight"):
            dense_dtype = jnp.dtype(value.dtype).name
        tensors.update(_entries(key, layer, value))
    if not quantized:
        raise ValueError("the model holds no quantized weight; save a dense model with save_merged or "
                         "transformers' save_pretrained")
    config = json.loads((src / "config.json").read_text())
    from ._layers import Linear

    compute = next((n.compute_dtype for _, n in nnx.iter_graph(model) if isinstance(n, Linear)), None)
    config["quantization_config"] = _quantization_config(quantized, compute)
    if dense_dtype is not None:
        config["dtype"] = dense_dtype
        config.pop("torch_dtype", None)
    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for name in _COPIED:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
