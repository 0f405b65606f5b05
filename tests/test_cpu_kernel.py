"""The native CPU kernel (qlora_jax.kernels.cpu_nf4, C++ through XLA FFI): built here (g++ is on
every machine this project runs on; a failed build would fail these tests, not skip them), equal to
its pure-jnp twin and to the XLA path within fp32 summation order, and chosen by qmatmul for
decode-sized inputs only."""

import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax
from qlora_jax.kernels import cpu_nf4
from qlora_jax.ops import qmatmul
from qlora_jax.quant._array import dequantize_absmax
from qlora_jax.quant._tables import CODE_TABLES


def test_the_kernel_builds_here():
    assert cpu_nf4.available(), cpu_nf4.unavailable_reason()


def _case(n, k, m, dtype, quant_type="nf4", blocksize=64, double_quant=True, seed=0):
    keys = jax.random.split(jax.random.key(seed), 2)
    w = jax.random.normal(keys[0], (n, k), jnp.float32)
    q = qlora_jax.quantize(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    x = jax.random.normal(keys[1], (m, k), jnp.float32).astype(dtype)
    return x, q


# shapes: the vector path (K a multiple of 32; bf16 with K and blocksize multiples of 64: the
# AVX-512 BF16 path, tiles of 8, 4, 2 and 1 rows) and the element-by-element one (K = 70, 1376 with
# blocks spanning rows), 1..64 rows, NF4 and FP4, double quantization on and off
CASES = [(96, 2048, 7, "bfloat16", "nf4", 64, True), (64, 2048, 1, "bfloat16", "fp4", 256, False),
         (64, 128, 1, "float32", "nf4", 64, True), (300, 96, 3, "bfloat16", "nf4", 64, True),
         (512, 1376, 1, "bfloat16", "nf4", 64, True), (33, 70, 2, "float32", "fp4", 64, False),
         (128, 256, 16, "bfloat16", "fp4", 128, True), (40, 64, 5, "float32", "nf4", 32, False),
         (72, 192, 40, "bfloat16", "nf4", 64, True), (24, 70, 64, "float32", "nf4", 64, True)]


@pytest.mark.parametrize("n,k,m,dtype,quant_type,blocksize,double_quant", CASES)
def test_kernel_matches_its_twin_and_the_xla_path(n, k, m, dtype, quant_type, blocksize, double_quant):
    x, q = _case(n, k, m, dtype, quant_type, blocksize, double_quant)
    args = (x, q.codes, dequantize_absmax(q), jnp.asarray(CODE_TABLES[quant_type]))
    ours = cpu_nf4.cpu_gemv(*args, n=n, blocksize=blocksize)
    twin = cpu_nf4.reference_cpu_gemv(*args, n=n, blocksize=blocksize)
    xla = qmatmul(x, q, backend="xla")
    assert ours.dtype == x.dtype and ours.shape == (m, n)
    for ref in (twin, xla):
        _close(ours, ref, dtype)


def _close(ours, ref, dtype):
    # the same products, summed in another order; bf16 results may then round one ulp apart
    tol = 1e-5 if dtype == "float32" else 2 ** -8
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), rtol=tol,
                               atol=tol * float(jnp.abs(ref.astype(jnp.float32)).max()))


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return set(next((line for line in f if line.startswith("flags")), "").split())


def _amx_here() -> bool:  # the CPU has AMX BF16 and Linux (5.16 on) hands it out on request
    release = tuple(int(p) for p in platform.release().split("-")[0].split(".")[:2])
    return {"amx_tile", "amx_bf16", "avx512f", "avx512bw", "avx512_bf16"} <= _cpu_flags() and release >= (5, 16)


def test_gemm_is_built_with_the_best_instructions_the_cpu_has():
    flags = _cpu_flags()
    expected = ("amx_bf16" if _amx_here() else "avx512_bf16" if {"avx512f", "avx512bw", "avx512_bf16"} <= flags
                else "avx2" if {"avx2", "fma"} <= flags else None)
    assert cpu_nf4.gemm_isa() == expected and cpu_nf4.gemm_available() == (expected is not None)


def test_qmatmul_dispatch_and_gradient():
    x, q = _case(96, 128, 8, "bfloat16")
    big = jnp.tile(x, (10, 1))  # 80 rows: the GEMM kernel in bf16 (where built), the XLA path in fp32
    # bf16 from GEMM_FROM_M rows (AMX_GEMM_FROM_M with AMX): the GEMM kernel where it has bf16 dot
    # products, else the GEMV one; float32 always the GEMV one
    isa = cpu_nf4.gemm_isa()
    from_m = {"amx_bf16": cpu_nf4.AMX_GEMM_FROM_M, "avx512_bf16": cpu_nf4.GEMM_FROM_M}.get(isa)
    assert cpu_nf4.gemm_from_m() == from_m
    for rows in (cpu_nf4.AMX_GEMM_FROM_M - 1, cpu_nf4.AMX_GEMM_FROM_M, cpu_nf4.GEMM_FROM_M - 1, cpu_nf4.GEMM_FROM_M, 16):
        hlo = jax.jit(lambda a: qmatmul(a, q, backend="cpu")).lower(big[:rows]).as_text()
        gemm = from_m is not None and rows >= from_m
        assert (cpu_nf4.GEMM_TARGET in hlo, cpu_nf4.TARGET in hlo) == (gemm, not gemm), (rows, isa)
        _close(qmatmul(big[:rows], q, backend="cpu"), qmatmul(big[:rows], q, backend="xla"), "bfloat16")
    assert cpu_nf4.TARGET in jax.jit(lambda a: qmatmul(a, q, backend="cpu")).lower(big[:16].astype(jnp.float32)).as_text()
    x = x[:cpu_nf4.AMX_GEMM_FROM_M - 1]  # fewer rows than either GEMM kernel takes
    hlo_small = jax.jit(lambda a: qmatmul(a, q, backend="cpu")).lower(x).as_text()
    hlo_big = jax.jit(lambda a: qmatmul(a, q, backend="cpu")).lower(big).as_text()
    hlo_big32 = jax.jit(lambda a: qmatmul(a, q, backend="cpu")).lower(big.astype(jnp.float32)).as_text()
    assert cpu_nf4.TARGET in hlo_small and cpu_nf4.TARGET not in hlo_big
    assert (cpu_nf4.GEMM_TARGET in hlo_big) == cpu_nf4.gemm_available() and cpu_nf4.GEMM_TARGET not in hlo_small
    assert cpu_nf4.TARGET not in hlo_big32 and cpu_nf4.GEMM_TARGET not in hlo_big32
    assert cpu_nf4.TARGET in jax.jit(lambda a: qmatmul(a, q)).lower(x[:1]).as_text()  # auto on CPU
    hlo16 = jax.jit(lambda a: qmatmul(a, q)).lower(big.astype(jnp.float16)).as_text()
    assert cpu_nf4.TARGET not in hlo16 and cpu_nf4.GEMM_TARGET not in hlo16
    _close(qmatmul(big, q, backend="cpu"), qmatmul(big, q, backend="xla"), "bfloat16")
    # dx through the GEMM kernel (bf16, where built), else the XLA path's VJP
    dy = jax.random.normal(jax.random.key(3), (80, 96)).astype(jnp.bfloat16)

    def grad(backend):
        return jax.grad(lambda a: jnp.sum(qmatmul(a, q, backend=backend).astype(jnp.float32) * dy))

    assert (cpu_nf4.GEMM_TARGET in jax.jit(grad("cpu")).lower(big).as_text()) == cpu_nf4.gemm_available()
    _close(grad("cpu")(big), grad("xla")(big), "bfloat16")
    # K not a multiple of 32: the GEMV kernel's element path for few rows, the XLA path for many
    x70, q70 = _case(48, 70, 80, "bfloat16")
    hlo70 = jax.jit(lambda a: qmatmul(a, q70, backend="cpu")).lower(x70).as_text()
    assert cpu_nf4.GEMM_TARGET not in hlo70 and cpu_nf4.TARGET not in hlo70
    np.testing.assert_array_equal(np.asarray(qmatmul(x70, q70, backend="cpu"), np.float32),
                                  np.asarray(qmatmul(x70, q70, backend="xla"), np.float32))


# (n, k, m, quant_type, blocksize, double_quant): N with a tail past the 32-column panels (300, 40),
# M not a multiple of the 12-row tile, K = 1376 (blocks spanning rows), blocksizes 32 / 64 / 128
# and reductions past the AVX2 path's 2048-element chunks (K = 4160 forward, N = 2090 backward);
# for AMX: M a multiple of its 32-row blocks (the input read in place, no tail copied), N = 1376
# (groups of 10 panels, the last one of 3), backward reductions N not a multiple of 32 (the input copied)
GEMM_CASES = [(64, 128, 80, "nf4", 64, True), (300, 96, 97, "nf4", 64, True), (512, 1376, 130, "nf4", 64, True),
              (40, 64, 5, "fp4", 32, False), (128, 256, 200, "fp4", 128, True), (1376, 512, 66, "nf4", 64, False),
              (72, 4160, 13, "nf4", 64, True), (2090, 96, 20, "fp4", 64, False), (256, 320, 64, "nf4", 64, True)]


@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("n,k,m,quant_type,blocksize,double_quant", GEMM_CASES)
def test_gemm_matches_its_twin_and_the_xla_path(n, k, m, quant_type, blocksize, double_quant, transpose):
    x, q = _case(n, k, m, "bfloat16", quant_type, blocksize, double_quant)
    if transpose:
        x = jax.random.normal(jax.random.key(7), (m, n), jnp.float32).astype(jnp.bfloat16)
    args = (x, q.codes, dequantize_absmax(q), jnp.asarray(CODE_TABLES[quant_type]))
    kw = dict(n=n, k=k, blocksize=blocksize, transpose=transpose)
    if not cpu_nf4.gemm_available():  # a CPU without AVX-512 BF16 or AVX2: a clear refusal (qmatmul takes XLA)
        with pytest.raises(RuntimeError, match="GEMM kernel is not available"):
            cpu_nf4.cpu_gemm(*args, **kw)
        return
    ours = cpu_nf4.cpu_gemm(*args, **kw)
    twin = cpu_nf4.reference_cpu_gemm(*args, **kw)
    w = qlora_jax.dequantize(q, jnp.bfloat16)
    xla = (jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32).astype(x.dtype)
           if transpose else qmatmul(x, q, backend="xla"))
    assert ours.dtype == x.dtype and ours.shape == (m, k if transpose else n)
    for ref in (twin, xla):
        _close(ours, ref, "bfloat16")


def test_gemm_refuses_what_it_does_not_take():
    x, q = _case(64, 96, 80, "bfloat16")
    args = (q.codes, dequantize_absmax(q), jnp.asarray(CODE_TABLES["nf4"]))
    if cpu_nf4.gemm_available():
        with pytest.raises(ValueError, match="float32"):
            cpu_nf4.cpu_gemm(x.astype(jnp.float32), *args, n=64, k=96, blocksize=64)
        with pytest.raises(ValueError, match=r"got bfloat16 \(80, 96\)"):
            cpu_nf4.cpu_gemm(x, *args, n=64, k=96, blocksize=64, transpose=True)  # dy must be [M, n]


_BUILD_CHECK = """
import jax, jax.numpy as jnp, numpy as np, qlora_jax
from qlora_jax.kernels import cpu_nf4
from qlora_jax.quant._array import dequantize_absmax
from qlora_jax.quant._tables import CODE_TABLES
import sys
expected = sys.argv[1] if sys.argv[1] != "none" else None
gemm = expected is not None
assert cpu_nf4.gemm_isa() == expected, cpu_nf4.gemm_isa()
for n, k, m, qt, transpose in [(300, 2080, 97, "nf4", False), (2090, 96, 20, "fp4", True), (72, 192, 1, "nf4", None),
                               (72, 192, 7, "fp4", None)]:
    q = qlora_jax.quantize(jax.random.normal(jax.random.key(0), (n, k)), quant_type=qt)
    x = jax.random.normal(jax.random.key(1), (m, n if transpose else k)).astype(jnp.bfloat16)
    args = (x, q.codes, dequantize_absmax(q), jnp.asarray(CODE_TABLES[qt]))
    if transpose is not None and not gemm:
        continue
    if transpose is None:
        got, want = cpu_nf4.cpu_gemv(*args, n=n, blocksize=64), cpu_nf4.reference_cpu_gemv(*args, n=n, blocksize=64)
    else:
        kw = dict(n=n, k=k, blocksize=64, transpose=transpose)
        got, want = cpu_nf4.cpu_gemm(*args, **kw), cpu_nf4.reference_cpu_gemm(*args, **kw)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=2 ** -8, atol=2 ** -8 * float(np.abs(want).max()))
for n, k, m, transpose in [(1030, 512, 45, False), (1030, 512, 1, False), (70, 96, 3, False), (300, 64, 32, True)]:
    if not gemm:  # the dense products (the LM head) on every GEMM kernel's blocks, decode's few rows too
        continue
    x = jax.random.normal(jax.random.key(1), (m, n if transpose else k)).astype(jnp.bfloat16)
    w = (0.1 * jax.random.normal(jax.random.key(2), (n, k))).astype(jnp.bfloat16)
    got = np.asarray(cpu_nf4.cpu_dense_gemm(x, w, transpose=transpose), np.float32)
    want = np.asarray(cpu_nf4.reference_cpu_dense_gemm(x, w, transpose=transpose), np.float32)
    np.testing.assert_allclose(got, want, rtol=2 ** -8, atol=2 ** -8 * float(np.abs(want).max()))
vectors = expected is not None  # AVX2 or AVX-512: the elementwise kernels (cross-entropy, RoPE, SwiGLU) too
assert cpu_nf4.xent_available() == cpu_nf4.rope_available() == cpu_nf4.swiglu_available() == vectors
if vectors:
    from qlora_jax.models._rope import rope_cos_sin, rope_inv_freq
    k = jax.random.split(jax.random.key(3), 4)
    logits = (jax.random.normal(k[0], (37, 300)) * 4).astype(jnp.bfloat16)
    labels = jax.random.randint(k[1], (37,), 0, 300)
    scale = jnp.full((37,), 1 / 37, jnp.float32)
    lse, ref = cpu_nf4.cpu_xent_lse(logits), cpu_nf4.reference_xent_lse(logits)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref), rtol=2e-6, atol=1e-6)
    g = np.asarray(cpu_nf4.cpu_xent_grad(logits, ref, labels, scale), np.float32)
    g_ref = np.asarray(cpu_nf4.reference_xent_grad(logits, ref, labels, scale), np.float32)
    np.testing.assert_array_less(np.abs(g - g_ref), np.abs(g_ref) * 2.0 ** -7 + 1e-38)
    x = (jax.random.normal(k[2], (2, 7, 4, 80)) * 3).astype(jnp.bfloat16)  # 40 per half: a partial group
    cos, sin = rope_cos_sin(jnp.arange(7)[None].repeat(2, 0) * 7, rope_inv_freq(80, 10000.0), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(cpu_nf4.cpu_rope(x, cos, sin), np.float32),
                                  np.asarray(cpu_nf4.reference_rope(x, cos, sin), np.float32))
    gate, up = (jax.random.normal(k[3], (2, 3, 37, 71)) * 4).astype(jnp.bfloat16)[:2]
    h, h_ref = (np.asarray(f(gate, up), np.float32) for f in (cpu_nf4.cpu_swiglu, cpu_nf4.reference_swiglu))
    np.testing.assert_array_less(np.abs(h - h_ref), np.abs(h_ref) * 2.0 ** -7 + 1e-38)
    assert np.mean(h == h_ref) >= 0.99
print("checked")
"""


@pytest.mark.parametrize("setting", ["avx2", "avx512f", "avx512"])
def test_the_avx2_and_avx512_builds_match_their_twins(tmp_path, setting):
    # QLORA_JAX_CPU_KERNEL=avx2 builds without AVX-512: where the CPU has AVX-512 this is the only
    # run of the AVX2 code (the code an AVX2-only CPU runs); where it has not, the same build again;
    # without AVX2 (another architecture) no GEMM kernel, the GEMV kernel's scalar code.
    # QLORA_JAX_CPU_KERNEL=avx512 builds without AMX: where the CPU has AMX, the only run of the
    # AVX-512 BF16 GEMM code. QLORA_JAX_CPU_KERNEL=avx512f builds without AVX-512 BF16 too: where
    # the CPU has it, the only run of the GEMV kernel's AVX-512 fp32 code on bf16 x. The elementwise
    # kernels (cross-entropy, RoPE, SwiGLU) are checked against their twins in every build
    import os
    import subprocess
    import sys
    env = dict(os.environ, QLORA_JAX_CPU_KERNEL=setting, QLORA_JAX_CACHE=str(tmp_path))
    flags = _cpu_flags()
    expected = ("avx512_bf16" if setting == "avx512" and {"avx512f", "avx512bw", "avx512_bf16"} <= flags
                else "avx2" if {"avx2", "fma"} <= flags else "none")
    proc = subprocess.run([sys.executable, "-P", "-c", _BUILD_CHECK, expected], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "checked" in proc.stdout, proc.stderr[-3000:]


def test_a_bad_kernel_setting_is_refused(monkeypatch):
    monkeypatch.setattr(cpu_nf4, "_STATE", {})
    monkeypatch.setenv("QLORA_JAX_CPU_KERNEL", "sse4")
    with pytest.raises(ValueError, match=r"QLORA_JAX_CPU_KERNEL='sse4': expected 0 \(off\), 1"):
        cpu_nf4.available()
    monkeypatch.setattr(cpu_nf4, "_STATE", {})


def test_turned_off_or_unbuildable_falls_back(monkeypatch):
    monkeypatch.setattr(cpu_nf4, "_STATE", {})
    monkeypatch.setenv("QLORA_JAX_CPU_KERNEL", "0")
    assert not cpu_nf4.available() and "QLORA_JAX_CPU_KERNEL=0" in cpu_nf4.unavailable_reason()
    x, q = _case(64, 128, 1, "float32")
    hlo = jax.jit(lambda a: qmatmul(a, q, backend="cpu")).lower(x).as_text()
    assert cpu_nf4.TARGET not in hlo
    monkeypatch.setattr(cpu_nf4, "_STATE", {})
    monkeypatch.delenv("QLORA_JAX_CPU_KERNEL")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("QLORA_JAX_CACHE", "/nonexistent-cache")
    assert not cpu_nf4.available() and "c++" in cpu_nf4.unavailable_reason()
    monkeypatch.setattr(cpu_nf4, "_STATE", {})


# ---------------------------------------------------------------- first-level quantization (host)

QUANTIZE_SHAPES = [(1,), (63,), (65,), (7, 9), (10, 70), (128, 257), (300, 1001)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_host_quantize_equals_the_xla_program(quant_type, dtype):
    """quantize_4bit_host gives the XLA first-level program's codes, absmax and finiteness bit for
    bit: short last blocks, odd counts, all-zero blocks, scales from 1e-3 to 30, blocksizes 32, 64
    and 4096, one thread and two (the blocks split between them)."""
    from qlora_jax.quant._array import quantize_first_level_checked

    rng = np.random.default_rng(len(quant_type) + len(dtype))
    for shape in QUANTIZE_SHAPES:
        for blocksize in (32, 64, 4096):
            x = (rng.standard_normal(shape) * rng.choice([1e-3, 1, 30])).astype(jnp.dtype(dtype))
            flat = x.reshape(-1)
            if flat.size > 5:
                flat[rng.integers(0, flat.size, 3)] = 0
            if flat.size >= 130:
                flat[64:128] = 0  # an all-zero block at blocksize 32 and 64
            want = [np.asarray(a) for a in quantize_first_level_checked(jnp.asarray(x), quant_type=quant_type,
                                                                         blocksize=blocksize)]
            for threads in (1, 2):
                codes, absmax, finite = cpu_nf4.quantize_4bit_host(x, quant_type, blocksize, threads=threads)
                case = (shape, blocksize, threads)
                np.testing.assert_array_equal(codes, want[0], err_msg=str(case))
                assert absmax.tobytes() == want[1].tobytes(), case
                assert finite and bool(want[2]), case


def test_host_quantize_reports_non_finite_and_refuses_what_it_does_not_take():
    x = np.ones((40, 70), np.float32)
    for index in [(0, 0), (39, 69), (20, 33)]:
        for bad in (np.nan, np.inf):
            y = x.copy()
            y[index] = bad
            assert not cpu_nf4.quantize_4bit_host(y, "nf4", 64, threads=2)[2], (index, bad)
    with pytest.raises(ValueError, match="float32/bfloat16/float16, nf4/fp4 and an even blocksize; got int32"):
        cpu_nf4.quantize_4bit_host(np.ones(64, np.int32), "nf4", 64)
    with pytest.raises(ValueError, match="got float32, 'int4', 64"):
        cpu_nf4.quantize_4bit_host(x, "int4", 64)


def test_host_double_quantization_equals_the_xla_program():
    """quantize_nested_host gives quantize_absmax's nested codes and scales bit for bit: lengths
    around the nested blocksize, all-equal blocks (absmax2 = 0: code 0), spiky and tiny absmax."""
    from qlora_jax.quant._array import absmax_offset, quantize_absmax

    rng = np.random.default_rng(0)
    for nb in [1, 2, 255, 256, 257, 1000, 11008, 90112]:
        for kind in ("random", "equal", "first block equal", "spiky"):
            a = (np.abs(rng.standard_normal(nb)) * rng.choice([1e-3, 0.05, 3])).astype(np.float32)
            if kind == "equal":
                a[:] = a[0]
            elif kind == "first block equal":
                a[:300] = a[0]
            elif kind == "spiky":
                a[rng.integers(0, nb, max(1, nb // 50))] *= 100
            for nested_blocksize in (256, 64):
                offset = absmax_offset(a)
                codes, absmax2 = cpu_nf4.quantize_nested_host(a, offset, nested_blocksize)
                want = quantize_absmax(jnp.asarray(a), offset, nested_blocksize=nested_blocksize)
                case = (nb, kind, nested_blocksize)
                np.testing.assert_array_equal(codes, np.asarray(want[0]), err_msg=str(case))
                assert absmax2.tobytes() == np.asarray(want[1]).tobytes(), case


def test_eager_quantize_on_cpu_runs_the_host_kernel(monkeypatch):
    """Eager quantize of a concrete CPU array runs no XLA quantization program (they would be
    compiled per weight shape); under jit they run. Placement follows the input's device."""
    from qlora_jax.quant import _array

    def no_xla(*args, **kwargs):
        raise AssertionError("an XLA quantization program ran")

    x = jax.random.normal(jax.random.key(0), (96, 160), jnp.float32).astype(jnp.bfloat16)
    want = qlora_jax.quantize(x)
    monkeypatch.setattr(_array, "quantize_first_level_checked", no_xla)
    monkeypatch.setattr(_array, "quantize_absmax", no_xla)
    for arg in (x, np.asarray(x), jax.device_put(x, jax.devices()[-1])):
        q = qlora_jax.quantize(arg)
        for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        if isinstance(arg, jax.Array):  # placed as the XLA program places its result
            assert q.codes.devices() == arg.devices() and q.codes.committed == arg.committed
    stacked = qlora_jax.quantize(jnp.stack([x, -x]), batch_dims=1)
    np.testing.assert_array_equal(np.asarray(stacked.codes[0]), np.asarray(want.codes))
    monkeypatch.undo()
    jitted = jax.jit(qlora_jax.quantize)(x)  # traced: the XLA programs, not the kernels
    np.testing.assert_array_equal(np.asarray(jitted.codes), np.asarray(want.codes))
    monkeypatch.setattr(cpu_nf4, "available", lambda: False)  # no kernel built: eager runs the XLA programs
    for a, b in zip(jax.tree.leaves(qlora_jax.quantize(np.asarray(x))), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("transpose", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("n,k,m", [(70, 96, 100), (300, 64, 32), (1030, 512, 45), (4130, 64, 40), (1030, 512, 1),
                                   (70, 96, 3), (1030, 64, 4), (34, 32, 2)])
def test_dense_gemm_matches_its_twin(n, k, m, transpose):
    # the LM head's products (AMX, or AVX-512 BF16 dot products): N past the 32-column panels (70,
    # 300, 1030), M with and without a partial 32-row block (12-row tiles without AMX) and decode's
    # few rows, backward reductions N not a multiple of 32 (the input copied on AMX) and past 2048
    # (4130: chunks on AMX, the sums carried)
    x = jax.random.normal(jax.random.key(1), (m, n if transpose else k)).astype(jnp.bfloat16)
    w = (0.1 * jax.random.normal(jax.random.key(2), (n, k))).astype(jnp.bfloat16)
    if not cpu_nf4.dense_gemm_supported(n, k, jnp.bfloat16, transpose=transpose):  # neither: a clear refusal
        assert cpu_nf4.gemm_isa() not in ("amx_bf16", "avx512_bf16", "avx2")
        with pytest.raises(ValueError, match="AMX, AVX-512 BF16 or AVX2"):
            cpu_nf4.cpu_dense_gemm(x, w, transpose=transpose)
        return
    ours = cpu_nf4.cpu_dense_gemm(x, w, transpose=transpose)
    assert ours.dtype == jnp.bfloat16 and ours.shape == (m, k if transpose else n)
    _close(ours, cpu_nf4.reference_cpu_dense_gemm(x, w, transpose=transpose), "bfloat16")


def test_a_dense_product_of_few_rows_runs_on_the_kernel_with_autodiffs_gradient():
    # decode's LM head: up to dense_kernel_rows() rows of bf16 x (4, on AMX, AVX-512 BF16 or AVX2) against
    # a dense bf16 weight take the kernel (XLA's one-row dot is slow on CPU), not more rows, not
    # backend="xla"; gradients are the XLA product's
    from qlora_jax.ops import _qmatmul

    w = (0.1 * jax.random.normal(jax.random.key(2), (1030, 512))).astype(jnp.bfloat16)
    for shape, backend, native in [((1, 1, 512), "auto", True), ((2, 2, 512), "auto", True),
                                   ((1, 5, 512), "auto", False), ((1, 1, 512), "xla", False)]:
        x = jax.random.normal(jax.random.key(1), shape).astype(jnp.bfloat16)
        hlo = jax.jit(lambda a, b: qmatmul(a, b, backend=backend)).lower(x, w).as_text()
        rows = shape[0] * shape[1]
        expect = native and rows <= {"amx_bf16": 4, "avx512_bf16": 4, "avx2": 4}.get(cpu_nf4.gemm_isa(), 0)
        assert (cpu_nf4.DENSE_GEMM_TARGET in hlo) == expect, (shape, backend)
        ours = qmatmul(x, w, backend=backend)
        assert ours.shape == (*shape[:-1], 1030) and ours.dtype == jnp.bfloat16
        _close(ours.reshape(-1, 1030), _qmatmul._dot_t(x, w).reshape(-1, 1030), "bfloat16")
        dy = jax.random.normal(jax.random.key(3), ours.shape).astype(jnp.bfloat16)
        got = jax.vjp(lambda a, b: qmatmul(a, b, backend=backend), x, w)[1](dy)
        want = jax.vjp(_qmatmul._dot_t, x, w)[1](dy)
        for g, e in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(e, np.float32))


def test_dense_gemm_refuses_what_it_does_not_take():
    x = jnp.zeros((8, 96), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"got float32 \(8, 96\)"):
        cpu_nf4.cpu_dense_gemm(x.astype(jnp.float32), jnp.zeros((64, 96), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"bfloat16 \[64, 80\] weight"):  # K not a multiple of 32
        cpu_nf4.cpu_dense_gemm(jnp.zeros((8, 80), jnp.bfloat16), jnp.zeros((64, 80), jnp.bfloat16))
