"""The fused dequantize-matmul Pallas kernels, proven without a GPU (../shared/design.md):
numbers in interpret mode against the pure-jnp twins and the XLA path, forward and VJP; lowering
for CUDA through jax.export down to the Triton custom call; fusion (no dequantized weight outside
the kernel). The same checks at full size and compiled for real run under the ``gpu`` marker."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import qlora_jax
from qlora_jax.kernels import nf4_matmul as km
from qlora_jax.ops import qmatmul
from qlora_jax.ops._qmatmul import _block_m, _kernel_operands, resolve_backend
from qlora_jax.quant._array import dequantize_absmax
from qlora_jax.quant._tables import CODE_TABLES

TRITON = "__gpu$xla.gpu.triton"


def _weight(n, k, quant_type="nf4", blocksize=64, double_quant=True, seed=0):
    w = jax.random.normal(jax.random.key(seed), (n, k), jnp.float32)
    return qlora_jax.quantize(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)


def _close(got, want, dtype):
    """Equal up to the fp32 accumulation order, then one rounding to ``dtype``."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    eps = float(jnp.finfo(dtype).eps)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= max(eps, 1e-6) * scale, (np.abs(got - want).max(), scale)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_values_are_the_tables(quant_type):
    got = np.asarray(km.code_values(jnp.arange(16, dtype=jnp.uint8), quant_type))
    np.testing.assert_array_equal(got, np.asarray(CODE_TABLES[quant_type], np.float32))


# (M, N, K, blocksize): tails that the tiles do not divide (M 5, 70; N 40, 17, 200), blocksizes
# below, at and above the K step
CASES = [(5, 40, 128, 64), (70, 96, 256, 128), (3, 17, 64, 32), (33, 200, 192, 64)]


@pytest.mark.parametrize("m,n,k,blocksize", CASES)
@pytest.mark.parametrize("quant_type,dtype,double_quant", [("nf4", jnp.bfloat16, True), ("fp4", jnp.float16, True),
                                                           ("nf4", jnp.float32, False), ("fp4", jnp.bfloat16, False)])
def test_forward_and_backward_kernels_in_interpret_mode(m, n, k, blocksize, quant_type, dtype, double_quant):
    q = _weight(n, k, quant_type, blocksize, double_quant)
    arrays, kw = _kernel_operands(q)
    assert (arrays[1].dtype == jnp.uint8) == double_quant  # 8-bit absmax codes reach the kernel as they are
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(dtype)
    dy = jax.random.normal(jax.random.key(2), (m, n), jnp.float32).astype(dtype)
    # the twin's absmax decoding is dequantize's, bit for bit, and so its weight
    np.testing.assert_array_equal(km.absmax_values(*arrays[1:], nested_blocksize=kw["nested_blocksize"]),
                                  dequantize_absmax(q).reshape(n, -1))
    ref = km.reference_matmul(x, *arrays, **kw)
    xla = qmatmul(x, q, backend="xla")
    _close(ref, xla, dtype)  # the twin is the XLA path
    for bm, bn in [(16, 16), (16, 32), (64, 64)]:
        y = km.pallas_matmul(x, *arrays, block_m=bm, block_n=bn, interpret=True, **kw)
        assert y.dtype == dtype and y.shape == (m, n)
        _close(y, ref, dtype)
        dx = km.pallas_matmul_t(dy, *arrays, block_m=bm, block_n=bn, interpret=True, **kw)
        assert dx.dtype == dtype and dx.shape == (m, k)
        _close(dx, km.reference_matmul_t(dy, *arrays, **kw), dtype)
    for rows in (1, 2, 4, 8, 16):  # the skinny kernel, for decode
        y = km.pallas_gemv(x[:rows] if rows <= m else jnp.resize(x, (rows, k)), *arrays, block_n=16, interpret=True,
                           **kw)
        _close(y, km.reference_matmul(x[:rows] if rows <= m else jnp.resize(x, (rows, k)), *arrays, **kw), dtype)
    # the op: dispatch (skinny below 17 rows, padded), reshapes, custom VJP
    _close(qmatmul(x, q, backend="pallas", interpret=True), ref, dtype)


@pytest.mark.parametrize("quant_type,blocksize,double_quant", [("nf4", 64, True), ("fp4", 32, True),
                                                               ("nf4", 128, False)])
def test_the_kernels_dequantize_bit_exactly(quant_type, blocksize, double_quant):
    """Through an identity matrix the kernels return the weight they built in registers: equal bit
    for bit to ``dequantize`` (bitsandbytes' values), nested absmax decoding included."""
    n, k = 48, 384  # 288 or 576 absmax values: nested blocks of 256 end mid-row
    q = _weight(n, k, quant_type, blocksize, double_quant)
    arrays, kw = _kernel_operands(q)
    w = np.asarray(qlora_jax.dequantize(q, jnp.float32))
    y = km.pallas_matmul(jnp.eye(k, dtype=jnp.float32), *arrays, block_m=32, block_n=16, interpret=True, **kw)
    np.testing.assert_array_equal(np.asarray(y), w.T)
    for j in (0, 77, k - 1):  # the skinny kernel: one column of the identity at a time
        y = km.pallas_gemv(jnp.eye(k, dtype=jnp.float32)[j:j + 1], *arrays, block_n=16, interpret=True, **kw)
        np.testing.assert_array_equal(np.asarray(y)[0], w[:, j])
    dx = km.pallas_matmul_t(jnp.eye(n, dtype=jnp.float32), *arrays, block_m=16, block_n=16, interpret=True, **kw)
    np.testing.assert_array_equal(np.asarray(dx), w)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_op_vjp_through_the_kernels_matches_grad_of_the_reference(dtype):
    q = _weight(96, 320)
    arrays, kw = _kernel_operands(q)
    x = jax.random.normal(jax.random.key(1), (2, 9, 320), jnp.float32).astype(dtype)

    dy = jax.random.normal(jax.random.key(2), (2, 9, 96), jnp.float32).astype(dtype)

    def loss(fn):  # linear in the op's output: its gradient is exactly the VJP of dy
        return lambda a: jnp.sum(fn(a).astype(jnp.float32) * dy.astype(jnp.float32))

    ours = jax.jit(jax.value_and_grad(loss(lambda a: qmatmul(a, q, backend="pallas", interpret=True))))(x)
    ref = jax.value_and_grad(loss(lambda a: km.reference_matmul(a, *arrays, **kw)))(x)
    assert ours[1].dtype == dtype and ours[1].shape == x.shape
    _close(ours[1], ref[1], dtype)
    np.testing.assert_allclose(float(ours[0]), float(ref[0]), rtol=1e-3 if dtype == jnp.bfloat16 else 1e-5)


def test_dispatch():
    q, odd = _weight(64, 128), _weight(64, 96)  # K=96: not a multiple of 64, the XLA path takes it
    assert resolve_backend("pallas", q) == "pallas" and resolve_backend("pallas", odd) == "xla"
    assert resolve_backend("auto", q) == {"gpu": "pallas", "cpu": "cpu"}.get(jax.default_backend(), "xla")
    assert resolve_backend("auto", jnp.ones((4, 4))) == "dense"
    x = jnp.ones((3, 96), jnp.float32)
    np.testing.assert_array_equal(qmatmul(x, odd, backend="pallas"), qmatmul(x, odd, backend="xla"))
    assert [_block_m(m) for m in (1, 16, 17, 32, 33, 8192)] == [16, 16, 32, 32, 64, 64]
    with pytest.raises(ValueError, match="pallas_gemv takes M a power of two <= 16 rows; got M=3"):
        km.pallas_gemv(jnp.ones((3, 128)), *_kernel_operands(q)[0], **_kernel_operands(q)[1])
    with pytest.raises(ValueError, match="block_n=48 must be a power of two"):
        km.pallas_matmul(jnp.ones((4, 128)), *_kernel_operands(q)[0], **_kernel_operands(q)[1], block_n=48)


def _export_cuda(fn, *args):
    exp = export.export(jax.jit(fn), platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
    return exp.mlir_module()


@pytest.mark.parametrize("m", [1, 16, 32, 128])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("quant_type,blocksize", [("nf4", 64), ("fp4", 128), ("nf4", 32)])
def test_every_dispatched_configuration_lowers_for_cuda_and_stays_fused(m, dtype, quant_type, blocksize):
    """The op's forward and backward (block sizes as the dispatcher picks them) lower for CUDA to
    Triton custom calls, and no array of the weight's [N, K] shape exists outside them."""
    n, k = 192, 384  # K a multiple of every blocksize here: the kernel takes them all
    q = jax.eval_shape(lambda: _weight(n, k, quant_type, blocksize))
    x = jax.ShapeDtypeStruct((m, k), dtype)

    def fwd_bwd(x, q):
        y, vjp = jax.vjp(lambda a: qmatmul(a, q, backend="pallas"), x)
        return y, vjp(jnp.ones_like(y))[0]

    text = _export_cuda(fwd_bwd, x, q)
    calls = re.findall(r"stablehlo.custom_call @([^\(]+)\(", text)
    assert calls.count(TRITON) == 2 and set(calls) == {TRITON}, calls  # forward and dx, nothing else
    assert not re.search(rf"tensor<{n}x{k}x", text) and not re.search(rf"tensor<{n * k}x", text)
    assert re.search(rf"tensor<{n}x{k // 2}xui8>", text)  # the packed codes reach the kernel as they are
    assert re.search(rf"tensor<{n}x{k // blocksize}xui8>", text)  # so do the 8-bit absmax codes


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)])
@pytest.mark.parametrize("m", [1, 16, 128, 2048])
def test_full_size_on_gpu(m, n, k):
    q = _weight(n, k)
    if m == 16:  # the weight the kernel builds, bit for bit (no FMA fused into the absmax decoding)
        arrays, kw = _kernel_operands(q)
        y = km.pallas_matmul(jnp.eye(k, dtype=jnp.float32)[:1024], *arrays, **kw)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(qlora_jax.dequantize(q, jnp.float32)).T[:1024])
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(jnp.bfloat16)
    dy = jax.random.normal(jax.random.key(2), (m, n), jnp.float32).astype(jnp.bfloat16)
    y, vjp = jax.vjp(lambda a: qmatmul(a, q, backend="pallas"), x)
    y_ref, vjp_ref = jax.vjp(lambda a: qmatmul(a, q, backend="xla"), x)
    _close(y, y_ref, jnp.bfloat16)
    _close(vjp(dy)[0], vjp_ref(dy)[0], jnp.bfloat16)


def test_block_sizes_are_measured_once_and_cached_on_disk(tmp_path):
    """The autotuner runs every candidate on representative inputs (here in interpret mode, with a
    stand-in clock that favours the last candidate), keeps the fastest, writes it atomically to its JSON
    file, and the next tuner (a new process) reads it without measuring; candidates that fail are
    skipped. It runs while the op is being traced under jit."""
    from qlora_jax.kernels.autotune import Autotuner
    from qlora_jax.ops._qmatmul import _candidates, _choose

    calls = []

    def clock(fn):  # a stand-in clock: each candidate really runs; later candidates "are faster"
        out = jax.block_until_ready(fn())
        assert out.shape == (16, 64) and out.dtype == jnp.bfloat16
        calls.append(1)
        return 100.0 - len(calls)

    q = _weight(64, 128)
    tuner = Autotuner(tmp_path / "autotune.json", timer=clock)

    @jax.jit
    def traced(x):  # tuning happens at trace time, on concrete inputs
        return jnp.zeros(()) + len(_choose("gemv", 16, q, jnp.bfloat16, interpret=True, tuner=tuner))

    traced(jnp.ones(3))
    best = _choose("gemv", 16, q, jnp.bfloat16, interpret=True, tuner=tuner)
    assert best == _candidates("gemv", 16)[-1] and len(calls) == len(_candidates("gemv", 16))
    saved = json.loads((tmp_path / "autotune.json").read_text())
    (entry,) = saved
    assert saved[entry]["config"] == best and '"dtype": "bfloat16"' in entry and '"m": 16' in entry
    fresh = Autotuner(tmp_path / "autotune.json", timer=lambda fn: pytest.fail("measured again"))
    assert _choose("gemv", 16, q, jnp.bfloat16, interpret=True, tuner=fresh) == best
    # another dtype is another entry; a candidate that cannot run is skipped
    broken = Autotuner(tmp_path / "autotune.json",
                       timer=lambda fn: (_ for _ in ()).throw(RuntimeError("too much shared memory")))
    with pytest.raises(RuntimeError, match="no configuration of kernel nf4_matmul.gemm ran"):
        _choose("gemm", 64, q, jnp.float16, interpret=True, tuner=broken)
    assert _choose("gemm", 64, q, jnp.float16, interpret=True) == _candidates("gemm", 64)[0]  # CPU: the default


@pytest.mark.parametrize("kind", ["gemm", "gemv", "gemm_t"])
def test_every_autotune_candidate_lowers_for_cuda(kind):
    """The autotuner may pick any candidate on a GPU: each one lowers to the Triton custom call."""
    from qlora_jax.ops._qmatmul import _candidates

    n, k, m = 256, 512, 16 if kind == "gemv" else 128
    q = jax.eval_shape(lambda: _weight(n, k))
    arrays = jax.eval_shape(lambda w: _kernel_operands(w)[0], q)
    static = _kernel_operands(_weight(8, 64))[1]  # the same static arguments (nf4, 64, 256)
    fn = {"gemm": km.pallas_matmul, "gemv": km.pallas_gemv, "gemm_t": km.pallas_matmul_t}[kind]
    x = jax.ShapeDtypeStruct((m, n if kind == "gemm_t" else k), jnp.bfloat16)
    for config in _candidates(kind, m):
        text = _export_cuda(lambda x, *a, c=config: fn(x, *a, **static, **c), x, *arrays)
        assert TRITON in text, config


def test_a_model_trains_through_the_pallas_kernels(tmp_path, monkeypatch):
    """A tiny NF4 Llama with ``kernel: pallas`` (interpret mode on CPU) under the real train step
    (scanned layers, checkpointing, LoRA, two micro-batches): loss and adapter gradients agree
    with the XLA path, so the kernels' custom VJP composes with scan, remat and accumulation."""
    import optax
    from flax import nnx

    from qlora_jax.lora import LoraParam
    from qlora_jax.models import from_pretrained, write_tiny_llama
    from qlora_jax.train import split_model, train_step

    monkeypatch.setenv("QLORA_JAX_PALLAS_INTERPRET", "1")
    path = write_tiny_llama(tmp_path / "tiny")
    batch = {k: jnp.asarray(np.random.default_rng(0).integers(3, 250, (2, 2, 24)), jnp.int32)
             for k in ("input_ids", "labels")}
    batch["attention_mask"] = jnp.ones((2, 2, 24), jnp.int32)
    results = {}
    for kernel in ("xla", "pallas"):
        q = qlora_jax.QuantConfig(compute_dtype="float32", kernel=kernel)
        model = from_pretrained(path, quantization=q, gradient_checkpointing=True)
        qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        parts = split_model(model)
        tx = optax.sgd(1.0)  # the update is minus the gradient
        step = lambda t, r, f, o, b: train_step(parts.graphdef, tx, t, r, f, o, b)  # noqa: E731
        args = (parts.trainable, parts.rngs, parts.frozen, tx.init(parts.trainable), batch)
        kernels = str(jax.make_jaxpr(step)(*args)).count("pallas_call")
        assert (kernels > 0) == (kernel == "pallas"), kernels  # the kernels really run (K=352 ones: XLA)
        new, _, _, m = jax.jit(step)(*args)
        results[kernel] = (float(m["loss"]), jax.tree.map(lambda a, b: a - b, parts.trainable, new))
        assert isinstance(jax.tree.leaves(nnx.state(model, LoraParam))[0], jax.Array)
    assert abs(results["pallas"][0] - results["xla"][0]) <= 1e-5 * abs(results["xla"][0])
    for a, b in zip(jax.tree.leaves(results["pallas"][1]), jax.tree.leaves(results["xla"][1])):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4 * np.abs(np.asarray(b)).max() + 1e-7
