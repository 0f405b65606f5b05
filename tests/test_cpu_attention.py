"""The native CPU attention kernels (kernels/cpu/attention.cc, qlora_jax.kernels.cpu_nf4.cpu_attention
and cpu_attention_bwd): built where the CPU has AVX-512 BF16, equal to the XLA path (``attend``,
eager transformers' arithmetic, and the pure-jnp twin) within fp32 summation order, forward and
backward, on every kind of mask the decoder makes; chosen by the model's attention in bf16 training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax
from qlora_jax.kernels import cpu_nf4
from qlora_jax.models._decoder import attention_bias
from qlora_jax.models._layers import attend, attend_native, native_attention_takes
from test_cpu_kernel import _cpu_flags

BF16 = jnp.bfloat16


HAS_BF16 = {"avx512f", "avx512bw", "avx512_bf16"} <= _cpu_flags()


def test_attention_kernel_is_built_where_the_cpu_has_avx512_bf16():
    assert cpu_nf4.attention_available() == HAS_BF16, cpu_nf4.unavailable_reason()


def _mask(kind, b, s):
    """The decoder's additive masks [B, S, S] (bf16, the dtype's minimum where masked)."""
    kv = jnp.ones((b, s), jnp.int32)
    window = 0
    if kind == "padding":  # left padding: the first query rows of row 1 see no key at all
        kv = kv.at[1, : s // 3].set(0)
    elif kind == "segments":  # packed rows: two segments in row 0
        kv = kv.at[0, s // 2:].set(2)
    elif kind == "window":
        window = 7
    return attention_bias(kv, jnp.arange(s), window, BF16)


def _xla(q, k, v, mask):
    return attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)


def _agree(ours, ref):
    """The same products summed in another order, and exp within an ulp: bf16 results one ulp apart
    at most, and nearly all of them the same bits."""
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(ours, ref, rtol=2 ** -7, atol=2 ** -8 * scale)
    assert (ours == ref).mean() >= 0.99


# (B, S, H, K, D): multi-head and grouped-query, S not a multiple of the 32-row blocks or the
# 32-key panels, D of 64, 128 (AMX's products where the CPU has it) and not a multiple of 32 (80,
# 16: AVX-512's), a single token
SHAPES = [(2, 40, 4, 2, 64), (1, 97, 8, 1, 16), (2, 33, 6, 3, 80), (1, 70, 4, 4, 128), (2, 1, 2, 1, 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["causal", "padding", "segments", "window"])
def test_kernels_match_the_xla_path(shape, kind):
    b, s, h, kh, d = shape
    keys = jax.random.split(jax.random.key(s * h + d), 4)
    q = jax.random.normal(keys[0], (b, s, h, d)).astype(BF16)
    k = jax.random.normal(keys[1], (b, s, kh, d)).astype(BF16)
    v = jax.random.normal(keys[2], (b, s, kh, d)).astype(BF16)
    w = jax.random.normal(keys[3], (b, s, h, d)).astype(BF16)
    mask = _mask(kind, b, s) if b > 1 or kind not in ("padding", "segments") else _mask("causal", b, s)
    if not HAS_BF16:  # no kernel here: the model keeps the XLA path
        assert not native_attention_takes(q, k, "auto")
        return
    assert native_attention_takes(q, k, "auto") and not native_attention_takes(q, k, "xla")
    scale = float(np.asarray(d ** -0.5, BF16))
    out, stats = cpu_nf4.cpu_attention(q, k, v, mask, scale=scale)
    assert out.dtype == BF16 and out.shape == q.shape and stats.shape == (b, h, s, 2)
    ref = _xla(q, k, v, mask)
    _agree(out, ref)
    _agree(out, cpu_nf4.reference_cpu_attention(q, k, v, mask, scale=scale))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, mask).astype(jnp.float32) * w.astype(jnp.float32))

    ours = jax.grad(loss(attend_native), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(_xla), argnums=(0, 1, 2))(q, k, v)
    for a, r in zip(ours, want):
        assert a.dtype == BF16 and a.shape == r.shape
        _agree(a, r)


def test_fully_masked_rows_are_the_xla_paths_uniform_softmax():
    # a query row whose every key is masked: XLA's softmax of equal scores is uniform over all keys;
    # the kernel then runs every key for that row's block (no panel skipped)
    if not HAS_BF16:
        assert not cpu_nf4.attention_available()
        return
    b, s, h, d = 1, 30, 2, 64
    q, k, v = (jax.random.normal(jax.random.key(i), (b, s, h, d)).astype(BF16) for i in range(3))
    mask = jnp.zeros((b, s, s), BF16).at[0, 5].set(jnp.finfo(BF16).min)  # row 5 sees nothing
    mask = jnp.where(jnp.tril(jnp.ones((s, s), bool))[None], mask, jnp.finfo(BF16).min).astype(BF16)
    out = cpu_nf4.cpu_attention(q, k, v, mask, scale=0.125)[0]
    ref = _xla(q, k, v, mask)
    _agree(out, ref)
    np.testing.assert_allclose(np.asarray(out[0, 5], np.float32),
                               np.asarray(v.astype(jnp.float32).mean(axis=1)[0], np.float32), atol=2e-2)


def test_kernels_refuse_what_they_do_not_take():
    if not cpu_nf4.attention_available():
        with pytest.raises(RuntimeError, match="attention kernel is not available"):
            cpu_nf4.cpu_attention(*(jnp.zeros((1, 4, 2, 8), BF16),) * 3, jnp.zeros((1, 4, 4), BF16), scale=1.0)
        return
    q = jnp.zeros((1, 4, 2, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"cpu_attention takes bfloat16 .* got q float32\(1, 4, 2, 8\)"):
        cpu_nf4.cpu_attention(q, q, q, jnp.zeros((1, 4, 4), jnp.float32), scale=1.0)
    q = jnp.zeros((1, 4, 3, 8), BF16)  # 3 query heads over 2 key heads
    with pytest.raises(ValueError, match="H a multiple of K"):
        cpu_nf4.cpu_attention(q, jnp.zeros((1, 4, 2, 8), BF16), jnp.zeros((1, 4, 2, 8), BF16),
                              jnp.zeros((1, 4, 4), BF16), scale=1.0)
    assert not native_attention_takes(jnp.zeros((1, 4, 2, 7), BF16), jnp.zeros((1, 4, 1, 7), BF16), "auto")


def test_a_bf16_train_step_runs_the_kernels_and_matches_the_xla_attention(tmp_path, monkeypatch):
    """A tiny bf16 model: its jitted loss and gradients with the native attention against the same
    model with attention through XLA (every other op the same): the custom calls are in the
    program, and loss and adapter gradients agree to bf16 rounding."""
    from qlora_jax.models import write_tiny_checkpoint
    from qlora_jax.models import _layers

    ckpt = write_tiny_checkpoint(tmp_path / "m", "llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, dtype="bfloat16")
    model = qlora_jax.from_pretrained(ckpt, quantization=qlora_jax.QuantConfig(compute_dtype="bfloat16"),
                                      dtype=jnp.bfloat16)
    qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    from flax import nnx

    from qlora_jax.lora import LoraParam
    from qlora_jax.train import split_model

    parts = split_model(model)
    leaves, tree = jax.tree.flatten(parts.trainable)  # adapters away from PEFT's B = 0: every one has a gradient
    keys = jax.random.split(jax.random.key(1), len(leaves))
    lora = jax.tree.unflatten(tree, [0.05 * jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys, leaves)])
    ids = jax.random.randint(jax.random.key(0), (2, 48), 0, 512)
    mask = jnp.ones_like(ids).at[1, :5].set(0)
    labels = jnp.where(mask > 0, ids, -100)

    def value_and_grads(lora, rngs, frozen):  # as the train step takes them
        m = nnx.merge(parts.graphdef, *(jax.tree.map(lambda x: x, t) for t in (lora, rngs, frozen)))

        def loss(m):
            total, count = m.loss_sum(ids, mask, labels)
            return total / count

        return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, LoraParam))(m)

    args = (lora, parts.rngs, parts.frozen)
    fn = jax.jit(value_and_grads)
    hlo = fn.lower(*args).as_text()
    if not HAS_BF16:
        assert cpu_nf4.ATTENTION_TARGETS[0] not in hlo
        return
    assert all(t in hlo for t in cpu_nf4.ATTENTION_TARGETS)
    value, grads = fn(*args)
    monkeypatch.setattr(_layers, "native_attention_takes", lambda *a: False)
    fn_xla = jax.jit(lambda *a: value_and_grads(*a))  # a new function: not the cached trace
    assert cpu_nf4.ATTENTION_TARGETS[0] not in fn_xla.lower(*args).as_text()
    value_xla, grads_xla = fn_xla(*args)
    np.testing.assert_allclose(float(value), float(value_xla), rtol=1e-3)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_xla)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=0, atol=0.03 * float(np.abs(b).max()))  # seen: 1%


def test_long_sequences_release_their_partials_and_repeat_exactly():
    # 16 heads x 8192 keys: the backward's fp32 dk/dv partials pass 64 MiB and are freed after the
    # call; the next call allocates them again and gives the same bits
    if not HAS_BF16:
        assert not cpu_nf4.attention_available()
        return
    b, s, h, kh, d = 1, 8192, 16, 2, 64
    keys = jax.random.split(jax.random.key(3), 4)
    q, w = (jax.random.normal(kk, (b, s, h, d)).astype(BF16) for kk in keys[:2])
    k, v = (jax.random.normal(kk, (b, s, kh, d)).astype(BF16) for kk in keys[2:])
    mask = _mask("causal", b, s)
    out, stats = cpu_nf4.cpu_attention(q, k, v, mask, scale=0.125)
    first = [np.asarray(x) for x in cpu_nf4.cpu_attention_bwd(q, k, v, mask, stats, w, scale=0.125)]
    second = [np.asarray(x) for x in cpu_nf4.cpu_attention_bwd(q, k, v, mask, stats, w, scale=0.125)]
    for a, c in zip(first, second):
        assert np.isfinite(a.astype(np.float32)).all() and np.array_equal(a, c)
    # the first query row attends to key 0 alone: its output is v[0] of its key head
    np.testing.assert_array_equal(np.asarray(out[0, 0]), np.asarray(jnp.repeat(v[0, 0], h // kh, axis=0)))


@pytest.mark.slow
def test_the_avx512_products_match_the_xla_path_on_an_amx_cpu(tmp_path):
    """QLORA_JAX_CPU_KERNEL=avx512 builds without AMX: on a CPU with AMX the only run of the AVX-512
    products for head dims of 64 and 128 (elsewhere the same build again)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, QLORA_JAX_CPU_KERNEL="avx512", QLORA_JAX_CACHE=str(tmp_path))
    proc = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "test_kernels_match_the_xla_path"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
