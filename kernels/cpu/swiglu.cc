// The SwiGLU MLP's gate on bf16, h = silu(g) * u, and its gradient, as XLA FFI custom calls
// (qlora_jax.kernels.cpu_nf4.cpu_swiglu / cpu_swiglu_bwd; models._layers.swiglu).
//
// The arithmetic of PyTorch's CPU kernels for transformers' `act_fn(gate) * up` in bf16, every
// step in fp32 on bf16 values:
// - forward: silu = bf16(g / (1 + exp(-g))), h = bf16(silu * u);
// - backward (cotangent dh): du = bf16(dh * silu), ds = bf16(dh * u),
//   dg = bf16(ds * s * (1 + g * (1 - s))) with s = 1 / (1 + exp(-g)) (torch's silu_backward).
// Results differ from those only where exp's last bit (Cephes' expf, within about 1 ulp) moves a
// value across a bf16 rounding boundary. XLA:CPU ran the jnp form as five to six loops over the
// [tokens, intermediate] operands forward and as many backward, with fp32 temporaries between
// them: ~9 ms a layer of the small preset's step (1024 x 1376), ~70 ms a step.
//
// Layouts: g, u, h, dh, dg, du of one shape, any rank (elementwise).
#include <cstdint>

#include "xla/ffi/api/ffi.h"
#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define QLORA_SWIGLU 1
#elif defined(QLORA_AVX2_ELEMENTWISE)
#define QLORA_SWIGLU 2  // the AVX2 form: 8 lanes
#endif

namespace ffi = xla::ffi;

// 1: built (the CPU has AVX-512 BW, or AVX2 + FMA), 0: not (the jnp form runs)
extern "C" int QloraSwigluSupported() {
#ifdef QLORA_SWIGLU
  return 1;
#else
  return 0;
#endif
}

#ifdef QLORA_SWIGLU
namespace {

constexpr int64_t kPart = 8192;  // elements a task


bool same_shape(const ffi::Buffer<ffi::BF16>& a, const ffi::Buffer<ffi::BF16>& b) {
  auto da = a.dimensions(), db = b.dimensions();
  if (da.size() != db.size()) return false;
  for (size_t i = 0; i < da.size(); ++i)
    if (da[i] != db[i]) return false;
  return true;
}

#if QLORA_SWIGLU == 1
using qlora_cpu::bf16_bits;
using qlora_cpu::bf16_round;
using qlora_cpu::exp16;
using qlora_cpu::lanes;
using qlora_cpu::load_bf16;

inline __m512 one() { return _mm512_set1_ps(1.0f); }

// 1 + exp(-g): +inf where -g is past fp32's exp range, as torch's exp
inline __m512 one_plus_exp_neg(__m512 g) {
  return _mm512_add_ps(one(), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g), 89.0f));
}

// elements i .. i+15 (up to n)
inline void forward(const uint16_t* gs, const uint16_t* us, uint16_t* hs, int64_t i, int64_t n) {
  const __mmask16 in = lanes(n - i);
  const __m512 gv = load_bf16(gs + i, in), uv = load_bf16(us + i, in);
  const __m512 silu = bf16_round(_mm512_div_ps(gv, one_plus_exp_neg(gv)));
  _mm256_mask_storeu_epi16(hs + i, in, bf16_bits(bf16_round(_mm512_mul_ps(silu, uv))));
}

inline void backward(const uint16_t* gs, const uint16_t* us, const uint16_t* dhs, uint16_t* dgs, uint16_t* dus,
                     int64_t i, int64_t n) {
  const __mmask16 in = lanes(n - i);
  const __m512 gv = load_bf16(gs + i, in), uv = load_bf16(us + i, in), dhv = load_bf16(dhs + i, in);
  const __m512 den = one_plus_exp_neg(gv);
  const __m512 silu = bf16_round(_mm512_div_ps(gv, den));
  const __m512 s = _mm512_div_ps(one(), den);
  const __m512 ds = bf16_round(_mm512_mul_ps(dhv, uv));
  const __m512 slope = _mm512_add_ps(one(), _mm512_mul_ps(gv, _mm512_sub_ps(one(), s)));
  _mm256_mask_storeu_epi16(dus + i, in, bf16_bits(bf16_round(_mm512_mul_ps(dhv, silu))));
  _mm256_mask_storeu_epi16(dgs + i, in, bf16_bits(bf16_round(_mm512_mul_ps(_mm512_mul_ps(ds, s), slope))));
}
constexpr int64_t kLanes = 16;
#else
using qlora_cpu::bf16_round8;
using qlora_cpu::exp8;
using qlora_cpu::load_bf16_8;
using qlora_cpu::store_bf16_8;

inline __m256 one() { return _mm256_set1_ps(1.0f); }

inline __m256 one_plus_exp_neg(__m256 g) {
  return _mm256_add_ps(one(), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g), 89.0f));
}

inline void forward(const uint16_t* gs, const uint16_t* us, uint16_t* hs, int64_t i, int64_t n) {
  const __m256 gv = load_bf16_8(gs + i, n - i), uv = load_bf16_8(us + i, n - i);
  const __m256 silu = bf16_round8(_mm256_div_ps(gv, one_plus_exp_neg(gv)));
  store_bf16_8(hs + i, bf16_round8(_mm256_mul_ps(silu, uv)), n - i);
}

inline void backward(const uint16_t* gs, const uint16_t* us, const uint16_t* dhs, uint16_t* dgs, uint16_t* dus,
                     int64_t i, int64_t n) {
  const __m256 gv = load_bf16_8(gs + i, n - i), uv = load_bf16_8(us + i, n - i), dhv = load_bf16_8(dhs + i, n - i);
  const __m256 den = one_plus_exp_neg(gv);
  const __m256 silu = bf16_round8(_mm256_div_ps(gv, den));
  const __m256 s = _mm256_div_ps(one(), den);
  const __m256 ds = bf16_round8(_mm256_mul_ps(dhv, uv));
  const __m256 slope = _mm256_add_ps(one(), _mm256_mul_ps(gv, _mm256_sub_ps(one(), s)));
  store_bf16_8(dus + i, bf16_round8(_mm256_mul_ps(dhv, silu)), n - i);
  store_bf16_8(dgs + i, bf16_round8(_mm256_mul_ps(_mm256_mul_ps(ds, s), slope)), n - i);
}
constexpr int64_t kLanes = 8;
#endif

ffi::Error SwigluFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> g, ffi::Buffer<ffi::BF16> u,
                     ffi::Result<ffi::Buffer<ffi::BF16>> h) {
  if (!same_shape(g, u)) return ffi::Error::InvalidArgument("cpu swiglu: g and u of one shape");
  const int64_t n = g.element_count();
  const uint16_t *gs = qlora_cpu::bf16_words(g), *us = qlora_cpu::bf16_words(u);
  uint16_t* hs = qlora_cpu::bf16_words(*h);
  auto work = [&](int64_t p) {
    for (int64_t i = p * kPart; i < std::min(n, (p + 1) * kPart); i += kLanes) forward(gs, us, hs, i, n);
  };
  qlora_cpu::parallel_parts(pool, (n + kPart - 1) / kPart, work);
  return ffi::Error::Success();
}

ffi::Error SwigluBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> g, ffi::Buffer<ffi::BF16> u,
                     ffi::Buffer<ffi::BF16> dh, ffi::Result<ffi::Buffer<ffi::BF16>> dg,
                     ffi::Result<ffi::Buffer<ffi::BF16>> du) {
  if (!same_shape(g, u) || !same_shape(g, dh)) return ffi::Error::InvalidArgument("cpu swiglu: g, u and dh of one shape");
  const int64_t n = g.element_count();
  const uint16_t *gs = qlora_cpu::bf16_words(g), *us = qlora_cpu::bf16_words(u), *dhs = qlora_cpu::bf16_words(dh);
  uint16_t *dgs = qlora_cpu::bf16_words(*dg), *dus = qlora_cpu::bf16_words(*du);
  auto work = [&](int64_t p) {
    for (int64_t i = p * kPart; i < std::min(n, (p + 1) * kPart); i += kLanes) backward(gs, us, dhs, dgs, dus, i, n);
  };
  qlora_cpu::parallel_parts(pool, (n + kPart - 1) / kPart, work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QloraSwigluFwd, SwigluFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(QloraSwigluBwd, SwigluBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());
#endif
