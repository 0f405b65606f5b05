// NF4/FP4 quantization on the host, for eager quantize() on CPU (loading a checkpoint): the first
// level, bitsandbytes' quantize_4bit (its CPU path), step for step as
// qlora_jax.quant._core.quantize_4bit_flat computes it in XLA, and (QloraQuantizeNested, below)
// the double quantization of its absmax. The XLA program runs several passes over the tensor (absmax per
// block, then scale, bucketize and pack) at about 3.4 ns an element on two cores, and is compiled
// once per weight shape; this is one pass per block, with no compile.
//
// Per block of `blocksize` elements (row-major flat; the last may be short):
//   absmax = max |x| in fp32 (NaN if the block holds one: bitsandbytes propagates it);
//   full blocks: scaled = x * (1 / max(absmax, 1e-38)), the absmax stored as it is;
//   the short last block: scaled = x / max(absmax, 1e-38), that clamped absmax stored;
//   clamp to [-1, 1]; code = the number of the 15 midpoints strictly below (torch.bucketize,
//   right=False), through the FP4 argsort order for FP4; two codes a byte, the first element in
//   the high nibble, an odd count padded with the code of 0.0.
// Compiled with -ffp-contract=off: every product and quotient rounds once, as in bitsandbytes;
// subnormals are kept, as torch keeps them (XLA on CPU flushes them: the XLA path differs there).
// Returns 1 when every element is finite, 0 otherwise (the caller raises).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal half: a normal float
      int shifts = 0;
      while (!(mant & 0x400u)) {
        mant <<= 1;
        ++shifts;
      }
      u = sign | (uint32_t(113 - shifts) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <int kDtype>
inline float load(const void* x, int64_t i) {
  if constexpr (kDtype == 0) return static_cast<const float*>(x)[i];
  else if constexpr (kDtype == 1) return bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
  else return f16_to_f32(static_cast<const uint16_t*>(x)[i]);
}

struct Job {
  const void* x;
  int dtype;
  int64_t n;
  int blocksize;
  const float* mids;     // 15 bucket bounds, ascending
  const uint8_t* order;  // 16 codes (FP4's argsort order) or nullptr (NF4: the bucket is the code)
  uint8_t* packed;
  float* absmax;
};

// Blocks [b0, b1); returns whether all their elements are finite. The loops over a block are
// branch-free so that the compiler vectorizes them.
template <int kDtype>
bool quantize_blocks(const Job& job, int64_t b0, int64_t b1) {
  const float recip_of_tiny = 1.0f / 1e-38f;
  const int bs = job.blocksize;
  std::vector<float> buf(bs + 1);
  std::vector<uint8_t> q(bs + 1);
  float mids[15];
  for (int k = 0; k < 15; ++k) mids[k] = job.mids[k];
  bool finite = true;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * bs;
    const int len = int(std::min<int64_t>(bs, job.n - start));
    float m = 0.0f;
    int nan = 0;
    for (int j = 0; j < len; ++j) {
      const float v = load<kDtype>(job.x, start + j);
      buf[j] = v;
      const float a = std::fabs(v);
      nan |= a != a;
      m = a > m ? a : m;
    }
    const float am = nan ? NAN : m;
    if (nan || std::isinf(m)) finite = false;
    // absmax.clamp(min=1e-38), as bitsandbytes: an all-zero or all-subnormal block
    const float clamped = am < 1e-38f ? 1e-38f : am;  // (NaN stays NaN)
    if (len < bs) {  // the short last block divides by its clamped absmax, and stores it
      for (int j = 0; j < len; ++j) buf[j] = buf[j] / clamped;
      job.absmax[b] = clamped;
    } else {  // full blocks multiply by the reciprocal of the clamped absmax, and store the absmax
      const float r = am < 1e-38f ? recip_of_tiny : 1.0f / am;
      for (int j = 0; j < len; ++j) buf[j] = buf[j] * r;
      job.absmax[b] = am;
    }
    buf[len] = 0.0f;  // an odd count's pad: the zero bitsandbytes pads with
    const int padded = len + (len & 1);
    for (int j = 0; j < padded; ++j) {
      float c = buf[j] < -1.0f ? -1.0f : buf[j];
      c = c > 1.0f ? 1.0f : c;
      int32_t code = 0;
      for (int k = 0; k < 15; ++k) code += c > mids[k] ? 1 : 0;
      q[j] = uint8_t(code);
    }
    if (job.order)
      for (int j = 0; j < padded; ++j) q[j] = job.order[q[j]];
    uint8_t* out = job.packed + start / 2;  // blocksize is even: every block starts a byte
    for (int j = 0; j < padded; j += 2) out[j / 2] = uint8_t(q[j] << 4 | q[j + 1]);
  }
  return finite;
}

// IEEE subnormals as torch computes them: flush-to-zero and denormals-are-zero off in this thread
// while the guard lives (a thread inherits its creator's settings; XLA's CPU threads run with both on)
struct IeeeSubnormals {
#if defined(__SSE__)
  unsigned csr = _mm_getcsr();
  IeeeSubnormals() { _mm_setcsr(csr & ~(0x8000u | 0x0040u)); }
  ~IeeeSubnormals() { _mm_setcsr(csr); }
#endif
};

bool quantize_range(const Job& job, int64_t b0, int64_t b1) {
  IeeeSubnormals ieee;
  switch (job.dtype) {
    case 0: return quantize_blocks<0>(job, b0, b1);
    case 1: return quantize_blocks<1>(job, b0, b1);
    default: return quantize_blocks<2>(job, b0, b1);
  }
}

}  // namespace

extern "C" int QloraQuantize4bit(const void* x, int dtype, int64_t n, int blocksize, const float* mids,
                                 const uint8_t* order, uint8_t* packed, float* absmax, int threads) {
  Job job{x, dtype, n, blocksize, mids, order, packed, absmax};
  const int64_t nb = (n + blocksize - 1) / blocksize;
  const int64_t t = std::max<int64_t>(1, std::min<int64_t>(threads, nb / 64));  // small tensors: one thread
  std::vector<char> ok(t, 1);
  std::vector<std::thread> pool;
  for (int64_t i = 1; i < t; ++i)
    pool.emplace_back([&, i] { ok[i] = quantize_range(job, nb * i / t, nb * (i + 1) / t); });
  ok[0] = quantize_range(job, 0, nb / t);
  for (auto& th : pool) th.join();
  for (char v : ok)
    if (!v) return 0;
  return 1;
}

// Double quantization of one tensor's fp32 absmax [nb] given its offset (torch's absmax.mean(),
// summed by the caller), as qlora_jax.quant._core.quantize_nested_flat: centred = absmax - offset;
// per block of `nested_blocksize` absmax2 = max |centred|; scaled = clamp(centred * (1 / absmax2),
// -1, 1) (an all-equal block: 1 / 0, code 0); codes by bitsandbytes' CUDA dQuantize rule on the
// sorted 256-entry signed dynamic map (a 7-step binary search from pivot 127, then the midpoint
// comparison on the side of the value).
namespace {

inline uint8_t dquantize_cuda(float x, const float* code) {
  int pivot = 127, lower_pivot = 0, upper_pivot = 255;
  float lower = -1.0f, upper = 1.0f, val = code[pivot];
  for (int step = 64; step > 0; step /= 2) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += step;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= step;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[255];
  if (lower_pivot == 0) lower = code[0];
  if (x > val) return uint8_t(x > (upper + val) * 0.5f ? upper_pivot : pivot);
  return uint8_t(x < (lower + val) * 0.5f ? lower_pivot : pivot);
}

}  // namespace

extern "C" void QloraQuantizeNested(const float* absmax, int64_t nb, float offset, int nested_blocksize,
                                    const float* code, uint8_t* codes, float* absmax2) {
  IeeeSubnormals ieee;
  for (int64_t start = 0, j = 0; start < nb; start += nested_blocksize, ++j) {
    const int64_t len = std::min<int64_t>(nested_blocksize, nb - start);
    float m = 0.0f;
    for (int64_t i = 0; i < len; ++i) {
      const float a = std::fabs(absmax[start + i] - offset);
      m = a > m ? a : m;
    }
    absmax2[j] = m;
    const float r = 1.0f / m;
    for (int64_t i = 0; i < len; ++i) {
      float c = (absmax[start + i] - offset) * r;  // 0 * inf = NaN when m == 0: code 0, as on CUDA
      if (c != c) {
        codes[start + i] = 0;
        continue;
      }
      c = c < -1.0f ? -1.0f : (c > 1.0f ? 1.0f : c);
      codes[start + i] = dquantize_cuda(c, code);
    }
  }
}
