// Rotary position embeddings on bf16 (rotate-half convention), forward and backward, as XLA FFI
// custom calls (qlora_jax.kernels.cpu_nf4.cpu_rope / cpu_rope_bwd; models._rope.apply_rope).
//
// The arithmetic of the jnp form bit for bit (every step an fp32 operation on bf16 values, rounded
// to bf16 as XLA rounds it): out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), rotate_half(x)
// = (-x2, x1) for the halves x1, x2 of the head dim; its gradient dx = bf16(bf16(g * cos) +
// rotate_half^T(bf16(g * sin))), rotate_half^T(y) = (y2, -y1). XLA:CPU ran the jnp form's
// concatenate element by element: 1.5 ms for a [4, 256, 8, 64] q with the LoRA sum fused in (the
// small preset's q and k, forward and backward: 45 ms a step).
//
// Layouts (row-major): x, out, g, dx [B, S, H, D]; cos, sin [B, S, D]. D even.
#include <cstdint>

#include "xla/ffi/api/ffi.h"
#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define QLORA_ROPE 1
#elif defined(QLORA_AVX2_ELEMENTWISE)
#define QLORA_ROPE 2  // the AVX2 form: 8 lanes
#endif

namespace ffi = xla::ffi;

// 1: built (the CPU has AVX-512 BW, or AVX2 + FMA), 0: not (the jnp form runs)
extern "C" int QloraRopeSupported() {
#ifdef QLORA_ROPE
  return 1;
#else
  return 0;
#endif
}

#ifdef QLORA_ROPE
namespace {

#if QLORA_ROPE == 1
using qlora_cpu::bf16_bits;
using qlora_cpu::bf16_round;
using qlora_cpu::lanes;
using qlora_cpu::load_bf16;

inline __m512 mulr(__m512 a, __m512 b) { return bf16_round(_mm512_mul_ps(a, b)); }

// elements t .. t+15 (up to `half`) of one head's row: out = the rotation of x's halves
template <bool Backward>
inline void rotate(const uint16_t* xr, const uint16_t* c, const uint16_t* s, int64_t half, int64_t t, uint16_t* o) {
  const __mmask16 in = lanes(half - t);
  const __m512 x1 = load_bf16(xr + t, in), x2 = load_bf16(xr + half + t, in);
  const __m512 c1 = load_bf16(c + t, in), c2 = load_bf16(c + half + t, in);
  const __m512 s1 = load_bf16(s + t, in), s2 = load_bf16(s + half + t, in);
  __m512 o1, o2;
  if constexpr (Backward) {
    o1 = bf16_round(_mm512_add_ps(mulr(x1, c1), mulr(x2, s2)));
    o2 = bf16_round(_mm512_sub_ps(mulr(x2, c2), mulr(x1, s1)));
  } else {
    o1 = bf16_round(_mm512_sub_ps(mulr(x1, c1), mulr(x2, s1)));
    o2 = bf16_round(_mm512_add_ps(mulr(x2, c2), mulr(x1, s2)));
  }
  _mm256_mask_storeu_epi16(o + t, in, bf16_bits(o1));
  _mm256_mask_storeu_epi16(o + half + t, in, bf16_bits(o2));
}
constexpr int64_t kLanes = 16;
#else
using qlora_cpu::bf16_round8;
using qlora_cpu::load_bf16_8;
using qlora_cpu::store_bf16_8;

inline __m256 mulr(__m256 a, __m256 b) { return bf16_round8(_mm256_mul_ps(a, b)); }

template <bool Backward>
inline void rotate(const uint16_t* xr, const uint16_t* c, const uint16_t* s, int64_t half, int64_t t, uint16_t* o) {
  const int64_t in = half - t;
  const __m256 x1 = load_bf16_8(xr + t, in), x2 = load_bf16_8(xr + half + t, in);
  const __m256 c1 = load_bf16_8(c + t, in), c2 = load_bf16_8(c + half + t, in);
  const __m256 s1 = load_bf16_8(s + t, in), s2 = load_bf16_8(s + half + t, in);
  __m256 o1, o2;
  if constexpr (Backward) {
    o1 = bf16_round8(_mm256_add_ps(mulr(x1, c1), mulr(x2, s2)));
    o2 = bf16_round8(_mm256_sub_ps(mulr(x2, c2), mulr(x1, s1)));
  } else {
    o1 = bf16_round8(_mm256_sub_ps(mulr(x1, c1), mulr(x2, s1)));
    o2 = bf16_round8(_mm256_add_ps(mulr(x2, c2), mulr(x1, s2)));
  }
  store_bf16_8(o + t, o1, in);
  store_bf16_8(o + half + t, o2, in);
}
constexpr int64_t kLanes = 8;
#endif

// forward: o1 = x1 c1 - x2 s1, o2 = x2 c2 + x1 s2; backward: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
// (each product rounded to bf16, then the sum)
template <bool Backward>
ffi::Error RopeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> cos,
                    ffi::Buffer<ffi::BF16> sin, ffi::Result<ffi::Buffer<ffi::BF16>> out) {
  auto xd = x.dimensions(), cd = cos.dimensions(), sd = sin.dimensions();
  if (xd.size() != 4 || cd.size() != 3 || sd.size() != 3 || cd[0] != xd[0] || cd[1] != xd[1] || cd[2] != xd[3] ||
      sd[0] != cd[0] || sd[1] != cd[1] || sd[2] != cd[2] || xd[3] % 2 != 0)
    return ffi::Error::InvalidArgument("cpu rope: x [B, S, H, D] (D even), cos and sin [B, S, D]");
  const int64_t rows = xd[0] * xd[1], heads = xd[2], d = xd[3], half = d / 2;
  const uint16_t *xs = qlora_cpu::bf16_words(x), *cs = qlora_cpu::bf16_words(cos), *ss = qlora_cpu::bf16_words(sin);
  uint16_t* os = qlora_cpu::bf16_words(*out);
  constexpr int64_t kRowsPerPart = 16;
  auto work = [&](int64_t p) {
    for (int64_t r = p * kRowsPerPart; r < std::min(rows, (p + 1) * kRowsPerPart); ++r) {
      const uint16_t* c = cs + r * d;
      const uint16_t* s = ss + r * d;
      for (int64_t h = 0; h < heads; ++h) {
        const uint16_t* xr = xs + (r * heads + h) * d;
        uint16_t* o = os + (r * heads + h) * d;
        for (int64_t t = 0; t < half; t += kLanes) rotate<Backward>(xr, c, s, half, t, o);
      }
    }
  };
  qlora_cpu::parallel_parts(pool, (rows + kRowsPerPart - 1) / kRowsPerPart, work);
  return ffi::Error::Success();
}

}  // namespace

#define QLORA_ROPE_BIND                \
  ffi::Ffi::Bind()                     \
      .Ctx<ffi::ThreadPool>()          \
      .Arg<ffi::Buffer<ffi::BF16>>()   \
      .Arg<ffi::Buffer<ffi::BF16>>()   \
      .Arg<ffi::Buffer<ffi::BF16>>()   \
      .Ret<ffi::Buffer<ffi::BF16>>()
XLA_FFI_DEFINE_HANDLER_SYMBOL(QloraRopeFwd, RopeImpl<false>, QLORA_ROPE_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(QloraRopeBwd, RopeImpl<true>, QLORA_ROPE_BIND);
#endif
