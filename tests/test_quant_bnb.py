"""Bit-exactness of NF4/FP4 quantization against the real bitsandbytes (CPU).

Invariants pinned here (see also the docstring of qlora_jax.quant._core):
- code tables: NF4, FP4 (with its argsort order) and the 256-entry dynamic map equal bitsandbytes'.
- nibble order: the first element of each pair is the HIGH nibble; for an odd element count the
  last byte's low nibble is the code of 0.0 (bitsandbytes pads with a zero).
- boundary codes: a value exactly on a midpoint between two codes takes the LOWER code
  (torch.bucketize right=False); clamping to [-1, 1]; FP4's +0/-0 split follows the argsort.
- blocks: row-major flat blocks of `blocksize` (a block may span two rows); the short last
  block divides by its absmax, full blocks multiply by the reciprocal.
- zero blocks: absmax 0 scales by 1/1e-38 and gives the code of 0.0; an all-zero nested block
  (absmax2 = 0) gives nested code 0.
- double quantization: offset = mean(absmax) bit-identical to torch's (its summation order is
  reproduced); nested absmax identical; nested codes identical but for the CPU lookup-table steps
  at near-midpoint values (bnb_ref.assert_nested_codes_match); dequantization bit-identical given
  the same state, and the round trip through dequantize identical when the nested codes agree.
"""

import math
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qlora_jax
from qlora_jax.quant import _core, _tables

from bnb_ref import (F, assert_nested_codes_match, bnb_dequantize_reference, bnb_quantize, nested_scaled,
                     random_tensor, to_jax)

QUANT_TYPES = ["nf4", "fp4"]
DTYPES = ["float32", "bfloat16", "float16"]


def test_code_tables_match_bitsandbytes():
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    for qt, table in _tables.CODE_TABLES.items():
        np.testing.assert_array_equal(table, F.get_4bit_type(qt, device="cpu").numpy())
        bounds, order = _get_4bit_quantize_bounds(qt, torch.device("cpu"))
        ours = _tables.NF4_MIDPOINTS if qt == "nf4" else _tables.FP4_MIDPOINTS
        assert ours.tobytes() == bounds.numpy().tobytes()
        if qt == "fp4":
            np.testing.assert_array_equal(_tables.FP4_ORDER, order.numpy())
    assert _tables.DYNAMIC_MAP.tobytes() == F.create_dynamic_map().numpy().tobytes()
    assert _tables.UDYNAMIC_MAP.tobytes() == F.create_dynamic_map(signed=False).numpy().tobytes()


def _check_against_bnb(t: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool,
                       nested_blocksize: int = 256, batch_dims: int = 0):
    """Quantize ``t`` with both libraries and compare every stored bit and the dequantized values."""
    x = to_jax(t)
    q = qlora_jax.quantize(x, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                           double_quant_blocksize=nested_blocksize)
    ref = bnb_quantize(t, quant_type, blocksize, double_quant, nested_blocksize)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (math.ceil(t.numel() / 2),)
    np.testing.assert_array_equal(np.asarray(q.codes), ref["codes"], err_msg="packed codes")

    if not double_quant:
        assert np.asarray(q.absmax).tobytes() == ref["absmax"].tobytes(), "absmax"
    else:
        first = qlora_jax.quantize(x, quant_type=quant_type, blocksize=blocksize, double_quant=False)
        assert np.asarray(first.absmax).tobytes() == ref["absmax"].tobytes(), "first-level absmax"
        # offset = torch's absmax.mean(), reproduced in torch's own summation order: bit-identical.
        assert np.float32(q.offset).tobytes() == ref["offset"].tobytes(), f"offset {q.offset!r} vs {ref['offset']!r}"
        np.testing.assert_array_equal(np.asarray(q.nested_absmax), ref["absmax2"], err_msg="nested absmax")
        scaled = nested_scaled(ref["absmax"], ref["offset"], ref["absmax2"], nested_blocksize)
        assert_nested_codes_match(q.absmax, ref["qabsmax"], scaled)

    # Dequantization: identical to bitsandbytes given the same state, ...
    st = ref["state_dq"] if double_quant and nested_blocksize == 256 else ref["state"]
    packed = ref["packed_dq"] if double_quant and nested_blocksize == 256 else ref["packed"]
    q_bnb = qlora_jax.from_bnb_state(_prefixed_state(packed, st))
    ours_dq = np.asarray(qlora_jax.dequantize(q_bnb).astype(jnp.float32))
    bnb_absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset if st.nested else st.absmax
    expected = bnb_dequantize_reference(packed, bnb_absmax, quant_type, blocksize, t.shape, t.dtype)
    assert ours_dq.tobytes() == expected.tobytes(), "dequantize vs bitsandbytes' reference"
    if _cpu_kernel_exact(t.shape, blocksize):
        public = F.dequantize_4bit(packed, st).float().numpy().reshape(t.shape)
        assert_same_bits_but_fp4_zero_sign(ours_dq, public, packed, quant_type,
                                           "dequantize vs bitsandbytes.functional.dequantize_4bit")
    # ... and our own quantize -> dequantize round trip equals bitsandbytes' when the states agree.
    if not double_quant or np.array_equal(np.asarray(q.absmax), ref["qabsmax"]):
        mine = np.asarray(qlora_jax.dequantize(q).astype(jnp.float32))
        assert mine.tobytes() == ours_dq.tobytes(), "round trip"
    return q, ref


def _prefixed_state(packed, st) -> dict:
    return {("weight" if k == "" else f"weight.{k}"): v.numpy()
            for k, v in {"": packed, **st.as_dict(packed=True)}.items()}


def assert_same_bits_but_fp4_zero_sign(ours, public, packed, quant_type, msg) -> None:
    """Every bit equal, except the sign of FP4 code 8's zero, on which bitsandbytes' backends
    disagree: its pure-torch backend (the table of get_4bit_type, whose "-0" is the integer 0) and
    its AVX-512 CPU path give +0 * absmax; its scalar CPU path (CPUs without AVX-512, lut -0.0f) and
    the CUDA kernel (sign bit times the magnitude) give -0 * absmax. Ours is the pure-torch one
    (docs/decisions.md). Those elements must still be zeros of either sign."""
    ours, public = ours.reshape(-1), public.reshape(-1)
    signless = np.zeros(ours.shape, bool)
    if quant_type == "fp4":
        b = packed.reshape(-1).numpy()
        codes = np.stack([b >> 4, b & 15], -1).reshape(-1)[: ours.size]
        signless = (codes == 8) & (ours == 0) & (public == 0)
    assert ours[~signless].tobytes() == public[~signless].tobytes(), msg


def _cpu_kernel_exact(shape, blocksize) -> bool:
    """bitsandbytes' native CPU dequantize_4bit indexes blocks per row: it is right only when no
    block spans two rows (found here: blocks that do come back scaled by the wrong absmax; its
    pure-torch default backend and the CUDA kernels use flat blocks, as we do)."""
    return shape[-1] % blocksize == 0


# Shapes: whole blocks; rows not a multiple of any block (blocks span rows, partial last block);
# odd element count (padded last byte); 1-D; 3-D.
SHAPES = [(64, 256), (37, 51), (3, 5, 7), (1000,), (4, 4096)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["dq0", "dq1"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_matches_bitsandbytes(quant_type, dtype, double_quant, shape):
    seed = zlib.crc32(repr((quant_type, dtype, double_quant, shape)).encode())
    _check_against_bnb(random_tensor(shape, dtype, seed), quant_type, 64, double_quant)


@pytest.mark.parametrize("blocksize", _tables.BLOCKSIZES_4BIT)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_every_blocksize(quant_type, blocksize):
    for double_quant in (False, True):
        for shape in [(48, 4096), (33, 333)]:
            t = random_tensor(shape, "bfloat16", blocksize + len(shape[1:]) + double_quant)
            _check_against_bnb(t, quant_type, blocksize, double_quant)


@pytest.mark.parametrize("nested_blocksize", _tables.BLOCKSIZES_NESTED)
def test_every_nested_blocksize(nested_blocksize):
    t = random_tensor((128, 1000), "float32", nested_blocksize)
    _check_against_bnb(t, "nf4", 64, True, nested_blocksize=nested_blocksize)


def test_many_blocks_offset():
    """A 4096 x 4096 layer has 262144 blocks: a plain fp32 reduction would drift many ulps.

    From 32768 values on torch splits its sum across threads; quantize reproduces the
    single-threaded order, so bitsandbytes runs on one thread here (test_torch_sum_order checks
    the multi-threaded order separately).
    """
    t = random_tensor((4096, 4096), "bfloat16", 7)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_against_bnb(t, "nf4", 64, True)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_torch_sum_order(threads):
    """_core.torch_sum adds in torch's CPU order (cascade, lanes, per-thread chunks): same bits,
    on jax arrays (XLA) and numpy ones (the host path ``quantize`` takes outside jit); so does
    torch_mean against ``mean()``."""
    rng = np.random.default_rng(threads)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in [1, 5, 8, 31, 33, 100, 1023, 4097, 40000, 70001]:
            v = (np.abs(rng.standard_normal(n)) * 3).astype(np.float32)
            want_sum = np.float32(torch.from_numpy(v).sum().item()).tobytes()
            want_mean = np.float32(torch.from_numpy(v).mean().item()).tobytes()
            for arr in (jnp.asarray(v), v):
                ours = np.float32(_core.torch_sum(arr, num_threads=threads))
                assert ours.tobytes() == want_sum, (n, threads, type(arr))
                mean = np.float32(_core.torch_mean(arr, num_threads=threads))
                assert mean.tobytes() == want_mean, (n, threads, type(arr))
    finally:
        torch.set_num_threads(old)


def _special_tensors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    yield "all_zero", np.zeros((8, 64), np.float32)
    z = x.copy(); z[3] = 0; z[7, :] = 0; z[11, :32] = 0
    yield "zero_blocks", z
    yield "zero_tail", np.concatenate([x.reshape(-1), np.zeros(40, np.float32)])
    yield "huge", x * np.float32(1e30)
    yield "tiny", x * np.float32(1e-30)
    yield "mixed_scales", x * np.float32(10.0) ** np.arange(-18, 18, 2.25, dtype=np.float32)[:, None]
    yield "constant_blocks", np.full((4, 64), -3.5, np.float32)
    # Values exactly on the bucket bounds (block absmax 1): a tie takes the lower code.
    for qt, mids in (("nf4", _tables.NF4_MIDPOINTS), ("fp4", _tables.FP4_MIDPOINTS)):
        # (neighbours of FP4's zero midpoint are taken at +-1e-30, not the subnormal next float:
        # see test_subnormal_inputs_flush_on_cpu)
        up = np.where(mids == 0, np.float32(1e-30), np.nextafter(mids, np.float32(2)))
        down = np.where(mids == 0, np.float32(-1e-30), np.nextafter(mids, np.float32(-2)))
        ties = np.concatenate([[1.0], mids, -mids, up, down]).astype(np.float32)
        yield f"ties_{qt}", np.pad(ties, (0, 64 * 2 - ties.size)).reshape(2, 64)
    yield "clamp_edges", np.array([1.0, -1.0, 0.0, -0.0, 0.5, -0.5] * 8, np.float32)
    # Blocks whose absmax equal the tensor mean: centred nested values of exactly zero.
    e = np.ones((6, 64), np.float32); e[0, 0] = 3.0; e[1, 0] = 0.0
    yield "nested_exact_zero", e


@pytest.mark.parametrize("name,array", list(_special_tensors()), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_special_values(quant_type, name, array):
    for dtype in DTYPES:
        if dtype == "float16" and name in ("huge", "tiny", "mixed_scales"):
            continue  # outside fp16's range: the input itself cannot be built
        t = torch.from_numpy(np.ascontiguousarray(array)).to(getattr(torch, dtype))
        for double_quant in (False, True):
            _check_against_bnb(t, quant_type, 64, double_quant)


def test_nibble_order_and_padding():
    """Hand-checked: codes of [1, -1, 0] are NF4 15, 0, 7 and the pad code 7: bytes 0xF0, 0x77."""
    q = qlora_jax.quantize(jnp.array([1.0, -1.0, 0.0], jnp.float32), double_quant=False)
    assert np.asarray(q.codes).tolist() == [0xF0, 0x77]
    t = torch.tensor([1.0, -1.0, 0.0])
    assert F.quantize_4bit(t, quant_type="nf4")[0].reshape(-1).tolist() == [0xF0, 0x77]


def test_all_zero_nested_block_gets_code_zero():
    q = qlora_jax.quantize(jnp.zeros((4, 64)), double_quant=True)
    assert np.asarray(q.absmax).tolist() == [0, 0, 0, 0]
    ref = bnb_quantize(torch.zeros(4, 64), "nf4", 64, True)
    assert ref["qabsmax"].tolist() == [0, 0, 0, 0]
    np.testing.assert_array_equal(np.asarray(qlora_jax.dequantize(q)), np.zeros((4, 64), np.float32))


def test_stacked_slices_are_separate_bnb_tensors():
    """Each slice of a stacked tensor is its own bitsandbytes tensor, offset included, quantized
    eagerly (offsets summed on the host) or under jit and vmap (by XLA: there a division by the
    block count was once rewritten into a multiplication by its reciprocal, 1 ulp off bitsandbytes'
    mean in some slices; seen in slice 1 of 4 for a (4, 64, 96) stack)."""
    import jax

    for shape, seed in (((3, 40, 96), 3), ((4, 64, 96), 0)):
        t = random_tensor(shape, "bfloat16", seed)
        q = qlora_jax.quantize(to_jax(t), batch_dims=1)
        q_vmap = jax.jit(jax.vmap(qlora_jax.quantize))(to_jax(t))
        assert q.shape == shape and q.batch_shape == (shape[0],) and q.offset.shape == (shape[0],)
        state = qlora_jax.to_bnb_state(q, prefix="model.layers.{}.mlp.up_proj.weight")
        for i in range(shape[0]):
            qi, ref = _check_against_bnb(t[i], "nf4", 64, True)
            for stacked in (q, q_vmap):
                assert np.asarray(stacked.offset[i]).tobytes() == ref["offset"].tobytes(), i
                np.testing.assert_array_equal(np.asarray(stacked.codes[i]), np.asarray(qi.codes))
                np.testing.assert_array_equal(np.asarray(stacked.absmax[i]), np.asarray(qi.absmax))
                np.testing.assert_array_equal(np.asarray(stacked.nested_absmax[i]), ref["absmax2"])
            assert state[f"model.layers.{i}.mlp.up_proj.weight"].tobytes() == ref["packed_dq"].numpy().tobytes()
        np.testing.assert_array_equal(
            np.asarray(qlora_jax.dequantize(q).astype(jnp.float32)),
            np.stack([np.asarray(qlora_jax.dequantize(qlora_jax.quantize(to_jax(t[i]))).astype(jnp.float32))
                      for i in range(shape[0])]))


@pytest.mark.parametrize("double_quant", [False, True], ids=["dq0", "dq1"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_bnb_state_round_trip(quant_type, double_quant):
    """bitsandbytes' serialized state -> QuantizedArray -> the same keys, dtypes, shapes and bytes."""
    t = random_tensor((96, 160), "bfloat16", 11)
    packed, st = F.quantize_4bit(t, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    theirs = _prefixed_state(packed, st)
    q = qlora_jax.from_bnb_state(theirs)
    ours = qlora_jax.to_bnb_state(q)
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert ours[k].tobytes() == theirs[k].tobytes(), k


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_our_state_loads_in_bitsandbytes(quant_type):
    """Our to_bnb_state is read by bitsandbytes' QuantState.from_dict and dequantizes identically."""
    from bitsandbytes.functional import QuantState

    t = random_tensor((64, 192), "float16", 5)
    q = qlora_jax.quantize(to_jax(t), quant_type=quant_type)
    state = qlora_jax.to_bnb_state(q, prefix="layer.weight")
    qs = QuantState.from_dict({k[len("layer.weight."):]: torch.from_numpy(v) for k, v in state.items()
                               if k != "layer.weight"}, device=torch.device("cpu"))
    assert qs.shape == t.shape and qs.dtype == torch.float16 and qs.quant_type == quant_type
    bnb_out = F.dequantize_4bit(torch.from_numpy(state["layer.weight"]), qs)
    np.testing.assert_array_equal(bnb_out.float().numpy(), np.asarray(qlora_jax.dequantize(q).astype(jnp.float32)))
    # and the packed codes are exactly what bitsandbytes itself stores for this tensor
    assert state["layer.weight"].tobytes() == F.quantize_4bit(t, quant_type=quant_type)[0].numpy().tobytes()


def test_subnormal_inputs_flush_on_cpu():
    """A documented platform difference: XLA on CPU flushes subnormal fp32 values to zero.

    bitsandbytes (torch on CPU) keeps them, so under jit on CPU an element below 2**-126 in
    magnitude (or a block whose absmax is) quantizes as a zero; on GPU XLA keeps subnormals.
    Eager quantization on CPU runs the native host kernel (``kernels/cpu/quantize.cc``), which keeps
    them as torch does: there even an all-subnormal block is bitsandbytes' bit for bit. Normal
    values, however tiny their block, are exact on every path (test_special_values[tiny]). The
    stored absmax of an all-zero short last block is bitsandbytes' 1e-38.
    """
    import jax

    from qlora_jax.kernels import cpu_nf4

    quantize_jit = jax.jit(lambda v: qlora_jax.quantize(v, double_quant=False))
    sub = np.float32(1e-40)
    x = np.array([sub, -sub, 0.5, 1.0] * 16, np.float32)  # normal block: subnormals are ~0 anyway
    ref = bnb_quantize(torch.from_numpy(x), "nf4", 64, False)
    for q in (qlora_jax.quantize(jnp.asarray(x), double_quant=False), quantize_jit(jnp.asarray(x))):
        np.testing.assert_array_equal(np.asarray(q.codes), ref["codes"])
    only_sub = np.full(64, 8e-39, np.float32)  # a block made only of subnormals
    ref = bnb_quantize(torch.from_numpy(only_sub), "nf4", 64, False)
    assert np.all(ref["codes"] == 0xEE)  # bitsandbytes: 8e-39 * (1 / 1e-38) = 0.8 -> code 14
    assert ref["absmax"].tobytes() == np.float32(8e-39).tobytes()
    q = quantize_jit(jnp.asarray(only_sub))
    assert np.all(np.asarray(q.codes) == 0x77)  # the code of 0.0 (7): flushed to zero
    np.testing.assert_array_equal(np.asarray(q.absmax), [0.0])
    q = qlora_jax.quantize(jnp.asarray(only_sub), double_quant=False)
    if cpu_nf4.available():  # eager: the host kernel, torch's arithmetic
        np.testing.assert_array_equal(np.asarray(q.codes), ref["codes"])
        assert np.asarray(q.absmax).tobytes() == ref["absmax"].tobytes()
        tail = np.full(33, 5e-39, np.float32)  # a short subnormal block: divided by the clamped 1e-38
        q, ref = qlora_jax.quantize(tail, double_quant=False), bnb_quantize(torch.from_numpy(tail), "nf4", 64, False)
        np.testing.assert_array_equal(np.asarray(q.codes), ref["codes"])
        assert np.asarray(q.absmax).tobytes() == ref["absmax"].tobytes()
    else:  # eager runs the XLA program too
        assert np.all(np.asarray(q.codes) == 0x77)
    zero_tail = qlora_jax.quantize(jnp.zeros(100), double_quant=False)
    assert np.asarray(zero_tail.absmax).tobytes() == np.array([0.0, 1e-38], np.float32).tobytes()
