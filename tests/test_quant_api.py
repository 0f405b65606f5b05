"""The quantization API without the reference library: errors, jit, pytrees, whole trees, storage."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax
from qlora_jax.quant import QuantizedArray, dequantize_params, quantize_params, storage_report


def _w(shape=(64, 128), dtype=jnp.bfloat16, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,needle", [
    ({"quant_type": "int4"}, "quant_type='int4'"),
    ({"quant_type": "NF4"}, "quant_type='NF4'"),
    ({"blocksize": 48}, "blocksize=48"),
    ({"blocksize": 16}, "blocksize=16"),
    ({"double_quant_blocksize": 32}, "double_quant_blocksize=32"),
    ({"batch_dims": 3}, "batch_dims=3"),
])
def test_bad_arguments_name_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("[", r"\[")) as e:
        qlora_jax.quantize(_w(), **kwargs)
    assert "expected" in str(e.value) or "allows" in str(e.value) or "out of range" in str(e.value)


@pytest.mark.parametrize("x", [jnp.ones((4, 64), jnp.int32), np.ones((4, 64), np.uint8),
                               np.ones((4, 64), np.complex64), np.ones((4, 64), np.float64)],
                         ids=["int32", "uint8", "complex64", "float64"])
def test_unsupported_dtypes(x):
    with pytest.raises(ValueError, match=f"dtype {np.dtype(x.dtype).name} is not supported"):
        qlora_jax.quantize(x)


def test_blocksize_unchecked_when_double_quant_off():
    q = qlora_jax.quantize(_w(), double_quant=False, double_quant_blocksize=7)
    assert q.nested_blocksize is None and q.offset is None and q.nested_absmax is None


def test_non_finite_rejected_eagerly():
    x = np.asarray(_w(dtype=jnp.float32)).copy()
    x[3, 5] = np.nan
    x[10, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 NaN/inf element\(s\), the first at index \(3, 5\)"):
        qlora_jax.quantize(x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("shape,index,batch_dims", [
    ((10, 70), (0, 0), 0), ((10, 70), (9, 69), 0),  # 700 elements: the short last block's last one
    ((7, 9), (6, 8), 0),  # one short block
    ((3, 10, 70), (1, 9, 65), 1), ((3, 10, 70), (2, 4, 4), 1)])  # stacked: a slice's short last block
def test_each_non_finite_element_is_found(bad, shape, index, batch_dims):
    """A single NaN or inf anywhere, a short last block included (whose stored absmax is clamped,
    so the check reads its elements), is reported with its index."""
    x = np.asarray(_w(shape, dtype=jnp.float32)).copy()
    x[index] = bad
    with pytest.raises(ValueError, match=rf"1 NaN/inf element\(s\), the first at index {re.escape(str(index))}"):
        qlora_jax.quantize(x, batch_dims=batch_dims)
    x[index] = 0.5
    qlora_jax.quantize(x, batch_dims=batch_dims)  # finite: no error


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_under_jit_propagates_like_bitsandbytes(bad):
    """Under jit nothing can raise: a NaN or inf poisons its block's absmax (and, double-quantized,
    the offset and so every block), as it does in bitsandbytes: the corruption stays visible."""
    x = np.asarray(_w(dtype=jnp.float32)).copy()
    x[0, 0] = bad
    f = jax.jit(lambda a: qlora_jax.dequantize(qlora_jax.quantize(a, double_quant=False)))
    out = np.asarray(f(x))
    assert not np.isfinite(out[0, :64]).any() and np.isfinite(out[0, 64:]).all()
    g = jax.jit(lambda a: qlora_jax.dequantize(qlora_jax.quantize(a)))
    assert not np.isfinite(np.asarray(g(x))).any()


def test_empty_tensor_rejected():
    with pytest.raises(ValueError, match="empty tensor"):
        qlora_jax.quantize(jnp.zeros((0, 64)))


def _replace(q, **kw):
    import dataclasses
    return dataclasses.replace(q, **kw)


@pytest.mark.parametrize("broken,needle", [
    (lambda q: _replace(q, codes=q.codes[:-1]), "QuantizedArray.codes is uint8"),
    (lambda q: _replace(q, codes=q.codes.astype(jnp.int8)), "QuantizedArray.codes is int8"),
    (lambda q: _replace(q, absmax=q.absmax.astype(jnp.float32)), "QuantizedArray.absmax is float32"),
    (lambda q: _replace(q, nested_absmax=None), "nested_absmax is missing"),
    (lambda q: _replace(q, offset=jnp.zeros((2,), jnp.float32)), "QuantizedArray.offset is float32\\[2\\]"),
    (lambda q: _replace(q, logical_shape=(64, 64)), "for logical shape \\(64, 64\\)"),
    (lambda q: _replace(q, blocksize=100), "blocksize=100"),
    (lambda q: _replace(q, quant_type="nf3"), "quant_type='nf3'"),
    (lambda q: _replace(q, nested_blocksize=None), "without double quantization has a nested_absmax"),
])
def test_inconsistent_leaves_rejected_by_dequantize(broken, needle):
    q = broken(qlora_jax.quantize(_w()))
    with pytest.raises(ValueError, match=needle):
        qlora_jax.dequantize(q)


def test_dequantize_rejects_bad_dtype_and_non_quantized():
    q = qlora_jax.quantize(_w())
    with pytest.raises(ValueError, match="dtype int8 is not supported"):
        qlora_jax.dequantize(q, jnp.int8)
    with pytest.raises(ValueError, match="expected a QuantizedArray"):
        qlora_jax.dequantize(_w())


# ------------------------------------------------------------------------------ jit and pytrees


@pytest.mark.parametrize("shape", [(96, 160), (1100, 2048)])
def test_quantize_and_dequantize_under_jit_match_eager(shape):
    """Eagerly the double-quantization offset is summed on the host (numpy), under jit by XLA:
    the same bits, for short and long (35200-block) absmax vectors alike."""
    x = _w(shape)
    q_eager = qlora_jax.quantize(x)
    q_jit = jax.jit(qlora_jax.quantize)(x)
    for a, b in zip(jax.tree.leaves(q_eager), jax.tree.leaves(q_jit)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(jax.jit(qlora_jax.dequantize)(q_jit)), np.asarray(qlora_jax.dequantize(q_eager)))


def test_pytree_structure():
    q = qlora_jax.quantize(_w())
    leaves, treedef = jax.tree.flatten(q)
    assert [leaf.dtype for leaf in leaves] == [jnp.uint8, jnp.uint8, jnp.float32, jnp.float32]
    assert jax.tree.unflatten(treedef, leaves).logical_shape == (64, 128)
    q2 = qlora_jax.quantize(_w(), double_quant=False)
    assert len(jax.tree.leaves(q2)) == 2
    assert jax.tree.structure(q) != jax.tree.structure(q2)  # static metadata is part of the treedef


def test_dequantize_default_and_explicit_dtype():
    x = _w(dtype=jnp.float16)
    q = qlora_jax.quantize(x)
    assert qlora_jax.dequantize(q).dtype == jnp.float16 and q.dequantize().shape == x.shape
    assert qlora_jax.dequantize(q, jnp.float32).dtype == jnp.float32
    # bf16 output is the fp32 value rounded once
    np.testing.assert_array_equal(np.asarray(qlora_jax.dequantize(q, jnp.bfloat16)),
                                  np.asarray(qlora_jax.dequantize(q, jnp.float32).astype(jnp.bfloat16)))


def test_quantization_error_is_bounded_by_half_the_largest_gap():
    """The error per element is at most half the largest gap between NF4 codes (-1 to -0.696)
    times the block absmax."""
    from qlora_jax.quant._tables import NF4_CODE

    x = np.asarray(_w((256, 256), jnp.float32))
    q = qlora_jax.quantize(jnp.asarray(x), double_quant=False)
    err = np.abs(np.asarray(qlora_jax.dequantize(q)) - x).reshape(-1, 64)
    bound = np.diff(NF4_CODE).max() / 2 * np.abs(x).reshape(-1, 64).max(axis=1, keepdims=True)
    assert np.all(err <= bound * (1 + 1e-6))


def test_stacked_under_vmap_equals_batch_dims():
    x = _w((4, 64, 96))
    a = qlora_jax.quantize(x, batch_dims=1)
    b = jax.vmap(qlora_jax.quantize)(x)
    for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    assert b.shape == (4, 64, 96) and b.logical_shape == (64, 96)


def test_memory_stays_linear_in_the_input():
    """No [N, 16] broadcast against the code table: the compiled quantize needs a few bytes of
    scratch per element (codes, scaled values), not the 64 bytes a 16-way fp32 compare would."""
    n = 1 << 22
    x = jax.ShapeDtypeStruct((n,), jnp.bfloat16)
    compiled = jax.jit(qlora_jax.quantize).lower(x).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 8 * n, f"quantize of {n} bf16 values uses {temp / n:.1f} scratch bytes per element"
    q = jax.eval_shape(qlora_jax.quantize, x)
    compiled = jax.jit(qlora_jax.dequantize).lower(q).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 8 * n


# ----------------------------------------------------------------------------- trees and storage


def _llama_shapes(hidden, inter, layers, vocab, kv_heads, heads, dtype=jnp.bfloat16):
    head_dim = hidden // heads
    layer = {
        "input_layernorm": {"weight": (hidden,)},
        "post_attention_layernorm": {"weight": (hidden,)},
        "self_attn": {"q_proj": {"weight": (hidden, hidden)}, "k_proj": {"weight": (kv_heads * head_dim, hidden)},
                      "v_proj": {"weight": (kv_heads * head_dim, hidden)}, "o_proj": {"weight": (hidden, hidden)}},
        "mlp": {"gate_proj": {"weight": (inter, hidden)}, "up_proj": {"weight": (inter, hidden)},
                "down_proj": {"weight": (hidden, inter)}},
    }
    tree = {"model": {"embed_tokens": {"weight": (vocab, hidden)}, "norm": {"weight": (hidden,)},
                      "layers": {str(i): layer for i in range(layers)}},
            "lm_head": {"weight": (vocab, hidden)}}
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), tree, is_leaf=lambda s: isinstance(s, tuple))


@pytest.mark.parametrize("name,dims", [
    ("llama2-7b", (4096, 11008, 32, 32000, 32, 32)),
    ("llama2-70b", (8192, 28672, 80, 32000, 8, 64)),
])
def test_storage_of_7b_and_70b_trees(name, dims):
    """eval_shape only: no memory is spent on the 7B or 70B weights."""
    shapes = _llama_shapes(*dims)
    for double_quant, bits in ((True, 4 + 8 / 64 + 32 / (64 * 256)), (False, 4.5)):
        qtree = jax.eval_shape(lambda t: quantize_params(t, double_quant=double_quant), shapes)
        report = storage_report(qtree)
        assert abs(report.quantized_bits_per_param - bits) / bits < 0.01, (name, report.quantized_bits_per_param)
        linear = sum(x.size for x in jax.tree.leaves(shapes) if x.ndim == 2) - 2 * dims[3] * dims[0]
        assert report.quantized_params == linear
        assert report.num_quantized_tensors == 7 * dims[2]
    assert report.total_params == sum(x.size for x in jax.tree.leaves(shapes))


def test_quantize_params_default_rule_skips_embeddings_head_and_norms():
    tree = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), _llama_shapes(128, 256, 2, 64, 2, 4))
    qtree = quantize_params(tree)
    assert isinstance(qtree["model"]["layers"]["0"]["self_attn"]["k_proj"]["weight"], QuantizedArray)
    assert isinstance(qtree["model"]["layers"]["1"]["mlp"]["down_proj"]["weight"], QuantizedArray)
    for path in (("model", "embed_tokens", "weight"), ("lm_head", "weight"), ("model", "norm", "weight"),
                 ("model", "layers", "0", "input_layernorm", "weight")):
        leaf = qtree
        for k in path:
            leaf = leaf[k]
        assert not isinstance(leaf, QuantizedArray), path
    back = dequantize_params(qtree)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    assert back["model"]["layers"]["0"]["self_attn"]["q_proj"]["weight"].dtype == jnp.bfloat16


def test_quantize_params_rules_and_stacks():
    tree = {"a": {"kernel": _w((64, 64))}, "b": {"kernel": _w((64, 64))}, "stack": _w((3, 64, 128))}
    only_a = quantize_params(tree, rules=[r"^a\."])
    assert isinstance(only_a["a"]["kernel"], QuantizedArray) and not isinstance(only_a["b"]["kernel"], QuantizedArray)
    pred = quantize_params(tree, rules=lambda path, x: x.ndim == 3, quant_type="fp4", blocksize=128)
    s = pred["stack"]
    assert isinstance(s, QuantizedArray) and s.batch_shape == (3,) and s.quant_type == "fp4" and s.blocksize == 128
    np.testing.assert_array_equal(np.asarray(s.codes[1]), np.asarray(
        qlora_jax.quantize(tree["stack"][1], quant_type="fp4", blocksize=128).codes))
    again = quantize_params(pred, rules=lambda path, x: True)  # already quantized leaves stay as they are
    assert again["stack"] is s
    with pytest.raises(ValueError, match="rules=42 is not supported"):
        quantize_params(tree, rules=42)


def test_storage_report_text():
    text = str(storage_report(quantize_params(jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype),
                                                           _llama_shapes(128, 256, 2, 64, 2, 4)))))
    assert "quantized weights" in text and "whole model" in text and "bits/param" in text
    assert "(14 quantized tensors)" in text
