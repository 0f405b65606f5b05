"""LLM.int8() base weights against bitsandbytes on CPU: codes and scales bit-exact, the matmul as
``Linear8bitLt(...).eval()`` computes it (MatMul8bitLt: the decomposition, bitsandbytes' CUDA
semantics), its VJP as MatMul8bitLt's backward, and the bad inputs."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qlora_jax
from qlora_jax.ops import qmatmul
from qlora_jax.quant import Int8Array, from_bnb_int8_state, quantize_params, storage_report, to_bnb_int8_state

from bnb_ref import JAX_DTYPES, TORCH_DTYPES, F, to_jax

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes as bnb


def _bnb_codes(w: torch.Tensor):
    cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
    return cb.numpy(), scb.numpy()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(64, 100), (33, 4096), (300, 257), (1, 7)])
def test_codes_and_scales_match_bitsandbytes(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    w = (torch.randn(shape, generator=g) * 0.05).to(TORCH_DTYPES[dtype])
    if shape[0] > 3:
        w[3] = 0  # an all-zero row: codes 0, scale 0
    q = qlora_jax.quantize(to_jax(w), quant_type="int8")
    cb, scb = _bnb_codes(w)
    assert isinstance(q, Int8Array) and q.codes.dtype == jnp.int8 and q.scales.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(q.codes), cb)
    np.testing.assert_array_equal(np.asarray(q.scales), scb)
    # dequantize as int8_vectorwise_dequant, and back to the original dtype by default
    np.testing.assert_array_equal(np.asarray(qlora_jax.dequantize(q, jnp.float32)),
                                  F.int8_vectorwise_dequant(torch.from_numpy(cb), torch.from_numpy(scb)).numpy())
    assert qlora_jax.dequantize(q).dtype == JAX_DTYPES[dtype]


def test_exact_ties_follow_torchs_reciprocal():
    """Every row holds its absmax and a spread of all float16 magnitudes below it: the scaled
    values include exact .5 ties, where torch's ``reciprocal(t) * 127`` and IEEE ``127 / t``
    round to different codes. Ours equal bitsandbytes' everywhere, and the naive quotient does
    not (so the rows do exercise the difference)."""
    rng = np.random.default_rng(0)
    all_f16 = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16)
    rows = []
    for t in rng.choice(all_f16[all_f16 > 1e-3], 256, replace=False):
        vals = all_f16[all_f16 <= t]
        vals = vals[np.linspace(0, len(vals) - 1, 1023).astype(int)]
        rows.append(np.concatenate([[t], vals * np.where(rng.random(1023) < .5, -1, 1).astype(np.float16)]))
    w = np.stack(rows).astype(np.float16)
    cb, _ = _bnb_codes(torch.from_numpy(w))
    np.testing.assert_array_equal(np.asarray(qlora_jax.quantize(jnp.asarray(w), quant_type="int8").codes), cb)
    absmax = np.abs(w).max(1, keepdims=True).astype(np.float32)
    naive = np.round(w.astype(np.float32) * (np.float32(127) / absmax)).astype(np.int8)
    assert (naive != cb).sum() > 0


def test_stacked_and_params_tree_and_storage():
    w = jax.random.normal(jax.random.key(0), (3, 48, 80), jnp.float32).astype(jnp.bfloat16)
    q = qlora_jax.quantize(w, quant_type="int8", batch_dims=1, threshold=4.0)
    assert q.shape == (3, 48, 80) and q.batch_shape == (3,) and q.threshold == 4.0
    for i in range(3):
        one = qlora_jax.quantize(w[i], quant_type="int8")
        np.testing.assert_array_equal(np.asarray(q.codes[i]), np.asarray(one.codes))
        np.testing.assert_array_equal(np.asarray(q.scales[i]), np.asarray(one.scales))
    tree = {"layers": {"mlp": {"up_proj": {"weight": w[0]}}}, "norm": {"weight": jnp.ones((80,))}}
    qt = quantize_params(tree, quant_type="int8")
    assert isinstance(qt["layers"]["mlp"]["up_proj"]["weight"], Int8Array)
    rep = storage_report(qt)
    assert rep.quantized_bytes == 48 * 80 + 4 * 48  # 8 bits per weight + one fp32 scale per row
    assert rep.quantized_bits_per_param == pytest.approx(8 + 32 / 80)
    back = qlora_jax.dequantize_params(qt)["layers"]["mlp"]["up_proj"]["weight"]
    assert back.dtype == jnp.bfloat16 and back.shape == (48, 80)


def test_bnb_state_round_trip():
    w = torch.randn(40, 72) * 0.02
    q = qlora_jax.quantize(to_jax(w), quant_type="int8")
    state = to_bnb_int8_state(q, "model.layers.0.mlp.up_proj.weight")
    assert sorted(state) == ["model.layers.0.mlp.up_proj.SCB", "model.layers.0.mlp.up_proj.weight",
                             "model.layers.0.mlp.up_proj.weight_format"]
    assert state["model.layers.0.mlp.up_proj.weight"].dtype == np.int8
    back = from_bnb_int8_state(state["model.layers.0.mlp.up_proj.weight"], state["model.layers.0.mlp.up_proj.SCB"],
                               state["model.layers.0.mlp.up_proj.weight_format"], dtype="float32")
    np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(q.codes))
    np.testing.assert_array_equal(np.asarray(back.scales), np.asarray(q.scales))
    with pytest.raises(ValueError, match="weight_format=1"):
        from_bnb_int8_state(state["model.layers.0.mlp.up_proj.weight"], state["model.layers.0.mlp.up_proj.SCB"], 1)


def _linear8bit(w: torch.Tensor, threshold: float):
    lin = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False, threshold=threshold)
    lin.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    return lin.to("cpu").eval()  # eval: MatMul8bitLt on CPU too (training mode takes MatMul8bitFp)


def _inputs(m, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, m, k, generator=g).to(TORCH_DTYPES[dtype])
    x[0, 0, 3] = 9.0  # outliers at threshold 6: columns 3, 5 (and 7 at 5.3)
    x[1, min(2, m - 1), 5] = -7.5
    x[0, m - 1, 7] = 5.3
    return x


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("threshold", [6.0, 0.0, 5.3])
@pytest.mark.parametrize("m,k,n", [(7, 100, 33), (1, 64, 128), (16, 257, 40)])
def test_matmul_matches_linear8bitlt_eval(dtype, threshold, m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    w = torch.randn(n, k, generator=g) * 0.1
    lin = _linear8bit(w, threshold)
    x = _inputs(m, k, dtype, seed=n)
    with torch.no_grad():
        ref = lin(x).float().numpy()
    q = qlora_jax.quantize(jnp.asarray(w.numpy()), quant_type="int8", threshold=threshold)
    np.testing.assert_array_equal(np.asarray(q.codes), lin.state.CB.numpy())
    y = jax.jit(lambda a, w: qmatmul(a, w))(to_jax(x), q)
    assert y.dtype == JAX_DTYPES[dtype] and y.shape == (2, m, n)
    if dtype == "float32":  # torch's addmm adds the outlier product in another order: ulps apart
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        if threshold == 0.0:
            np.testing.assert_array_equal(np.asarray(y), ref)
    else:  # half precision: the same roundings, bit for bit
        np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), ref)


def test_threshold_argument_overrides_the_weights_own():
    w = jax.random.normal(jax.random.key(1), (24, 64), jnp.float32) * 0.1
    x = jax.random.normal(jax.random.key(2), (5, 64), jnp.float32).at[0, 3].set(20.0)
    q6, q0 = qlora_jax.quantize(w, quant_type="int8"), qlora_jax.quantize(w, quant_type="int8", threshold=0.0)
    assert q6.threshold == 6.0
    np.testing.assert_array_equal(np.asarray(qmatmul(x, q6, threshold=0.0)), np.asarray(qmatmul(x, q0)))
    exact = x @ qlora_jax.dequantize(q6, jnp.float32).T
    err_dec = np.abs(np.asarray(qmatmul(x, q6)) - exact).max()
    err_none = np.abs(np.asarray(qmatmul(x, q6, threshold=0.0)) - exact).max()
    assert err_dec < err_none / 5  # the outlier column in full precision: much closer


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_vjp_matches_matmul8bitlt_backward(dtype, threshold):
    """grad w.r.t. x as MatMul8bitLt's backward (grad @ CB * SCB/127 in x's dtype); the frozen
    weight gets no gradient."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 96, generator=g) * 0.1
    lin = _linear8bit(w, threshold)
    x = _inputs(6, 96, dtype, seed=6).requires_grad_(True)
    dy = torch.randn(2, 6, 40, generator=g).to(TORCH_DTYPES[dtype])
    lin(x).backward(dy)
    q = qlora_jax.quantize(jnp.asarray(w.numpy()), quant_type="int8", threshold=threshold)
    _, vjp = jax.vjp(lambda a: qmatmul(a, q), to_jax(x.detach()))
    dx = vjp(to_jax(dy))[0]
    assert dx.dtype == JAX_DTYPES[dtype]
    ref = x.grad.float().numpy()
    if dtype == "float32":
        np.testing.assert_allclose(np.asarray(dx), ref, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(np.asarray(dx.astype(jnp.float32)), ref)
    gw = jax.grad(lambda w: qmatmul(to_jax(x.detach()), w).astype(jnp.float32).sum(), allow_int=True)(q)
    assert not np.asarray(gw.scales).any()


def test_outliers_are_data_dependent_under_one_jit():
    """One compiled program serves inputs with and without outliers (masks, not gathers)."""
    w = jax.random.normal(jax.random.key(3), (32, 64), jnp.float32) * 0.1
    q = qlora_jax.quantize(w, quant_type="int8")
    f = jax.jit(lambda a: qmatmul(a, q))
    x = jax.random.normal(jax.random.key(4), (8, 64), jnp.float32)
    lin = _linear8bit(torch.from_numpy(np.array(w)), 6.0)
    for xi in (x, x.at[2, 9].set(30.0), x.at[:, 11].set(-8.0)):
        with torch.no_grad():
            ref = lin(torch.from_numpy(np.asarray(xi))).numpy()
        np.testing.assert_allclose(np.asarray(f(xi)), ref, rtol=1e-5, atol=1e-5)
    assert f._cache_size() == 1


def test_lowers_for_cuda_with_an_int8_product():
    """The op exports for CUDA on this CPU machine, and its product is an s8 x s8 -> s32 dot (what
    XLA's GPU compiler hands to the int8 tensor-core GEMM)."""
    from jax import export

    q = jax.eval_shape(lambda w: qlora_jax.quantize(w, quant_type="int8"),
                       jax.ShapeDtypeStruct((256, 512), jnp.float32))
    x = jax.ShapeDtypeStruct((64, 512), jnp.bfloat16)
    exp = export.export(jax.jit(lambda a, w: qmatmul(a, w)), platforms=["cuda"])(x, q)
    text = exp.mlir_module()
    assert "tensor<64x512xi8>, tensor<256x512xi8>) -> tensor<64x256xi32>" in text


def test_bad_input():
    w = jnp.ones((8, 16), jnp.float32)
    q = qlora_jax.quantize(w, quant_type="int8")
    with pytest.raises(ValueError, match="threshold=-1"):
        qmatmul(jnp.ones((2, 16)), q, threshold=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        qlora_jax.quantize(w, quant_type="int8", threshold=float("nan"))
    with pytest.raises(ValueError, match="applies to quant_type='int8'"):
        qlora_jax.quantize(w, quant_type="nf4", threshold=6.0)
    bad = Int8Array(q.codes, q.scales[:5], logical_shape=(8, 16), dtype=np.dtype(np.float32))
    with pytest.raises(ValueError, match=r"Int8Array.scales is float32\[5\]; expected float32\[8\]"):
        qlora_jax.dequantize(bad)
    bad = Int8Array(q.codes.astype(jnp.int32), q.scales, logical_shape=(8, 16), dtype=np.dtype(np.float32))
    with pytest.raises(ValueError, match="Int8Array.codes is int32"):
        qlora_jax.dequantize(bad)
    with pytest.raises(ValueError, match="beyond float16's range"):
        qlora_jax.quantize(w.at[1, 2].set(1e6), quant_type="int8")
    with pytest.raises(ValueError, match="non-finite"):
        qlora_jax.quantize(w.at[1, 2].set(jnp.nan), quant_type="int8")
    with pytest.raises(ValueError, match=r"\[out, in\]"):
        qlora_jax.quantize(jnp.ones((2, 8, 16)), quant_type="int8")
    with pytest.raises(ValueError, match="does not fit input"):
        qmatmul(jnp.ones((2, 15)), q)


@pytest.mark.parametrize("outlier_columns", [2, 3, 5, 40])
def test_outlier_product_gathered_or_masked(monkeypatch, outlier_columns):
    """Outlier columns go through the smallest gathered slot that holds them, more than the largest
    through the mask over the whole input: all as bitsandbytes (here with slots of 3 and 6)."""
    from qlora_jax.ops import _int8

    monkeypatch.setattr(_int8, "OUTLIER_SLOTS", (3, 6))
    g = torch.Generator().manual_seed(outlier_columns)
    w = torch.randn(48, 96, generator=g) * 0.1
    x = torch.randn(5, 96, generator=g).to(torch.bfloat16)
    x[1, torch.randperm(96, generator=g)[:outlier_columns]] = 9.5
    lin = _linear8bit(w, 6.0)
    with torch.no_grad():
        ref = lin(x).float().numpy()
    q = qlora_jax.quantize(jnp.asarray(w.numpy()), quant_type="int8")
    y = jax.jit(lambda a, w: qmatmul(a, w))(to_jax(x), q)
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), ref)


def test_vjp_in_bands_of_rows(monkeypatch):
    """The int8 input gradient a band of rows at a time (band size lowered so a small weight takes
    that path) equals MatMul8bitLt's backward to fp32 summation order."""
    from qlora_jax.ops import _chunked

    monkeypatch.setattr(_chunked, "BAND_ELEMENTS", 40 * 96 // 4)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 96, generator=g) * 0.1
    lin = _linear8bit(w, 6.0)
    x = _inputs(6, 96, "float32", seed=6).requires_grad_(True)
    dy = torch.randn(2, 6, 40, generator=g)
    lin(x).backward(dy)
    q = qlora_jax.quantize(jnp.asarray(w.numpy()), quant_type="int8")
    _, vjp = jax.vjp(lambda a: qmatmul(a, q), to_jax(x.detach()))
    np.testing.assert_allclose(np.asarray(vjp(to_jax(dy))[0]), x.grad.numpy(), rtol=1e-5, atol=1e-6)
    assert "scan" in str(jax.make_jaxpr(lambda a: vjp(a))(to_jax(dy)))
