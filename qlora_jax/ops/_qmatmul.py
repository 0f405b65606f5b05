"""``qmatmul(x, w)``: y = x @ W^T for a dense, 4-bit or 8-bit quantized weight W of logical shape [out, in].

Dispatch is by the weight's type and ``backend``, never by model code. An ``Int8Array`` (LLM.int8())
takes ``ops._int8`` (bitsandbytes' MatMul8bitLt: int8 x int8 products with outlier decomposition,
XLA on every platform; ``backend`` does not apply). A 4-bit ``QuantizedArray``:
- ``xla``: dequantize to ``x.dtype``, then one dot with fp32 accumulation (every platform);
- ``pallas``: the fused Pallas kernels (``qlora_jax.kernels.nf4_matmul``, Triton lowering): the
  skinny one for up to 16 rows (decode), the GEMM one above, and the dx kernel, never
  materialising the dequantized weight; weights whose K is not a multiple of
  the blocksize and of 64 take the XLA path;
- ``triton``: the forward through the plain Triton kernel (``qlora_jax.kernels.triton_nf4``) via
  jax-triton, GPU only, to compare the two lowering paths; dx through the Pallas dx kernel;
- ``cpu``: the native CPU kernels (``qlora_jax.kernels.cpu_nf4``, C++ through XLA FFI, built on
  first use), reading the packed codes without writing a dequantized weight: a GEMV for up to 64
  rows of x (decode, short prefills; float32 or bfloat16; bfloat16 from 12 rows takes the GEMM
  where it has AVX-512 BF16), a GEMM with AVX-512 BF16 dot products
  (or, on CPUs without them, AVX2 fp32 FMAs of the same bf16 values) for more rows of bfloat16 and
  for dx (K and the blocksize multiples of 32). Anything they do not take (float16, more rows of float32, a mesh in context,
  another platform, a machine where they cannot be built): the XLA path;
- ``auto``: pallas on GPU, cpu on CPU, the XLA path elsewhere.

Under a mesh in context (``jax.set_mesh``) the kernel backends run in a ``shard_map`` over the
batch axes (data, fsdp): each device multiplies its rows of x by the whole (gathered) weight, as
XLA's partitioner cannot split the kernels' custom calls.

A ``LayerOfStack`` (layer i of a scanned model's stacked 4-bit weight, made by the decoder when it
decodes over scanned layers) runs the CPU GEMV on the stack's codes where they lie; anything else
takes the layer's slice and goes on as above.

Gradients: with respect to ``x`` only (dx = dy @ dequant(W), large weights a band of rows at a time:
``ops._chunked``); the frozen quantized weight gets a symbolic zero, so no gradient buffer of its
size is ever made.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp

from ..quant import Int8Array, QuantizedArray, dequantize
from ..quant._int8 import check_threshold
from ._chunked import band_rows, input_grad

BACKENDS = ("auto", "pallas", "triton", "cpu", "xla")


@jax.tree_util.register_pytree_node_class
class LayerOfStack:
    """Layer ``index`` of ``stack``, a QuantizedArray stacked over one leading (layer) axis, without
    slicing it out. A scanned model's decoding step multiplied each layer's weight after XLA sliced
    it from the stack (a dynamic slice: a copy of the model's codes per generated token); the CPU GEMV
    reads the layer's codes in the stack instead (``kernels.cpu_nf4.cpu_gemv_layer``). ``slice()``
    is the plain per-layer QuantizedArray, for every other path."""

    def __init__(self, stack: QuantizedArray, index):
        self.stack, self.index = stack, index

    def tree_flatten(self):
        return (self.stack, self.index), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)

    @property
    def logical_shape(self) -> tuple[int, ...]:
        return tuple(self.stack.logical_shape)

    def slice(self) -> QuantizedArray:
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, self.index, 0, keepdims=False), self.stack)

    def absmax(self) -> jax.Array:
        """The layer's fp32 first-level absmax (double quantization undone), its scales alone sliced."""
        from ..quant._core import dequantize_nested_flat

        sl = lambda a: jax.lax.dynamic_index_in_dim(a, self.index, 0, keepdims=False)  # noqa: E731
        q = self.stack
        if not q.double_quant:
            return sl(q.absmax)
        return dequantize_nested_flat(sl(q.absmax), sl(q.nested_absmax), sl(q.offset), q.nested_blocksize)


def _dot_t(x, w):
    """x [..., in] @ w[out, in]^T with fp32 accumulation, in x's dtype."""
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


#: Rows of x up to which a dense bf16 product runs on the native kernel on CPU (decode: the LM
#: head), by the kernel's instructions. XLA:CPU's dot with one row of x reads a [32000, 2048] bf16
#: weight at 2 GB/s (62 ms on the Xeon, 86 on Zen 4); the AMX kernel at 25 GB/s (5.2 ms), and from
#: two rows both run near 21-28 GB/s (Xeon, 2 cores). With AVX-512 BF16 (Zen 4) the kernel's
#: few-rows path reads it at 22-25 GB/s for 1-4 rows (5.3-6.1 ms), XLA's dot of 2-4 rows at 12-15.
#: With AVX2 (Zen 3): one row 9.5 ms (14 GB/s) against XLA's 61, four rows 11 ms against 32.
DENSE_KERNEL_ROWS = {"amx_bf16": 4, "avx512_bf16": 4, "avx2": 4}


def dense_kernel_rows() -> int:
    """``DENSE_KERNEL_ROWS`` for this CPU's GEMM kernel (0: none)."""
    from ..kernels import cpu_nf4

    return DENSE_KERNEL_ROWS.get(cpu_nf4.gemm_isa(), 0)


def _dense_kernel_takes(x, w) -> bool:
    from ..kernels import cpu_nf4

    rows = math.prod(x.shape[:-1])
    # only arrays: a wrapper that intercepts jax.lax.dot_general (Qwix's quantized weights) keeps its dot
    return (isinstance(x, jax.Array) and isinstance(w, jax.Array) and rows <= dense_kernel_rows()
            and x.dtype == w.dtype and jax.default_backend() == "cpu"
            and jax.sharding.get_abstract_mesh().empty
            and cpu_nf4.dense_gemm_supported(*w.shape, x.dtype, transpose=False))


@jax.custom_vjp
def _dense_few_rows(x, w):
    """``_dot_t`` on the AMX kernel (the same fp32 sums rounded to bf16, in another order); its
    gradients are ``_dot_t``'s."""
    from ..kernels import cpu_nf4

    return cpu_nf4.cpu_dense_gemm(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[0])


def _dense_few_rows_fwd(x, w):
    return _dense_few_rows(x, w), (x, w)


def _dense_few_rows_bwd(res, dy):
    return jax.vjp(_dot_t, *res)[1](dy)


_dense_few_rows.defvjp(_dense_few_rows_fwd, _dense_few_rows_bwd)


@jax.custom_vjp
def _qmatmul_xla(x, w: QuantizedArray):
    return _dot_t(x, dequantize(w, x.dtype))


def _fwd(x, w):
    return _qmatmul_xla(x, w), w


def _bwd(w, dy):
    """dx = dy @ dequant(W), large weights a band of rows at a time (``ops._chunked``)."""
    from ..quant import _core
    from ..quant._array import dequantize_absmax

    n, k = w.logical_shape
    rows = band_rows(n, k, w.blocksize)
    if rows >= n:
        return input_grad(dy, n, k, n, lambda r0, r: dequantize(w, dy.dtype)), None  # None: no weight gradient
    absmax = dequantize_absmax(w)

    def band(r0, r):
        codes = jax.lax.dynamic_slice_in_dim(w.codes, r0 * k // 2, r * k // 2)
        scales = jax.lax.dynamic_slice_in_dim(absmax, r0 * k // w.blocksize, r * k // w.blocksize)
        flat = _core.dequantize_4bit_flat(codes, scales, r * k, w.quant_type, w.blocksize)
        return flat.reshape(r, k).astype(dy.dtype)

    return input_grad(dy, n, k, rows, band), None


_qmatmul_xla.defvjp(_fwd, _bwd)


def _kernel_operands(w: QuantizedArray) -> tuple[tuple, dict]:
    """The kernels' view of a weight, no copy: codes [N, K/2], absmax [N, K/blocksize] (fp32, or
    uint8 codes with the nested scales and offset, decoded in the kernel), and static arguments."""
    n, k = w.logical_shape
    arrays = (w.codes.reshape(n, k // 2), w.absmax.reshape(n, k // w.blocksize))
    if w.double_quant:
        arrays += (w.nested_absmax, w.offset)
    return arrays, dict(quant_type=w.quant_type, blocksize=w.blocksize,
                        nested_blocksize=w.nested_blocksize if w.double_quant else None)


def _block_m(m: int) -> int:
    """Output rows per program: small for decode-sized M (skinny), 64 for training and prefill."""
    return 16 if m <= 16 else 32 if m <= 32 else 64


_GEMM_CANDIDATES = [(64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4),
                    (128, 128, 8, 4), (64, 128, 8, 4), (32, 64, 4, 4)]
_GEMV_CANDIDATES = [(32, 4), (16, 4), (64, 4), (128, 4), (32, 2), (64, 8), (128, 8)]


def _candidates(kind: str, m: int) -> list[dict]:
    """Configurations to try, the untuned default first (what runs when nothing is measured)."""
    if kind == "gemv":
        return [dict(block_n=bn, num_warps=nw, num_stages=3) for bn, nw in _GEMV_CANDIDATES]
    first = dict(block_m=_block_m(m), block_n=64, num_warps=4, num_stages=3)
    rest = [dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns) for bm, bn, nw, ns in _GEMM_CANDIDATES]
    return [first] + [c for c in rest if c != first and c["block_m"] <= max(32, 1 << (m - 1).bit_length())]


def _random_like(w: QuantizedArray, m: int, k_in: int, dtype):
    """Representative inputs for timing (random, never zeros) of the weight's operand shapes."""
    keys = jax.random.split(jax.random.key(0), 4)
    arrays, _ = _kernel_operands(w)
    fake = [jax.random.randint(keys[0], arrays[0].shape, 0, 256).astype(jnp.uint8)]
    if w.double_quant:
        fake += [jax.random.randint(keys[1], arrays[1].shape, 0, 256).astype(jnp.uint8),
                 jax.random.uniform(keys[2], arrays[2].shape, jnp.float32, 0.01, 0.1), jnp.float32(0.05)]
    else:
        fake += [jax.random.uniform(keys[1], arrays[1].shape, jnp.float32, 0.5, 2.0)]
    x = jax.random.normal(keys[3], (m, k_in), jnp.float32).astype(dtype)
    return x, fake


def _choose(kind: str, m: int, w: QuantizedArray, dtype, *, interpret: bool, tuner=None) -> dict:
    """Block sizes for kernel ``kind`` ("gemm", "gemv", "gemm_t") at M rows: measured once per
    device, shape and dtype and cached on disk (``qlora_jax.kernels.autotune``) on a GPU; the
    default otherwise (interpret mode, or ``QLORA_JAX_AUTOTUNE=0``)."""
    from ..kernels import autotune, nf4_matmul

    bucket = m if kind == "gemv" else max(32, 1 << (m - 1).bit_length())
    candidates = _candidates(kind, bucket)
    if tuner is None:
        if interpret or jax.default_backend() != "gpu":
            return candidates[0]
        tuner = autotune.default_tuner()
    _, static = _kernel_operands(w)
    n, k = w.logical_shape
    key = dict(m=bucket, n=n, k=k, dtype=jnp.dtype(dtype).name, double_quant=w.double_quant, **static)
    fn = {"gemm": nf4_matmul.pallas_matmul, "gemv": nf4_matmul.pallas_gemv, "gemm_t": nf4_matmul.pallas_matmul_t}[kind]

    def make(config):
        x, fake = _random_like(w, bucket, n if kind == "gemm_t" else k, dtype)
        return lambda: fn(x, *fake, **static, **config, interpret=interpret)

    return tuner.best(f"nf4_matmul.{kind}", key, candidates, make)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _qmatmul_pallas(x2, w: QuantizedArray, interpret: bool):
    from ..kernels import nf4_matmul

    arrays, static = _kernel_operands(w)
    m = x2.shape[0]
    if m <= nf4_matmul.GEMV_MAX_M:  # decode: the skinny kernel, rows padded to a power of two
        rows = 1 << (m - 1).bit_length()
        config = _choose("gemv", rows, w, x2.dtype, interpret=interpret)
        y = nf4_matmul.pallas_gemv(jnp.pad(x2, ((0, rows - m), (0, 0))), *arrays, **static, **config,
                                   interpret=interpret)
        return y[:m]
    config = _choose("gemm", m, w, x2.dtype, interpret=interpret)
    return nf4_matmul.pallas_matmul(x2, *arrays, **static, **config, interpret=interpret)


def _pallas_fwd(x2, w, interpret):
    return _qmatmul_pallas(x2, w, interpret), w


def _pallas_bwd(interpret, w, dy):
    from ..kernels import nf4_matmul

    arrays, static = _kernel_operands(w)
    config = _choose("gemm_t", dy.shape[0], w, dy.dtype, interpret=interpret)
    dx = nf4_matmul.pallas_matmul_t(dy, *arrays, **static, **config, interpret=interpret)
    return dx, None


_qmatmul_pallas.defvjp(_pallas_fwd, _pallas_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _qmatmul_triton(x2, w: QuantizedArray, interpret: bool):
    try:
        from ..kernels.triton_nf4 import triton_matmul
        import jax_triton  # noqa: F401  (imports only where a CUDA GPU is)
    except Exception as e:
        raise ValueError(f"backend='triton' runs the jax-triton kernel, which needs a CUDA GPU and the gpu extra "
                         f"(pip install 'qlora_jax[gpu]'); here: {type(e).__name__}: {e}") from None
    arrays, static = _kernel_operands(w)
    config = _choose("gemm", x2.shape[0], w, x2.dtype, interpret=True)  # the untuned default
    return triton_matmul(x2, *arrays, **static, **config)


_qmatmul_triton.defvjp(lambda x2, w, interpret: (_qmatmul_triton(x2, w, interpret), w), _pallas_bwd)


def _cpu_operands(w: QuantizedArray):
    """The CPU kernels' view of a weight: packed codes, fp32 first-level absmax (XLA undoes the
    double quantization: 1/blocksize of the weight's elements) and the code table."""
    from ..quant._array import dequantize_absmax
    from ..quant._tables import CODE_TABLES

    return w.codes, dequantize_absmax(w), jnp.asarray(CODE_TABLES[w.quant_type], jnp.float32)


@jax.custom_vjp
def _qmatmul_cpu(x2, w: QuantizedArray):
    from ..kernels import cpu_nf4

    n, k = w.logical_shape
    if cpu_nf4.gemv_takes(x2.shape[0], n, k, w.blocksize, x2.dtype):  # decode, short prefills: the GEMV kernel
        return cpu_nf4.cpu_gemv(x2, *_cpu_operands(w), n=n, blocksize=w.blocksize)
    return cpu_nf4.cpu_gemm(x2, *_cpu_operands(w), n=n, k=k, blocksize=w.blocksize)


def _cpu_bwd(w, dy):
    """dx = dy @ dequant(W) through the GEMM kernel where it takes the weight and dtype, else the XLA path."""
    from ..kernels import cpu_nf4

    n, k = w.logical_shape
    if cpu_nf4.gemm_available() and cpu_nf4.gemm_supported(n, k, w.blocksize, dy.dtype, transpose=True):
        return cpu_nf4.cpu_gemm(dy, *_cpu_operands(w), n=n, k=k, blocksize=w.blocksize, transpose=True), None
    return _bwd(w, dy)


_qmatmul_cpu.defvjp(lambda x2, w: (_qmatmul_cpu(x2, w), w), _cpu_bwd)


@jax.custom_vjp
def _qmatmul_cpu_layer(x2, w: LayerOfStack):
    """The GEMV with W layer ``w.index`` of the stacked codes, read in place."""
    from ..kernels import cpu_nf4
    from ..quant._tables import CODE_TABLES

    q = w.stack
    return cpu_nf4.cpu_gemv_layer(x2, q.codes, w.index, w.absmax(), jnp.asarray(CODE_TABLES[q.quant_type], jnp.float32),
                                  n=q.logical_shape[0], blocksize=q.blocksize)


def _cpu_layer_bwd(w, dy):
    return _cpu_bwd(w.slice(), dy)[0], None


_qmatmul_cpu_layer.defvjp(lambda x2, w: (_qmatmul_cpu_layer(x2, w), w), _cpu_layer_bwd)


def _cpu_kernel_takes(x, w: QuantizedArray) -> bool:
    """Whether a CPU kernel runs this product: the GEMV one for up to ``cpu_nf4.MAX_M`` rows, the
    GEMM one (AVX-512 BF16 or AVX2) for more rows of bfloat16; not under a mesh."""
    from ..kernels import cpu_nf4

    if not (jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().empty and cpu_nf4.available()):
        return False
    n, k = w.logical_shape
    return cpu_nf4.supported(math.prod(x.shape[:-1]), x.dtype) or (
        cpu_nf4.gemm_available() and cpu_nf4.gemm_supported(n, k, w.blocksize, x.dtype, transpose=False))


def resolve_backend(backend: str, w) -> str:
    """The backend that will run: ``auto`` is pallas on GPU for a weight the kernel takes, cpu on
    CPU (``qmatmul`` then takes the XLA path for inputs the CPU kernel does not), else xla; a
    named kernel backend falls back to xla for weights it does not take."""
    if isinstance(w, Int8Array):
        return "int8"
    if not isinstance(w, QuantizedArray):
        return "dense"
    if backend == "auto":
        backend = {"gpu": "pallas", "cpu": "cpu"}.get(jax.default_backend(), "xla")
    if backend in ("pallas", "triton"):
        from ..kernels import nf4_matmul

        if not nf4_matmul.supported(w.logical_shape[1], w.blocksize):
            return "xla"
    return backend


def qmatmul(x: jax.Array, w, *, backend: str = "auto", interpret: bool = False, threshold=None) -> jax.Array:
    """``x @ W^T`` for ``W`` of logical shape [out, in], dense, a QuantizedArray or an Int8Array.

    Args:
      x: activations [..., in]; the compute dtype (W is dequantized to it, the dot accumulates
        in fp32, the result is returned in it).
      w: a dense array [out, in] (plain dot), an unstacked QuantizedArray [out, in], or an
        unstacked Int8Array [out, in] (LLM.int8(), ``ops._int8``); a stacked one is taken slice
        by slice by the caller's ``nnx.scan`` / ``jax.vmap``, or one layer of it as a
        ``LayerOfStack`` (the decoder's scanned decoding: the CPU GEMV reads it in place).
      backend: "auto" | "pallas" | "triton" | "cpu" | "xla" (quantization config key ``kernel``).
      interpret: run a Pallas kernel in interpret mode (kernel backends); also on when the
        environment sets ``QLORA_JAX_PALLAS_INTERPRET=1``, so whole models run the kernels on CPU
        (tests).
      threshold: the LLM.int8() outlier threshold, for 8-bit weights only: None takes the
        weight's own (``Int8Array.threshold``, transformers' ``llm_int8_threshold``, 6.0 by
        default); 0.0 turns the outlier decomposition off.

    Returns:
      [..., out] in ``x.dtype``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; expected one of {BACKENDS}")
    if isinstance(w, Int8Array):
        from ._int8 import int8_matmul

        if w.batch_shape or len(w.logical_shape) != 2 or w.logical_shape[1] != x.shape[-1]:
            raise ValueError(f"Int8Array of shape {w.shape} does not fit input [..., {x.shape[-1]}]; expected an "
                             "unstacked [out, in] weight (map stacked ones with nnx.scan / jax.vmap)")
        threshold = check_threshold(w.threshold if threshold is None else threshold)
        y = int8_matmul(x.reshape(-1, x.shape[-1]), w, threshold)
        return y.reshape(*x.shape[:-1], w.logical_shape[0])
    if threshold is not None:
        raise ValueError(f"threshold={threshold!r} applies to 8-bit weights only; this weight is "
                         f"{type(w).__name__}")
    if isinstance(w, LayerOfStack):
        q = w.stack
        n, k = q.logical_shape
        if (len(q.batch_shape) == 1 and k == x.shape[-1] and resolve_backend(backend, q) == "cpu"
                and _cpu_kernel_takes(x, q)):
            from ..kernels import cpu_nf4

            m = math.prod(x.shape[:-1])
            if cpu_nf4.gemv_takes(m, n, k, q.blocksize, x.dtype):
                return _qmatmul_cpu_layer(x.reshape(-1, k), w).reshape(*x.shape[:-1], n)
        w = w.slice()
    if not isinstance(w, QuantizedArray):
        if w.ndim != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"weight shape {tuple(w.shape)} does not fit input [..., {x.shape[-1]}]; "
                             "expected [out, in]")
        w = w if w.dtype == x.dtype else w.astype(x.dtype)
        native = backend in ("auto", "cpu") and _dense_kernel_takes(x, w)
        return _dense_few_rows(x, w) if native else _dot_t(x, w)
    if w.batch_shape or len(w.logical_shape) != 2 or w.logical_shape[1] != x.shape[-1]:
        raise ValueError(f"QuantizedArray of shape {w.shape} does not fit input [..., {x.shape[-1]}]; "
                         "expected an unstacked [out, in] weight (map stacked ones with nnx.scan / jax.vmap)")
    chosen = resolve_backend(backend, w)
    if chosen == "cpu":
        if not _cpu_kernel_takes(x, w):
            return _qmatmul_xla(x, w)
        return _qmatmul_cpu(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.logical_shape[0])
    interpret = interpret or os.environ.get("QLORA_JAX_PALLAS_INTERPRET") == "1"
    if chosen in ("pallas", "triton"):
        fn = _qmatmul_pallas if chosen == "pallas" else _qmatmul_triton

        def run(x, w):
            return fn(x.reshape(-1, x.shape[-1]), w, interpret).reshape(*x.shape[:-1], w.logical_shape[0])

        axes = _batch_axes(x)
        if not axes:
            return run(x, w)
        # Under a mesh: XLA's partitioner cannot split the kernel's custom call (it would gather x
        # whole on every device), so each device runs the kernel on its own rows of x against the
        # whole weight (gathered, 4.5 bits per weight, as FSDP gathers any weight).
        from jax.sharding import PartitionSpec as P

        return jax.shard_map(run, in_specs=(P(axes), P()), out_specs=P(axes), check_vma=False)(x, w)
    return _qmatmul_xla(x, w)


def _batch_axes(x) -> tuple[str, ...]:
    """The mesh axes (in context, ``jax.set_mesh``) that split x's leading (batch) dimension for a
    kernel: data and fsdp where they divide it; () without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or x.ndim < 2:
        return ()
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return axes if axes and x.shape[0] % n == 0 else ()
