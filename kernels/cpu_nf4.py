"""The native CPU kernels of the quantized linear (``qmatmul(..., backend="cpu")``), C++ registered
with XLA as FFI custom calls:

- ``cpu_gemv`` (``cpu/nf4_gemv.cc``): an NF4/FP4 matrix-vector product for up to ``MAX_M`` rows
  (decode, short prefills), float32 or bfloat16; ``cpu_gemv_layer``, the same for one layer of a
  scanned model's stacked weight, read in place;
- ``cpu_gemm`` (``cpu/nf4_gemm.cc``): training-sized products in bfloat16, forward (x @ W^T) and
  backward (dy @ W), with AMX tiles (Intel Sapphire Rapids and later, where Linux grants them),
  AVX-512 BF16 dot products or, on CPUs without them, AVX2 fp32 FMAs of the same bf16 values
  (``gemm_available()``, ``gemm_isa()``);
- ``cpu_dense_gemm`` (``cpu/nf4_gemm.cc``, AMX, AVX-512 BF16 or AVX2): the same products with a dense
  bf16 weight
  (the LM head: ``ops.linear_cross_entropy_sum``);
- ``cpu_attention`` and ``cpu_attention_bwd`` (``cpu/attention.cc``): grouped-query attention for
  training in bfloat16, forward and backward, with AVX-512 BF16 dot products, their products on
  AMX tiles where the GEMM has them and head_dim is a multiple of 32 (``attention_available()``):
  no [S, T] scores or probabilities written to memory or saved for
  the backward, masked 32-key panels skipped;
- ``cpu_xent_lse`` and ``cpu_xent_grad`` (``cpu/xent.cc``): the LM head's cross-entropy on bf16
  logits, each row's logsumexp and the logits' gradient, in one pass each over the logits
  (``xent_available()``: AVX-512 or AVX2);
- ``cpu_rope`` and ``cpu_rope_bwd`` (``cpu/rope.cc``): rotary embeddings on bf16 and their
  gradient, bit for bit as the jnp form (``rope_available()``: AVX-512 or AVX2);
- ``cpu_swiglu`` and ``cpu_swiglu_bwd`` (``cpu/swiglu.cc``): the SwiGLU MLP's ``silu(g) * u`` on
  bf16 and its gradient, PyTorch's arithmetic in one pass each (``swiglu_available()``: AVX-512 or
  AVX2);
- ``cpu_lora_down``, ``cpu_lora_up`` and ``cpu_lora_grad`` (``cpu/lora.cc``): LoRA's rank-r
  products of bf16 activations with fp32 adapters, the B product summed into the base layer's
  bf16 result in the same pass, and the adapters' weight gradients from bf16 operands
  (``lora_available()``: AVX-512);
- ``quantize_4bit_host`` and ``quantize_nested_host`` (``cpu/quantize.cc``, plain C called through
  ctypes on host arrays, no XLA): the first level of ``quantize`` (NF4/FP4 codes and fp32 absmax)
  and its double quantization, which eager quantization on CPU (checkpoint loading) runs instead
  of XLA programs compiled per weight shape.

XLA on CPU has no fused 4-bit matmul: the XLA path dequantizes every weight to the compute dtype
first (a full write and read of a bf16 copy, on every forward and backward). These kernels read the
packed codes (an AVX-512 permute looks up 16 codes at a time, two AVX2 ones 8), scale and round them exactly as
``dequantize(w, x.dtype)`` does, and multiply with fp32 accumulation, on XLA's CPU threads: results
differ from the XLA path in fp32 summation order only.

It is compiled on first use on the machine that runs it (``g++ -O3 -march=native``, about
three seconds, cached under ``$QLORA_JAX_CACHE/kernels`` or ``~/.cache/qlora_jax/kernels`` by a
hash of the source, the compiler and the CPU): the installed wheel stays pure Python and portable.
Where it cannot be built (no compiler, no XLA FFI headers) ``available()`` is False, says why in
``unavailable_reason()``, and ``qmatmul`` takes the pure-JAX path. ``QLORA_JAX_CPU_KERNEL=0``
turns it off; ``QLORA_JAX_CPU_KERNEL=avx2`` builds it without AVX-512 (the AVX2 code a CPU without
AVX-512 runs, for testing it on one with), ``QLORA_JAX_CPU_KERNEL=avx512`` without AMX (likewise),
``QLORA_JAX_CPU_KERNEL=avx512f`` without AVX-512 BF16 either (AVX-512's fp32 paths; no GEMM or
attention kernel of AVX-512 then: the AVX2 GEMM).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCES = tuple(Path(__file__).with_name("cpu") / name
                for name in ("nf4_gemv.cc", "nf4_gemm.cc", "quantize.cc", "attention.cc", "xent.cc", "rope.cc",
                             "swiglu.cc", "lora.cc"))
HEADERS = (Path(__file__).with_name("cpu") / "common.h",)
TARGET = "qlora_jax_nf4_gemv"
LAYER_TARGET = "qlora_jax_nf4_gemv_layer"
GEMM_TARGET = "qlora_jax_nf4_gemm"
DENSE_GEMM_TARGET = "qlora_jax_dense_gemm"
ATTENTION_TARGETS = ("qlora_jax_attention_fwd", "qlora_jax_attention_bwd")
XENT_TARGETS = ("qlora_jax_xent_fwd", "qlora_jax_xent_bwd")
ROPE_TARGETS = ("qlora_jax_rope_fwd", "qlora_jax_rope_bwd")
SWIGLU_TARGETS = ("qlora_jax_swiglu_fwd", "qlora_jax_swiglu_bwd")
LORA_TARGETS = ("qlora_jax_lora_down", "qlora_jax_lora_up_add", "qlora_jax_lora_up", "qlora_jax_lora_grad")
MAX_M = 64  # rows of x the GEMV kernel takes (decode, short prefills); more: the GEMM kernel (bf16) or XLA
# bf16 rows from which the AVX-512 BF16 GEMM kernel runs instead of the GEMV one (measured on Zen 5,
# a 5632 x 2048 weight: GEMV 1.84 / 2.51 / 6.51 ms at 12 / 16 / 32 rows, GEMM 1.66 / 1.81 / 2.07)
GEMM_FROM_M = 12
# ... and from which the AMX one does (Xeon with AMX, 2 cores, 5632 x 2048: GEMV 1.02 / 2.34 ms at
# 4 / 8 rows, AMX GEMM 1.42 / 1.44)
AMX_GEMM_FROM_M = 6
_STATE: dict = {}


def _cache_root() -> Path:
    root = os.environ.get("QLORA_JAX_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "qlora_jax") / "kernels"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build() -> Path:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++/c++ or $CXX) on PATH")
    include = jax.ffi.include_dir()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    flags = ["-O3", "-march=native", "-ffp-contract=off", "-pthread"]
    if os.environ.get("QLORA_JAX_CPU_KERNEL") == "avx2":
        flags.append("-mno-avx512f")  # every AVX-512 subset off: the AVX2 paths
    if os.environ.get("QLORA_JAX_CPU_KERNEL") == "avx512f":
        flags.append("-mno-avx512bf16")  # AVX-512 without its bf16 dot products
    if os.environ.get("QLORA_JAX_CPU_KERNEL") in ("avx2", "avx512", "avx512f"):
        flags += ["-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8"]  # no AMX: the AVX-512 BF16 GEMM
    key = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES + HEADERS) + version.encode()
                         + _cpu_signature().encode() + jax.__version__.encode() + " ".join(flags).encode()
                         ).hexdigest()[:16]
    out = _cache_root() / key / "libqlora_nf4_gemv.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # built aside, then renamed: never half a library
        lib = Path(tmp) / out.name
        cmd = [cxx, *flags, "-shared", "-fPIC", "-std=c++17",
               "-w", f"-I{include}", *map(str, SOURCES), "-o", str(lib)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-600:]}")
        os.replace(lib, out)
    return out


def _load() -> bool:
    if "ok" in _STATE:
        return _STATE["ok"]
    setting = os.environ.get("QLORA_JAX_CPU_KERNEL")
    if setting not in (None, "", "0", "1", "avx2", "avx512", "avx512f"):
        raise ValueError(f"QLORA_JAX_CPU_KERNEL={setting!r}: expected 0 (off), 1 (the default), avx512, avx512f "
                         "or avx2")
    _STATE["ok"], _STATE["reason"], _STATE["gemm"], _STATE["attention"] = False, None, None, False
    _STATE["xent"] = _STATE["rope"] = _STATE["swiglu"] = _STATE["lora"] = False
    if setting == "0":
        _STATE["reason"] = "turned off (QLORA_JAX_CPU_KERNEL=0)"
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.QloraNf4Gemv), platform="cpu")
        jax.ffi.register_ffi_target(LAYER_TARGET, jax.ffi.pycapsule(lib.QloraNf4GemvLayer), platform="cpu")
        isa = lib.QloraNf4GemmSupported()  # what the CPU has: 3 AMX, 2 AVX-512 BF16, 1 AVX2 + FMA, 0 neither
        if isa:
            jax.ffi.register_ffi_target(GEMM_TARGET, jax.ffi.pycapsule(lib.QloraNf4Gemm), platform="cpu")
            _STATE["gemm"] = {3: "amx_bf16", 2: "avx512_bf16", 1: "avx2"}[isa]
            # the dense bf16 products (the LM head) on the same blocks
            jax.ffi.register_ffi_target(DENSE_GEMM_TARGET, jax.ffi.pycapsule(lib.QloraDenseGemm), platform="cpu")
        if lib.QloraAttentionSupported():  # AVX-512 BF16
            for target, fn in zip(ATTENTION_TARGETS, (lib.QloraAttentionFwd, lib.QloraAttentionBwd)):
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(fn), platform="cpu")
            _STATE["attention"] = True
        if lib.QloraXentSupported():  # AVX-512 BW or AVX2
            for target, fn in zip(XENT_TARGETS, (lib.QloraXentFwd, lib.QloraXentBwd)):
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(fn), platform="cpu")
            _STATE["xent"] = True
        if lib.QloraRopeSupported():  # AVX-512 BW or AVX2
            for target, fn in zip(ROPE_TARGETS, (lib.QloraRopeFwd, lib.QloraRopeBwd)):
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(fn), platform="cpu")
            _STATE["rope"] = True
        if lib.QloraSwigluSupported():  # AVX-512 BW or AVX2
            for target, fn in zip(SWIGLU_TARGETS, (lib.QloraSwigluFwd, lib.QloraSwigluBwd)):
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(fn), platform="cpu")
            _STATE["swiglu"] = True
        if lib.QloraLoraSupported():  # AVX-512 BW
            for target, fn in zip(LORA_TARGETS, (lib.QloraLoraDown, lib.QloraLoraUpAdd, lib.QloraLoraUp,
                                                    lib.QloraLoraGrad)):
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(fn), platform="cpu")
            _STATE["lora"] = True
        lib.QloraQuantize4bit.restype = ctypes.c_int  # the host quantization (plain C, ctypes)
        lib.QloraQuantizeNested.restype = None
    except Exception as e:  # noqa: BLE001  (any failure means: the pure-JAX path)
        _STATE["reason"] = f"{type(e).__name__}: {e}"
        return False
    _STATE["ok"], _STATE["lib"] = True, lib
    return True


_DTYPE_IDS = {np.dtype(np.float32): 0, np.dtype(jnp.bfloat16): 1, np.dtype(np.float16): 2}


def _host_lib():
    if not _load():
        raise RuntimeError(f"the CPU kernel is not available: {_STATE['reason']}")
    return _STATE["lib"]


def _ptr(a: np.ndarray | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if a is None else a.ctypes.data)


def quantize_4bit_host(x: np.ndarray, quant_type: str, blocksize: int, threads: int | None = None):
    """First-level 4-bit quantization of one host tensor (flattened row-major), bit for bit as
    ``quant._core.quantize_4bit_flat``: (packed codes u8 [ceil(N/2)], fp32 absmax [NB], whether
    every element is finite). ``x`` is float32, bfloat16 or float16; ``blocksize`` even. Blocks are
    split over ``threads`` (default: the CPUs this process may run on)."""
    from ..quant import _tables

    lib = _host_lib()
    x = np.ascontiguousarray(x)
    if x.dtype not in _DTYPE_IDS or quant_type not in ("nf4", "fp4") or blocksize % 2:
        raise ValueError(f"quantize_4bit_host takes float32/bfloat16/float16, nf4/fp4 and an even blocksize; "
                         f"got {x.dtype}, {quant_type!r}, {blocksize}")
    n = x.size
    codes = np.empty(-(-n // 2), np.uint8)
    absmax = np.empty(-(-n // blocksize), np.float32)
    mids = np.ascontiguousarray(_tables.NF4_MIDPOINTS if quant_type == "nf4" else _tables.FP4_MIDPOINTS, np.float32)
    order = None if quant_type == "nf4" else np.ascontiguousarray(_tables.FP4_ORDER, np.uint8)
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    finite = lib.QloraQuantize4bit(_ptr(x), ctypes.c_int(_DTYPE_IDS[x.dtype]), ctypes.c_int64(n),
                                   ctypes.c_int(blocksize), _ptr(mids), _ptr(order), _ptr(codes), _ptr(absmax),
                                   ctypes.c_int(threads))
    return codes, absmax, bool(finite)


def quantize_nested_host(absmax: np.ndarray, offset, nested_blocksize: int):
    """Double quantization of one tensor's fp32 absmax [NB] given its ``offset``, bit for bit as
    ``quant._core.quantize_nested_flat``: (uint8 codes [NB], fp32 nested absmax [ceil(NB/nb2)])."""
    from ..quant import _tables

    lib = _host_lib()
    absmax = np.ascontiguousarray(absmax, np.float32).reshape(-1)
    codes = np.empty(absmax.size, np.uint8)
    absmax2 = np.empty(-(-absmax.size // nested_blocksize), np.float32)
    table = np.ascontiguousarray(_tables.DYNAMIC_MAP, np.float32)
    lib.QloraQuantizeNested(_ptr(absmax), ctypes.c_int64(absmax.size), ctypes.c_float(np.float32(offset)),
                            ctypes.c_int(nested_blocksize), _ptr(table), _ptr(codes), _ptr(absmax2))
    return codes, absmax2


def available() -> bool:
    """Whether the kernel is built and registered (builds it on the first call)."""
    return _load()


def unavailable_reason() -> str | None:
    _load()
    return _STATE["reason"]


def gemm_available() -> bool:
    """Whether the training-sized kernel is built (it needs a CPU with AVX-512 BF16 or AVX2 + FMA)."""
    return _load() and _STATE["gemm"] is not None


def gemm_isa() -> str | None:
    """The instructions the training-sized kernel runs: ``"amx_bf16"`` (AMX tiles of bf16 dot
    products; the weight decoded with AVX-512), ``"avx512_bf16"`` (bf16 dot products), ``"avx2"``
    (fp32 FMAs of the bf16 values), or None where it is not available."""
    return _STATE["gemm"] if _load() else None


def gemm_supported(n: int, k: int, blocksize: int, dtype, *, transpose: bool) -> bool:
    """Weights [n, k] and dtypes ``cpu_gemm`` takes: bfloat16, K and blocksize multiples of 32 (each
    32-element group of a row in one block) and, for the backward, an even N."""
    return (jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) and k % 32 == 0 and blocksize % 32 == 0
            and (n % 2 == 0 or not transpose))


def gemm_from_m() -> int | None:
    """The rows from which bfloat16 products take the GEMM kernel instead of the GEMV one:
    ``AMX_GEMM_FROM_M`` with AMX, ``GEMM_FROM_M`` with AVX-512 BF16, None without bf16 dot products
    (the GEMV kernel up to ``MAX_M`` rows)."""
    return {"amx_bf16": AMX_GEMM_FROM_M, "avx512_bf16": GEMM_FROM_M}.get(gemm_isa())


def gemv_takes(m: int, n: int, k: int, blocksize: int, dtype) -> bool:
    """Whether the GEMV kernel runs an [m, k] x [n, k]^T product: up to ``MAX_M`` rows of float32
    or bfloat16, but bfloat16 from ``gemm_from_m()`` rows goes to the GEMM kernel where it takes
    the weight."""
    if not supported(m, dtype):
        return False
    from_m = gemm_from_m()
    if from_m is None or not gemm_supported(n, k, blocksize, dtype, transpose=False):
        return True
    return m < from_m


def supported(m: int, dtype) -> bool:
    """Shapes and dtypes the kernel takes: up to ``MAX_M`` rows of float32 or bfloat16."""
    return m <= MAX_M and jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@functools.partial(jax.jit, static_argnames=("n", "blocksize"))
def cpu_gemv(x2, codes, absmax, table, *, n: int, blocksize: int):
    """y [M, n] = x2 [M, K] @ W^T in x2's dtype, W given by its packed ``codes`` (u8 [n*K/2]), fp32
    first-level ``absmax`` [ceil(n*K/blocksize)] and code ``table`` (f32 [16])."""
    if not _load():
        raise RuntimeError(f"the CPU kernel is not available: {_STATE['reason']}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x2.shape[0], n), x2.dtype), vmap_method="sequential")
    return call(x2, codes.reshape(-1), absmax.reshape(-1).astype(jnp.float32), table.astype(jnp.float32),
                blocksize=np.int64(blocksize))


@functools.partial(jax.jit, static_argnames=("n", "blocksize"))
def cpu_gemv_layer(x2, codes, layer, absmax, table, *, n: int, blocksize: int):
    """``cpu_gemv`` with W one layer of a stack: ``codes`` u8 [L, n*K/2] (every layer's, read where
    they lie: no slice of them is made), ``layer`` an int scalar in [0, L); ``absmax`` [ceil(n*K /
    blocksize)] is that layer's."""
    if not _load():
        raise RuntimeError(f"the CPU kernel is not available: {_STATE['reason']}")
    call = jax.ffi.ffi_call(LAYER_TARGET, jax.ShapeDtypeStruct((x2.shape[0], n), x2.dtype), vmap_method="sequential")
    return call(x2, codes.reshape(-1), jnp.asarray(layer, jnp.int32).reshape(()),
                absmax.reshape(-1).astype(jnp.float32), table.astype(jnp.float32), blocksize=np.int64(blocksize))


@functools.partial(jax.jit, static_argnames=("n", "k", "blocksize", "transpose"))
def cpu_gemm(x2, codes, absmax, table, *, n: int, k: int, blocksize: int, transpose: bool = False):
    """bfloat16 products with W [n, k] given by its packed ``codes``, fp32 first-level ``absmax`` and
    code ``table``: ``x2 [M, k] @ W^T -> [M, n]``, or with ``transpose`` ``x2 [M, n] @ W -> [M, k]``
    (the input gradient)."""
    if not gemm_available():
        raise RuntimeError(f"the CPU GEMM kernel is not available: {_STATE['reason'] or 'neither AVX-512 BF16 nor AVX2 + FMA'}")
    if not gemm_supported(n, k, blocksize, x2.dtype, transpose=transpose) or x2.shape[1] != (n if transpose else k):
        raise ValueError(f"cpu_gemm takes bfloat16 [M, {n if transpose else k}] inputs for an [{n}, {k}] weight with "
                         f"K and blocksize multiples of 32; got {x2.dtype} {x2.shape}, blocksize {blocksize}")
    call = jax.ffi.ffi_call(GEMM_TARGET, jax.ShapeDtypeStruct((x2.shape[0], k if transpose else n), x2.dtype),
                            vmap_method="sequential")
    return call(x2, codes.reshape(-1), absmax.reshape(-1).astype(jnp.float32), table.astype(jnp.float32),
                blocksize=np.int64(blocksize), transpose=transpose)


def dense_gemm_supported(n: int, k: int, dtype, *, transpose: bool) -> bool:
    """Whether ``cpu_dense_gemm`` runs here for a bf16 weight [n, k]: a GEMM kernel built (AMX,
    AVX-512 BF16 or AVX2), bfloat16, K a multiple of 32 and, for the backward, an even N."""
    return (_load() and _STATE["gemm"] in ("amx_bf16", "avx512_bf16", "avx2")
            and jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) and k % 32 == 0 and (n % 2 == 0 or not transpose))


@functools.partial(jax.jit, static_argnames=("transpose",))
def cpu_dense_gemm(x2, w, *, transpose: bool = False):
    """bfloat16 products with a dense bf16 weight ``w`` [n, k] on AMX, AVX-512 BF16 or AVX2 (the LM head):
    ``x2 [M, k] @ w^T -> [M, n]``, or with ``transpose`` ``x2 [M, n] @ w -> [M, k]``; fp32 sums
    rounded to bf16."""
    n, k = w.shape
    if not dense_gemm_supported(n, k, x2.dtype, transpose=transpose) or w.dtype != x2.dtype \
            or x2.ndim != 2 or x2.shape[1] != (n if transpose else k):
        raise ValueError(f"cpu_dense_gemm takes bfloat16 [M, {n if transpose else k}] inputs for a bfloat16 "
                         f"[{n}, {k}] weight on a CPU with AMX, AVX-512 BF16 or AVX2 (K a multiple of 32); got "
                         f"{x2.dtype} {x2.shape}, weight {w.dtype}, GEMM kernel {gemm_isa()}")
    call = jax.ffi.ffi_call(DENSE_GEMM_TARGET, jax.ShapeDtypeStruct((x2.shape[0], k if transpose else n), x2.dtype),
                            vmap_method="sequential")
    return call(x2, w, transpose=transpose)


def reference_cpu_dense_gemm(x2, w, *, transpose: bool = False):
    """The pure-jnp twin of ``cpu_dense_gemm``: one dot with fp32 accumulation, rounded to bf16."""
    dims = (((1,), (0,)), ((), ())) if transpose else (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(x2, w, dims, preferred_element_type=jnp.float32).astype(x2.dtype)


def reference_cpu_gemm(x2, codes, absmax, table, *, n: int, k: int, blocksize: int, transpose: bool = False):
    """The pure-jnp twin of ``cpu_gemm``: dequantize to bf16, one dot with fp32 accumulation."""
    w = _reference_weight(codes, absmax, table, n, k, blocksize, x2.dtype)
    dims = (((1,), (0,)), ((), ())) if transpose else (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(x2, w, dims, preferred_element_type=jnp.float32).astype(x2.dtype)


def _reference_weight(codes, absmax, table, n, k, blocksize, dtype):
    flat = codes.reshape(-1)
    nibbles = jnp.stack([flat >> 4, flat & 0xF], axis=-1).reshape(-1)[: n * k].astype(jnp.int32)
    scale = jnp.repeat(absmax.reshape(-1), blocksize)[: n * k]
    return (jnp.asarray(table, jnp.float32)[nibbles] * scale).astype(dtype).reshape(n, k)


def reference_cpu_gemv(x2, codes, absmax, table, *, n: int, blocksize: int):
    """The pure-jnp twin: dequantize to x2's dtype, one dot with fp32 accumulation."""
    w = _reference_weight(codes, absmax, table, n, x2.shape[1], blocksize, x2.dtype)
    y = jax.lax.dot_general(x2, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x2.dtype)


def attention_available() -> bool:
    """Whether the attention kernels are built (they need a CPU with AVX-512 BF16)."""
    return _load() and _STATE["attention"]


def attention_supported(q_shape, k_shape, dtype) -> bool:
    """Shapes the attention kernels take: bfloat16 q [B, S, H, D] and k, v [B, T, K, D] with H a
    multiple of K and D even."""
    return (jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) and len(q_shape) == 4 and len(k_shape) == 4
            and q_shape[0] == k_shape[0] and q_shape[3] == k_shape[3] and q_shape[3] % 2 == 0
            and q_shape[2] % k_shape[2] == 0)


def _attention_check(q, k, v, mask):
    if not attention_available():
        raise RuntimeError(f"the CPU attention kernel is not available: {_STATE['reason'] or 'no AVX-512 BF16'}")
    b, s, _, _ = q.shape
    if (not attention_supported(q.shape, k.shape, q.dtype) or k.dtype != q.dtype or v.shape != k.shape
            or v.dtype != q.dtype or mask.shape != (b, s, k.shape[1]) or mask.dtype != q.dtype):
        raise ValueError(f"cpu_attention takes bfloat16 q [B, S, H, D], k and v [B, T, K, D] (H a multiple of K, D "
                         f"even) and a bfloat16 mask [B, S, T]; got q {q.dtype}{q.shape}, k {k.dtype}{k.shape}, "
                         f"v {v.dtype}{v.shape}, mask {mask.dtype}{mask.shape}")


@functools.partial(jax.jit, static_argnames=("scale",))
def cpu_attention(q, k, v, mask, *, scale: float):
    """Attention forward: (out [B, S, H, D], stats f32 [B, H, S, 2]) for q [B, S, H, D], k and v
    [B, T, K, D] and the additive mask [B, S, T], all bfloat16 (``scale``: the scores' factor,
    used as given). ``stats`` (each row's softmax max and sum) is what ``cpu_attention_bwd`` needs
    besides the inputs. The arithmetic of ``reference_cpu_attention``."""
    _attention_check(q, k, v, mask)
    b, s, h, _ = q.shape
    call = jax.ffi.ffi_call(ATTENTION_TARGETS[0], (jax.ShapeDtypeStruct(q.shape, q.dtype),
                                                   jax.ShapeDtypeStruct((b, h, s, 2), jnp.float32)),
                            vmap_method="sequential")
    return call(q, k, v, mask, scale=np.float32(scale))


@functools.partial(jax.jit, static_argnames=("scale",))
def cpu_attention_bwd(q, k, v, mask, stats, dout, *, scale: float):
    """Attention backward: (dq, dk, dv) for the forward's inputs, its ``stats`` and ``dout``."""
    _attention_check(q, k, v, mask)
    call = jax.ffi.ffi_call(ATTENTION_TARGETS[1], (jax.ShapeDtypeStruct(q.shape, q.dtype),
                                                   jax.ShapeDtypeStruct(k.shape, k.dtype),
                                                   jax.ShapeDtypeStruct(v.shape, v.dtype)),
                            vmap_method="sequential")
    return call(q, k, v, mask, stats.astype(jnp.float32), dout.astype(q.dtype), scale=np.float32(scale))


def reference_cpu_attention(q, k, v, mask, *, scale: float):
    """The pure-jnp twin of ``cpu_attention``'s output: eager transformers' arithmetic (bf16 scores
    times ``scale``, plus the mask, fp32 softmax rounded to bf16, fp32-accumulated products)."""
    b, s, h, d = q.shape
    kh = k.shape[2]
    f32 = jnp.float32
    qh = q.reshape(b, s, kh, h // kh, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", qh, k, preferred_element_type=f32).astype(q.dtype)
    scores = scores * jnp.asarray(scale, q.dtype) + mask[:, None, None].astype(q.dtype)
    probs = jax.nn.softmax(scores.astype(f32), axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v, preferred_element_type=f32).astype(q.dtype)
    return out.reshape(b, s, h, d)


def xent_available() -> bool:
    """Whether the cross-entropy kernels are built (they need a CPU with AVX-512 BW or AVX2 + FMA)."""
    return _load() and _STATE["xent"]


def _xent_check(logits):
    if not xent_available():
        raise RuntimeError(f"the CPU cross-entropy kernel is not available: {_STATE['reason'] or 'neither AVX-512 nor AVX2'}")
    if logits.ndim != 2 or logits.dtype != jnp.bfloat16:
        raise ValueError(f"cpu_xent takes bfloat16 logits [N, V]; got {logits.dtype}{logits.shape}")


@jax.jit
def cpu_xent_fwd(logits, labels):
    """(lse, picked): each row's logsumexp (fp32 [N]) of bfloat16 logits [N, V] and its logit at
    ``labels`` (int32 [N] in [0, V); fp32); ``reference_xent_fwd``'s arithmetic. The one reader of
    the logits besides ``cpu_xent_grad``, which overwrites them."""
    _xent_check(logits)
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"cpu_xent_fwd takes labels of shape {logits.shape[:1]}; got {labels.shape}")
    out = jax.ShapeDtypeStruct(logits.shape[:1], jnp.float32)
    call = jax.ffi.ffi_call(XENT_TARGETS[0], (out, out), vmap_method="sequential")
    return tuple(call(logits, labels.astype(jnp.int32)))


@jax.jit
def cpu_xent_lse(logits):
    """Each row's logsumexp (fp32 [N]) of bfloat16 logits [N, V]; ``reference_xent_lse``'s arithmetic."""
    _xent_check(logits)
    return cpu_xent_fwd(logits, jnp.zeros(logits.shape[:1], jnp.int32))[0]


@jax.jit
def cpu_xent_grad(logits, lse, labels, scale):
    """``bf16((softmax(logits) - onehot(labels)) * scale[:, None])`` from the forward's ``lse``;
    labels int32 [N] (in [0, V)), scale fp32 [N]; ``reference_xent_grad``'s arithmetic."""
    _xent_check(logits)
    n = logits.shape[0]
    if lse.shape != (n,) or labels.shape != (n,) or scale.shape != (n,):
        raise ValueError(f"cpu_xent_grad takes lse, labels and scale of shape ({n},); got {lse.shape}, "
                         f"{labels.shape}, {scale.shape}")
    # in place of the logits, where they die here (the backward's): no fresh [N, V] buffer to fault in
    # in place of the logits where they die here (the backward's; XLA copies them where they do
    # not): no fresh [N, V] buffer to fault in
    call = jax.ffi.ffi_call(XENT_TARGETS[1], jax.ShapeDtypeStruct(logits.shape, logits.dtype),
                            vmap_method="sequential", input_output_aliases={0: 0})
    return call(logits, lse.astype(jnp.float32), labels.astype(jnp.int32), scale.astype(jnp.float32))


def reference_xent_lse(logits):
    """The pure-jnp twin of ``cpu_xent_lse``."""
    return jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)


def reference_xent_fwd(logits, labels):
    """The pure-jnp twin of ``cpu_xent_fwd``."""
    picked = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)[:, 0].astype(jnp.float32)
    return reference_xent_lse(logits), picked


def reference_xent_grad(logits, lse, labels, scale):
    """The pure-jnp twin of ``cpu_xent_grad``."""
    p = jnp.exp(logits.astype(jnp.float32) - lse[:, None])
    onehot = jnp.arange(logits.shape[-1])[None, :] == labels[:, None]
    return ((p - onehot) * scale[:, None]).astype(logits.dtype)


def rope_available() -> bool:
    """Whether the rotary-embedding kernels are built (they need a CPU with AVX-512 BW or AVX2 + FMA)."""
    return _load() and _STATE["rope"]


def _rope_call(target, x, cos, sin):
    if not rope_available():
        raise RuntimeError(f"the CPU rope kernel is not available: {_STATE['reason'] or 'neither AVX-512 nor AVX2'}")
    b, s, _, d = x.shape if x.ndim == 4 else (None, None, None, None)
    if (x.ndim != 4 or d % 2 or cos.shape != (b, s, d) or sin.shape != (b, s, d)
            or not x.dtype == cos.dtype == sin.dtype == jnp.bfloat16):
        raise ValueError(f"cpu_rope takes bfloat16 x [B, S, H, D] (D even) and cos, sin [B, S, D]; got x "
                         f"{x.dtype}{x.shape}, cos {cos.dtype}{cos.shape}, sin {sin.dtype}{sin.shape}")
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="sequential")(x, cos, sin)


@jax.jit
def cpu_rope(x, cos, sin):
    """``x * cos + rotate_half(x) * sin`` (cos, sin broadcast over the heads), bit for bit as
    ``reference_rope``."""
    return _rope_call(ROPE_TARGETS[0], x, cos, sin)


@jax.jit
def cpu_rope_bwd(g, cos, sin):
    """The gradient of ``cpu_rope`` with respect to x for the cotangent ``g``, bit for bit as
    autodiff of ``reference_rope``."""
    return _rope_call(ROPE_TARGETS[1], g, cos, sin)


def reference_rope(x, cos, sin):
    """The pure-jnp twin of ``cpu_rope`` (transformers' ``apply_rotary_pos_emb``)."""
    half = x.shape[-1] // 2
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return x * c + jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1) * s


def swiglu_available() -> bool:
    """Whether the SwiGLU kernels are built (they need a CPU with AVX-512 BW or AVX2 + FMA)."""
    return _load() and _STATE["swiglu"]


def _swiglu_check(*arrays):
    if not swiglu_available():
        raise RuntimeError(f"the CPU swiglu kernel is not available: {_STATE['reason'] or 'neither AVX-512 nor AVX2'}")
    if any(a.dtype != jnp.bfloat16 or a.shape != arrays[0].shape for a in arrays):
        raise ValueError("cpu_swiglu takes bfloat16 operands of one shape; got "
                         + ", ".join(f"{a.dtype}{a.shape}" for a in arrays))


@jax.jit
def cpu_swiglu(g, u):
    """``silu(g) * u`` on bf16 as PyTorch computes ``F.silu(g) * u`` (``reference_swiglu``; exp's
    last bit aside)."""
    _swiglu_check(g, u)
    return jax.ffi.ffi_call(SWIGLU_TARGETS[0], jax.ShapeDtypeStruct(g.shape, g.dtype), vmap_method="sequential")(g, u)


@jax.jit
def cpu_swiglu_bwd(g, u, dh):
    """The gradients (dg, du) of ``cpu_swiglu`` for the cotangent ``dh``, as PyTorch's
    ``silu_backward`` and bf16 product rule (``reference_swiglu_bwd``)."""
    _swiglu_check(g, u, dh)
    out = jax.ShapeDtypeStruct(g.shape, g.dtype)
    return tuple(jax.ffi.ffi_call(SWIGLU_TARGETS[1], (out, out), vmap_method="sequential")(g, u, dh))


def reference_swiglu(g, u):
    """The pure-jnp twin of ``cpu_swiglu``: silu in fp32, rounded to g's dtype once, times u."""
    g32 = g.astype(jnp.float32)
    silu = (g32 / (1.0 + jnp.exp(-g32))).astype(g.dtype)
    return silu * u


def reference_swiglu_bwd(g, u, dh):
    """The pure-jnp twin of ``cpu_swiglu_bwd``: torch's silu_backward on fp32 values."""
    g32 = g.astype(jnp.float32)
    den = 1.0 + jnp.exp(-g32)
    silu = (g32 / den).astype(g.dtype)
    s = 1.0 / den
    ds = (dh * u).astype(jnp.float32)
    dg = (ds * s * (1.0 + g32 * (1.0 - s))).astype(g.dtype)
    return dg, dh * silu


def lora_available() -> bool:
    """Whether the LoRA product kernels are built (they need a CPU with AVX-512 BW)."""
    return _load() and _STATE["lora"]


_LORA_TAKES = {"cpu_lora_down": "bfloat16 x [..., C] and float32 a [r, C]",
               "cpu_lora_up": "float32 h [..., r], float32 a [r, C] and bfloat16 base [..., C] (or None)",
               "cpu_lora_grad": "float32 h [..., r] and bfloat16 y [..., C] with the same leading dims"}


def _lora_check(name, ok, *arrays):
    if not lora_available():
        raise RuntimeError(f"the CPU LoRA kernels are not available: {_STATE['reason'] or 'no AVX-512'}")
    if not ok:
        raise ValueError(f"{name} takes {_LORA_TAKES[name]}; got "
                         + ", ".join(f"{a.dtype}{a.shape}" for a in arrays if a is not None))


@functools.partial(jax.jit, static_argnames=("scaling",))
def cpu_lora_down(x, a, *, scaling: float = 1.0):
    """``scaling * (x @ a^T)`` [..., r] in fp32 for bf16 ``x`` [..., C] (its exact fp32 values) and
    fp32 ``a`` [r, C] (``reference_lora_down``; fp32 sums in another order)."""
    _lora_check("cpu_lora_down", x.ndim >= 1 and a.ndim == 2 and x.shape[-1] == a.shape[1]
                and x.dtype == jnp.bfloat16 and a.dtype == jnp.float32, x, a)
    call = jax.ffi.ffi_call(LORA_TARGETS[0], jax.ShapeDtypeStruct((*x.shape[:-1], a.shape[0]), jnp.float32),
                            vmap_method="sequential")
    return call(x, a, scaling=np.float32(scaling))


@functools.partial(jax.jit, static_argnames=("scaling", "round_first"))
def cpu_lora_up(h, a, base=None, *, scaling: float = 1.0, round_first: bool = False):
    """``bf16(base + t)`` [..., C], t = ``scaling * (h @ a)`` in fp32 for ``h`` [..., r] and ``a`` [r, C],
    t rounded to bf16 first with ``round_first``; ``bf16(t)`` without a base (``reference_lora_up``)."""
    shape = (*h.shape[:-1], a.shape[-1])
    ok = (h.ndim >= 1 and a.ndim == 2 and h.shape[-1] == a.shape[0] and h.dtype == a.dtype == jnp.float32
          and (base is None or (base.dtype == jnp.bfloat16 and base.shape == shape)))
    _lora_check("cpu_lora_up", ok, h, a, base)
    out = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    if base is None:
        return jax.ffi.ffi_call(LORA_TARGETS[2], out, vmap_method="sequential")(h, a, scaling=np.float32(scaling))
    return jax.ffi.ffi_call(LORA_TARGETS[1], out, vmap_method="sequential")(
        base, h, a, scaling=np.float32(scaling), round_first=bool(round_first))


@functools.partial(jax.jit, static_argnames=("scaling",))
def cpu_lora_grad(h, y, *, scaling: float = 1.0):
    """``scaling * h^T @ y`` [r, C] in fp32, summed over the leading dims of fp32 ``h`` [..., r] and
    bf16 ``y`` [..., C] (``reference_lora_grad``; fp32 sums in row order)."""
    _lora_check("cpu_lora_grad", h.ndim >= 1 and h.shape[:-1] == y.shape[:-1] and h.dtype == jnp.float32
                and y.dtype == jnp.bfloat16, h, y)
    call = jax.ffi.ffi_call(LORA_TARGETS[3], jax.ShapeDtypeStruct((h.shape[-1], y.shape[-1]), jnp.float32),
                            vmap_method="sequential")
    return call(h, y, scaling=np.float32(scaling))


def reference_lora_down(x, a, *, scaling: float = 1.0):
    """The pure-jnp twin of ``cpu_lora_down``."""
    return jax.lax.dot_general(x.astype(jnp.float32), a, (((x.ndim - 1,), (1,)), ((), ()))) * scaling


def reference_lora_up(h, a, base=None, *, scaling: float = 1.0, round_first: bool = False):
    """The pure-jnp twin of ``cpu_lora_up``."""
    t = jax.lax.dot_general(h, a, (((h.ndim - 1,), (0,)), ((), ()))) * scaling
    if round_first or base is None:
        t = t.astype(jnp.bfloat16)
    return t if base is None else (base.astype(jnp.float32) + t.astype(jnp.float32)).astype(jnp.bfloat16)


def reference_lora_grad(h, y, *, scaling: float = 1.0):
    """The pure-jnp twin of ``cpu_lora_grad``."""
    h2, y2 = h.reshape(-1, h.shape[-1]), y.reshape(-1, y.shape[-1]).astype(jnp.float32)
    return jax.lax.dot_general(h2, y2, (((0,), (0,)), ((), ()))) * scaling
