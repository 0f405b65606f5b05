"""Injecting adapters into a loaded model by module surgery, selected by target rules on Hugging
Face module names, whatever the internal layout (scanned stacks or unrolled layers)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models._layers import Linear
from ._config import LoraConfig
from ._layers import LoraAdapter, LoraLayerMask, LoraLinear

# PEFT's defaults when target_modules is None (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
DEFAULT_TARGETS = {"llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
                   "qwen3": ("q_proj", "v_proj")}


def _hf_names(model, path) -> list[tuple[int | None, str]]:
    """(layer index or None, Hugging Face module name) for a module path of the model."""
    if path[0] == "layers":
        if model.scan_layers:
            rest = ".".join(map(str, path[1:]))
            return [(i, f"model.layers.{i}.{rest}") for i in range(model.config.num_hidden_layers)]
        return [(path[1], f"model.layers.{path[1]}." + ".".join(map(str, path[2:])))]
    if path[0] == "lm_head":
        return [(None, "lm_head")]
    return [(None, "model." + ".".join(map(str, path)))]


def linear_modules(model):
    """{module path: (linear, [(layer, hf_name), ...])} for every base linear of the model
    (already-wrapped ones included, through their ``base_layer``)."""
    found = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, LoraLinear):
            found[tuple(path)] = (node, _hf_names(model, tuple(path)))
        elif isinstance(node, Linear) and not (path and path[-1] == "base_layer"):
            found[tuple(path)] = (node, _hf_names(model, tuple(path)))
    return found


def _matches(config: LoraConfig, name: str, model_type: str, layer: int | None) -> bool:
    targets = config.target_modules if config.target_modules is not None else DEFAULT_TARGETS[model_type]
    if config.layers_to_transform is not None and (layer is None or layer not in config.layers_to_transform):
        return False
    if targets == "all-linear":
        return name != "lm_head"
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _get(model, path):
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def _set(model, path, value):
    parent = _get(model, path[:-1])
    setattr(parent, path[-1], value)


def _make_adapter(linear, config, key, stack, dtype):
    out_f, in_f = linear.weight.get_value().shape[-2:]
    kw = dict(r=config.r, scaling=config.scaling, dropout=config.lora_dropout, init=config.init_lora_weights,
              dtype=dtype)
    if stack is None:
        return LoraAdapter(in_f, out_f, rngs=nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 1)), **kw)

    @nnx.split_rngs(splits=stack)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return LoraAdapter(in_f, out_f, rngs=rngs, **kw)

    return make(nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 1)))


def apply_lora(model, config: LoraConfig, seed: int = 0, adapter_name: str = "default", dtype=jnp.float32):
    """Add a LoRA adapter to every linear that ``config`` targets; changes ``model`` in place and
    returns it. A second call with another ``adapter_name`` adds another adapter beside the first
    (switch with ``set_adapter``). Adapter weights are kept in ``dtype`` (fp32 master weights)."""
    model_type = model.config.model_type
    selected = []
    every = {}
    for path, (node, names) in linear_modules(model).items():
        every[path] = names
        layers = [layer for layer, name in names if _matches(config, name, model_type, layer)]
        if layers:
            selected.append((path, node, names, layers))
    if not selected:
        names = sorted({name.split(".")[-1] for names in every.values() for _, name in names})
        raise ValueError(f"target_modules={config.target_modules!r} (layers_to_transform="
                         f"{config.layers_to_transform}) matches no linear module of this {model_type} model; "
                         f"its linear modules are named {names}, e.g. "
                         f"{[n for names in every.values() for _, n in names][:3]}")
    root = jax.random.key(seed)
    for k, (path, node, names, layers) in enumerate(selected):
        stacked = model.scan_layers and path[0] == "layers"
        base = node.base_layer if isinstance(node, LoraLinear) else node
        adapter = _make_adapter(base, config, jax.random.fold_in(root, k),
                                model.config.num_hidden_layers if stacked else None, dtype)
        if stacked and len(layers) < len(names):
            mask = np.zeros(len(names), np.float32)
            mask[layers] = 1.0
            adapter.layer_mask = LoraLayerMask(jnp.asarray(mask))
        if isinstance(node, LoraLinear):
            if adapter_name in node.lora:
                raise ValueError(f"adapter_name={adapter_name!r} already exists on {names[0][1]}; pick another name")
            node.lora[adapter_name] = adapter
        else:
            _set(model, path, LoraLinear(node, {adapter_name: adapter}, adapter_name))
    # static metadata of the model's graph, so hashable: (name, config) pairs
    model.lora_configs = tuple(sorted({**lora_configs(model), adapter_name: config}.items()))
    return model


def lora_configs(model) -> dict:
    """{adapter name: LoraConfig} of the adapters applied to ``model``."""
    return dict(getattr(model, "lora_configs", ()))


def lora_modules(model):
    return [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, LoraLinear)]


def set_adapter(model, adapter_name: str | None):
    """Make ``adapter_name`` the active adapter of every LoRA layer that has it (None: base only)."""
    mods = lora_modules(model)
    if adapter_name is not None and not any(adapter_name in m.lora for _, m in mods):
        known = sorted({n for _, m in mods for n in m.lora})
        raise ValueError(f"adapter_name={adapter_name!r} is not loaded; loaded adapters: {known}")
    for _, m in mods:
        m.active_adapter = adapter_name if adapter_name is None or adapter_name in m.lora else None
    return model


def _merged_weight(m: LoraLinear, name, dtype):
    from ..quant import dequantize, is_quantized

    w = m.base_layer.weight.get_value()
    w = dequantize(w, dtype) if is_quantized(w) else w
    if name is not None and name in m.lora:
        ad = m.lora[name]
        a, b = ad.lora_A[...].astype(jnp.float32), ad.lora_B[...].astype(jnp.float32)
        delta = jnp.matmul(b, a) * ad.scaling
        if ad.layer_mask is not None:
            delta = delta * ad.layer_mask[...][:, None, None]
        w = (w.astype(jnp.float32) + delta).astype(dtype)
    return w


def merge_adapters(model, adapter_name: str | None = None, *, keep_adapters: bool = False):
    """Fold the active (or named) adapter into dense base weights: the base is dequantized to the
    model's dtype, never re-quantized (a re-quantized merge loses quality, peft#2321). Changes
    ``model`` in place and returns it.

    ``keep_adapters=False`` (PEFT's ``merge_and_unload``) removes the adapters. ``True`` (PEFT's
    ``merge_adapter``) keeps them, and the original base weight, so that ``unmerge_adapters``
    restores the model exactly (PEFT's unmerge subtracts, which on a 4-bit base re-quantizes)."""
    from ._layers import UnmergedWeight

    for path, m in lora_modules(model):
        if m.unmerged_weight is not None:
            raise ValueError(f"{path} is already merged; unmerge_adapters first")
        merged = _merged_weight(m, adapter_name or m.active_adapter, model.dtype)
        if keep_adapters:
            m.unmerged_weight = UnmergedWeight(m.base_layer.weight.get_value())
            m.base_layer.weight = nnx.Param(merged)
        else:
            m.base_layer.weight = nnx.Param(merged)
            _set(model, path, m.base_layer)
    return model


def unmerge_adapters(model):
    """Undo ``merge_adapters(..., keep_adapters=True)``: the original base weights come back as they
    were (bit for bit) and the adapters run separately again."""
    count = 0
    for _, m in lora_modules(model):
        if m.unmerged_weight is not None:
            m.base_layer.weight = nnx.Param(m.unmerged_weight.get_value())
            m.unmerged_weight = None
            count += 1
    if not count:
        raise ValueError("no merged adapter to unmerge (merge_adapters(..., keep_adapters=True) merges reversibly)")
    return model
