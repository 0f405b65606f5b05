"""The native CPU cross-entropy kernels (kernels/cpu/xent.cc, qlora_jax.kernels.cpu_nf4.cpu_xent_lse and
cpu_xent_grad): built where the CPU has AVX-512 or AVX2 + FMA, equal to their jnp twins but for the fp32 order of the
row sums and exp's last bit, on ragged vocabularies, rows without a label and extreme logits; chosen by
``ops.linear_cross_entropy_sum`` for bf16 logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.kernels import cpu_nf4
from qlora_jax.ops import linear_cross_entropy_sum
from test_cpu_kernel import _cpu_flags

HAS_VECTORS = {"avx512f", "avx512bw", "avx512vl"} <= _cpu_flags() or {"avx2", "fma"} <= _cpu_flags()


def test_xent_kernels_are_built_where_the_cpu_has_avx512_or_avx2():
    assert cpu_nf4.xent_available() == (HAS_VECTORS and cpu_nf4.available())


native = pytest.mark.skipif(not HAS_VECTORS, reason="the kernels need AVX-512 or AVX2 (the jnp twins run)")


@native
@pytest.mark.parametrize("n,v", [(37, 300), (5, 32000), (1, 17), (64, 16)])
def test_xent_kernels_match_their_twins(n, v):
    k = jax.random.split(jax.random.key(n * v), 3)
    logits = (jax.random.normal(k[0], (n, v)) * 4).astype(jnp.bfloat16)
    logits = logits.at[0, :3].set(jnp.asarray([60.0, -80.0, 30.0], jnp.bfloat16)[: min(3, v)])  # far from the max
    labels = jax.random.randint(k[1], (n,), 0, v)
    scale = jnp.where(jnp.arange(n) % 3 == 1, 0.0, 1.0 / n).astype(jnp.float32)  # rows without a label: 0
    lse = cpu_nf4.cpu_xent_lse(logits)
    ref = cpu_nf4.reference_xent_lse(logits)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref), rtol=2e-6, atol=1e-6)
    lse2, picked = cpu_nf4.cpu_xent_fwd(logits, labels)
    ref2, picked_ref = cpu_nf4.reference_xent_fwd(logits, labels)
    np.testing.assert_array_equal(np.asarray(lse2), np.asarray(lse))
    np.testing.assert_allclose(np.asarray(ref2), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(picked), np.asarray(picked_ref))  # a bf16 value, exactly
    g = np.asarray(cpu_nf4.cpu_xent_grad(logits, ref, labels, scale), np.float32)
    g_ref = np.asarray(cpu_nf4.reference_xent_grad(logits, ref, labels, scale), np.float32)
    # exp within an ulp: a bf16 result one ulp apart at most, where the fp32 value sits on a boundary
    np.testing.assert_array_less(np.abs(g - g_ref), np.abs(g_ref) * 2.0 ** -7 + 1e-38)
    assert np.mean(g == g_ref) >= 0.99
    assert np.all(g[np.asarray(scale) == 0] == 0)
    assert np.all(g[np.arange(n), np.asarray(labels)][np.asarray(scale) > 0] < 0)  # the label's -(1 - p)


@native
def test_xent_lse_of_infinite_rows_is_logsumexps():
    logits = jnp.asarray([[-jnp.inf] * 20, [jnp.inf] + [0.0] * 19, [jnp.nan] + [0.0] * 19], jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(cpu_nf4.cpu_xent_lse(logits)),
                                  np.asarray(cpu_nf4.reference_xent_lse(logits)))


@native
def test_xent_kernels_refuse_what_they_do_not_take():
    with pytest.raises(ValueError, match="bfloat16 logits"):
        cpu_nf4.cpu_xent_lse(jnp.zeros((4, 8), jnp.float32))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        cpu_nf4.cpu_xent_grad(jnp.zeros((4, 8), jnp.bfloat16), jnp.zeros(3), jnp.zeros(4, jnp.int32), jnp.zeros(4))


@native
def test_the_head_loss_runs_the_kernels_in_bf16():
    k = jax.random.split(jax.random.key(3), 3)
    h = jax.random.normal(k[0], (24, 64)).astype(jnp.bfloat16)
    w = (jax.random.normal(k[1], (500, 64)) * 0.2).astype(jnp.bfloat16)
    labels = jax.random.randint(k[2], (24,), 0, 500)
    valid = jnp.arange(24) % 5 != 0
    txt = jax.jit(jax.grad(lambda h: linear_cross_entropy_sum(h, w, labels, valid))).lower(h).as_text()
    assert cpu_nf4.XENT_TARGETS[0] in txt and cpu_nf4.XENT_TARGETS[1] in txt


@native
def test_the_head_loss_overwrites_the_logits_with_their_gradient():
    """The backward's gradient takes the logits' buffer (no fresh [N, V] one), without a copy of them:
    after the forward's one kernel nothing else reads them."""
    k = jax.random.split(jax.random.key(3), 3)
    h = jax.random.normal(k[0], (64, 64)).astype(jnp.bfloat16)
    w = (jax.random.normal(k[1], (500, 64)) * 0.2).astype(jnp.bfloat16)
    labels = jax.random.randint(k[2], (64,), 0, 500)
    valid = jnp.arange(64) % 5 != 0
    grad = jax.jit(jax.value_and_grad(lambda h: linear_cross_entropy_sum(h, w, labels, valid)))  # the loss too
    hlo = grad.lower(h).compile().as_text()
    assert "output_to_operand_aliasing" in hlo
    assert not any(" copy(" in line and "[64,500]" in line.split("=")[1][:20] for line in hlo.splitlines() if "=" in line)
