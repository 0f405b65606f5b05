"""The native CPU rotary-embedding kernels (kernels/cpu/rope.cc, qlora_jax.kernels.cpu_nf4.cpu_rope and
cpu_rope_bwd): built where the CPU has AVX-512 or AVX2 + FMA, bit for bit the jnp form (transformers'
``apply_rotary_pos_emb``) and autodiff's gradient of it; chosen by ``apply_rope`` in bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.kernels import cpu_nf4
from qlora_jax.models._rope import apply_rope, rope_cos_sin, rope_inv_freq
from test_cpu_kernel import _cpu_flags

HAS_VECTORS = {"avx512f", "avx512bw", "avx512vl"} <= _cpu_flags() or {"avx2", "fma"} <= _cpu_flags()
native = pytest.mark.skipif(not HAS_VECTORS, reason="the kernels need AVX-512 or AVX2 (the jnp form runs)")


def test_rope_kernels_are_built_where_the_cpu_has_avx512_or_avx2():
    assert cpu_nf4.rope_available() == (HAS_VECTORS and cpu_nf4.available())


def _operands(b, s, h, d, seed=0):
    k = jax.random.split(jax.random.key(seed), 2)
    x = (jax.random.normal(k[0], (b, s, h, d)) * 3).astype(jnp.bfloat16)
    g = jax.random.normal(k[1], (b, s, h, d)).astype(jnp.bfloat16)
    pos = jnp.arange(s)[None].repeat(b, 0) * 7 + jnp.arange(b)[:, None]  # large angles too
    cos, sin = rope_cos_sin(pos, rope_inv_freq(d, 10000.0), jnp.bfloat16)
    return x, g, cos, sin


@native
@pytest.mark.parametrize("shape", [(4, 33, 8, 64), (1, 5, 3, 128), (2, 7, 4, 80), (1, 3, 2, 6)])
def test_rope_kernels_equal_the_jnp_form_bit_for_bit(shape):
    x, g, cos, sin = _operands(*shape)
    np.testing.assert_array_equal(np.asarray(cpu_nf4.cpu_rope(x, cos, sin), np.float32),
                                  np.asarray(cpu_nf4.reference_rope(x, cos, sin), np.float32))
    dx_ref = jax.vjp(lambda x: cpu_nf4.reference_rope(x, cos, sin), x)[1](g)[0]
    np.testing.assert_array_equal(np.asarray(cpu_nf4.cpu_rope_bwd(g, cos, sin), np.float32),
                                  np.asarray(dx_ref, np.float32))
    # and through apply_rope's custom gradient
    y, vjp = jax.vjp(lambda x: apply_rope(x, cos, sin), x)
    np.testing.assert_array_equal(np.asarray(vjp(g)[0], np.float32), np.asarray(dx_ref, np.float32))
    txt = jax.jit(lambda x, g: jax.vjp(lambda x: apply_rope(x, cos, sin), x)[1](g)[0] + apply_rope(x, cos, sin)
                  ).lower(x, g).as_text()
    assert cpu_nf4.ROPE_TARGETS[0] in txt and cpu_nf4.ROPE_TARGETS[1] in txt


@native
def test_rope_kernels_refuse_what_they_do_not_take():
    x, _, cos, sin = _operands(1, 4, 2, 8)
    with pytest.raises(ValueError, match="bfloat16 x"):
        cpu_nf4.cpu_rope(x.astype(jnp.float32), cos, sin)
    with pytest.raises(ValueError, match=r"cos, sin \[B, S, D\]"):
        cpu_nf4.cpu_rope(x, cos[:, :2], sin[:, :2])


def test_apply_rope_in_float32_stays_the_jnp_form():
    x, _, cos, sin = _operands(1, 4, 2, 8)
    x, cos, sin = (a.astype(jnp.float32) for a in (x, cos, sin))
    txt = jax.jit(apply_rope).lower(x, cos, sin).as_text()
    assert cpu_nf4.ROPE_TARGETS[0] not in txt
