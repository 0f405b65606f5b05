// y = x @ dequantize(W)^T for a 4-bit (NF4/FP4) weight in bitsandbytes' layout, on the CPU, as an
// XLA FFI custom call (qlora_jax.kernels.cpu_nf4). Decode-sized x (a few rows): the packed codes
// are read once, looked up in the 16-entry code table (one AVX-512 permute per 16 codes), scaled
// by their block's absmax, rounded to x's dtype as `dequantize(w, x.dtype)` rounds, and multiplied
// with every row of x with fp32 accumulation; the dequantized weight is never written.
//
// Operands: x [M, K] (f32 | bf16), codes u8 [N*K/2] (two codes per byte, first in the high
// nibble, row-major over the flattened [N, K] weight), absmax f32 [ceil(N*K/blocksize)] (the
// first-level scales, double quantization already undone), table f32 [16]. Result y [M, N] in
// x's dtype. Rows of W are split over XLA's intra-op thread pool (for weights big enough to pay
// for it): a separate OpenMP pool would spin against XLA's own threads.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <algorithm>
#include <type_traits>

#include "xla/ffi/api/ffi.h"
#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QLORA_AVX512 1
#if defined(__AVX512BF16__)
#define QLORA_AVX512_BF16 1  // bf16 x: bf16 dot products (tile_bf16)
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QLORA_AVX2 1
#endif

namespace ffi = xla::ffi;

namespace {

using qlora_cpu::bf16_bits_to_f32;
using qlora_cpu::f32_to_bf16_bits;
using qlora_cpu::round_bf16;
#if defined(QLORA_AVX512) || defined(QLORA_AVX2)
using qlora_cpu::rounding_bias_added;
#endif

// One weight element, as dequantize(w, dtype) makes it: fp32 product, then rounded to dtype.
inline float weight(const uint8_t* codes, const float* absmax, const float* table, int64_t flat,
                    int64_t blocksize, bool bf16) {
  uint8_t byte = codes[flat >> 1];
  int code = (flat & 1) ? (byte & 0xF) : (byte >> 4);
  float w = table[code] * absmax[flat / blocksize];
  return bf16 ? round_bf16(w) : w;
}

// Any shape: element by element (K odd, blocks not aligned to 32-element groups).
void rows_scalar(const float* x, int64_t m, int64_t k, const uint8_t* codes, const float* absmax,
                 const float* table, int64_t blocksize, bool bf16, int64_t n0, int64_t n1, float* y,
                 int64_t n) {
  std::vector<float> acc(m);
  for (int64_t r = n0; r < n1; ++r) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t c = 0; c < k; ++c) {
      float w = weight(codes, absmax, table, r * k + c, blocksize, bf16);
      for (int64_t i = 0; i < m; ++i) acc[i] += x[i * k + c] * w;
    }
    for (int64_t i = 0; i < m; ++i) y[i * n + r] = acc[i];
  }
}

// Every row r in [n0, n1) of W against the m rows of x, in tiles of MaxMT (8 or 4), 4, 2 and 1
// rows of x: tile(mt, x's first row of the tile, r's codes, r * k, out) with mt a
// std::integral_constant (the tile's row count, a compile-time constant of the tile kernels).
template <int MaxMT, typename X, typename Tile>
inline void tiled_rows(const X* xs, int64_t m, int64_t k, const uint8_t* codes, int64_t n0, int64_t n1, float* y,
                       int64_t n, Tile&& tile) {
  for (int64_t r = n0; r < n1; ++r) {
    const uint8_t* row_codes = codes + (r * k) / 2;
    for (int64_t i0 = 0; i0 < m;) {
      const int64_t left = m - i0;
      auto run = [&](auto mt) {
        tile(mt, xs + i0 * k, row_codes, r * k, y + i0 * n + r);
        i0 += decltype(mt)::value;
      };
      if constexpr (MaxMT >= 8) {
        if (left >= 8) { run(std::integral_constant<int, 8>{}); continue; }
      }
      if (left >= 4) run(std::integral_constant<int, 4>{});
      else if (left >= 2) run(std::integral_constant<int, 2>{});
      else run(std::integral_constant<int, 1>{});
    }
  }
}

#ifdef QLORA_AVX512
// How far ahead of the codes being decoded the AVX-512 paths prefetch them: decoding reads every
// weight once a token, from memory, and the hardware prefetchers alone left the kernel waiting on
// it (Xeon, 2 cores, 5632x2048 NF4 cold: 0.85 ms without, 0.58 at 512 bytes, 0.46 at 2048 and 4096;
// 0.41 with the weight in cache).
constexpr int64_t PREFETCH = 2048;

// K a multiple of 32 and blocksize a multiple of 32: each group of 32 elements (16 code bytes) lies
// in one row and one block. xs holds x rearranged per group: the 16 even elements, then the 16 odd
// ones, so that the high and low nibbles of 16 bytes meet their x values without interleaving.
// MT rows of x per pass (a compile-time count: the accumulators stay in registers; 8 at most, as
// 16 spilled and ran at half the speed). The block's 16 possible weights (table x absmax, rounded)
// are made once a group and looked up: the same values as rounding each product, in fewer
// instructions. Up to 4 rows keep two accumulators each (even and odd elements): one chain of
// FMAs a row waited on their latency.
template <int MT>
__attribute__((always_inline)) inline void tile_avx512(const float* xs, int64_t k, const uint8_t* row_codes,
                                                       const float* absmax, int64_t row_flat, int64_t bs_shift,
                                                       int64_t blocksize, bool bf16, const __m512& tab, float* out,
                                                       int64_t out_stride) {
  const __m512i mask4 = _mm512_set1_epi32(0xF);
  const __m512i high16 = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  constexpr int NA = MT <= 4 ? 2 : 1;
  __m512 acc[MT][NA];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NA; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t groups = k / 32;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t flat = row_flat + g * 32;  // a group of 32 lies in one block (blocksize % 32 == 0)
    if ((g & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(row_codes + g * 16 + PREFETCH), _MM_HINT_T0);
    __m512 scaled = _mm512_mul_ps(tab, _mm512_set1_ps(absmax[bs_shift >= 0 ? (flat >> bs_shift) : flat / blocksize]));
    if (bf16)  // round to nearest even bf16 (finite values: codes times a finite absmax)
      scaled = _mm512_castsi512_ps(_mm512_and_si512(rounding_bias_added(_mm512_castps_si512(scaled)), high16));
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row_codes + g * 16)));
    const __m512 w_hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), scaled);
    const __m512 w_lo = _mm512_permutexvar_ps(_mm512_and_si512(bytes, mask4), scaled);
    const float* xg = xs + g * 32;
    for (int i = 0; i < MT; ++i) {
      acc[i][0] = _mm512_fmadd_ps(w_hi, _mm512_loadu_ps(xg + i * k), acc[i][0]);
      acc[i][NA - 1] = _mm512_fmadd_ps(w_lo, _mm512_loadu_ps(xg + i * k + 16), acc[i][NA - 1]);
    }
  }
  for (int i = 0; i < MT; ++i)
    out[i * out_stride] = _mm512_reduce_add_ps(NA == 2 ? _mm512_add_ps(acc[i][0], acc[i][NA - 1]) : acc[i][0]);
}

void rows_avx512(const float* xs, int64_t m, int64_t k, const uint8_t* codes, const float* absmax,
                 const float* table, int64_t blocksize, bool bf16, int64_t n0, int64_t n1, float* y,
                 int64_t n) {
  const __m512 tab = _mm512_loadu_ps(table);
  const int64_t bs_shift = (blocksize & (blocksize - 1)) == 0 ? __builtin_ctzll(blocksize) : -1;
  tiled_rows<8>(xs, m, k, codes, n0, n1, y, n, [&](auto mt, const float* xt, const uint8_t* rc, int64_t flat, float* out) {
    tile_avx512<decltype(mt)::value>(xt, k, rc, absmax, flat, bs_shift, blocksize, bf16, tab, out, n);
  });
}
#endif

#ifdef QLORA_AVX512_BF16
// bf16 x on CPUs with AVX-512 BF16, K and blocksize multiples of 64: a group of 64 elements (32
// code bytes, one block's absmax) per step. The block's 16 possible weights (table x absmax,
// rounded to bf16 as dequantize(w, bf16) rounds them) are packed as 16 bf16 words, and one word
// permute (vpermw) looks up 32 codes at a time: the high nibbles (the group's even elements), then
// the low ones (the odd). Each meets its 32 x values in one vdpbf16ps: products of two bf16 values
// are exact in fp32, summed in fp32 (its rounding is round to nearest even; it flushes denormal
// inputs and results to zero, which bf16 activations and weights of a trained model do not reach).
// xs holds x as bf16 words grouped per 64: the 32 even elements, then the 32 odd ones. The codes
// are prefetched PREFETCH bytes ahead, as in tile_avx512.

template <int MT>
__attribute__((always_inline)) inline void tile_bf16(const uint16_t* xs, int64_t k, const uint8_t* row_codes,
                                                     const float* absmax, int64_t row_flat, int64_t bs_shift,
                                                     int64_t blocksize, const __m512& tab, float* out,
                                                     int64_t out_stride) {
  const __m512i mask4 = _mm512_set1_epi16(0xF);
  constexpr int NA = MT <= 4 ? 2 : 1;
  __m512 acc[MT][NA];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NA; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t groups = k / 64;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t flat = row_flat + g * 64;  // a group of 64 lies in one block (blocksize % 64 == 0)
    if ((g & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(row_codes + g * 32 + PREFETCH), _MM_HINT_T0);
    const __m512 scaled = _mm512_mul_ps(tab, _mm512_set1_ps(absmax[bs_shift >= 0 ? (flat >> bs_shift) : flat / blocksize]));
    // rounded to bf16 (finite values: codes times a finite absmax), the 16 words in the low half
    const __m512i words = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(
        _mm512_srli_epi32(qlora_cpu::rounding_bias_added(_mm512_castps_si512(scaled)), 16)));
    const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row_codes + g * 32)));
    const __m512bh w_hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), words);
    const __m512bh w_lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(bytes, mask4), words);
    const uint16_t* xg = xs + g * 64;
    for (int i = 0; i < MT; ++i) {
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], w_hi, (__m512bh)_mm512_loadu_si512(xg + i * k));
      acc[i][NA - 1] = _mm512_dpbf16_ps(acc[i][NA - 1], w_lo, (__m512bh)_mm512_loadu_si512(xg + i * k + 32));
    }
  }
  for (int i = 0; i < MT; ++i)
    out[i * out_stride] = _mm512_reduce_add_ps(NA == 2 ? _mm512_add_ps(acc[i][0], acc[i][NA - 1]) : acc[i][0]);
}

void rows_bf16(const uint16_t* xs, int64_t m, int64_t k, const uint8_t* codes, const float* absmax,
               const float* table, int64_t blocksize, int64_t n0, int64_t n1, float* y, int64_t n) {
  const __m512 tab = _mm512_loadu_ps(table);
  const int64_t bs_shift = (blocksize & (blocksize - 1)) == 0 ? __builtin_ctzll(blocksize) : -1;
  tiled_rows<8>(xs, m, k, codes, n0, n1, y, n, [&](auto mt, const uint16_t* xt, const uint8_t* rc, int64_t flat, float* out) {
    tile_bf16<decltype(mt)::value>(xt, k, rc, absmax, flat, bs_shift, blocksize, tab, out, n);
  });
}
#endif

#ifdef QLORA_AVX2
// The AVX2 form of tile_avx512 (CPUs without AVX-512: AMD before Zen 4, many Intel client
// chips): the 16-entry table as two 8-entry permutes and a blend on the code's bit 3, each group of
// 32 elements as two halves of 8 code bytes. A lone row keeps four accumulators (one FMA chain
// would wait on its latency), more rows two each.
template <int MT>
__attribute__((always_inline)) inline void tile_avx2(const float* xs, int64_t k, const uint8_t* row_codes,
                                                     const float* absmax, int64_t row_flat, int64_t bs_shift,
                                                     int64_t blocksize, bool bf16, const __m256& tab_lo,
                                                     const __m256& tab_hi, float* out, int64_t out_stride) {
  constexpr int NC = MT == 1 ? 4 : 2;
  const __m256i mask4 = _mm256_set1_epi32(0xF);
  const __m256i high16 = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  // The group's 16 possible weights (table x absmax, rounded to bf16 for bf16 x) made once, then
  // looked up: the same bits as scaling and rounding each element, in about half the instructions
  // (the per-element product and rounding took ~2.3 ms for a [5632, 2048] weight on Zen 3).
  auto scaled = [&](const __m256& tab, __m256 scale) {
    __m256 w = _mm256_mul_ps(tab, scale);
    if (bf16)  // round to nearest even bf16 (finite values: codes times a finite absmax)
      w = _mm256_castsi256_ps(_mm256_and_si256(rounding_bias_added(_mm256_castps_si256(w)), high16));
    return w;
  };
  auto lookup = [](__m256i c, const __m256& lo_tab, const __m256& hi_tab) {
    const __m256 lo = _mm256_permutevar8x32_ps(lo_tab, c), hi = _mm256_permutevar8x32_ps(hi_tab, c);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
  };
  __m256 acc[MT][NC];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NC; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t groups = k / 32;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t flat = row_flat + g * 32;  // a group of 32 lies in one block (blocksize % 32 == 0)
    const __m256 scale = _mm256_set1_ps(absmax[bs_shift >= 0 ? (flat >> bs_shift) : flat / blocksize]);
    const __m256 s_lo = scaled(tab_lo, scale), s_hi = scaled(tab_hi, scale);
    const float* xg = xs + g * 32;
    for (int h = 0; h < 2; ++h) {  // code bytes 8h .. 8h+7: even elements 8h.., odd ones 16+8h..
      const __m256i bytes =
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row_codes + g * 16 + 8 * h)));
      const __m256 w_hi = lookup(_mm256_srli_epi32(bytes, 4), s_lo, s_hi);
      const __m256 w_lo = lookup(_mm256_and_si256(bytes, mask4), s_lo, s_hi);
      for (int i = 0; i < MT; ++i) {
        acc[i][(2 * h) % NC] = _mm256_fmadd_ps(w_hi, _mm256_loadu_ps(xg + i * k + 8 * h), acc[i][(2 * h) % NC]);
        acc[i][(2 * h + 1) % NC] =
            _mm256_fmadd_ps(w_lo, _mm256_loadu_ps(xg + i * k + 16 + 8 * h), acc[i][(2 * h + 1) % NC]);
      }
    }
  }
  for (int i = 0; i < MT; ++i) {
    __m256 s = acc[i][0];
    for (int j = 1; j < NC; ++j) s = _mm256_add_ps(s, acc[i][j]);
    out[i * out_stride] = qlora_cpu::reduce_add(s);
  }
}

void rows_avx2(const float* xs, int64_t m, int64_t k, const uint8_t* codes, const float* absmax,
               const float* table, int64_t blocksize, bool bf16, int64_t n0, int64_t n1, float* y, int64_t n) {
  const __m256 tab_lo = _mm256_loadu_ps(table), tab_hi = _mm256_loadu_ps(table + 8);
  const int64_t bs_shift = (blocksize & (blocksize - 1)) == 0 ? __builtin_ctzll(blocksize) : -1;
  tiled_rows<4>(xs, m, k, codes, n0, n1, y, n, [&](auto mt, const float* xt, const uint8_t* rc, int64_t flat, float* out) {
    tile_avx2<decltype(mt)::value>(xt, k, rc, absmax, flat, bs_shift, blocksize, bf16, tab_lo, tab_hi, out, n);
  });
}
#endif

// The checks of x, y, absmax and table shared by both handlers; "" when they hold.
const char* check_operands(const ffi::AnyBuffer& x, const ffi::Buffer<ffi::F32>& absmax,
                           const ffi::Buffer<ffi::F32>& table, ffi::Result<ffi::AnyBuffer>& y,
                           int64_t blocksize) {
  auto xd = x.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || xd[0] != yd[0]) return "nf4_gemv: x must be [M, K] and y [M, N]";
  const int64_t k = xd[1], n = yd[1];
  const ffi::DataType dt = x.element_type();
  if (dt != ffi::DataType::F32 && dt != ffi::DataType::BF16) return "nf4_gemv: x must be float32 or bfloat16";
  if (y->element_type() != dt) return "nf4_gemv: y must have x's dtype";
  if (table.element_count() != 16) return "nf4_gemv: the code table has 16 entries";
  if (blocksize <= 0 || static_cast<int64_t>(absmax.element_count()) != (n * k + blocksize - 1) / blocksize)
    return "nf4_gemv: absmax does not match the [N, K] weight";
  return "";
}

// y = x @ W^T for W's packed codes at c (one [N, K] weight); the operands checked
ffi::Error gemv_run(ffi::ThreadPool& pool, ffi::AnyBuffer& x, const uint8_t* c, ffi::Buffer<ffi::F32>& absmax,
                    ffi::Buffer<ffi::F32>& table, ffi::Result<ffi::AnyBuffer>& y, int64_t blocksize) {
  const int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = y->dimensions()[1];
  const bool bf16 = x.element_type() == ffi::DataType::BF16;

  std::vector<float> acc(m * n);
  const float* a = absmax.typed_data();
  const float* t = table.typed_data();
  // Row ranges ("parts") for the pool's threads; small weights run here alone.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), n * k / (1 << 16)));
  const int64_t per = (n + parts - 1) / parts;
  auto finish = [&] {
    if (bf16) {
      uint16_t* yb = qlora_cpu::bf16_words(*y);
      for (int64_t i = 0; i < m * n; ++i) yb[i] = f32_to_bf16_bits(acc[i]);
    } else {
      std::memcpy(y->untyped_data(), acc.data(), sizeof(float) * m * n);
    }
    return ffi::Error::Success();
  };
#ifdef QLORA_AVX512_BF16
  if (bf16 && k % 64 == 0 && blocksize % 64 == 0) {  // x as bf16 words grouped as even then odd per 64
    const uint16_t* xb = qlora_cpu::bf16_words(x);
    std::vector<uint16_t> xs(m * k);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t g = 0; g < k / 64; ++g)
        for (int64_t j = 0; j < 32; ++j) {
          xs[i * k + g * 64 + j] = xb[i * k + g * 64 + 2 * j];
          xs[i * k + g * 64 + 32 + j] = xb[i * k + g * 64 + 2 * j + 1];
        }
    auto part = [&](int64_t p) { rows_bf16(xs.data(), m, k, c, a, t, blocksize, p * per, std::min(n, (p + 1) * per), acc.data(), n); };
    qlora_cpu::parallel_parts(pool, parts, part);
    return finish();
  }
#endif
  // x in fp32 (and, for the vector path, grouped as even then odd elements per 32)
  std::vector<float> xf(m * k);
  if (bf16) {
    const uint16_t* xb = qlora_cpu::bf16_words(x);
    for (int64_t i = 0; i < m * k; ++i) xf[i] = bf16_bits_to_f32(xb[i]);
  } else {
    std::memcpy(xf.data(), x.untyped_data(), sizeof(float) * m * k);
  }
  bool vector_path = false;
#if defined(QLORA_AVX512) || defined(QLORA_AVX2)
  vector_path = k % 32 == 0 && blocksize % 32 == 0;
#endif
  std::vector<float> xs;
  if (vector_path) {  // x grouped as even then odd elements per 32
    xs.resize(m * k);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t g = 0; g < k / 32; ++g)
        for (int64_t j = 0; j < 16; ++j) {
          xs[i * k + g * 32 + j] = xf[i * k + g * 32 + 2 * j];
          xs[i * k + g * 32 + 16 + j] = xf[i * k + g * 32 + 2 * j + 1];
        }
  }
  auto rows = [&](int64_t n0, int64_t n1) {
#if defined(QLORA_AVX512)
    if (vector_path) return rows_avx512(xs.data(), m, k, c, a, t, blocksize, bf16, n0, n1, acc.data(), n);
#elif defined(QLORA_AVX2)
    if (vector_path) return rows_avx2(xs.data(), m, k, c, a, t, blocksize, bf16, n0, n1, acc.data(), n);
#endif
    rows_scalar(xf.data(), m, k, c, a, t, blocksize, bf16, n0, n1, acc.data(), n);
  };
  auto part = [&](int64_t p) { rows(p * per, std::min(n, (p + 1) * per)); };
  qlora_cpu::parallel_parts(pool, parts, part);
  return finish();
}

ffi::Error Nf4GemvImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::U8> codes,
                       ffi::Buffer<ffi::F32> absmax, ffi::Buffer<ffi::F32> table, ffi::Result<ffi::AnyBuffer> y,
                       int64_t blocksize) {
  if (const char* bad = check_operands(x, absmax, table, y, blocksize); *bad) return ffi::Error::InvalidArgument(bad);
  const int64_t nk = x.dimensions()[1] * y->dimensions()[1];
  if (static_cast<int64_t>(codes.element_count()) != (nk + 1) / 2)
    return ffi::Error::InvalidArgument("nf4_gemv: codes do not match the [N, K] weight");
  return gemv_run(pool, x, codes.typed_data(), absmax, table, y, blocksize);
}

// The same product with W one layer of a stack: codes u8 [L, N*K/2] (a scanned model's stacked
// weight, whole), layer an s32 scalar in [0, L). A decoding step over scanned layers reads the layer's
// codes where they lie; sliced out first (XLA's dynamic slice), every generated token copied the
// model's codes once more.
ffi::Error Nf4GemvLayerImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::U8> codes,
                            ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::F32> absmax, ffi::Buffer<ffi::F32> table,
                            ffi::Result<ffi::AnyBuffer> y, int64_t blocksize) {
  if (const char* bad = check_operands(x, absmax, table, y, blocksize); *bad) return ffi::Error::InvalidArgument(bad);
  const int64_t per = (x.dimensions()[1] * y->dimensions()[1] + 1) / 2;
  const int64_t total = static_cast<int64_t>(codes.element_count());
  if (layer.element_count() != 1 || per == 0 || total % per != 0)
    return ffi::Error::InvalidArgument("nf4_gemv_layer: codes must be [L, N*K/2] for the [N, K] weight, layer a scalar");
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= total / per) return ffi::Error::InvalidArgument("nf4_gemv_layer: layer index out of range");
  return gemv_run(pool, x, codes.typed_data() + l * per, absmax, table, y, blocksize);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QloraNf4Gemv, Nf4GemvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("blocksize"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(QloraNf4GemvLayer, Nf4GemvLayerImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("blocksize"));
