// Shared by the native CPU kernels (nf4_gemv.cc, nf4_gemm.cc): bfloat16 <-> float32 bit conversions
// and the split of a kernel's work over XLA's intra-op thread pool.
#pragma once

#include <cstdint>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>

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
