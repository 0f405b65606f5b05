// LoRA's rank-r products for bf16 activations and fp32 adapters, as XLA FFI custom calls
// (qlora_jax.kernels.cpu_nf4.cpu_lora_down / cpu_lora_up; lora._layers):
//
// - down: y [N, r] (fp32) = scaling * (x @ a^T) for x [N, C] (bf16, read as the fp32 values PEFT's
//   cast gives) and a [r, C] (fp32): the adapter's A product forward (a = lora_A), and the
//   gradient's (dy @ B) * scaling backward (a = lora_B^T);
// - up: out [N, C] (bf16) = bf16(base + t), t = scaling * (h @ a) for h [N, r] and a [r, C] (fp32),
//   t rounded to bf16 first where `round_first` (PEFT's 4-bit and 8-bit layers cast the adapter's
//   output to the result's dtype before adding it); without a base (`has_base` false) out = bf16(t):
//   the adapter's B product and its sum with the base layer's result forward (a = lora_B^T), the
//   input gradient dhr @ lora_A backward.
//
// Written as XLA ops the same work wrote an fp32 [N, C] result, read it back to scale it or add it
// in a loop of its own, and ran the rank-16 products through YNNPACK at ~30 GFLOP/s: ~95 ms of the
// small preset's 0.44 s step. Here nothing but the results is written. The fp32 sums run in
// another order than XLA's (down: 16 lanes of partial sums over C, then added as a tree).
#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "xla/ffi/api/ffi.h"
#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define QLORA_LORA 1
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define QLORA_LORA_AMX 1
#endif
#endif

namespace ffi = xla::ffi;

// 1: built (the CPU has AVX-512 BW), 0: not (the XLA ops run)
extern "C" int QloraLoraSupported() {
#ifdef QLORA_LORA
  return 1;
#else
  return 0;
#endif
}

#ifdef QLORA_LORA
namespace {

using qlora_cpu::bf16_bits;
using qlora_cpu::bf16_round;
using qlora_cpu::lanes;
using qlora_cpu::load_bf16;
using qlora_cpu::rows_cols;

constexpr int64_t kRowsPerPart = 32;


// The partial sums of outputs j0 .. j0 + NJ of one row over x's 16-column chunks [kb0, kb1),
// 16 lanes each, continued in acc (NJ x 16 fp32). ap: a packed as [chunk][r][16] (zeros past C),
// so that one chunk's r vectors lie together.
template <int NJ>
inline void down_part(const uint16_t* xr, const float* ap, int64_t r, int64_t c, int64_t j0, int64_t kb0, int64_t kb1,
                      float* acc) {
  __m512 s[NJ];
#pragma GCC unroll 16
  for (int j = 0; j < NJ; ++j) s[j] = _mm512_load_ps(acc + 16 * j);
  const int64_t full = std::min(kb1, c / 16);
  int64_t kb = kb0;
  for (; kb < full; ++kb) {
    const __m512 xv = load_bf16(xr + kb * 16, static_cast<__mmask16>(0xFFFF));
    const float* blk = ap + (kb * r + j0) * 16;
#pragma GCC unroll 16
    for (int j = 0; j < NJ; ++j) s[j] = _mm512_fmadd_ps(xv, _mm512_load_ps(blk + 16 * j), s[j]);
  }
  if (kb < kb1) {  // the last, partial chunk
    const __m512 xv = load_bf16(xr + kb * 16, lanes(c - kb * 16));
    const float* blk = ap + (kb * r + j0) * 16;
#pragma GCC unroll 16
    for (int j = 0; j < NJ; ++j) s[j] = _mm512_fmadd_ps(xv, _mm512_load_ps(blk + 16 * j), s[j]);
  }
#pragma GCC unroll 16
  for (int j = 0; j < NJ; ++j) _mm512_store_ps(acc + 16 * j, s[j]);
}

// 16 x 16 partial sums (row j: output j's 16 lanes) -> the 16 sums, scaled, the first nj stored to y
inline void down_reduce(const float* acc, int64_t nj, float scaling, float* y) {
  __m512i t[16];
  for (int j = 0; j < 16; ++j) t[j] = _mm512_load_si512(acc + 16 * j);
  qlora_cpu::transpose16(t);  // t[l] lane j: the l-th partial sum of output j
  __m512 s[8];
  for (int l = 0; l < 8; ++l) s[l] = _mm512_add_ps(_mm512_castsi512_ps(t[l]), _mm512_castsi512_ps(t[l + 8]));
  for (int l = 0; l < 4; ++l) s[l] = _mm512_add_ps(s[l], s[l + 4]);
  s[0] = _mm512_add_ps(_mm512_add_ps(s[0], s[2]), _mm512_add_ps(s[1], s[3]));
  _mm512_mask_storeu_ps(y, lanes(nj), _mm512_mul_ps(s[0], _mm512_set1_ps(scaling)));
}

using DownPart = void (*)(const uint16_t*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*);
template <int... J>
constexpr auto down_table(std::integer_sequence<int, J...>) {
  return std::array<DownPart, sizeof...(J)>{&down_part<J + 1>...};
}

// Rows a task, and 16-column chunks of a (16 of its rows: 16 KB) a pass over those rows, so that
// a's slice stays in L1 while the rows' partial sums (16 KB) wait between passes: a whole
// [16, 1376] a streamed from L2 for every row ran the product at L2's speed.
constexpr int64_t kDownRows = 16, kDownChunks = 16;

#ifdef QLORA_LORA_AMX
// The down product on AMX tiles, where C is a multiple of 32: a (fp32) split into three bf16 parts
// hi + mid + lo (each the rounded remainder of the one before: a to within 2^-24 of itself), so that
// the tiles' bf16 products with x are those of a's fp32 value and sum in fp32, as the AVX-512 path
// but in the tiles' order; 3 tile products per 32 columns instead of 32 FMAs per 16 (~0.25 ms for
// [1024, 1376] x [16, 1376] on the FMA path, bound by its loads).
// Packed a: for each 32-column step, each 16-output chunk, each part, one B tile in the pairs'
// layout (16 pair rows x 16 outputs x 2): [steps][chunks][3][16][16][2] bf16, zeros past r.
void amx_pack_down(const float* a, int64_t r, int64_t c, uint16_t* ap) {
  const int64_t steps = c / 32, chunks = (r + 15) / 16;
  for (int64_t s = 0; s < steps; ++s)
    for (int64_t jc = 0; jc < chunks; ++jc) {
      __m512 v0[16], v1[16];  // output j's 32 columns of this step, then what is left of them
      for (int64_t j = 0; j < 16; ++j) {
        const bool in = jc * 16 + j < r;
        const float* row = a + (jc * 16 + j) * c + s * 32;
        v0[j] = in ? _mm512_loadu_ps(row) : _mm512_setzero_ps();
        v1[j] = in ? _mm512_loadu_ps(row + 16) : _mm512_setzero_ps();
      }
      for (int64_t part = 0; part < 3; ++part) {
        __m512i w[16];  // w[j] word p: the pair (2p, 2p+1) of output j (the even one in the low half)
        for (int64_t j = 0; j < 16; ++j) {
          const __m512 h0 = bf16_round(v0[j]), h1 = bf16_round(v1[j]);
          w[j] = _mm512_castsi256_si512(bf16_bits(h0));
          w[j] = _mm512_inserti64x4(w[j], bf16_bits(h1), 1);  // 32 bf16 in column order
          v0[j] = _mm512_sub_ps(v0[j], h0);
          v1[j] = _mm512_sub_ps(v1[j], h1);
        }
        qlora_cpu::transpose16(w);  // w[p] word j: the tile's row p
        uint16_t* tile = ap + ((s * chunks + jc) * 3 + part) * 512;
        for (int64_t p = 0; p < 16; ++p) _mm512_store_si512(tile + 32 * p, w[p]);
      }
    }
}

constexpr int64_t kAmxRows = 64;  // rows of x a task (4 tiles of 16)

void amx_down(ffi::ThreadPool& pool, const uint16_t* xs, const float* as, int64_t n, int64_t c, int64_t r,
              float scaling, float* ys) {
  const int64_t steps = c / 32, chunks = (r + 15) / 16;
  thread_local qlora_cpu::Scratch packed;
  uint16_t* ap = packed.get<uint16_t>(steps * chunks * 3 * 512);  // 64-byte aligned tiles
  amx_pack_down(as, r, c, ap);
  auto work = [&](int64_t p) {
    thread_local qlora_cpu::Scratch tail_rows;
    alignas(64) float sums[16 * 16];
    qlora_cpu::tiles_configure();
    for (int64_t m0 = p * kAmxRows; m0 < std::min(n, (p + 1) * kAmxRows); m0 += 16) {
      const int64_t rows = std::min<int64_t>(16, n - m0);
      const uint16_t* xb = xs + m0 * c;
      if (rows < 16) {  // the last rows, zeros past n
        uint16_t* t = tail_rows.get<uint16_t>(16 * c);
        std::fill(t, t + 16 * c, uint16_t{0});
        std::copy(xb, xb + rows * c, t);
        xb = t;
      }
      for (int64_t j0 = 0; j0 < chunks; j0 += 4) {  // up to 4 accumulator tiles (tmm0-3) of 16 outputs
        const int64_t nc = std::min<int64_t>(4, chunks - j0);
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t s = 0; s < steps; ++s) {
          _tile_loadd(4, xb + s * 32, c * 2);
          const uint16_t* bs = ap + (s * chunks + j0) * 3 * 512;
          // tile numbers are immediates: one branch per accumulator
#define QLORA_DOWN_CHUNK(T)                      \
  if (T < nc) {                                  \
    _tile_loadd(5, bs + (T * 3 + 0) * 512, 64);  \
    _tile_loadd(6, bs + (T * 3 + 1) * 512, 64);  \
    _tile_loadd(7, bs + (T * 3 + 2) * 512, 64);  \
    _tile_dpbf16ps(T, 4, 5);                     \
    _tile_dpbf16ps(T, 4, 6);                     \
    _tile_dpbf16ps(T, 4, 7);                     \
  }
          QLORA_DOWN_CHUNK(0)
          QLORA_DOWN_CHUNK(1)
          QLORA_DOWN_CHUNK(2)
          QLORA_DOWN_CHUNK(3)
#undef QLORA_DOWN_CHUNK
        }
        for (int64_t t = 0; t < nc; ++t) {
          switch (t) {
            case 0: _tile_stored(0, sums, 64); break;
            case 1: _tile_stored(1, sums, 64); break;
            case 2: _tile_stored(2, sums, 64); break;
            default: _tile_stored(3, sums, 64); break;
          }
          const int64_t jb = (j0 + t) * 16, nj = std::min<int64_t>(16, r - jb);
          for (int64_t i = 0; i < rows; ++i)
            _mm512_mask_storeu_ps(ys + (m0 + i) * r + jb, lanes(nj),
                                  _mm512_mul_ps(_mm512_load_ps(sums + 16 * i), _mm512_set1_ps(scaling)));
        }
      }
    }
    _tile_release();
  };
  qlora_cpu::parallel_parts(pool, (n + kAmxRows - 1) / kAmxRows, work);
}
#endif

ffi::Error LoraDown(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::F32> a,
                    ffi::Result<ffi::Buffer<ffi::F32>> y, float scaling) {
  const auto [n, c] = rows_cols(x);
  const int64_t r = a.dimensions().size() == 2 ? a.dimensions()[0] : -1, chunks = (c + 15) / 16;
  if (n < 0 || r < 0 || a.dimensions()[1] != c || rows_cols(*y) != std::make_pair(n, r))
    return ffi::Error::InvalidArgument("cpu lora down: x [..., C], a [r, C] and y [..., r]");
  static constexpr auto table = down_table(std::make_integer_sequence<int, 16>{});
  const uint16_t* xs = qlora_cpu::bf16_words(x);
  const float* as = a.typed_data();
  float* ys = y->typed_data();
#ifdef QLORA_LORA_AMX
  if (c % 32 == 0 && c > 0 && qlora_cpu::amx_granted()) {
    amx_down(pool, xs, as, n, c, r, scaling, ys);
    return ffi::Error::Success();
  }
#endif
  thread_local qlora_cpu::Scratch packed;
  float* ap = packed.get<float>(chunks * r * 16);
  for (int64_t kb = 0; kb < chunks; ++kb)
    for (int64_t j = 0; j < r; ++j)
      for (int64_t l = 0; l < 16; ++l) ap[(kb * r + j) * 16 + l] = kb * 16 + l < c ? as[j * c + kb * 16 + l] : 0.0f;
  auto work = [&](int64_t p) {
    thread_local qlora_cpu::Scratch sums;
    float* acc = sums.get<float>(kDownRows * 256);
    const int64_t m0 = p * kDownRows, m1 = std::min(n, m0 + kDownRows);
    for (int64_t j0 = 0; j0 < r; j0 += 16) {
      const int64_t nj = std::min<int64_t>(16, r - j0);
      std::fill(acc, acc + kDownRows * 256, 0.0f);
      for (int64_t kb = 0; kb < chunks; kb += kDownChunks)
        for (int64_t m = m0; m < m1; ++m)
          table[nj - 1](xs + m * c, ap, r, c, j0, kb, std::min(chunks, kb + kDownChunks), acc + (m - m0) * 256);
      for (int64_t m = m0; m < m1; ++m) down_reduce(acc + (m - m0) * 256, nj, scaling, ys + m * r + j0);
    }
  };
  qlora_cpu::parallel_parts(pool, (n + kDownRows - 1) / kDownRows, work);
  return ffi::Error::Success();
}

// MR rows of out: for each 16 columns, the sum over t of h[m, t] * a[t, cols] (a's 16 columns loaded
// once for the MR rows), scaled, then the epilogue
template <int MR>
inline void up_rows(const float* h, int64_t r, const float* a, int64_t c, const uint16_t* base, float scaling,
                    bool round_first, uint16_t* out) {
  const __m512 sc = _mm512_set1_ps(scaling);
  for (int64_t j = 0; j < c; j += 16) {
    const __mmask16 in = lanes(c - j);
    __m512 acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t t = 0; t < r; ++t) {
      const __m512 av = _mm512_maskz_loadu_ps(in, a + t * c + j);
      for (int i = 0; i < MR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(h[i * r + t]), av, acc[i]);
    }
    for (int i = 0; i < MR; ++i) {
      __m512 v = _mm512_mul_ps(acc[i], sc);
      if (round_first) v = bf16_round(v);
      if (base != nullptr) v = _mm512_add_ps(load_bf16(base + i * c + j, in), v);
      _mm256_mask_storeu_epi16(out + i * c + j, in, bf16_bits(bf16_round(v)));
    }
  }
}

using UpRows = void (*)(const float*, int64_t, const float*, int64_t, const uint16_t*, float, bool, uint16_t*);
constexpr int kMR = 8;
template <int... I>
constexpr auto up_table(std::integer_sequence<int, I...>) {
  return std::array<UpRows, sizeof...(I)>{&up_rows<I + 1>...};
}

ffi::Error UpImpl(ffi::ThreadPool& pool, const float* hs, int64_t n, int64_t r, const float* as, int64_t c,
                  const uint16_t* base, float scaling, bool round_first, uint16_t* os) {
  static constexpr auto table = up_table(std::make_integer_sequence<int, kMR>{});
  auto work = [&](int64_t p) {
    for (int64_t m = p * kRowsPerPart; m < std::min(n, (p + 1) * kRowsPerPart); m += kMR) {
      const int64_t rows = std::min<int64_t>(kMR, std::min(n, (p + 1) * kRowsPerPart) - m);
      table[rows - 1](hs + m * r, r, as, c, base == nullptr ? nullptr : base + m * c, scaling, round_first, os + m * c);
    }
  };
  qlora_cpu::parallel_parts(pool, (n + kRowsPerPart - 1) / kRowsPerPart, work);
  return ffi::Error::Success();
}

// h [..., r], a [r, C] and out [..., C] (and base as out): {N, r, C}, or zeros where they do not fit
template <typename Out>
std::array<int64_t, 3> up_shapes(const ffi::Buffer<ffi::F32>& h, const ffi::Buffer<ffi::F32>& a, const Out& out) {
  const auto [n, r] = rows_cols(h);
  const auto [no, c] = rows_cols(out);
  if (n < 0 || a.dimensions().size() != 2 || a.dimensions()[0] != r || a.dimensions()[1] != c || no != n) return {0, 0, 0};
  return {n, r, c};
}

ffi::Error LoraUpAdd(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> base, ffi::Buffer<ffi::F32> h,
                     ffi::Buffer<ffi::F32> a, ffi::Result<ffi::Buffer<ffi::BF16>> out, float scaling,
                     bool round_first) {
  const auto [n, r, c] = up_shapes(h, a, *out);
  if (c == 0 || rows_cols(base) != std::make_pair(n, c) || base.element_count() != out->element_count())
    return ffi::Error::InvalidArgument("cpu lora up: base [..., C], h [..., r] and a [r, C]");
  return UpImpl(pool, h.typed_data(), n, r, a.typed_data(), c,
                qlora_cpu::bf16_words(base), scaling, round_first,
                qlora_cpu::bf16_words(*out));
}

ffi::Error LoraUp(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> a,
                  ffi::Result<ffi::Buffer<ffi::BF16>> out, float scaling) {
  const auto [n, r, c] = up_shapes(h, a, *out);
  if (c == 0) return ffi::Error::InvalidArgument("cpu lora up: h [..., r] and a [r, C]");
  return UpImpl(pool, h.typed_data(), n, r, a.typed_data(), c, nullptr, scaling, false, qlora_cpu::bf16_words(*out));
}

// Columns [j, j + 32) (two vectors, `in0` / `in1` lanes valid) of out rows t0 .. t0 + NT: the sums
// over n rows of h[m, t] * y[m, cols], each row of y read once for the NT rows of out
template <int NT>
inline void grad_block(const float* h, int64_t n, int64_t r, int64_t t0, const uint16_t* y, int64_t c, int64_t j,
                       __mmask16 in0, __mmask16 in1, float* out) {
  __m512 acc0[NT], acc1[NT];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
  for (int64_t m = 0; m < n; ++m) {
    const __m512 y0 = load_bf16(y + m * c + j, in0), y1 = load_bf16(y + m * c + j + 16, in1);
    const float* hm = h + m * r + t0;
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m512 ht = _mm512_set1_ps(hm[t]);
      acc0[t] = _mm512_fmadd_ps(ht, y0, acc0[t]);
      acc1[t] = _mm512_fmadd_ps(ht, y1, acc1[t]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) {
    _mm512_mask_storeu_ps(out + (t0 + t) * c + j, in0, acc0[t]);
    _mm512_mask_storeu_ps(out + (t0 + t) * c + j + 16, in1, acc1[t]);
  }
}

using GradBlock = void (*)(const float*, int64_t, int64_t, int64_t, const uint16_t*, int64_t, int64_t, __mmask16,
                           __mmask16, float*);
template <int... T>
constexpr auto grad_table(std::integer_sequence<int, T...>) {
  return std::array<GradBlock, sizeof...(T)>{&grad_block<T + 1>...};
}

// Rows of h and y a task: each task sums its rows into a partial [r, C] of its own, 32 columns at a
// time (its rows of y, ~90 KB at C = 1376, stay in L2 as the columns advance), and the partials are
// added in task order. A task per 32 columns over all N rows instead read y down its columns, one
// cache line a row: bound by memory latency, ~0.7 ms for [1024, 1376].
constexpr int64_t kGradRows = 128;

// out [r, C] = scaling * h^T @ y for h [..., r] (fp32) and y [..., C] (bf16): the adapters' weight
// gradients (dB^T from the B product's input and the cotangent, dA from the A product's).
ffi::Error LoraGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::BF16> y,
                    ffi::Result<ffi::Buffer<ffi::F32>> out, float scaling) {
  const auto [n, r] = rows_cols(h);
  const auto [ny, c] = rows_cols(y);
  auto od = out->dimensions();
  if (n < 0 || ny != n || od.size() != 2 || od[0] != r || od[1] != c)
    return ffi::Error::InvalidArgument("cpu lora grad: h [..., r], y [..., C] and out [r, C]");
  static constexpr auto table = grad_table(std::make_integer_sequence<int, 8>{});
  const float* hs = h.typed_data();
  const uint16_t* ys = qlora_cpu::bf16_words(y);
  float* os = out->typed_data();
  const int64_t parts = std::max<int64_t>(1, (n + kGradRows - 1) / kGradRows);
  thread_local qlora_cpu::Scratch partials;
  float* ps = partials.get<float>(parts * r * c);
  auto work = [&](int64_t p) {
    const int64_t m0 = p * kGradRows, rows = std::max<int64_t>(0, std::min(n, m0 + kGradRows) - m0);
    for (int64_t j = 0; j < c; j += 32)
      for (int64_t t0 = 0; t0 < r; t0 += 8)
        table[std::min<int64_t>(8, r - t0) - 1](hs + m0 * r, rows, r, t0, ys + m0 * c, c, j, lanes(c - j),
                                                lanes(c - j - 16), ps + p * r * c);
  };
  qlora_cpu::parallel_parts(pool, parts, work);
  const __m512 sc = _mm512_set1_ps(scaling);
  for (int64_t i = 0; i < r * c; i += 16) {
    const __mmask16 in = lanes(r * c - i);
    __m512 s = _mm512_maskz_loadu_ps(in, ps + i);
    for (int64_t p = 1; p < parts; ++p) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(in, ps + p * r * c + i));
    _mm512_mask_storeu_ps(os + i, in, _mm512_mul_ps(s, sc));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QloraLoraGrad, LoraGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scaling"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(QloraLoraDown, LoraDown,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scaling"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(QloraLoraUpAdd, LoraUpAdd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<float>("scaling")
                                  .Attr<bool>("round_first"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(QloraLoraUp, LoraUp,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<float>("scaling"));
#endif
