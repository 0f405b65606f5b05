"""``from_pretrained``: a Hugging Face checkpoint -> CausalLM, quantizing linears as they stream."""

from __future__ import annotations

import dataclasses
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..quant import QuantConfig, from_bnb_int8_state, from_bnb_state, is_quantized, quantize
from ._checkpoint import iter_tensor_readers, iter_tensors, release_freed_memory, resolve_checkpoint
from ._config import DecoderConfig
from ._decoder import CausalLM

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # a buffer some older checkpoints carry


def _hf_key(path: tuple) -> tuple[str, int | None]:
    """NNX state path -> (Hugging Face key, or key template with the layer index left out; layer)."""
    if path == ("embed_tokens",):
        return "model.embed_tokens.weight", None
    if path[0] == "layers":
        if isinstance(path[1], int):  # unrolled
            return f"model.layers.{path[1]}." + ".".join(map(str, path[2:])), path[1]
        return "model.layers.{}." + ".".join(map(str, path[1:])), -1  # scanned: stacked over layers
    if path[0] == "norm":
        return "model." + ".".join(map(str, path)), None
    return ".".join(map(str, path)), None


def _is_quantized_linear(key: str, quantization: QuantConfig | None) -> bool:
    """transformers' bitsandbytes loading (4- and 8-bit): every linear of the decoder layers; never
    embeddings or lm_head, nor the modules in ``llm_int8_skip_modules``."""
    if quantization is None or not key.startswith("model.layers.") or not key.endswith("_proj.weight"):
        return False
    skip = quantization.llm_int8_skip_modules or ()
    module = key[: -len(".weight")]
    return not any(re.search(rf"(^|\.){re.escape(s)}(\.|$)", module) for s in skip)


def abstract_model(path_or_hub_id: str | os.PathLike, *, quantization: QuantConfig | None = None,
                   dtype=jnp.float32, scan_layers: bool = True, gradient_checkpointing=None,
                   revision: str | None = None) -> CausalLM:
    """The model ``from_pretrained`` would build, as shapes and dtypes only (``nnx.eval_shape``):
    reads config.json, no tensor. For memory estimates and compile-ahead checks of any size."""
    from transformers import AutoConfig

    ckpt = resolve_checkpoint(path_or_hub_id, revision=revision)
    hf_config = AutoConfig.from_pretrained(ckpt)
    cfg = DecoderConfig.from_hf(hf_config)
    quantization = quantization or _prequantized_config(hf_config)
    kw = dict(dtype=jnp.dtype(dtype), scan_layers=scan_layers, gradient_checkpointing=gradient_checkpointing,
              kernel=quantization.kernel if quantization else "auto",
              compute_dtype=quantization.jnp_compute_dtype if quantization else None)

    def make():
        model = CausalLM(cfg, rngs=nnx.Rngs(0), **kw)
        graphdef, state = nnx.split(model)
        flat = []
        for path, var in nnx.to_flat_state(state):
            key, layer = _hf_key(path)
            if _is_quantized_linear(key.format(0), quantization):
                var = var.replace(quantize(var.get_value(), **quantization.quantize_kwargs(),
                                           batch_dims=1 if layer == -1 else 0))
            flat.append((path, var))
        return nnx.merge(graphdef, nnx.from_flat_state(flat))

    model = nnx.eval_shape(make)
    model.name_or_path = str(path_or_hub_id)
    return model


def from_pretrained(path_or_hub_id: str | os.PathLike, *, quantization: QuantConfig | None = None,
                    dtype=jnp.float32, scan_layers: bool = True, gradient_checkpointing=None,
                    shardings=None, mesh=None, revision: str | None = None) -> CausalLM:
    """Load a Llama / Mistral / Qwen2 / Qwen3 checkpoint as a CausalLM.

    Tensors are read one at a time; with ``quantization`` the decoder layers' linear weights are
    quantized as they arrive (host memory holds one full-precision tensor at a time).

    Args:
      path_or_hub_id: a local checkpoint directory or a hub id (needs network).
      quantization: a QuantConfig, or None for a dense model.
      dtype: dtype of the dense weights and of the activations.
      scan_layers: stack the layers and run them with ``nnx.scan`` (False: an unrolled list).
      gradient_checkpointing: None/False, True, or a ``jax.checkpoint_policies`` name.
      shardings: None, or a function ``(hf_key, value) -> jax.sharding.Sharding | None`` that
        places each leaf as it is built.
      mesh: a ``(data, fsdp, tensor)`` mesh (``qlora_jax.sharding.make_mesh``): each tensor goes
        straight onto its shards by ``qlora_jax.sharding``'s partition rules as it is read (and
        quantized), and the scanned layers are stacked shard by shard, so no device holds more
        than one full tensor at a time. Exclusive with ``shardings``.
      revision: hub revision.
    """
    from transformers import AutoConfig

    if mesh is not None:
        if shardings is not None:
            raise ValueError("from_pretrained takes shardings= or mesh=, not both")
        from ..sharding import leaf_sharding

        shardings = lambda key, value: leaf_sharding(tuple(key.split(".")), value, mesh)  # noqa: E731
    ckpt = resolve_checkpoint(path_or_hub_id, revision=revision)
    hf_config = AutoConfig.from_pretrained(ckpt)
    cfg = DecoderConfig.from_hf(hf_config)
    prequantized = _prequantized_config(hf_config)
    if prequantized is not None:
        _check_matches_stored(ckpt, quantization, prequantized)
        quantization = quantization or prequantized
    dtype = jnp.dtype(dtype)
    kw = dict(dtype=dtype, scan_layers=scan_layers, gradient_checkpointing=gradient_checkpointing,
              kernel=quantization.kernel if quantization else "auto",
              compute_dtype=quantization.jnp_compute_dtype if quantization else None)
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0), **kw))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)

    # Where each checkpoint tensor goes: key -> (position in flat, layer index or None).
    wanted: dict[str, tuple[int, int | None]] = {}
    stack_keys: dict[int, str] = {}  # position of a stacked leaf -> its layer-0 key (for its sharding)
    for i, (path, _) in enumerate(flat):
        key, layer = _hf_key(path)
        if layer == -1:
            stack_keys[i] = key.format(0)
            for li in range(cfg.num_hidden_layers):
                wanted[key.format(li)] = (i, li)
        else:
            wanted[key] = (i, layer)

    values: list = [None] * len(flat)
    stacks: dict[int, list] = {}
    unused = []
    # several processes: each reads only the parts of each tensor its devices hold
    partial = mesh is not None and prequantized is None and jax.process_count() > 1
    tensors = iter_tensor_readers(ckpt) if partial else iter_tensors(ckpt)
    if prequantized is not None:
        tensors = (_bnb_int8_groups(tensors, _torch_dtype(hf_config), quantization.llm_int8_threshold)
                   if prequantized.load_in_8bit else _bnb_groups(tensors))
    for key, array in tensors:
        if key not in wanted:
            if not _IGNORED.match(key) and not (key == "lm_head.weight" and cfg.tie_word_embeddings):
                unused.append(key)
            continue
        i, layer = wanted.pop(key)
        expected = flat[i][1].get_value()
        shape = expected.shape[1:] if (scan_layers and layer is not None) else expected.shape
        if tuple(array.shape) != tuple(shape):
            raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(array.shape)}; the model "
                             f"({cfg.model_type}) expects {tuple(shape)}")
        if partial:
            value = _read_shards(key, array, dtype, quantization if _is_quantized_linear(key, quantization) else None,
                                 mesh)
        elif is_quantized(array):  # stored quantized: used as it is, never requantized
            value = array
        else:
            # already in the model's dtype: a quantized weight is quantized straight from the host
            # buffer (on CPU by the host kernel, no device copy first), another put as it is (a
            # device_put compiles nothing; jnp.asarray staged a program per shape)
            same = isinstance(array, np.ndarray) and array.dtype == dtype
            value = array if same else jnp.asarray(array).astype(dtype)
            if _is_quantized_linear(key, quantization):
                value = quantize(value, **quantization.quantize_kwargs())
            else:
                value = jax.device_put(value)
        if not partial:
            value = _place(value, key, shardings)
        if scan_layers and layer is not None:
            stacks.setdefault(i, [None] * cfg.num_hidden_layers)[layer] = value
        else:
            values[i] = value
        del array, value
        release_freed_memory()
    if wanted:
        missing = sorted(wanted)
        raise ValueError(f"checkpoint {str(ckpt)!r} lacks {len(missing)} tensor(s) the model needs, e.g. "
                         f"{missing[:5]}")
    if unused:
        warnings.warn(f"{len(unused)} checkpoint tensor(s) are not used by the model, e.g. {unused[:5]}",
                      stacklevel=2)
    for i in list(stacks):  # one kind of leaf at a time, so only its per-layer parts are doubled
        values[i] = _stack(stacks.pop(i), stack_keys[i], shardings)
        release_freed_memory()
    new_flat = [(path, var.replace(values[i])) for i, (path, var) in enumerate(flat)]
    model = nnx.merge(graphdef, nnx.from_flat_state(new_flat))
    model.name_or_path = str(path_or_hub_id)  # what PEFT records as base_model_name_or_path
    return model


def _row_ranges(sharding, shape, row_size: int) -> list[tuple[int, int]]:
    """The distinct [first, last) row ranges of a flat leaf (``row_size`` elements per row of the
    logical tensor) that this process's devices hold under ``sharding``."""
    ranges = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        a, b, _ = index[-1].indices(shape[-1])
        ranges.add((a // row_size, -(-b // row_size)))
    return sorted(ranges)


def _read_shards(key: str, reader, dtype, quantization: QuantConfig | None, mesh):
    """One checkpoint tensor as a global array on ``mesh`` by the partition rules, read and (with
    ``quantization``) quantized by this process for its own devices' parts only.

    4-bit weights are split along output features in whole absmax blocks, so each band of rows
    quantizes on its own exactly as inside the whole tensor (``quantize_first_level_checked``: the
    bits ``quantize`` gives); double
    quantization needs every block's absmax (the offset is their mean), so the bands' absmax are
    gathered over the processes (XLA's all-gather, 1/16 of the bf16 bytes) and every process runs
    the same ``quantize_absmax`` on them. The result equals ``quantize`` of the whole tensor bit for
    bit."""
    from ..quant._array import absmax_offset, quantize_absmax, quantize_first_level_checked
    from ..sharding import leaf_sharding

    names = tuple(key.split("."))
    shape = reader.shape
    if quantization is None:
        target = leaf_sharding(names, jax.ShapeDtypeStruct(shape, dtype), mesh)
        return jax.make_array_from_callback(shape, target, lambda index: np.asarray(reader[index]).astype(dtype))
    kw = quantization.quantize_kwargs()
    abstract = jax.eval_shape(lambda x: quantize(x, **kw), jax.ShapeDtypeStruct(shape, dtype))
    target = leaf_sharding(names, abstract, mesh)
    if quantization.load_in_8bit:  # LLM.int8(): rows are independent, each process quantizes its bands
        codes = np.zeros(abstract.codes.shape, np.int8)
        scales = np.zeros(abstract.scales.shape, np.float32)
        held = target.codes.addressable_devices_indices_map(abstract.codes.shape).values()
        for r0, r1 in sorted({index[0].indices(shape[0])[:2] for index in held}):
            band = quantize(jnp.asarray(reader[r0:r1]).astype(dtype), **kw)  # raises on bad values
            codes[r0:r1], scales[r0:r1] = np.asarray(band.codes), np.asarray(band.scales)
        put = lambda full, sharding: jax.make_array_from_callback(full.shape, sharding, lambda i: full[i])  # noqa: E731
        return dataclasses.replace(abstract, codes=put(codes, target.codes), scales=put(scales, target.scales))
    if target.codes.spec == jax.sharding.PartitionSpec():  # kept whole (does not divide): read it all
        return jax.device_put(quantize(jnp.asarray(reader[:]).astype(dtype), **kw), target)
    cols = int(np.prod(shape[1:]))
    codes = np.zeros(abstract.codes.shape, np.uint8)  # this process's bands filled in
    absmax = np.zeros(abstract.absmax.shape, np.float32)
    for r0, r1 in _row_ranges(target.codes, abstract.codes.shape, cols // 2):
        band = jnp.asarray(reader[r0:r1]).astype(dtype)
        c, a, finite = quantize_first_level_checked(band, quant_type=kw["quant_type"], blocksize=kw["blocksize"])
        if not bool(finite):
            raise ValueError(f"checkpoint tensor {key!r} holds non-finite values (rows {r0}..{r1 - 1}); "
                             "expected finite weights")
        codes[r0 * cols // 2:r1 * cols // 2] = np.asarray(c)
        absmax[r0 * cols // kw["blocksize"]:r1 * cols // kw["blocksize"]] = np.asarray(a)
    put = lambda full, sharding: jax.make_array_from_callback(full.shape, sharding, lambda i: full[i])  # noqa: E731
    if not kw["double_quant"]:
        return dataclasses.replace(abstract, codes=put(codes, target.codes), absmax=put(absmax, target.absmax))
    split = put(absmax, target.absmax)  # every process's bands -> the whole absmax on every device
    whole = jax.jit(lambda x: x, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))(split)
    gathered = np.asarray(whole.addressable_data(0))
    qabsmax, absmax2, offset = quantize_absmax(gathered, absmax_offset(gathered),
                                               nested_blocksize=kw["double_quant_blocksize"])
    qabsmax, absmax2, offset = np.asarray(qabsmax), np.asarray(absmax2), np.asarray(offset)
    return dataclasses.replace(abstract, codes=put(codes, target.codes), absmax=put(qabsmax, target.absmax),
                               nested_absmax=put(absmax2, target.nested_absmax), offset=put(offset, target.offset))


def _stack(layers: list, key: str, shardings):
    """The per-layer values stacked on a new leading axis; with ``shardings``, computed shard by
    shard straight into the stacked leaf's sharding."""
    stack = lambda *xs: jax.tree.map(lambda *ys: jnp.stack(ys), *xs)  # noqa: E731
    if shardings is None:
        return stack(*layers)
    target = shardings(key, jax.eval_shape(stack, *layers))
    return stack(*layers) if target is None else jax.jit(stack, out_shardings=target)(*layers)


def _place(value, key, shardings):
    if shardings is None:
        return value
    sharding = shardings(key, value)
    return value if sharding is None else jax.device_put(value, sharding)


def _check_matches_stored(ckpt, quantization: QuantConfig | None, stored: QuantConfig) -> None:
    """A QuantConfig given for a pre-quantized checkpoint must describe what is stored (its
    kernel, compute dtype and LLM.int8() threshold are free: they do not change the weights)."""
    if quantization is None:
        return
    if quantization.load_in_8bit != stored.load_in_8bit or (
            not stored.load_in_8bit and quantization.quantize_kwargs() != stored.quantize_kwargs()):
        what = ("LLM.int8() (load_in_8bit)" if stored.load_in_8bit else
                f"{stored.quant_type}, blocksize {stored.blocksize}, double_quant={stored.double_quant}")
        raise ValueError(f"{str(ckpt)!r} is already quantized ({what}); pass quantization=None or a matching "
                         f"QuantConfig, not {quantization}")


def _torch_dtype(hf_config) -> str:
    """The checkpoint's dtype name (config ``dtype`` / ``torch_dtype``), float16 when unset, as
    transformers' 8-bit loading defaults to."""
    dt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "float16"
    return str(dt).removeprefix("torch.")


def _prequantized_config(hf_config) -> QuantConfig | None:
    """The QuantConfig of a checkpoint transformers saved with bitsandbytes 4- or 8-bit weights."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes":
        raise ValueError(f"quantization_config with quant_method={qc.get('quant_method')!r} is not supported; "
                         "expected a bitsandbytes 4-bit or 8-bit checkpoint")
    if qc.get("load_in_8bit"):
        return QuantConfig(load_in_8bit=True, llm_int8_threshold=float(qc.get("llm_int8_threshold", 6.0)),
                           llm_int8_skip_modules=qc.get("llm_int8_skip_modules"))
    compute = str(qc.get("bnb_4bit_compute_dtype") or "float32").removeprefix("torch.")
    return QuantConfig(quant_type=qc.get("bnb_4bit_quant_type", "fp4"),
                       double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)), compute_dtype=compute,
                       llm_int8_skip_modules=qc.get("llm_int8_skip_modules"))


_BNB_PART = re.compile(r"(.+\.weight)\.(absmax|quant_map|nested_absmax|nested_quant_map|"
                       r"quant_state\.bitsandbytes__(?:nf4|fp4))$")


def _bnb_groups(tensors):
    """Regroup a bitsandbytes 4-bit checkpoint's entries: each weight's packed codes, absmax, maps
    and quant_state become one (key, QuantizedArray); other tensors pass through."""
    pending: dict[str, dict] = {}
    for key, array in tensors:
        m = _BNB_PART.match(key)
        prefix = m.group(1) if m else (key if array.dtype == np.uint8 and key.endswith(".weight") else None)
        if prefix is None:
            yield key, array
            continue
        group = pending.setdefault(prefix, {})
        group[key] = array
        qs = [k for k in group if ".quant_state." in k]
        needed = {prefix, f"{prefix}.absmax", f"{prefix}.quant_map"}
        if qs and b"nested_offset" in np.asarray(group[qs[0]]).tobytes():
            needed |= {f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map"}
        if qs and needed <= group.keys():
            yield prefix, from_bnb_state(pending.pop(prefix), prefix=prefix)
    if pending:
        raise ValueError(f"incomplete bitsandbytes 4-bit entries for {sorted(pending)[:5]}: each quantized weight "
                         "needs its codes, absmax, quant_map and quant_state (and nested_* with double quantization)")


_INT8_PART = re.compile(r"(.+\.)(weight|SCB|weight_format)$")


def _bnb_int8_groups(tensors, dtype: str, threshold: float):
    """Regroup a transformers 8-bit checkpoint's entries: each int8 ``weight`` with its ``SCB``
    and ``weight_format`` (absent in older checkpoints: "row", as bitsandbytes assumes) becomes one
    (key, Int8Array); other tensors pass through."""
    pending: dict[str, dict] = {}
    for key, array in tensors:
        m = _INT8_PART.match(key)
        if m is None or (m.group(2) == "weight" and array.dtype != np.int8):
            yield key, array
            continue
        module, part = m.groups()
        group = pending.setdefault(module, {})
        group[part] = array
        if {"weight", "SCB", "weight_format"} <= group.keys():
            g = pending.pop(module)
            yield module + "weight", from_bnb_int8_state(g["weight"], g["SCB"], g["weight_format"], dtype=dtype,
                                                         threshold=threshold)
    for module, g in pending.items():
        if {"weight", "SCB"} <= g.keys():
            yield module + "weight", from_bnb_int8_state(g["weight"], g["SCB"], g.get("weight_format"), dtype=dtype,
                                                         threshold=threshold)
    incomplete = sorted(m for m, g in pending.items() if not {"weight", "SCB"} <= g.keys())
    if incomplete:
        raise ValueError(f"incomplete bitsandbytes 8-bit entries for {incomplete[:5]}: each int8 weight needs its "
                         "int8 'weight' and fp32 'SCB'")
