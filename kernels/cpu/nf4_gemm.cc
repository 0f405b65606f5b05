// Training-sized products with a 4-bit (NF4/FP4) weight in bitsandbytes' layout, on the CPU, as an
// XLA FFI custom call (qlora_jax.kernels.cpu_nf4.cpu_gemm), with AVX-512 BF16 dot products, or on
// CPUs without them (AMD before Zen 4, Intel before Cooper Lake / Sapphire Rapids) AVX2 fp32 FMAs
// of the same bf16 values (exact products, fp32 sums):
//   forward   y  [M, N] = x  [M, K] @ dequantize(W)^T
//   backward  dx [M, K] = dy [M, N] @ dequantize(W)
// bf16 operands, fp32 accumulation, the result rounded to bf16: the XLA path's arithmetic
// (`dequantize(w, bf16)`, then a dot with fp32 accumulation) in another summation order. The
// dequantized weight is never written whole: each thread decodes a panel of output columns (32
// with AVX-512 BF16, ~64 bytes a K; 16 with AVX2, 64 bytes a K) into a buffer that stays in its L2
// cache, and multiplies every row of the input with it.
//
// AVX-512 BF16: a panel holds bf16 pairs as `vdpbf16ps` takes them: word (p, j) = the two weights
// of reduction pair p (elements 2p, 2p+1 of the reduction axis) for output column j, 32 columns
// wide (two registers of 16 fp32 accumulators). The input's pair (row m, 2p..2p+1) is one 32-bit
// word of a row-major bf16 array, broadcast to every lane. The forward's columns are W's rows
// n0..n0+31; the backward's are W's columns k0.. (even ones in the first register, odd ones in the
// second, interleaved back when the tile is stored). AVX2: the same structure in fp32 words (the
// bf16 values widened), 16 columns by 6 input rows a register tile.
//
// Operands: x [M, R] bf16 (R = K forward, N backward), codes u8 [N*K/2] (two codes a byte, first in
// the high nibble, row-major over the flattened [N, K] weight), absmax f32 [ceil(N*K/blocksize)]
// (first-level scales, double quantization undone), table f32 [16]. Result [M, C] bf16 (C = N
// forward, K backward). Needs K and blocksize multiples of 32 (every 32-element group of a row lies
// in one block) and, backward, N even. `vdpbf16ps` treats denormal inputs as zero and flushes
// denormal sums (round to nearest even otherwise); the AVX2 path keeps denormals.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "xla/ffi/api/ffi.h"
#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define QLORA_GEMM_ISA 2  // AVX-512 BF16
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define QLORA_GEMM_AMX 1  // and AMX tiles, where Linux grants them (amx_granted)
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QLORA_GEMM_ISA 1  // AVX2 + FMA
#endif

namespace ffi = xla::ffi;

// 3: AMX BF16 tiles (and AVX-512 BF16 for the decoding), 2: AVX-512 BF16 dot products, 1: AVX2
// fp32 FMAs, 0: not built (the CPU has neither)
extern "C" int QloraNf4GemmSupported() {
#if defined(QLORA_GEMM_AMX)
  return qlora_cpu::amx_granted() ? 3 : 2;
#elif defined(QLORA_GEMM_ISA)
  return QLORA_GEMM_ISA;
#else
  return 0;
#endif
}

#ifdef QLORA_GEMM_ISA
namespace {

struct Weight {
  const uint8_t* codes;
  const float* absmax;
  int64_t n, k, blocksize, shift;  // shift: log2(blocksize) when a power of two, else -1
  float scale(int64_t flat) const { return absmax[shift >= 0 ? (flat >> shift) : flat / blocksize]; }
};

using qlora_cpu::rounding_bias_added;
#ifdef QLORA_GEMM_AMX
using qlora_cpu::amx_granted;
using qlora_cpu::tiles_configure;
using qlora_cpu::transpose16;
#endif

#if QLORA_GEMM_ISA == 2
constexpr int64_t NR = 32;   // panel columns
constexpr int MR = 12;       // input rows per register tile: 24 accumulators
constexpr int64_t STEP = 2;  // reduction elements per 32-bit word of a panel or packed input (bf16 pairs)

struct Table {
  __m512 v;
  explicit Table(const float* t) : v(_mm512_loadu_ps(t)) {}
};

// bf16 bits (round to nearest even) in the low 16 bits of each lane: the weights are finite.
inline __m512i bf16_bits(__m512 v) { return _mm512_srli_epi32(rounding_bias_added(_mm512_castps_si512(v)), 16); }

// The 32 weights W[row, c0 .. c0+31] (one block, 16 code bytes) as dequantize(w, bf16) rounds them:
// even elements (high nibbles) in `even`, odd ones in `odd`, bf16 bits in each lane's low half. The
// 16 table entries are scaled and rounded once (the block's 16 possible weights), then looked up:
// the same bits as rounding each element's product, in a third of the instructions.
inline void decode32(const Weight& w, int64_t row, int64_t c0, const Table& table, __m512i& even, __m512i& odd) {
  const int64_t flat = row * w.k + c0;
  const __m512i scaled = bf16_bits(_mm512_mul_ps(table.v, _mm512_set1_ps(w.scale(flat))));
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.codes + flat / 2)));
  even = _mm512_permutexvar_epi32(_mm512_srli_epi32(bytes, 4), scaled);
  odd = _mm512_permutexvar_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0xF)), scaled);
}

// Where a panel's weights come from: the packed 4-bit weight (decoded as dequantize(w, bf16)
// rounds it) or a dense bf16 one (the LM head); rows() x width() elements. words(): the 16 bf16
// pairs of elements c0 .. c0+31 of a row, pair i = elements (2i, 2i+1), the first in the low half;
// split(): even and odd elements in the low halves of two vectors.
struct QuantizedRows {
  const Weight& w;
  const Table& table;
  int64_t rows() const { return w.n; }
  int64_t width() const { return w.k; }
  __m512i words(int64_t row, int64_t c0) const {
    __m512i even, odd;
    decode32(w, row, c0, table, even, odd);
    return _mm512_or_si512(even, _mm512_slli_epi32(odd, 16));
  }
  void split(int64_t row, int64_t c0, __m512i& even, __m512i& odd) const { decode32(w, row, c0, table, even, odd); }
};

struct DenseRows {
  const uint16_t* w;  // [n, k] bf16, row-major
  int64_t n, k;
  int64_t rows() const { return n; }
  int64_t width() const { return k; }
  __m512i words(int64_t row, int64_t c0) const { return _mm512_loadu_si512(w + row * k + c0); }
  void split(int64_t row, int64_t c0, __m512i& even, __m512i& odd) const {
    const __m512i v = words(row, c0);
    even = _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF));
    odd = _mm512_srli_epi32(v, 16);
  }
};

// Forward panel: columns = W's rows n0 .. n0+31 (zeros past N), pairs over K.
template <typename Rows>
void pack_forward(const Rows& src, int64_t n0, uint32_t* panel) {
  const int64_t k = src.width(), pairs = k / 2, cols = std::min<int64_t>(NR, src.rows() - n0);
  if (cols < NR) std::memset(panel, 0, sizeof(uint32_t) * pairs * NR);
  alignas(64) uint32_t words[16];
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t c0 = 0; c0 < k; c0 += 32) {
      _mm512_store_si512(words, src.words(n0 + j, c0));
      uint32_t* dst = panel + (c0 / 2) * NR + j;
      for (int i = 0; i < 16; ++i) dst[i * NR] = words[i];
    }
}

// Backward panel: columns = W's columns k0 .. k0+31 (even ones, then odd ones), pairs over N.
template <typename Rows>
void pack_backward(const Rows& src, int64_t k0, uint32_t* panel) {
  for (int64_t q = 0; q < src.rows() / 2; ++q) {
    __m512i e0, o0, e1, o1;
    src.split(2 * q, k0, e0, o0);
    src.split(2 * q + 1, k0, e1, o1);
    _mm512_store_si512(panel + q * NR, _mm512_or_si512(e0, _mm512_slli_epi32(e1, 16)));
    _mm512_store_si512(panel + q * NR + 16, _mm512_or_si512(o0, _mm512_slli_epi32(o1, 16)));
  }
}

inline __m256i round_to_bf16(__m512 v) {  // 16 fp32 -> 16 bf16 (nearest even, NaN kept quiet)
  const __m512i u = _mm512_castps_si512(v);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i bits = _mm512_mask_or_epi32(rounding_bias_added(u), nan, u, _mm512_set1_epi32(0x400000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
}

// One row of 32 fp32 sums (columns 0-15 in v0, 16-31 in v1) rounded to bf16 and stored at its first
// `cols` columns. interleave: the backward's column order (v0 the even columns, v1 the odd ones).
inline void store_row(__m512 v0, __m512 v1, uint16_t* out, int64_t cols, bool interleave) {
  if (interleave) {
    const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512 e = v0;
    v0 = _mm512_permutex2var_ps(e, lo_idx, v1);
    v1 = _mm512_permutex2var_ps(e, hi_idx, v1);
  }
  const __mmask16 m0 = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  _mm256_mask_storeu_epi16(out, m0, round_to_bf16(v0));
  _mm256_mask_storeu_epi16(out + 16, m1, round_to_bf16(v1));
}

// The input rearranged per tile of MR rows: word (t, p, r) = the pair p of row t*MR + r (zeros past
// M), so that a tile reads its input as one sequential stream (12 strided rows of x were 12 streams).
void pack_input(const uint16_t* x, int64_t m, int64_t pairs, int64_t t, uint32_t* xp) {
  const uint32_t* xw = reinterpret_cast<const uint32_t*>(x);
  uint32_t* dst = xp + t * pairs * MR;
  const int64_t rows = std::min<int64_t>(MR, m - t * MR);
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t* src = xw + (t * MR + r) * pairs;
    for (int64_t p = 0; p < pairs; ++p) dst[p * MR + r] = src[p];
  }
  for (int64_t r = rows; r < MR; ++r)
    for (int64_t p = 0; p < pairs; ++p) dst[p * MR + r] = 0;
}

// A tile of packed input (MR words a pair, R of them used) times a panel over `pairs` reduction
// pairs; the R x 32 result stored into out (row stride ldo, bf16) at `cols` valid columns.
// interleave: the backward's column order (even columns in the first accumulator, odd in the second).
template <int R>
void tile(const uint32_t* xp, const uint32_t* panel, int64_t pairs, uint16_t* out, int64_t ldo, int64_t cols,
          bool interleave) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_load_si512(panel + p * NR));
    const __m512bh b1 = reinterpret_cast<__m512bh>(_mm512_load_si512(panel + p * NR + 16));
    const uint32_t* a_p = xp + p * MR;
    for (int r = 0; r < R; ++r) {
      const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int32_t>(a_p[r])));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
  for (int r = 0; r < R; ++r) store_row(acc[r][0], acc[r][1], out + r * ldo, cols, interleave);
}

template <int R>
void tiles_from(const uint32_t* xp, const uint32_t* panel, int64_t pairs, uint16_t* out, int64_t ldo, int64_t cols,
                bool interleave, int64_t rows) {
  if constexpr (R > 0) {
    if (rows == R) return tile<R>(xp, panel, pairs, out, ldo, cols, interleave);
    return tiles_from<R - 1>(xp, panel, pairs, out, ldo, cols, interleave, rows);
  }
}

// The output columns c0 .. c0+cols-1 (one panel) for every row of the input: the panel decoded
// once over the whole reduction, then every tile of the input against it.
template <typename Rows>
void panel_product(const Rows& src, int64_t c0, int64_t cols, bool transpose, const uint32_t* xp, int64_t m,
                   int64_t pairs, uint16_t* y, int64_t ldy) {
  thread_local qlora_cpu::Scratch panel_buffer;
  uint32_t* panel = panel_buffer.get<uint32_t>(pairs * NR);
  if (transpose) pack_backward(src, c0, panel);
  else pack_forward(src, c0, panel);
  for (int64_t i = 0; i * MR < m; ++i)
    tiles_from<MR>(xp + i * pairs * MR, panel, pairs, y + i * MR * ldy + c0, ldy, cols, transpose,
                   std::min<int64_t>(MR, m - i * MR));
}

#ifdef QLORA_GEMM_AMX
// AMX: the 32 x 32 output block of 32 input rows and 32 panel columns in four tiles of 16 x 16
// fp32 sums (tmm0-3), each step of 32 reduction elements loading two tiles of input (tmm4-5: 16 rows
// of 32 bf16, straight from the row-major input) and two of panel (tmm6-7: 16 bf16 pairs x 16
// columns, as `tdpbf16ps` takes them) for four tile products. The panel is laid out by tile: block
// (s, h) of 16 x 16 words = pairs 16s .. 16s+15 of the columns 16h .. 16h+15, 1 KiB contiguous. A
// thread decodes a group of G panels (up to ~512 KiB: its L2) once, then runs every 32-row block of
// the input against each: the input is read once a group, not once a panel. `tdpbf16ps` sums each
// pair's two products into the fp32 sum, as `vdpbf16ps` does (denormal inputs as zero, round to
// nearest even).
constexpr int64_t AMX_MR = 32;          // input rows of an output block
constexpr int64_t AMX_STEP = 32;        // reduction elements a tile step takes (16 pairs)
constexpr int64_t AMX_BLOCK = 256;      // words of a panel tile (16 pairs x 16 columns)
constexpr int64_t AMX_GROUP_BYTES = 512 << 10;
// Reduction steps a panel holds at most (2048 elements: 128 KiB a panel): a longer reduction (the
// LM head's backward, 32000; down_proj, 5632) runs in chunks with the sums carried, so that groups
// of panels stay in L2 and the input is read once a group, not once a panel.
constexpr int64_t AMX_CHUNK_STEPS = 64;

// Forward panel: columns = W's rows n0 .. n0+31 (zeros past N), steps s0 .. s0+steps-1 over K.
// Sixteen rows' 32-element groups give 16 words each (a tile's columns), transposed into the tile's rows.
template <typename Rows>
void amx_pack_forward(const Rows& src, int64_t n0, int64_t s0, int64_t steps, uint32_t* panel) {
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t s = 0; s < steps; ++s) {
      __m512i r[16];
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t row = n0 + 16 * h + j;
        r[j] = row < src.rows() ? src.words(row, (s0 + s) * AMX_STEP) : _mm512_setzero_si512();
      }
      transpose16(r);
      uint32_t* block = panel + (2 * s + h) * AMX_BLOCK;
      for (int i = 0; i < 16; ++i) _mm512_store_si512(block + 16 * i, r[i]);
    }
}

// Backward panel: columns = W's columns k0 .. k0+31 (even ones in the first tile, odd ones in the
// second), pairs over N (zeros past N), steps s0 .. s0+steps-1.
template <typename Rows>
void amx_pack_backward(const Rows& src, int64_t k0, int64_t s0, int64_t steps, uint32_t* panel) {
  for (int64_t s = 0; s < steps; ++s) {
    uint32_t* b0 = panel + 2 * s * AMX_BLOCK;
    uint32_t* b1 = b0 + AMX_BLOCK;
    for (int64_t i = 0; i < 16; ++i) {
      const int64_t q = 16 * (s0 + s) + i;
      __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
      if (2 * q < src.rows()) {  // N even: rows 2q and 2q+1
        __m512i e0, o0, e1, o1;
        src.split(2 * q, k0, e0, o0);
        src.split(2 * q + 1, k0, e1, o1);
        even = _mm512_or_si512(e0, _mm512_slli_epi32(e1, 16));
        odd = _mm512_or_si512(o0, _mm512_slli_epi32(o1, 16));
      }
      _mm512_store_si512(b0 + 16 * i, even);
      _mm512_store_si512(b1 + 16 * i, odd);
    }
  }
}

// The 32 x 32 fp32 sums of 32 input rows (x, row stride ldx elements) times one panel over `steps`
// steps, stored row-major into sums (32 x 32); `add`: continuing the sums already there (the
// reduction's previous chunk), in the same order as one pass.
inline void amx_block(const uint16_t* x, int64_t ldx, const uint32_t* panel, int64_t steps, float* sums, bool add) {
  if (add) {
    _tile_loadd(0, sums, 128);
    _tile_loadd(1, sums + 16, 128);
    _tile_loadd(2, sums + 16 * 32, 128);
    _tile_loadd(3, sums + 16 * 32 + 16, 128);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t stride = ldx * 2;
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, x + s * AMX_STEP, stride);
    _tile_loadd(5, x + 16 * ldx + s * AMX_STEP, stride);
    _tile_loadd(6, panel + 2 * s * AMX_BLOCK, 64);
    _tile_loadd(7, panel + (2 * s + 1) * AMX_BLOCK, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, sums, 128);
  _tile_stored(1, sums + 16, 128);
  _tile_stored(2, sums + 16 * 32, 128);
  _tile_stored(3, sums + 16 * 32 + 16, 128);
}

// The input as the tiles read it: rows of a multiple of 32 elements, blocks of 32 rows. `full`
// blocks straight from `x` (row stride ld), the last partial one from `tail` (32 rows, zeros past M).
struct AmxInput {
  const uint16_t* x;
  const uint16_t* tail;
  int64_t ld, m, full;
  const uint16_t* block(int64_t b) const { return b < full ? x + b * AMX_MR * ld : tail; }
};

// One group of panels: columns c0 .. c0 + 32*g - 1 (the last one cut at cols_total) for every row,
// the reduction's `steps` in chunks of `chunk` steps (the last one shorter): a chunk's panels
// decoded, then every 32-row block against each, the fp32 sums of every block carried to the next
// chunk in `carry` (blocks x g x 32 x 32) where there is more than one.
template <typename Rows>
void amx_group(const Rows& src, int64_t c0, int64_t g, int64_t cols_total, bool transpose, const AmxInput& in,
               int64_t steps, int64_t chunk, uint16_t* y) {
  thread_local qlora_cpu::Scratch panel_buffer, carry_buffer;
  const int64_t panel_words = chunk * 2 * AMX_BLOCK, blocks = (in.m + AMX_MR - 1) / AMX_MR;
  uint32_t* panels = panel_buffer.get<uint32_t>(g * panel_words);
  alignas(64) float local[AMX_MR * 32];
  float* carry = steps > chunk ? carry_buffer.get<float>(blocks * g * AMX_MR * 32) : nullptr;
  tiles_configure();
  for (int64_t s0 = 0; s0 < steps; s0 += chunk) {
    const int64_t len = std::min(chunk, steps - s0);
    const bool last = s0 + len == steps;
    for (int64_t j = 0; j < g; ++j) {
      if (transpose) amx_pack_backward(src, c0 + 32 * j, s0, len, panels + j * panel_words);
      else amx_pack_forward(src, c0 + 32 * j, s0, len, panels + j * panel_words);
    }
    for (int64_t b = 0; b < blocks; ++b) {
      const uint16_t* xb = in.block(b) + s0 * AMX_STEP;
      const int64_t rows = std::min<int64_t>(AMX_MR, in.m - b * AMX_MR);
      for (int64_t j = 0; j < g; ++j) {
        float* sums = carry ? carry + (b * g + j) * AMX_MR * 32 : local;
        amx_block(xb, in.ld, panels + j * panel_words, len, sums, s0 > 0);
        if (!last) continue;
        const int64_t col = c0 + 32 * j, cols = std::min<int64_t>(32, cols_total - col);
        for (int64_t r = 0; r < rows; ++r)
          store_row(_mm512_load_ps(sums + 32 * r), _mm512_load_ps(sums + 32 * r + 16),
                    y + (b * AMX_MR + r) * cols_total + col, cols, transpose);
      }
    }
  }
  _tile_release();
}

// y [M, C] for x [M, R] on AMX: the input read in place where R is a multiple of 32 (its partial
// last block of rows copied with zeros past M), else copied whole with zero columns to a multiple
// of 32; groups of panels as large as AMX_GROUP_BYTES allows but at least two a thread (so that a
// thread finishing early takes another), split over the pool.
// make_rows(): this thread's panel source (a decoder holds the table in a register).
template <typename MakeRows>
void amx_gemm(ffi::ThreadPool& pool, int64_t n, int64_t k, const MakeRows& make_rows, bool transpose, const uint16_t* x,
              int64_t m, uint16_t* y) {
  const int64_t red = transpose ? n : k, cols_total = transpose ? k : n;
  const int64_t steps = (red + AMX_STEP - 1) / AMX_STEP, ld = steps * AMX_STEP;
  const int64_t blocks = (m + AMX_MR - 1) / AMX_MR;
  thread_local qlora_cpu::Scratch input_buffer;
  AmxInput in{x, nullptr, red, m, m / AMX_MR};
  if (ld != red || in.full < blocks) {
    const int64_t first = ld != red ? 0 : in.full;  // the rows copied: all of them, or the last block
    uint16_t* copy = input_buffer.get<uint16_t>((blocks - first) * AMX_MR * ld);
    std::memset(copy, 0, sizeof(uint16_t) * (blocks - first) * AMX_MR * ld);
    for (int64_t r = first * AMX_MR; r < m; ++r)
      std::memcpy(copy + (r - first * AMX_MR) * ld, x + r * red, sizeof(uint16_t) * red);
    if (ld != red) in = AmxInput{copy, nullptr, ld, m, blocks};
    else in.tail = copy;
  }
  const int64_t panels = (cols_total + 31) / 32, threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = (steps + AMX_CHUNK_STEPS - 1) / AMX_CHUNK_STEPS, chunk = (steps + chunks - 1) / chunks;
  const int64_t panel_bytes = chunk * 2 * AMX_BLOCK * static_cast<int64_t>(sizeof(uint32_t));
  const int64_t g = std::max<int64_t>(1, std::min(AMX_GROUP_BYTES / panel_bytes, panels / (2 * threads)));
  auto work = [&](int64_t i) {
    make_rows([&](const auto& src) {
      amx_group(src, i * g * 32, std::min(g, panels - i * g), cols_total, transpose, in, steps, chunk, y);
    });
  };
  qlora_cpu::parallel_parts(pool, (panels + g - 1) / g, work);
}
#endif

#else  // QLORA_GEMM_ISA == 1: AVX2 + FMA, fp32 products of the bf16 values (exact), fp32 sums
constexpr int64_t NR = 16;   // panel columns (two registers of 8)
constexpr int MR = 6;        // input rows per register tile: 12 accumulators of the 16 registers
constexpr int64_t STEP = 1;  // one reduction element per 32-bit word: the panel and the input hold fp32

struct Table {  // the 16 codes as two 8-entry permutes, chosen by the code's bit 3
  __m256 lo, hi;
  explicit Table(const float* t) : lo(_mm256_loadu_ps(t)), hi(_mm256_loadu_ps(t + 8)) {}
};

inline __m256 lookup(const Table& t, __m256i c, __m256 s) {  // table[c] * s, rounded to bf16 (as fp32)
  const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, c), _mm256_permutevar8x32_ps(t.hi, c),
                                    _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
  const __m256i u = rounding_bias_added(_mm256_castps_si256(_mm256_mul_ps(v, s)));  // finite weights
  return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

// The 16 weights W[row, c0 .. c0+15] (one block, 8 code bytes) as dequantize(w, bf16) rounds them:
// even elements (high nibbles) in `even`, odd ones in `odd`.
inline void decode16(const Weight& w, int64_t row, int64_t c0, const Table& table, __m256& even, __m256& odd) {
  const int64_t flat = row * w.k + c0;
  const __m256 s = _mm256_set1_ps(w.scale(flat));
  const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.codes + flat / 2)));
  even = lookup(table, _mm256_srli_epi32(bytes, 4), s);
  odd = lookup(table, _mm256_and_si256(bytes, _mm256_set1_epi32(0xF)), s);
}

// Where a panel's weights come from (the AVX2 form of the AVX-512 path's QuantizedRows and
// DenseRows): the packed 4-bit weight, decoded as dequantize(w, bf16) rounds it, or a dense bf16
// one (the LM head). split16(): elements c0 .. c0+15 of a row, the even ones in `even` and the odd
// ones in `odd`, as fp32 (exact).
struct QuantizedRows {
  const Weight& w;
  const Table& table;
  int64_t rows() const { return w.n; }
  void split16(int64_t row, int64_t c0, __m256& even, __m256& odd) const { decode16(w, row, c0, table, even, odd); }
};

struct DenseRows {
  const uint16_t* w;  // [n, k] bf16, row-major
  int64_t n, k;
  int64_t rows() const { return n; }
  void split16(int64_t row, int64_t c0, __m256& even, __m256& odd) const {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + row * k + c0));  // 8 pairs
    even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
};

// Forward panel of reduction elements e0 .. e1-1 (multiples of 32 but e1 = K): float (e - e0, j) =
// W[n0 + j, e], columns W's rows n0 .. n0+15 (zeros past N).
template <typename Rows>
void pack_forward(const Rows& src, int64_t n0, int64_t e0, int64_t e1, float* panel) {
  const int64_t cols = std::min<int64_t>(NR, src.rows() - n0);
  if (cols < NR) std::memset(panel, 0, sizeof(float) * (e1 - e0) * NR);
  alignas(32) float even[8], odd[8];
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t c0 = e0; c0 < e1; c0 += 16) {
      __m256 e, o;
      src.split16(n0 + j, c0, e, o);
      _mm256_store_ps(even, e);
      _mm256_store_ps(odd, o);
      float* dst = panel + (c0 - e0) * NR + j;
      for (int i = 0; i < 8; ++i) {
        dst[(2 * i) * NR] = even[i];
        dst[(2 * i + 1) * NR] = odd[i];
      }
    }
}

// Backward panel of reduction elements (W's rows) e0 .. e1-1: float (q - e0, j) = W[q, column j],
// columns W's columns k0 .. k0+15 (even ones, then odd).
template <typename Rows>
void pack_backward(const Rows& src, int64_t k0, int64_t e0, int64_t e1, float* panel) {
  for (int64_t q = e0; q < e1; ++q) {
    __m256 e, o;
    src.split16(q, k0, e, o);
    _mm256_store_ps(panel + (q - e0) * NR, e);
    _mm256_store_ps(panel + (q - e0) * NR + 8, o);
  }
}

inline __m128i round_to_bf16(__m256 v) {  // 8 fp32 -> 8 bf16 (nearest even, NaN kept quiet)
  const __m256i u = _mm256_castps_si256(v);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  const __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
  const __m256i bits = _mm256_srli_epi32(
      _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounding_bias_added(u)), _mm256_castsi256_ps(quiet), nan)),
      16);
  return _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
}

// The input rearranged per tile of MR rows, in fp32: float (t, e, r) = x[t*MR + r, e] (zeros past M).
void pack_input(const uint16_t* x, int64_t m, int64_t red, int64_t t, uint32_t* xp) {
  uint32_t* dst = xp + t * red * MR;
  const int64_t rows = std::min<int64_t>(MR, m - t * MR);
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* src = x + (t * MR + r) * red;
    for (int64_t e = 0; e < red; ++e) dst[e * MR + r] = static_cast<uint32_t>(src[e]) << 16;
  }
  for (int64_t r = rows; r < MR; ++r)
    for (int64_t e = 0; e < red; ++e) dst[e * MR + r] = 0;
}

// The MR x 16 fp32 sums of a tile of packed input times a panel (all MR rows: those past M are
// zeros), added to `sums` (MR rows of 16: a reduction chunk continues the previous one's sums in the
// same order) or, for the first chunk, stored there. Twelve named accumulators: as an array GCC kept
// a copy of every one on the stack, stored on every step.
__attribute__((noinline)) void accumulate(const float* xp, const float* panel, int64_t red, float* sums, bool add) {
  static_assert(MR == 6, "accumulate names six rows");
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  if (add) {
    c00 = _mm256_load_ps(sums), c01 = _mm256_load_ps(sums + 8), c10 = _mm256_load_ps(sums + 16);
    c11 = _mm256_load_ps(sums + 24), c20 = _mm256_load_ps(sums + 32), c21 = _mm256_load_ps(sums + 40);
    c30 = _mm256_load_ps(sums + 48), c31 = _mm256_load_ps(sums + 56), c40 = _mm256_load_ps(sums + 64);
    c41 = _mm256_load_ps(sums + 72), c50 = _mm256_load_ps(sums + 80), c51 = _mm256_load_ps(sums + 88);
  }
  for (int64_t e = 0; e < red; ++e) {
    const __m256 b0 = _mm256_load_ps(panel + e * NR), b1 = _mm256_load_ps(panel + e * NR + 8);
    const float* a_e = xp + e * MR;
#define QLORA_ROW(r)                                     \
  {                                                      \
    const __m256 a = _mm256_broadcast_ss(a_e + r);       \
    c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0);           \
    c##r##1 = _mm256_fmadd_ps(a, b1, c##r##1);           \
  }
    QLORA_ROW(0) QLORA_ROW(1) QLORA_ROW(2) QLORA_ROW(3) QLORA_ROW(4) QLORA_ROW(5)
#undef QLORA_ROW
  }
  const __m256 all[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(sums + r * 16, all[r][0]);
    _mm256_store_ps(sums + r * 16 + 8, all[r][1]);
  }
}

// The first `rows` rows of a tile's fp32 sums (MR x 16) rounded to bf16 and stored into out (row
// stride ldo) at `cols` valid columns. interleave: the backward's column order (even columns in the
// first 8 sums of a row, odd in the second).
void store_tile(const float* sums, int64_t rows, uint16_t* out, int64_t ldo, int64_t cols, bool interleave) {
  for (int64_t r = 0; r < rows; ++r) {
    __m256 v0 = _mm256_load_ps(sums + r * NR), v1 = _mm256_load_ps(sums + r * NR + 8);
    if (interleave) {  // [e0..e7], [o0..o7] -> [e0 o0 .. e3 o3], [e4 o4 .. e7 o7]
      const __m256 lo = _mm256_unpacklo_ps(v0, v1), hi = _mm256_unpackhi_ps(v0, v1);
      v0 = _mm256_permute2f128_ps(lo, hi, 0x20);
      v1 = _mm256_permute2f128_ps(lo, hi, 0x31);
    }
    const __m128i h0 = round_to_bf16(v0), h1 = round_to_bf16(v1);
    if (cols >= NR) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + r * ldo), h0);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + r * ldo + 8), h1);
    } else {
      alignas(16) uint16_t row[NR];
      _mm_store_si128(reinterpret_cast<__m128i*>(row), h0);
      _mm_store_si128(reinterpret_cast<__m128i*>(row + 8), h1);
      std::memcpy(out + r * ldo, row, sizeof(uint16_t) * cols);
    }
  }
}

constexpr int64_t KC = 2048;  // reduction elements a panel chunk holds at most (128 KiB)

// The output columns c0 .. c0+cols-1 (one panel) for every row of the input: the reduction in
// chunks of at most KC elements (a whole-K panel of 5632 was 360 KiB, which the input's stream
// pushed out of a 512 KiB L2: 85 GFLOP/s against 145 at K = 2048), the fp32 sums of every row
// carried from chunk to chunk (the same summation order as one pass), then rounded to bf16.
template <typename Rows>
void panel_product(const Rows& src, int64_t c0, int64_t cols, bool transpose, const uint32_t* xw, int64_t m,
                   int64_t red, uint16_t* y, int64_t ldy) {
  thread_local qlora_cpu::Scratch panel_buffer, sums_buffer;
  const int64_t tiles = (m + MR - 1) / MR, chunks = (red + KC - 1) / KC;
  const int64_t len = ((red + chunks - 1) / chunks + 31) / 32 * 32;  // chunks start at multiples of 32
  float* panel = panel_buffer.get<float>(len * NR);
  float* sums = sums_buffer.get<float>(tiles * MR * NR);
  const float* xp = reinterpret_cast<const float*>(xw);
  for (int64_t e0 = 0; e0 < red; e0 += len) {
    const int64_t e1 = std::min(red, e0 + len);
    if (transpose) pack_backward(src, c0, e0, e1, panel);
    else pack_forward(src, c0, e0, e1, panel);
    for (int64_t i = 0; i < tiles; ++i) accumulate(xp + (i * red + e0) * MR, panel, e1 - e0, sums + i * MR * NR, e0 > 0);
  }
  for (int64_t i = 0; i < tiles; ++i)
    store_tile(sums + i * MR * NR, std::min<int64_t>(MR, m - i * MR), y + i * MR * ldy + c0, ldy, cols, transpose);
}
#endif

// y [M, C] for x [M, R] on the dot-product paths (AVX-512 BF16 or AVX2): the input packed by
// tiles of MR rows (in the calling thread's buffer: kernels running side by side on other threads
// have their own), then one panel of columns a task: product(c0, cols, xp, steps) writes the
// columns c0 .. c0+cols-1 of every row from the packed input (steps words a row).
template <typename Product>
void panel_gemm(ffi::ThreadPool& pool, int64_t cols_total, int64_t red, const uint16_t* x, int64_t m,
                const Product& product) {
  const int64_t steps = red / STEP, panels = (cols_total + NR - 1) / NR, tiles = (m + MR - 1) / MR;
  thread_local qlora_cpu::Scratch input_buffer;
  uint32_t* xp = input_buffer.get<uint32_t>(tiles * steps * MR);
  auto pack = [&](int64_t t) { pack_input(x, m, steps, t, xp); };
  qlora_cpu::parallel_parts(pool, tiles, pack);
  auto work = [&](int64_t p) {  // one panel of columns
    const int64_t c0 = p * NR;
    product(c0, std::min<int64_t>(NR, cols_total - c0), xp, steps);
  };
  qlora_cpu::parallel_parts(pool, panels, work);
}

ffi::Error Nf4GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::U8> codes,
                       ffi::Buffer<ffi::F32> absmax, ffi::Buffer<ffi::F32> table, ffi::Result<ffi::Buffer<ffi::BF16>> y,
                       int64_t blocksize, bool transpose) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || xd[0] != yd[0])
    return ffi::Error::InvalidArgument("nf4_gemm: the input must be [M, R] and the result [M, C]");
  const int64_t m = xd[0];
  const int64_t n = transpose ? xd[1] : yd[1], k = transpose ? yd[1] : xd[1];
  if (table.element_count() != 16) return ffi::Error::InvalidArgument("nf4_gemm: the code table has 16 entries");
  if (k % 32 != 0 || blocksize % 32 != 0 || (transpose && n % 2 != 0))
    return ffi::Error::InvalidArgument("nf4_gemm: needs K and blocksize multiples of 32 (and N even backward)");
  if (static_cast<int64_t>(codes.element_count()) != n * k / 2 ||
      static_cast<int64_t>(absmax.element_count()) != (n * k + blocksize - 1) / blocksize)
    return ffi::Error::InvalidArgument("nf4_gemm: codes/absmax do not match the [N, K] weight");
  const Weight w{codes.typed_data(), absmax.typed_data(), n, k, blocksize,
                 (blocksize & (blocksize - 1)) == 0 ? __builtin_ctzll(blocksize) : -1};
  const float* t = table.typed_data();
  const uint16_t* xb = qlora_cpu::bf16_words(x);
  uint16_t* yb = qlora_cpu::bf16_words(*y);
#ifdef QLORA_GEMM_AMX
  if (amx_granted()) {
    auto rows = [&](const auto& run) {
      const Table table(t);
      run(QuantizedRows{w, table});
    };
    amx_gemm(pool, n, k, rows, transpose, xb, m, yb);
    return ffi::Error::Success();
  }
#endif
  const int64_t cols_total = transpose ? k : n;
  panel_gemm(pool, cols_total, transpose ? n : k, xb, m, [&](int64_t c0, int64_t cols, const uint32_t* xp,
                                                               int64_t steps) {
    const Table table(t);
    panel_product(QuantizedRows{w, table}, c0, cols, transpose, xp, m, steps, yb, cols_total);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QloraNf4Gemm, Nf4GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int64_t>("blocksize")
                                  .Attr<bool>("transpose"));
#endif

#ifdef QLORA_GEMM_ISA
namespace {
constexpr int64_t kFewRows = 4;         // decode's rows: a product with this many rows or fewer...
constexpr int64_t kFewRowsPart = 256;  // ...reads W's rows in parts of this many, one part a task

#if QLORA_GEMM_ISA == 2

// Decode's few rows (M <= kFewRows) against a dense bf16 weight, forward, without panels: W's rows
// n0 .. n1-1 four at a time, each 32-element group of a row one `vdpbf16ps` step against every
// input row (M x K bf16, in L1), the 16 lanes summed at the end of the row. W is read once, in
// order, at memory speed (packing panels for one row ran at 8 GB/s on Zen 4).
template <int M>
void few_rows_product(const uint16_t* x, const uint16_t* w, int64_t n0, int64_t n1, int64_t k, uint16_t* y,
                      int64_t ldy) {
  auto rows = [&](auto q_count, int64_t j) {
    constexpr int Q = decltype(q_count)::value;
    __m512 acc[Q][M];
    for (int q = 0; q < Q; ++q)
      for (int r = 0; r < M; ++r) acc[q][r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < k; c += 32) {
      __m512bh wv[Q];
      for (int q = 0; q < Q; ++q) wv[q] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + (j + q) * k + c));
      for (int r = 0; r < M; ++r) {
        const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + r * k + c));
        for (int q = 0; q < Q; ++q) acc[q][r] = _mm512_dpbf16_ps(acc[q][r], wv[q], xv);
      }
    }
    for (int q = 0; q < Q; ++q)
      for (int r = 0; r < M; ++r) y[r * ldy + j + q] = qlora_cpu::f32_to_bf16_bits(_mm512_reduce_add_ps(acc[q][r]));
  };
  int64_t j = n0;
  for (; j + 4 <= n1; j += 4) rows(std::integral_constant<int, 4>{}, j);
  for (; j < n1; ++j) rows(std::integral_constant<int, 1>{}, j);
}
#else
// The AVX2 form: each 16-element group of a W row split into its even and odd elements as fp32
// (exact), two FMAs with the input row's (split once, before: M x K fp32 in L1), 8 lanes summed at
// the end of the row; Q rows of W at a time, as the registers allow (Q x M accumulators).
template <int M>
void few_rows_product(const uint16_t* x, const uint16_t* w, int64_t n0, int64_t n1, int64_t k, uint16_t* y,
                      int64_t ldy) {
  thread_local qlora_cpu::Scratch split_buffer;
  float* xs = split_buffer.get<float>(M * k);  // row r, group g: 8 even elements, then 8 odd
  for (int r = 0; r < M; ++r)
    for (int64_t c = 0; c < k; c += 16)
      for (int i = 0; i < 8; ++i) {
        xs[r * k + c + i] = qlora_cpu::bf16_bits_to_f32(x[r * k + c + 2 * i]);
        xs[r * k + c + 8 + i] = qlora_cpu::bf16_bits_to_f32(x[r * k + c + 2 * i + 1]);
      }
  auto rows = [&](auto q_count, int64_t j) {
    constexpr int Q = decltype(q_count)::value;
    __m256 acc[Q][M];
    for (int q = 0; q < Q; ++q)
      for (int r = 0; r < M; ++r) acc[q][r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < k; c += 16) {
      __m256 we[Q], wo[Q];
      for (int q = 0; q < Q; ++q) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (j + q) * k + c));
        we[q] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        wo[q] = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
      }
      for (int r = 0; r < M; ++r) {
        const __m256 xe = _mm256_load_ps(xs + r * k + c), xo = _mm256_load_ps(xs + r * k + c + 8);
        for (int q = 0; q < Q; ++q) acc[q][r] = _mm256_fmadd_ps(wo[q], xo, _mm256_fmadd_ps(we[q], xe, acc[q][r]));
      }
    }
    for (int q = 0; q < Q; ++q)
      for (int r = 0; r < M; ++r) y[r * ldy + j + q] = qlora_cpu::f32_to_bf16_bits(qlora_cpu::reduce_add(acc[q][r]));
  };
  constexpr int kQ = M <= 2 ? 4 : 2;
  int64_t j = n0;
  for (; j + kQ <= n1; j += kQ) rows(std::integral_constant<int, kQ>{}, j);
  for (; j < n1; ++j) rows(std::integral_constant<int, 1>{}, j);
}
#endif

void few_rows_gemm(ffi::ThreadPool& pool, const uint16_t* x, int64_t m, const uint16_t* w, int64_t n, int64_t k,
                   uint16_t* y) {
  auto work = [&](int64_t p) {
    const int64_t n0 = p * kFewRowsPart, n1 = std::min(n, n0 + kFewRowsPart);
    switch (m) {
      case 1: return few_rows_product<1>(x, w, n0, n1, k, y, n);
      case 2: return few_rows_product<2>(x, w, n0, n1, k, y, n);
      case 3: return few_rows_product<3>(x, w, n0, n1, k, y, n);
      default: return few_rows_product<4>(x, w, n0, n1, k, y, n);
    }
  };
  qlora_cpu::parallel_parts(pool, (n + kFewRowsPart - 1) / kFewRowsPart, work);
}

// Dense bf16 products (the LM head and its input gradient), the same blocks as the 4-bit weight's
// (AMX where granted, else AVX-512 BF16 dot products or AVX2 FMAs; decode's few rows without panels) with the
// panel read from a bf16 weight [N, K]: forward y [M, N] = x [M, K] @ W^T, backward
// dx [M, K] = dy [M, N] @ W. Needs K a multiple of 32 and, backward, N even.
ffi::Error DenseGemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> weight,
                         ffi::Result<ffi::Buffer<ffi::BF16>> y, bool transpose) {
  auto xd = x.dimensions();
  auto wd = weight.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || wd.size() != 2 || xd[0] != yd[0])
    return ffi::Error::InvalidArgument("dense_gemm: the input must be [M, R], the weight [N, K], the result [M, C]");
  const int64_t n = wd[0], k = wd[1];
  if (xd[1] != (transpose ? n : k) || yd[1] != (transpose ? k : n) || k % 32 != 0 || (transpose && n % 2 != 0))
    return ffi::Error::InvalidArgument("dense_gemm: shapes do not match, or K is not a multiple of 32 (N odd backward)");
  const DenseRows src{qlora_cpu::bf16_words(weight), n, k};
#ifdef QLORA_GEMM_AMX
  if (amx_granted()) {
    auto rows = [&](const auto& run) { run(src); };
    amx_gemm(pool, n, k, rows, transpose, qlora_cpu::bf16_words(x), xd[0], qlora_cpu::bf16_words(*y));
    return ffi::Error::Success();
  }
#endif
  if (!transpose && xd[0] <= kFewRows) {
    if (xd[0] > 0) few_rows_gemm(pool, qlora_cpu::bf16_words(x), xd[0], src.w, n, k, qlora_cpu::bf16_words(*y));
    return ffi::Error::Success();
  }
  const int64_t cols_total = transpose ? k : n;
  uint16_t* yb = qlora_cpu::bf16_words(*y);
  panel_gemm(pool, cols_total, transpose ? n : k, qlora_cpu::bf16_words(x), xd[0],
             [&](int64_t c0, int64_t cols, const uint32_t* xp, int64_t steps) {
               panel_product(src, c0, cols, transpose, xp, xd[0], steps, yb, cols_total);
             });
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QloraDenseGemm, DenseGemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<bool>("transpose"));
#endif
