// The LM head's cross-entropy on bf16 logits, as XLA FFI custom calls
// (qlora_jax.kernels.cpu_nf4.cpu_xent_lse / cpu_xent_grad; ops.linear_cross_entropy_sum):
//
// - forward: lse [N] = logsumexp over each row of logits [N, V] (bf16), in fp32 as
//   jax.nn.logsumexp: m = the row's max (0 where it is not finite), log(sum(exp(l - m))) + m; and
//   each row's logit at its label;
// - backward: g [N, V] = bf16((exp(l - lse) - onehot(label)) * scale), scale [N] (fp32) the loss
//   cotangent of each row (0 for rows without a label), written over the logits where they die
//   there (XLA aliases them; fresh, the 65 MB of a small-preset step's g cost 10-50 ms of page
//   faults).
//
// Written as XLA ops the same arithmetic took four passes over the [N, V] logits with fp32 copies
// (the logits converted, then reduced, exp'd and converted back): 64 ms of a 0.46 s small-preset
// step for 1024 x 32000 logits. Here each row is read once a pass from cache, nothing but the
// results written. Results differ from the XLA ops in the fp32 summation order of the row sums and
// in the last bit of exp (Cephes' expf, within about 1 ulp).
#include <cmath>
#include <cstdint>
#include <limits>

#include "xla/ffi/api/ffi.h"
#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define QLORA_XENT 1
#elif defined(QLORA_AVX2_ELEMENTWISE)
#define QLORA_XENT 2  // the AVX2 form: 8 lanes
#endif

namespace ffi = xla::ffi;

// 1: built (the CPU has AVX-512 BW, or AVX2 + FMA), 0: not (the XLA ops run)
extern "C" int QloraXentSupported() {
#ifdef QLORA_XENT
  return 1;
#else
  return 0;
#endif
}

#ifdef QLORA_XENT
namespace {

constexpr int64_t ROWS_PER_PART = 4;

// an infinite max shifts by 0, as jax.nn.logsumexp (the vector exp saturates: scalar exp)
float infinite_max_lse(const uint16_t* row, int64_t v) {
  float sum = 0.0f;
  for (int64_t t = 0; t < v; ++t) sum += std::exp(qlora_cpu::bf16_bits_to_f32(row[t]));
  return std::log(sum);
}

#if QLORA_XENT == 1
using qlora_cpu::bf16_bits;
using qlora_cpu::bf16_round;
using qlora_cpu::exp16;
using qlora_cpu::lanes;
using qlora_cpu::load_bf16;

float row_lse(const uint16_t* row, int64_t v) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < v; t += 16) {
    const __mmask16 in = lanes(v - t);
    m = _mm512_mask_max_ps(m, in, m, load_bf16(row + t, in));
  }
  const float mx = _mm512_reduce_max_ps(m);
  if (!std::isfinite(mx)) return infinite_max_lse(row, v);
  const __m512 mv = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t t = 0; t < v; t += 16) {
    const __mmask16 in = lanes(v - t);
    acc = _mm512_mask_add_ps(acc, in, acc, exp16(_mm512_sub_ps(load_bf16(row + t, in), mv)));
  }
  return std::log(_mm512_reduce_add_ps(acc)) + mx;
}

// a row of the logits' gradient: bf16((exp(l - lse) - onehot(label)) * scale)
void row_grad(const uint16_t* row, int64_t v, float lse, int32_t label, float scale, uint16_t* orow) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 lv = _mm512_set1_ps(lse), sv = _mm512_set1_ps(scale), one = _mm512_set1_ps(1.0f);
  const __m512i lab = _mm512_set1_epi32(label);
  for (int64_t t = 0; t < v; t += 16) {
    const __mmask16 in = lanes(v - t);
    __m512 e = exp16(_mm512_sub_ps(load_bf16(row + t, in), lv));
    const __mmask16 hit = _mm512_cmpeq_epi32_mask(_mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(t))), lab);
    e = _mm512_mask_sub_ps(e, hit, e, one);
    _mm256_mask_storeu_epi16(orow + t, in, bf16_bits(bf16_round(_mm512_mul_ps(e, sv))));
  }
}
#else
float row_lse(const uint16_t* row, int64_t v) {
  const uint16_t neg_inf = 0xff80;  // bf16 -inf: lanes past the row do not move the max
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < v; t += 8) m = _mm256_max_ps(m, qlora_cpu::load_bf16_8(row + t, v - t, neg_inf));
  const float mx = qlora_cpu::reduce_max8(m);
  if (!std::isfinite(mx)) return infinite_max_lse(row, v);
  const __m256 mv = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t t = 0; t < v; t += 8) {  // lanes past the row: exp(-inf) = 0
    acc = _mm256_add_ps(acc, qlora_cpu::exp8(_mm256_sub_ps(qlora_cpu::load_bf16_8(row + t, v - t, neg_inf), mv)));
  }
  return std::log(qlora_cpu::reduce_add(acc)) + mx;
}

void row_grad(const uint16_t* row, int64_t v, float lse, int32_t label, float scale, uint16_t* orow) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 lv = _mm256_set1_ps(lse), sv = _mm256_set1_ps(scale), one = _mm256_set1_ps(1.0f);
  const __m256i lab = _mm256_set1_epi32(label);
  for (int64_t t = 0; t < v; t += 8) {
    __m256 e = qlora_cpu::exp8(_mm256_sub_ps(qlora_cpu::load_bf16_8(row + t, v - t), lv));
    const __m256 hit = _mm256_castsi256_ps(
        _mm256_cmpeq_epi32(_mm256_add_epi32(iota, _mm256_set1_epi32(static_cast<int32_t>(t))), lab));
    e = _mm256_sub_ps(e, _mm256_and_ps(hit, one));
    qlora_cpu::store_bf16_8(orow + t, qlora_cpu::bf16_round8(_mm256_mul_ps(e, sv)), v - t);
  }
}
#endif

// lse [N] and the label's logit [N] (fp32; 0 for a label outside [0, V)): the backward, which
// overwrites the logits with their gradient in place, then reads nothing else of them
ffi::Error XentFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> logits, ffi::Buffer<ffi::S32> labels,
                       ffi::Result<ffi::Buffer<ffi::F32>> lse, ffi::Result<ffi::Buffer<ffi::F32>> picked) {
  auto d = logits.dimensions();
  if (d.size() != 2 || labels.element_count() != d[0])
    return ffi::Error::InvalidArgument("cpu xent: logits [N, V] and labels [N]");
  const int64_t n = d[0], v = d[1];
  const uint16_t* l = qlora_cpu::bf16_words(logits);
  const int32_t* lab = labels.typed_data();
  float* out = lse->typed_data();
  float* pick = picked->typed_data();
  auto work = [&](int64_t p) {
    for (int64_t r = p * ROWS_PER_PART; r < std::min(n, (p + 1) * ROWS_PER_PART); ++r) {
      out[r] = row_lse(l + r * v, v);
      pick[r] = lab[r] >= 0 && lab[r] < v ? qlora_cpu::bf16_bits_to_f32(l[r * v + lab[r]]) : 0.0f;
    }
  };
  qlora_cpu::parallel_parts(pool, (n + ROWS_PER_PART - 1) / ROWS_PER_PART, work);
  return ffi::Error::Success();
}

ffi::Error XentBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> logits, ffi::Buffer<ffi::F32> lse,
                       ffi::Buffer<ffi::S32> labels, ffi::Buffer<ffi::F32> scale,
                       ffi::Result<ffi::Buffer<ffi::BF16>> g) {
  auto d = logits.dimensions();
  if (d.size() != 2 || lse.element_count() != d[0] || labels.element_count() != d[0] ||
      scale.element_count() != d[0])
    return ffi::Error::InvalidArgument("cpu xent: logits [N, V], lse, labels and scale [N]");
  const int64_t n = d[0], v = d[1];
  const uint16_t* l = qlora_cpu::bf16_words(logits);
  const float* ls = lse.typed_data();
  const int32_t* lab = labels.typed_data();
  const float* sc = scale.typed_data();
  uint16_t* out = qlora_cpu::bf16_words(*g);
  auto work = [&](int64_t p) {
    for (int64_t r = p * ROWS_PER_PART; r < std::min(n, (p + 1) * ROWS_PER_PART); ++r)
      row_grad(l + r * v, v, ls[r], lab[r], sc[r], out + r * v);
  };
  qlora_cpu::parallel_parts(pool, (n + ROWS_PER_PART - 1) / ROWS_PER_PART, work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QloraXentFwd, XentFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QloraXentBwd, XentBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());
#endif
