// Shared by the native CPU kernels (nf4_gemv.cc, nf4_gemm.cc): bfloat16 <-> float32 bit conversions
// and the split of a kernel's work over XLA's intra-op thread pool.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
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
