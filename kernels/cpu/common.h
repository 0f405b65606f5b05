// Shared by the native CPU kernels (kernels/cpu/*.cc): bfloat16 <-> float32 bit conversions, FFI
// buffers as bf16 words and as rows, the 16 x 16 word transpose, AMX tile permission and
// configuration, and the split of a kernel's work over XLA's intra-op thread pool.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>
#include <utility>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace qlora_cpu {

inline float bf16_bits_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16_bits(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float round_bf16(float f) { return bf16_bits_to_f32(f32_to_bf16_bits(f)); }

// An XLA FFI bf16 buffer's elements as their 16-bit words (for a result: bf16_words(*out))
template <typename B>
inline uint16_t* bf16_words(const B& b) { return reinterpret_cast<uint16_t*>(b.untyped_data()); }

// An FFI buffer [..., C] as rows [N, C] (any leading dims, row-major): {N, C}, or {-1, -1} for a scalar
template <typename B>
std::pair<int64_t, int64_t> rows_cols(const B& b) {
  auto d = b.dimensions();
  if (d.size() == 0) return {-1, -1};
  int64_t n = 1;
  for (size_t i = 0; i + 1 < d.size(); ++i) n *= d[i];
  return {n, d[d.size() - 1]};
}

#if defined(__AVX512F__)
// fp32 bits plus the round-to-nearest-even bias of their bf16 rounding (the bf16 is the high half;
// finite values: NaN is the caller's concern)
inline __m512i rounding_bias_added(__m512i u) {
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
}
#endif

#if defined(__AVX2__)
// The same for 8 lanes (the AVX2 kernels)
inline __m256i rounding_bias_added(__m256i u) {
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
}

inline float reduce_add(__m256 v) {  // the sum of 8 lanes
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#if defined(__AVX512F__)
// r[i] (16 words each) -> r[c] = the words (i, c) for i = 0 .. 15: the 16 x 16 transpose of 32-bit words.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  __m512i u[16];  // u[4i + j], 128-bit lane L: column 4L + j of rows 4i .. 4i+3
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // the 4 x 4 transpose of 128-bit lanes of u[j], u[4+j], u[8+j], u[12+j]
    const __m512i x0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44), x1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44);
    const __m512i y1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
    r[j] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    r[4 + j] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    r[8 + j] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// Elementwise helpers, 16 lanes (attention.cc, xent.cc)
inline __m512 bf16_round(__m512 v) {  // fp32 -> the nearest bf16 (even), as fp32; NaN kept quiet
  const __m512i u = _mm512_castps_si512(v);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i bits = _mm512_mask_or_epi32(rounding_bias_added(u), nan, u, _mm512_set1_epi32(0x400000));
  return _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

inline __m256i bf16_bits(__m512 rounded) {  // an already-rounded fp32 (bf16_round) -> its 16 bf16
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(rounded), 16));
}

inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {  // up to 16 bf16 -> fp32 (zeros past the mask)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// exp(x) in fp32 (Cephes' expf: range reduction by ln 2 in two parts, a degree-6 polynomial; within
// about 1 ulp), 0 below -87.33 (no denormal results) and for -inf, NaN kept. Above `hi` the result
// is exp(hi): Cephes' 88.376; pass hi = 89 for +inf past fp32's range (scalef overflows to it).
inline __m512 exp16(__m512 x, float hi = 88.3762626647949f) {
  const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_LT_OQ);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33654f)), _mm512_set1_ps(hi));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512 e = _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), _mm512_scalef_ps(p, n));
  return _mm512_mask_mov_ps(e, nan, x);
}

inline __mmask16 lanes(int64_t n) {  // the first n of 16 lanes (n may be <= 0 or >= 16)
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__))
// The elementwise helpers' AVX2 forms, 8 lanes (xent.cc, rope.cc, swiglu.cc on CPUs without
// AVX-512): the same arithmetic lane for lane. AVX2 has no 16-bit masked loads or stores, so a
// partial group (n < 8) goes through a small buffer.
#define QLORA_AVX2_ELEMENTWISE 1
inline __m256 bf16_round8(__m256 v) {  // fp32 -> the nearest bf16 (even), as fp32; NaN kept quiet
  const __m256i u = _mm256_castps_si256(v);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  const __m256 rounded = _mm256_castsi256_ps(rounding_bias_added(u));
  const __m256 quiet = _mm256_castsi256_ps(_mm256_or_si256(u, _mm256_set1_epi32(0x400000)));
  const __m256 bits = _mm256_blendv_ps(rounded, quiet, nan);
  return _mm256_and_ps(bits, _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

// up to 8 bf16 -> fp32 (n <= 0: none; lanes past n get `fill`'s bits, +0.0 by default)
inline __m256 load_bf16_8(const uint16_t* p, int64_t n, uint16_t fill = 0) {
  __m128i h;
  if (n >= 8) {
    h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {
    alignas(16) uint16_t buf[8];
    for (int i = 0; i < 8; ++i) buf[i] = i < n ? p[i] : fill;
    h = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
  }
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// an already-rounded fp32 (bf16_round8) -> its first n (up to 8) bf16 at p
inline void store_bf16_8(uint16_t* p, __m256 rounded, int64_t n) {
  const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(rounded), 16);
  const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
  if (n >= 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  } else if (n > 0) {
    alignas(16) uint16_t buf[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(buf), h);
    std::memcpy(p, buf, sizeof(uint16_t) * n);
  }
}

// exp16's arithmetic on 8 lanes (Cephes' expf, the same steps and constants): 2^n applied as two
// exact power-of-two factors in place of scalef (n in [-126, 128]: each factor a normal float, the
// first product exact, the second rounded once, as scalef rounds).
inline __m256 exp8(__m256 x, float hi = 88.3762626647949f) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(hi));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
  const __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
  const __m256 e = _mm256_andnot_ps(under, _mm256_mul_ps(_mm256_mul_ps(p, f1), f2));
  return _mm256_blendv_ps(e, x, nan);
}

inline float reduce_max8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#endif

#if defined(__AVX512F__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
// Linux gives a process AMX tile data only once it asks (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA, 18); a kernel or hypervisor that refuses leaves the AVX-512 BF16 path.
inline bool amx_granted() {
  static const bool granted = [] {
    constexpr long kGetPerm = 0x1022, kReqPerm = 0x1023, kXtiledata = 18;
    if (syscall(SYS_arch_prctl, kReqPerm, kXtiledata) != 0) return false;
    unsigned long mask = 0;
    return syscall(SYS_arch_prctl, kGetPerm, &mask) == 0 && (mask >> kXtiledata & 1) != 0;
  }();
  return granted;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void tiles_configure() {  // eight tiles of 16 rows x 64 bytes
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = 16;
  _tile_loadconfig(&c);
}
#endif

// A grow-only, 64-byte aligned scratch buffer (one per thread: `thread_local Scratch`).
class Scratch {
 public:
  template <typename T>
  T* get(size_t count) {
    const size_t bytes = (sizeof(T) * count + 63) / 64 * 64;
    if (capacity_ < bytes) {
      data_.reset(std::aligned_alloc(64, bytes));
      capacity_ = bytes;
    }
    return static_cast<T*>(data_.get());
  }

 private:
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<void, Free> data_;
  size_t capacity_ = 0;
};

// Runs work(p) for p in [0, parts) on this thread and up to (pool threads - 1) of the pool's. Every
// thread, this one included, claims parts until none are left, so a part never waits for a busy
// pool (two kernels running side by side on a two-thread pool each finish their own parts). A task
// that starts after the last part was claimed touches only the shared counters, which it co-owns.
template <typename Pool, typename Work>
void parallel_parts(Pool& pool, int64_t parts, Work& work) {
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto claim = [counters, parts, &work] {
    for (int64_t p; (p = counters->next.fetch_add(1)) < parts;) {
      work(p);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(parts, std::max<int64_t>(1, pool.num_threads())) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([claim] { claim(); });
  claim();
  while (counters->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
}

}  // namespace qlora_cpu
