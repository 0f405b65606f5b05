"""Ops whose backward is written out for the CPU's fast matmul path (compute-dtype operands, fp32
accumulation): the LM head + cross-entropy (``ops.linear_cross_entropy_sum``) and attention
(``models._layers.attend``), and RMSNorm (its row sums as a batched dot). In fp32 they must equal
autodiff of the plain formulas; in bf16 they round where PyTorch's autograd rounds, so they agree with
autodiff to bf16 precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import qlora_jax
from qlora_jax.models._layers import RMSNorm, attend
from qlora_jax.ops import linear_cross_entropy_sum
from qlora_jax.train import causal_lm_loss_sum


def _naive_head_loss(h, w, labels, valid):
    logits = jax.lax.dot_general(h, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    logits = logits.astype(h.dtype).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(valid, lse - picked, 0.0))


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("hidden", [48, 96])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_linear_cross_entropy_matches_autodiff(dtype, tol, hidden):
    from qlora_jax.kernels import cpu_nf4

    k = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k[0], (37, hidden)).astype(dtype)
    w = (jax.random.normal(k[1], (300, hidden)) * 0.2).astype(dtype)
    labels = jax.random.randint(k[2], (37,), 0, 300)
    valid = jnp.arange(37) % 5 != 0
    loss_and_grad = jax.value_and_grad(linear_cross_entropy_sum, argnums=(0, 1))
    ours, (dh, dw) = loss_and_grad(h, w, labels, valid)
    ref, (rh, rw) = jax.value_and_grad(_naive_head_loss, argnums=(0, 1))(h, w, labels, valid)
    # bf16 with a hidden size of a multiple of 32 on a CPU with AMX: both products on the native
    # kernel (fp32 sums in another order: a logit may round to the neighbouring bf16 value); with
    # AVX-512 BF16 only the logits
    native = dtype == "bfloat16" and cpu_nf4.dense_gemm_supported(300, hidden, h.dtype, transpose=True)
    hlo = jax.jit(loss_and_grad).lower(h, w, labels, valid).as_text()
    assert hlo.count(cpu_nf4.DENSE_GEMM_TARGET) == (0 if not native else 2 if cpu_nf4.gemm_isa() == "amx_bf16" else 1)
    assert dh.dtype == h.dtype and dw.dtype == w.dtype
    assert abs(float(ours) - float(ref)) <= (1e-4 if native else 1e-6) * abs(float(ref))  # the same rounded logits
    assert _rel(dh, rh) < tol and _rel(dw, rw) < tol


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", [1000, 77])
def test_linear_cross_entropy_with_grad_scale_is_the_same_op_in_chunks(dtype, n, monkeypatch):
    """With ``grad_scale`` (the cotangent the sum will get) dh is made in the forward, in chunks of
    rows (here 256 a chunk, the last one padded): the same loss and gradients as without it for that
    cotangent (up to the order of fp32 sums); for another cotangent the gradients scale; W's
    gradient is recomputed chunk by chunk."""
    from qlora_jax.ops import _head

    monkeypatch.setattr(_head, "_CHUNK_BYTES", 256 * 300 * jnp.dtype(dtype).itemsize)  # 256-row chunks
    k = jax.random.split(jax.random.key(4), 3)
    h = jax.random.normal(k[0], (n, 64)).astype(dtype)
    w = (jax.random.normal(k[1], (300, 64)) * 0.2).astype(dtype)
    labels = jax.random.randint(k[2], (n,), 0, 300)
    valid = jnp.arange(n) % 7 != 3
    scale = 1.0 / 911

    def grads(ct, **kw):
        loss, vjp = jax.vjp(lambda a, b: linear_cross_entropy_sum(a, b, labels, valid, **kw), h, w)
        return (loss, *vjp(jnp.float32(ct)))

    ref = grads(scale)
    got = grads(scale, grad_scale=scale)
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-6)
    # dh: the same arithmetic, in the order XLA's dot sums a chunk's rows (a last bit may differ)
    assert got[1].dtype == h.dtype and _rel(got[1], ref[1]) < (1e-6 if dtype == "float32" else 1e-2)
    assert got[2].dtype == w.dtype and _rel(got[2], ref[2]) < (1e-5 if dtype == "float32" else 1e-2)
    other = grads(3 * scale, grad_scale=scale)
    assert _rel(other[1], 3 * np.asarray(ref[1], np.float32)) < (1e-6 if dtype == "float32" else 1e-2)
    assert _rel(other[2], 3 * np.asarray(ref[2], np.float32)) < (1e-5 if dtype == "float32" else 1e-2)


def test_linear_cross_entropy_grad_scale_edges():
    """An empty batch takes the unchunked op; a zero grad_scale (no cotangent to scale from) is refused."""
    h, w = jnp.zeros((0, 64), jnp.float32), jnp.ones((300, 64), jnp.float32)
    loss, dh = jax.value_and_grad(lambda a: linear_cross_entropy_sum(a, w, jnp.zeros(0, jnp.int32), jnp.zeros(0, bool),
                                                                     grad_scale=0.5))(h)
    assert float(loss) == 0.0 and dh.shape == (0, 64)
    with pytest.raises(ValueError, match="grad_scale=0"):
        linear_cross_entropy_sum(jnp.ones((4, 64)), w, jnp.zeros(4, jnp.int32), jnp.ones(4, bool), grad_scale=0.0)


def test_the_chunked_head_keeps_no_full_logits():
    """The compiled value-and-gradient holds one chunk's logits, not [tokens, vocab]: 2048 x 8192
    bf16 logits are 32 MiB; with grad_scale the step's temporaries stay below that."""
    n, v, e = 2048, 8192, 64
    h = jnp.zeros((n, e), jnp.bfloat16)
    w = jnp.zeros((v, e), jnp.bfloat16)
    labels, valid = jnp.zeros(n, jnp.int32), jnp.ones(n, bool)

    def temp(**kw):
        f = jax.jit(jax.grad(lambda a: linear_cross_entropy_sum(a, w, labels, valid, **kw)))
        return f.lower(h).compile().memory_analysis().temp_size_in_bytes

    logits = n * v * 2
    assert temp() >= logits > temp(grad_scale=1.0) and temp(grad_scale=1.0) < logits * 3 // 4


def test_linear_cross_entropy_rejects_a_misfit_head():
    with pytest.raises(ValueError, match=r"head weight shape \(10, 7\)"):
        linear_cross_entropy_sum(jnp.zeros((3, 8)), jnp.zeros((10, 7)), jnp.zeros(3, jnp.int32), jnp.ones(3, bool))


def _naive_attend(q, k, v, bias):
    b, s, h, d = q.shape
    kh = k.shape[2]
    q5 = q.reshape(b, s, kh, h // kh, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", q5, k, preferred_element_type=jnp.float32)
    scores = scores.astype(q.dtype) * jnp.asarray(d ** -0.5, q.dtype) + bias[:, None, None].astype(q.dtype)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(b, s, h, d)


def _exact_attend(q, k, v, bias):
    """_naive_attend in float64 numpy."""
    b, s, h, d = q.shape
    kh = k.shape[2]
    scores = np.einsum("bskgd,btkd->bkgst", q.reshape(b, s, kh, h // kh, d), k) * d ** -0.5 + bias[:, None, None]
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bkgst,btkd->bskgd", probs, v).reshape(b, s, h, d)


@pytest.mark.parametrize("shape", [(1, 40, 2048), (3, 5, 96)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rms_norm_gradients_are_autodiffs(dtype, shape):
    """RMSNorm's input and weight gradients against autodiff of transformers' formula: equal up to
    the fp32 summation order of the row sums (fp32: 1e-6; bf16: the same fp32 values rounded, so a
    bf16 ulp where a value sits on a rounding boundary, nowhere more)."""
    k = jax.random.split(jax.random.key(1), 3)
    x = (jax.random.normal(k[0], shape) * 3).astype(dtype)
    g = jax.random.normal(k[2], shape).astype(dtype)
    norm = RMSNorm(shape[-1], 1e-5, dtype=dtype)
    norm.weight[...] = (1 + 0.3 * jax.random.normal(k[1], shape[-1:])).astype(dtype)
    w = norm.weight[...]

    def plain(x, w):
        x32 = x.astype(jnp.float32)
        return w * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-5)).astype(x.dtype)

    graphdef, state = nnx.split(norm)

    def ours(x, w):
        return nnx.merge(graphdef, jax.tree.map(lambda _: w, state))(x)

    y0, (dx0, dw0) = plain(x, w), jax.vjp(plain, x, w)[1](g)
    y1, (dx1, dw1) = ours(x, w), jax.vjp(ours, x, w)[1](g)
    assert jnp.array_equal(y0, y1)
    for a, b in ((dx1, dx0), (dw1, dw0)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if dtype == "float32":
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
        else:  # one bf16 ulp (2**-8 relative) at most, and at few elements
            np.testing.assert_array_less(np.abs(a - b), np.abs(b) * 2.0 ** -7 + 1e-30)
            assert np.mean(a != b) < 0.01


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_attention_backward_matches_autodiff(dtype, tol):
    k = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(k[0], (2, 7, 4, 16)).astype(dtype)
    kk = jax.random.normal(k[1], (2, 7, 2, 16)).astype(dtype)
    v = jax.random.normal(k[2], (2, 7, 2, 16)).astype(dtype)
    causal = jnp.where(jnp.arange(7)[None, :] <= jnp.arange(7)[:, None], 0.0, jnp.finfo(jnp.float32).min)
    bias = jnp.broadcast_to(causal, (2, 7, 7)).astype(dtype)
    dout = jax.random.normal(k[3], (2, 7, 4, 16)).astype(dtype)
    # attend takes keys and values head-major [B, K, T, D] (the KV cache's layout)
    ours, vjp = jax.vjp(lambda q, kk, v: attend(q, kk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), bias), q, kk, v)
    ref, ref_vjp = jax.vjp(lambda *a: _naive_attend(*a, bias), q, kk, v)
    if dtype == "bfloat16":  # forward unchanged: the same roundings to bf16
        np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(ref, np.float32))
    else:  # within fp32 rounding of the exact (float64) result, as the naive form is: XLA:CPU's fp32
        # dots sum in an order that depends on the operands' layout and the CPU's vector width (the
        # two forms agreed bit for bit on AVX-512 machines, not on AVX2 ones: ~1 ulp apart there)
        exact = _exact_attend(*(np.asarray(a, np.float64) for a in (q, kk, v, bias)))
        bound = 2 * np.finfo(np.float32).eps * np.abs(exact).max()
        for got in (ours, ref):
            np.testing.assert_allclose(np.asarray(got, np.float64), exact, rtol=0, atol=bound)
    for a, b in zip(vjp(dout), ref_vjp(dout)):
        assert a.dtype == b.dtype and _rel(a, b) < tol


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from qlora_jax.models import write_tiny_checkpoint

    return {tied: write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama", vocab_size=300,
                                        tie_word_embeddings=tied) for tied in (False, True)}


@pytest.mark.parametrize("head", ["dense", "tied", "lora"])
def test_model_loss_sum_matches_transformers_loss(checkpoints, head):
    """model.loss_sum (the fused head for a dense head; the logits path for an adapted one) equals
    causal_lm_loss_sum of the logits and transformers' own loss, padding and ignored labels included."""
    tiny = checkpoints[head == "tied"]
    model = qlora_jax.from_pretrained(tiny)
    assert (model.lm_head is None) == (head == "tied")
    if head == "lora":
        qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    ids = np.random.default_rng(0).integers(3, 300, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    labels = np.where(mask > 0, ids, -100)
    labels[0, 5] = -100
    total, count = model.loss_sum(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(labels))
    via_logits = causal_lm_loss_sum(model(jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(labels))
    assert int(count) == int(via_logits[1]) and abs(float(total) - float(via_logits[0])) < 1e-5 * float(total)
    if head != "lora":
        hf = transformers.AutoModelForCausalLM.from_pretrained(tiny, attn_implementation="eager").eval()
        with torch.no_grad():
            theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        labels=torch.tensor(labels)).loss
        assert abs(float(total / count) - float(theirs)) < 1e-5 * float(theirs)
