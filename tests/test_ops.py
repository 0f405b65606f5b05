"""The quantized-linear op's XLA path: forward, VJP, no weight gradient, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax
from qlora_jax.ops import qmatmul


def _case(dtype, quant_type="nf4", double_quant=True, out=96, inp=160):
    k1, k2 = jax.random.split(jax.random.key(0))
    w = jax.random.normal(k1, (out, inp), jnp.float32).astype(jnp.bfloat16)
    x = jax.random.normal(k2, (2, 5, inp), jnp.float32).astype(dtype)
    return x, qlora_jax.quantize(w, quant_type=quant_type, double_quant=double_quant)


def _reference(x, q):
    w = qlora_jax.dequantize(q, x.dtype)
    return jnp.einsum("bsi,oi->bso", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_forward_matches_dequantize_then_dot(dtype, quant_type):
    x, q = _case(dtype, quant_type)
    y = jax.jit(lambda a, w: qmatmul(a, w, backend="xla"))(x, q)
    assert y.dtype == dtype and y.shape == (2, 5, 96)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(_reference(x, q), np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_vjp_matches_grad_of_reference(dtype):
    x, q = _case(dtype)
    dy = jax.random.normal(jax.random.key(3), (2, 5, 96), jnp.float32).astype(dtype)
    _, vjp = jax.vjp(lambda a: qmatmul(a, q, backend="xla"), x)
    _, vjp_ref = jax.vjp(lambda a: _reference(a, q), x)
    np.testing.assert_array_equal(np.asarray(vjp(dy)[0], np.float32), np.asarray(vjp_ref(dy)[0], np.float32))


def test_weight_cotangent_is_zero():
    """The op's VJP returns a symbolic zero for the frozen weight: asked for anyway, it is zeros."""
    x, q = _case(jnp.float32)
    _, vjp = jax.vjp(qmatmul, x, q)
    _, dq = vjp(jnp.ones((2, 5, 96), jnp.float32))
    leaves = jax.tree.leaves(dq)
    assert [leaf.dtype for leaf in leaves] == [jax.dtypes.float0, jax.dtypes.float0, jnp.float32, jnp.float32]
    assert not any(np.any(np.asarray(leaf)) for leaf in leaves[2:])  # integer leaves: float0, no data


def test_dense_weight_is_a_plain_dot():
    x, _ = _case(jnp.float32)
    w = jax.random.normal(jax.random.key(1), (96, 160), jnp.float32)
    expected = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    # fp32 accumulation over 160 terms against an fp64 reference
    np.testing.assert_allclose(np.asarray(qmatmul(x, w)), expected, rtol=1e-5, atol=1e-5)


def test_errors():
    x, q = _case(jnp.float32)
    with pytest.raises(ValueError, match="backend='tpu' is not supported"):
        qmatmul(x, q, backend="tpu")
    with pytest.raises(ValueError, match="threshold=6.0 applies to 8-bit weights only"):
        qmatmul(x, q, threshold=6.0)
    with pytest.raises(ValueError, match=r"does not fit input \[..., 7\]"):
        qmatmul(x[..., :7], q)
    stacked = qlora_jax.quantize(jnp.ones((2, 96, 160)), batch_dims=1)
    with pytest.raises(ValueError, match="unstacked"):
        qmatmul(x, stacked)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_vjp_in_bands_of_rows(monkeypatch, quant_type):
    """Large weights' input gradient is taken a band of rows at a time (ops._chunked; here with the
    band size lowered so that a small weight takes that path): the same dx to fp32 summation order."""
    from qlora_jax.ops import _chunked

    monkeypatch.setattr(_chunked, "BAND_ELEMENTS", 96 * 160 // 6)
    assert _chunked.band_rows(96, 160, 64) == 16
    x, q = _case(jnp.float32, quant_type)
    dy = jax.random.normal(jax.random.key(3), (2, 5, 96), jnp.float32)
    _, vjp = jax.vjp(lambda a: qmatmul(a, q, backend="xla"), x)
    _, vjp_ref = jax.vjp(lambda a: _reference(a, q), x)
    np.testing.assert_allclose(np.asarray(vjp(dy)[0]), np.asarray(vjp_ref(dy)[0]), rtol=1e-5, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(lambda a: vjp(a))(dy))
    assert "scan" in jaxpr or "while" in jaxpr  # the band loop ran
