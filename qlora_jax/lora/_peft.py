"""PEFT's adapter directory format: adapter_config.json + adapter_model.safetensors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from ._config import LoraConfig
from ._inject import apply_lora, linear_modules, lora_configs, set_adapter
from ._layers import LoraLinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_VERSION = "0.22.0"

# Every field peft 0.22.0's LoraConfig writes, with its defaults; ours are set over them.
_PEFT_DEFAULTS = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "astra_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_VERSION, "qalora_group_size": 16, "r": 8,
    "rank_pattern": {}, "revision": None, "target_modules": None, "target_parameters": None,
    "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}
# Fields whose non-default values would change the adapter's meaning: refused on load.
_UNSUPPORTED = ("use_dora", "use_qalora", "lora_bias", "fan_in_fan_out", "layer_replication", "alpha_pattern",
                "rank_pattern", "exclude_modules", "target_parameters", "trainable_token_indices", "modules_to_save")


def _adapter_slots(model, adapter_name):
    """(PEFT key prefix, adapter, layer index or None) for every place the adapter applies."""
    slots = []
    for path, (node, names) in linear_modules(model).items():
        if not isinstance(node, LoraLinear) or adapter_name not in node.lora:
            continue
        ad = node.lora[adapter_name]
        mask = None if ad.layer_mask is None else np.asarray(ad.layer_mask[...])
        for layer, name in names:
            stacked = model.scan_layers and path[0] == "layers"
            if mask is not None and not mask[layer]:
                continue
            slots.append((f"base_model.model.{name}", ad, layer if stacked else None))
    return slots


def save_adapter(model, path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write the adapter as PEFT's ``save_pretrained`` does (keys without the adapter name,
    lora_A [r, in] and lora_B [out, r], the adapter's dtype), atomically: a half-written
    directory never replaces a good one."""
    configs = lora_configs(model)
    names = sorted(configs)
    adapter_name = adapter_name or ("default" if "default" in names else (names[0] if names else None))
    if adapter_name not in names:
        raise ValueError(f"adapter_name={adapter_name!r} is not on this model; adapters: {names}")
    config = configs[adapter_name]
    tensors = {}
    for prefix, ad, layer in _adapter_slots(model, adapter_name):
        for part in ("lora_A", "lora_B"):
            w = np.asarray(getattr(ad, part)[...])
            tensors[f"{prefix}.{part}.weight"] = np.ascontiguousarray(w if layer is None else w[layer])
    meta = dict(_PEFT_DEFAULTS)
    targets = config.target_modules
    meta.update(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias=config.bias,
                use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
                target_modules=targets if isinstance(targets, str) or targets is None else sorted(targets),
                layers_to_transform=list(config.layers_to_transform) if config.layers_to_transform else None,
                base_model_name_or_path=getattr(model, "name_or_path", None))
    if meta["target_modules"] is None:
        from ._inject import DEFAULT_TARGETS

        meta["target_modules"] = sorted(DEFAULT_TARGETS[model.config.model_type])
    path = Path(path)
    existed, tmp = path.exists(), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        path.mkdir(exist_ok=True)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(tmp / name, path / name)
    except Exception as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not existed:
            shutil.rmtree(path, ignore_errors=True)
        error = _write_error(path, e, existed)
        if error is None:
            raise
        raise error from e
    tmp.rmdir()
    return path


def _write_error(path: Path, error: Exception, existed: bool) -> OSError | None:
    """A failed ``save_adapter`` write as an OSError saying what happened and that nothing was left half-written
    (safetensors reports a full disk as a SafetensorError, not an OSError); None for errors that are not I/O."""
    from ..checkpoint import is_disk_full

    kept = "; the adapter already there is unchanged" if existed else ""
    if is_disk_full(error):
        return OSError(errno.ENOSPC, f"the disk is full (no space left on device) while writing the adapter to "
                                     f"{path}; nothing was written there{kept}. Free some space and save again.")
    if isinstance(error, OSError):
        return OSError(error.errno, f"writing the adapter to {path} failed ({error}); nothing was written there{kept}")
    return None


def read_adapter_config(path: str | os.PathLike) -> LoraConfig:
    file = Path(path) / CONFIG_NAME
    if not file.exists():
        raise ValueError(f"{str(path)!r} has no {CONFIG_NAME}; expected a PEFT adapter directory")
    meta = json.loads(file.read_text())
    if meta.get("peft_type") != "LORA":
        raise ValueError(f"peft_type={meta.get('peft_type')!r} in {str(file)!r} is not supported; expected 'LORA'")
    for key in _UNSUPPORTED:
        if key in meta and meta[key] not in (None, False, {}, []):
            raise ValueError(f"{key}={meta[key]!r} in {str(file)!r} is not supported")
    return LoraConfig(r=meta["r"], lora_alpha=meta["lora_alpha"], lora_dropout=meta.get("lora_dropout", 0.0),
                      target_modules=meta.get("target_modules"), bias=meta.get("bias", "none"),
                      use_rslora=meta.get("use_rslora", False), init_lora_weights=meta.get("init_lora_weights", True)
                      if meta.get("init_lora_weights") in (True, False, "gaussian") else True,
                      layers_to_transform=meta.get("layers_to_transform"))


def load_adapter(model, path: str | os.PathLike, adapter_name: str = "default"):
    """Load a PEFT LoRA adapter directory (written by PyTorch's ``PeftModel.save_pretrained`` or by
    ``save_adapter``) onto ``model`` under ``adapter_name``; changes the model in place and returns
    it. The first adapter loaded becomes the active one; switch with ``set_adapter``."""
    from safetensors import safe_open

    config = read_adapter_config(path)
    first = not lora_configs(model)
    apply_lora(model, config, adapter_name=adapter_name)
    weights = Path(path) / WEIGHTS_NAME
    with safe_open(weights, "numpy") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    for prefix, ad, layer in _adapter_slots(model, adapter_name):
        for part in ("lora_A", "lora_B"):
            key = f"{prefix}.{part}.weight"
            if key not in stored:
                raise ValueError(f"{str(weights)!r} lacks {key!r}, which the adapter config targets on this model")
            value = stored.pop(key)
            var = getattr(ad, part)
            current = var.get_value()
            expected = current.shape if layer is None else current.shape[1:]
            if value.shape != expected:
                raise ValueError(f"adapter tensor {key!r} has shape {value.shape}; this model expects {expected} "
                                 "(an adapter trained on another base?)")
            value = jnp.asarray(value, current.dtype)
            var.set_value(value if layer is None else current.at[layer].set(value))
    if stored:
        raise ValueError(f"{len(stored)} adapter tensor(s) match no module of this model, e.g. {sorted(stored)[:3]} "
                         "(an adapter for another architecture?)")
    if first:
        set_adapter(model, adapter_name)
    return model
