"""The native CPU SwiGLU kernels (kernels/cpu/swiglu.cc, qlora_jax.kernels.cpu_nf4.cpu_swiglu and
cpu_swiglu_bwd): built where the CPU has AVX-512 or AVX2 + FMA, equal to their jnp twins but for exp's last bit,
and PyTorch's ``F.silu(g) * u`` forward and backward; chosen by ``models._layers.swiglu`` in bf16,
whose gradient is the twins' in every dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qlora_jax.kernels import cpu_nf4
from qlora_jax.models._layers import swiglu
from test_cpu_kernel import _cpu_flags

HAS_VECTORS = {"avx512f", "avx512bw", "avx512vl"} <= _cpu_flags() or {"avx2", "fma"} <= _cpu_flags()
native = pytest.mark.skipif(not HAS_VECTORS, reason="the kernels need AVX-512 or AVX2 (the jnp twins run)")


def test_swiglu_kernels_are_built_where_the_cpu_has_avx512_or_avx2():
    assert cpu_nf4.swiglu_available() == (HAS_VECTORS and cpu_nf4.available())


def _operands(shape, dtype=jnp.bfloat16, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    g = (jax.random.normal(k[0], shape) * 4).astype(dtype)
    extremes = jnp.asarray([100.0, -100.0, 88.5, -88.5, 90.0, -90.0, 0.0, -0.0], dtype)
    g = g.reshape(-1).at[: min(8, g.size)].set(extremes[: min(8, g.size)]).reshape(shape)
    u = jax.random.normal(k[1], shape).astype(dtype)
    dh = jax.random.normal(k[2], shape).astype(dtype)
    return g, u, dh


def _f32(a):
    return np.asarray(a, np.float32)


def _torch(g, u, dh):
    tg, tu = (torch.tensor(_f32(a)).bfloat16().requires_grad_() for a in (g, u))
    h = torch.nn.functional.silu(tg) * tu
    h.backward(torch.tensor(_f32(dh)).bfloat16())
    return h.detach().float().numpy(), tg.grad.float().numpy(), tu.grad.float().numpy()


def _close_in_bf16(a, b, min_equal):
    # exp within an ulp: a bf16 result one ulp apart at most, where the fp32 value sits on a boundary
    np.testing.assert_array_less(np.abs(a - b), np.abs(b) * 2.0 ** -7 + 1e-37)
    assert np.mean(a == b) >= min_equal


@native
@pytest.mark.parametrize("shape", [(1024, 1376), (2, 7, 37), (5,), (3, 16)])
def test_swiglu_kernels_match_their_twins_and_pytorch(shape):
    g, u, dh = _operands(shape)
    h = _f32(cpu_nf4.cpu_swiglu(g, u))
    dg, du = (_f32(a) for a in cpu_nf4.cpu_swiglu_bwd(g, u, dh))
    h_ref = _f32(cpu_nf4.reference_swiglu(g, u))
    dg_ref, du_ref = (_f32(a) for a in cpu_nf4.reference_swiglu_bwd(g, u, dh))
    h_pt, dg_pt, du_pt = _torch(g, u, dh)
    for ours, ref, pt in ((h, h_ref, h_pt), (dg, dg_ref, dg_pt), (du, du_ref, du_pt)):
        _close_in_bf16(ours, ref, 0.999)
        # torch does not flush denormals to zero as XLA's CPU threads do: -88.5's tiny gradient
        tiny = np.abs(pt) < 1e-36
        _close_in_bf16(ours[~tiny], pt[~tiny], 0.999)
        assert np.all(np.abs(ours[tiny]) < 1e-36)
    assert np.all(np.isfinite(h)) and np.all(np.isfinite(dg))  # exp(-g) overflowing to inf is no NaN


@native
def test_swiglu_kernels_keep_infinities_and_nans():
    g = jnp.asarray([jnp.inf, -jnp.inf, jnp.nan, 1.0] * 4, jnp.bfloat16)
    u = jnp.ones_like(g)
    np.testing.assert_array_equal(_f32(cpu_nf4.cpu_swiglu(g, u)), _f32(cpu_nf4.reference_swiglu(g, u)))


@native
def test_swiglu_kernels_refuse_what_they_do_not_take():
    g, u, dh = _operands((4, 8))
    with pytest.raises(ValueError, match="bfloat16 operands of one shape"):
        cpu_nf4.cpu_swiglu(g.astype(jnp.float32), u)
    with pytest.raises(ValueError, match=r"\(4, 7\)"):
        cpu_nf4.cpu_swiglu_bwd(g, u, dh[:, :7])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_swiglu_gradient_is_the_twins_and_close_to_autodiff(dtype):
    g, u, dh = _operands((6, 40), dtype)
    h, vjp = jax.vjp(swiglu, g, u)
    dg, du = vjp(dh)
    assert h.dtype == dg.dtype == du.dtype == dtype
    _close_in_bf16(_f32(h), _f32(cpu_nf4.reference_swiglu(g, u)), 0.99)
    for ours, ref in zip((dg, du), cpu_nf4.reference_swiglu_bwd(g, u, dh)):
        _close_in_bf16(_f32(ours), _f32(ref), 0.99)
    # and autodiff of jax.nn.silu's form, in fp32 where rounding does not part them
    g32, u32, dh32 = (a.astype(jnp.float32) for a in (g, u, dh))
    auto = jax.vjp(lambda g, u: jax.nn.silu(g) * u, g32, u32)[1](dh32)
    ours32 = jax.vjp(swiglu, g32, u32)[1](dh32)
    for a, b in zip(ours32, auto):
        np.testing.assert_allclose(_f32(a), _f32(b), rtol=1e-5, atol=1e-6)


@native
def test_swiglu_takes_the_kernels_in_bf16_only():
    g, u, dh = _operands((4, 32))
    step = jax.jit(lambda g, u, dh: jax.vjp(swiglu, g, u)[1](dh))
    txt = step.lower(g, u, dh).as_text()
    assert cpu_nf4.SWIGLU_TARGETS[1] in txt
    txt = jax.jit(swiglu).lower(g, u).as_text()
    assert cpu_nf4.SWIGLU_TARGETS[0] in txt
    txt = jax.jit(swiglu).lower(g.astype(jnp.float32), u.astype(jnp.float32)).as_text()
    assert cpu_nf4.SWIGLU_TARGETS[0] not in txt
