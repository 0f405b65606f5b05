"""The native CPU LoRA kernels (kernels/cpu/lora.cc, qlora_jax.kernels.cpu_nf4.cpu_lora_down, cpu_lora_up
and cpu_lora_grad): built where the CPU has AVX-512, equal to their jnp twins but for the fp32 order of
their sums; chosen by ``LoraLinear`` in bf16 with fp32 adapters, whose sum with the base layer's result
follows PEFT (over a quantized base the adapter's output is rounded to bf16 first)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlora_jax
from qlora_jax.kernels import cpu_nf4
from qlora_jax.lora._layers import _lora_sum_native
from qlora_jax.ops._residuals import stash
from test_cpu_kernel import _cpu_flags

HAS_AVX512 = {"avx512f", "avx512bw", "avx512vl"} <= _cpu_flags()
native = pytest.mark.skipif(not HAS_AVX512, reason="the kernels need AVX-512 (the XLA ops run)")

SHAPES = [((1024,), 512, 16), ((37,), 64, 20), ((5,), 96, 70), ((4, 37), 100, 5), ((9,), 33, 64), ((3,), 7, 17), ((2, 2, 5), 1376, 8), ((1,), 16, 1)]


def _f32(a):
    return np.asarray(a, np.float32)


def test_lora_kernels_are_built_where_the_cpu_has_avx512():
    assert cpu_nf4.lora_available() == (HAS_AVX512 and cpu_nf4.available())


def _operands(lead, c, r, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (*lead, c)).astype(jnp.bfloat16)
    a = jax.random.normal(k[1], (r, c)) * 0.05
    h = jax.random.normal(k[2], (*lead, r))
    base = jax.random.normal(k[3], (*lead, c)).astype(jnp.bfloat16)
    return x, a, h, base


def _bf16_close(got, want, base, min_equal):
    # fp32 sums in another order: a bf16 result one ulp apart at most where the sum sits on a rounding
    # boundary; rounded before its sum with the base, the adapter's output may be one ulp of its own
    # magnitude (at most |want| + |base|) apart
    got, want = _f32(got), _f32(want)
    np.testing.assert_array_less(np.abs(got - want), 2.0 ** -7 * (2 * np.abs(want) + np.abs(base)) + 1e-30)
    assert np.mean(got == want) >= min_equal


def _close(got, want, rtol):
    np.testing.assert_allclose(_f32(got), _f32(want), rtol=rtol, atol=rtol * float(np.abs(_f32(want)).max()))


@native
@pytest.mark.parametrize("lead,c,r", SHAPES)
def test_lora_kernels_match_their_twins(lead, c, r):
    x, a, h, base = _operands(lead, c, r)
    down = cpu_nf4.cpu_lora_down(x, a, scaling=2.0)
    assert down.shape == (*lead, r) and down.dtype == jnp.float32
    _close(down, cpu_nf4.reference_lora_down(x, a, scaling=2.0), 1e-5)
    grad = cpu_nf4.cpu_lora_grad(h, x, scaling=0.5)
    assert grad.shape == (r, c) and grad.dtype == jnp.float32
    _close(grad, cpu_nf4.reference_lora_grad(h, x, scaling=0.5), 1e-5)
    for b in (None, base):
        for round_first in (False, True):
            got = _f32(cpu_nf4.cpu_lora_up(h, a, b, scaling=2.0, round_first=round_first))
            want = _f32(cpu_nf4.reference_lora_up(h, a, b, scaling=2.0, round_first=round_first))
            assert got.shape == (*lead, c)
            _bf16_close(got, want, 0.0 if b is None else _f32(b), 0.999)


@native
def test_lora_up_rounds_the_adapters_output_first_where_asked():
    # base 1.0 and an adapter output of 2^-8 + 2^-17: rounded first it is 2^-8 (half an ulp of 1.0 in
    # bf16: the sum ties to even, 1.0); summed in fp32, 1 + 2^-8 + 2^-17 rounds up to 1 + 2^-7
    h = jnp.asarray([[1.0]], jnp.float32)
    a = jnp.asarray([[2.0 ** -8 + 2.0 ** -17] * 16], jnp.float32)
    base = jnp.ones((1, 16), jnp.bfloat16)
    assert np.all(_f32(cpu_nf4.cpu_lora_up(h, a, base, round_first=True)) == 1.0)
    assert np.all(_f32(cpu_nf4.cpu_lora_up(h, a, base, round_first=False)) == 1.0 + 2.0 ** -7)


@native
def test_lora_kernels_refuse_what_they_do_not_take():
    x, a, h, base = _operands((4,), 32, 8)
    with pytest.raises(ValueError, match="bfloat16 x"):
        cpu_nf4.cpu_lora_down(x.astype(jnp.float32), a)
    with pytest.raises(ValueError, match=r"float32 h \[\.\.\., r\]"):
        cpu_nf4.cpu_lora_up(h, a[:, :16], base)
    with pytest.raises(ValueError, match="same leading dims"):
        cpu_nf4.cpu_lora_grad(h[:3], x)


def _plain_sum(result, x, a, b, scaling, round_first):
    h = x.astype(jnp.float32)
    h = jax.lax.dot_general(h, a, (((h.ndim - 1,), (1,)), ((), ())))
    delta = jax.lax.dot_general(h, b, (((h.ndim - 1,), (1,)), ((), ()))) * scaling
    if round_first:
        return result + delta.astype(result.dtype)
    return (result.astype(jnp.float32) + delta).astype(result.dtype)


@native
@pytest.mark.parametrize("round_first", [True, False])
def test_native_lora_sum_and_its_gradient_are_autodiffs(round_first):
    k = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(k[0], (2, 24, 96)).astype(jnp.bfloat16)
    a = 0.1 * jax.random.normal(k[1], (8, 96))
    b = 0.1 * jax.random.normal(k[2], (160, 8))
    result = jax.random.normal(k[3], (2, 24, 160)).astype(jnp.bfloat16)
    g = jax.random.normal(k[4], (2, 24, 160)).astype(jnp.bfloat16)
    y, vjp = jax.vjp(lambda r, x, a, b: _lora_sum_native(r, x, *stash(x), a, b, 2.0, round_first), result, x, a, b)
    y_ref, vjp_ref = jax.vjp(lambda r, x, a, b: _plain_sum(r, x, a, b, 2.0, round_first), result, x, a, b)
    _bf16_close(y, y_ref, _f32(result), 0.99)
    for got, want in zip(vjp(g), vjp_ref(g), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        _close(got, want, 2 ** -7 if got.dtype == jnp.bfloat16 else 1e-5)


def _quantized_lora_linear(dropout=0.0):
    from qlora_jax.lora._layers import LoraAdapter, LoraLinear
    from qlora_jax.models._layers import Linear

    base = Linear(64, 96, bias=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    base.weight = nnx.Param(qlora_jax.quantize(base.weight.get_value(), quant_type="nf4", blocksize=64))
    adapter = LoraAdapter(64, 96, r=4, scaling=2.0, dropout=dropout, init="gaussian", dtype=jnp.float32,
                          rngs=nnx.Rngs(1))
    adapter.lora_B.set_value(0.1 * jax.random.normal(jax.random.key(3), adapter.lora_B.get_value().shape))
    return LoraLinear(base, {"default": adapter}, "default")


@native
def test_lora_linear_over_a_quantized_base_runs_the_kernels_in_bf16():
    layer = _quantized_lora_linear()
    x = jax.random.normal(jax.random.key(2), (3, 5, 64)).astype(jnp.bfloat16)
    txt = jax.jit(lambda x: layer(x)).lower(x).as_text()
    assert cpu_nf4.LORA_TARGETS[1] in txt
    adapter = layer.lora["default"]
    result = layer.base_layer(x)
    want = _plain_sum(result, x, adapter.lora_A[...], adapter.lora_B[...], adapter.scaling, True)
    _bf16_close(layer(x), want, _f32(result), 0.99)


def test_lora_linear_over_a_quantized_base_rounds_the_adapter_first_as_peft():
    """PEFT's 4-bit (and 8-bit) LoRA layers cast the adapter's output to the result's dtype, then
    add; with dropout the XLA path runs, the same arithmetic."""
    layer = _quantized_lora_linear(dropout=0.1)
    x = jax.random.normal(jax.random.key(2), (3, 5, 64)).astype(jnp.bfloat16)
    layer.eval()  # dropout off, the XLA path still (an adapter with dropout never takes the kernels)
    adapter = layer.lora["default"]
    result = layer.base_layer(x)
    want = _plain_sum(result, x, adapter.lora_A[...], adapter.lora_B[...], adapter.scaling, True)
    np.testing.assert_array_equal(_f32(layer(x)), _f32(want))
