"""bitsandbytes as ground truth: thin helpers the parity tests share."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default import ops as default_ops

from qlora_jax.compare import nested_code_mismatch, nested_scaled  # noqa: F401  (tests import it from here)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_jax(t: torch.Tensor):
    """The same values, bit for bit, as a JAX array of the same dtype."""
    name = str(t.dtype).removeprefix("torch.")
    return jnp.asarray(t.float().numpy()).astype(JAX_DTYPES[name])


def random_tensor(shape, dtype: str, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(TORCH_DTYPES[dtype])


def bnb_quantize(t: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool, nested_blocksize=256):
    """bitsandbytes' 4-bit state as numpy: codes, first-level absmax, and the nested state."""
    packed, st = F.quantize_4bit(t, blocksize=blocksize, compress_statistics=False, quant_type=quant_type)
    out = {"codes": packed.numpy().reshape(-1), "absmax": st.absmax.numpy(), "state": st, "packed": packed}
    if double_quant:
        offset = st.absmax.mean()
        qabsmax, st2 = F.quantize_blockwise(st.absmax - offset, blocksize=nested_blocksize)
        out.update(qabsmax=qabsmax.numpy(), absmax2=st2.absmax.numpy(), offset=np.float32(offset.item()))
        # the same through quantize_4bit itself, so the test covers bitsandbytes' public entry point
        packed_dq, st_dq = F.quantize_4bit(t, blocksize=blocksize, compress_statistics=True, quant_type=quant_type)
        assert nested_blocksize != 256 or np.array_equal(st_dq.absmax.numpy(), out["qabsmax"])
        out["state_dq"], out["packed_dq"] = st_dq, packed_dq
    return out


def bnb_dequantize_reference(packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int,
                             shape, dtype: torch.dtype) -> np.ndarray:
    """bitsandbytes' pure-torch dequantization (its default backend, the semantics CUDA shares)."""
    code = F.get_4bit_type(quant_type, device="cpu")
    fn = getattr(default_ops._dequantize_4bit_compute, "__wrapped__", default_ops._dequantize_4bit_compute)
    out = fn(packed.reshape(-1), absmax.float(), code, blocksize, tuple(shape), dtype)
    return out.reshape(tuple(shape)).float().numpy()


def assert_nested_codes_match(ours, theirs, scaled) -> None:
    """Nested codes agree except where bitsandbytes' CPU lookup table picks the neighbouring code.

    Our rule is bitsandbytes' CUDA one (nearest code). Its CPU kernel indexes a 65536-entry table,
    so values within one table step of a midpoint between two codes may take the other one. Any
    disagreement must be by exactly one code, at such a near-midpoint value
    (``qlora_jax.compare.nested_code_mismatch``, the comparison report's rule too).
    """
    reason = nested_code_mismatch(ours, theirs, scaled)
    assert reason is None, reason
    diff = np.asarray(ours).reshape(-1) != np.asarray(theirs).reshape(-1)
    # Near-midpoint values are rare (about 0.2% of codes on random weights); on a sample large
    # enough to measure, a larger share would mean a systematic difference, not lookup-table steps.
    assert diff.size < 1000 or diff.mean() < 0.01, f"{diff.mean():.2%} of nested codes differ"


def hf_model_on_our_base(model, checkpoint, **kwargs):
    """transformers' model of ``checkpoint`` with every quantized linear replaced by our
    dequantization of it (fp32): the reference that NF4 model and LoRA parity tests run against."""
    import transformers

    import qlora_jax
    from qlora_jax.lora import LoraLinear, linear_modules

    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager", **kwargs)
    state = hf.state_dict()
    with torch.no_grad():
        for path, (node, names) in linear_modules(model).items():
            linear = node.base_layer if isinstance(node, LoraLinear) else node
            w = linear.weight.get_value()
            if not isinstance(w, qlora_jax.QuantizedArray):
                continue
            w = np.asarray(qlora_jax.dequantize(w, jnp.float32))
            for layer, name in names:
                stacked = model.scan_layers and path[0] == "layers"
                state[name + ".weight"].copy_(torch.from_numpy(np.ascontiguousarray(w[layer] if stacked else w)))
    return hf


def write_reverse_task(root):
    """A tiny Llama checkpoint and 64 "reverse abcd:" -> " dcba" records (JSONL) under ``root``:
    the trainer and fault tests' run. Returns (checkpoint, data file)."""
    import json

    from qlora_jax.models import write_tiny_checkpoint

    base = write_tiny_checkpoint(root / "base", "llama", num_hidden_layers=2)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(64):
        word = "".join(rng.choice(list("abcdef"), 4))
        rows.append({"prompt": f"reverse {word}:", "completion": f" {word[::-1]}"})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return base, data


def write_count_task(root):
    """A tiny random Llama and 80 "count i:" -> " 0 1 ..." records (JSONL) under ``root``: the
    multi-device and multi-process trainer runs. Returns (checkpoint, data file)."""
    import json

    from qlora_jax.models import write_tiny_llama

    base = write_tiny_llama(root / "tiny")
    rows = [{"prompt": f"count {i}:", "completion": " " + " ".join(str(j) for j in range(i % 7 + 1))}
            for i in range(80)]
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return base, data
