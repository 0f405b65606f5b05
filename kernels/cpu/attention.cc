// Grouped-query attention for training on the CPU, forward and backward, as XLA FFI custom calls
// (qlora_jax.kernels.cpu_nf4.cpu_attention / cpu_attention_bwd), with AVX-512 BF16 dot products,
// and the products on AMX tiles where the CPU has them, Linux grants them and head_dim is a
// multiple of 32 (1b-preset shapes, 2-core Xeon: forward 8.2 -> 3.2 ms, backward 19.2 -> 6.1 ms a
// layer; the elementwise work stays on AVX-512).
//
// The arithmetic is eager transformers' (qlora_jax.models._layers.attend, the XLA path, is the
// reference twin): scores = bf16(q . k) (fp32 sums), times bf16(head_dim**-0.5) rounded to bf16,
// plus the additive mask rounded to bf16; softmax in fp32 (exp(s - max) / sum); probabilities
// rounded to bf16; out = bf16(probs @ v) with fp32 sums. The backward rounds where the XLA path's
// written-out backward does: dprobs = bf16(dout . v), row sums of dprobs * p in fp32, dscores =
// bf16(bf16(p * (dprobs - rows)) * scale), then dq = bf16(dscores @ k), dk = bf16(dscores^T @ q),
// dv = bf16(probs^T @ dout), dk and dv summed over the query heads of a key head in fp32. Results
// differ from the XLA path in fp32 summation order and in the last bit of exp.
//
// What the XLA path pays and this does not: the [B, K, G, S, T] scores and probabilities written to
// memory and read back (fp32 and bf16 copies, saved from the forward for the backward), and the
// head-major copies of q, k, v and their gradients. Here a block of RB query rows of one head is
// taken against every key in cache; the forward saves only each row's max and sum (the backward
// recomputes the probabilities bit for bit from them). Keys whose mask entry is below DEAD
// (transformers' masks hold the dtype's minimum) in every row of a block are skipped in 32-key
// panels when every row of the block has a key that is not: their exp(s - max) is exactly 0, so
// the causal half of the work is skipped with the same results. A block whose rows include one
// with no such key (a padding query: the XLA path's uniform softmax over the masked scores) runs
// every key.
//
// Layouts (row-major): q [B, S, H, D] and k, v [B, T, K, D] (the projections' sequence-major
// output, no transposes), mask [B, S, T] bf16, stats [B, H, S, 2] f32 (max, sum), out and dq like
// q, dk and dv like k. H = K * G (query head h reads key head h / G). D even.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "xla/ffi/api/ffi.h"
#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define QLORA_ATTENTION 1
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define QLORA_ATTENTION_AMX 1  // the products on AMX tiles where Linux grants them and D is a multiple of 32
#endif
#endif

namespace ffi = xla::ffi;

// 1: built (the CPU has AVX-512 BF16), 0: not (the XLA path runs attention)
extern "C" int QloraAttentionSupported() {
#ifdef QLORA_ATTENTION
  return 1;
#else
  return 0;
#endif
}

#ifdef QLORA_ATTENTION
namespace {

using qlora_cpu::rounding_bias_added;
using qlora_cpu::Scratch;

constexpr int64_t NR = 32;     // panel columns (two registers of 16 fp32 sums)
constexpr int MR = 12;         // rows per register tile: 24 accumulators
constexpr int64_t RB = 32;     // query rows per block (even: the backward pairs them; 16 pairs: one AMX step)
constexpr float DEAD = -1e37f;  // mask entries at or below: a masked key

// --- the product: C [m, 32] (+)= A [m, pairs] x panel [pairs, 32], A's words (bf16 pairs) at
// a[r * lda + p * pa], C fp32 with row stride ldc (added to with `add`)
template <int R>
void mm_tile(const uint32_t* a, int64_t lda, int64_t pa, const uint32_t* panel, int64_t pairs, float* c, int64_t ldc,
             bool add) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = add ? _mm512_loadu_ps(c + r * ldc) : _mm512_setzero_ps();
    acc[r][1] = add ? _mm512_loadu_ps(c + r * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(panel + p * NR));
    const __m512bh b1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(panel + p * NR + 16));
    const uint32_t* a_p = a + p * pa;
    for (int r = 0; r < R; ++r) {
      const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int32_t>(a_p[r * lda])));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, b1);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(c + r * ldc, acc[r][0]);
    _mm512_storeu_ps(c + r * ldc + 16, acc[r][1]);
  }
}

template <int R>
void mm_rows(const uint32_t* a, int64_t lda, int64_t pa, const uint32_t* panel, int64_t pairs, float* c, int64_t ldc,
             bool add, int64_t rows) {
  if constexpr (R > 0) {
    if (rows == R) return mm_tile<R>(a, lda, pa, panel, pairs, c, ldc, add);
    return mm_rows<R - 1>(a, lda, pa, panel, pairs, c, ldc, add, rows);
  }
}

void mm(const uint32_t* a, int64_t lda, int64_t pa, int64_t m, const uint32_t* panel, int64_t pairs, float* c,
        int64_t ldc, bool add) {
  for (int64_t i = 0; i < m; i += MR)
    mm_rows<MR>(a + i * lda, lda, pa, panel, pairs, c + i * ldc, ldc, add, std::min<int64_t>(MR, m - i));
}

#ifdef QLORA_ATTENTION_AMX
using qlora_cpu::amx_granted;
using qlora_cpu::tiles_configure;
using qlora_cpu::transpose16;

// The same products on AMX: C [rows <= 32, 32] (+)= the sum over steps s of A_s [rows, 32 bf16] x
// B_s [16 pairs, 32 columns], A_s's row r at a(s) + r * lda (bf16 elements; 16 rows are read, 32
// when rows > 16: the caller's buffers hold them), B_s at b(s) in the panel layouts above (row
// stride NR words), C fp32 with row stride ldc (16 or 32 rows written). Tiles: tmm0-3 the sums (two
// row tiles x two column halves), tmm4-5 A, tmm6-7 B; the caller has configured them
// (tiles_configure). `tdpbf16ps` sums each pair's two products into the fp32 sum as `vdpbf16ps`
// does; the order over the pairs differs.
template <class A, class B>
void amx_mm(int64_t rows, int64_t lda, int64_t steps, A a, B b, float* c, int64_t ldc, bool add) {
  const bool two = rows > 16;
  const int64_t cs = ldc * 4, as = lda * 2, bs = NR * 4;
  if (add) {
    _tile_loadd(0, c, cs);
    _tile_loadd(1, c + 16, cs);
    if (two) {
      _tile_loadd(2, c + 16 * ldc, cs);
      _tile_loadd(3, c + 16 * ldc + 16, cs);
    }
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    const uint16_t* x = a(s);
    const uint32_t* y = b(s);
    _tile_loadd(4, x, as);
    _tile_loadd(6, y, bs);
    _tile_loadd(7, y + 16, bs);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (two) {
      _tile_loadd(5, x + 16 * lda, as);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, cs);
  _tile_stored(1, c + 16, cs);
  if (two) {
    _tile_stored(2, c + 16 * ldc, cs);
    _tile_stored(3, c + 16 * ldc + 16, cs);
  }
}
#endif

using qlora_cpu::bf16_bits;
using qlora_cpu::bf16_round;
using qlora_cpu::exp16;
using qlora_cpu::lanes;
using qlora_cpu::load_bf16;

struct Dims {
  int64_t b, s, t, h, kh, d, g;
  int64_t t32, d32, d2, panels;  // keys and head dims rounded up to 32, pairs of D, 32-key panels
  bool amx;                      // the products on AMX tiles
  int64_t kpanel_words() const { return t32 * d2; }         // key panels of one [T, D] matrix
  int64_t vpanel_words() const { return d32 * (t32 / 2); }  // value panels of one [T, D] matrix
};

Dims make_dims(int64_t b, int64_t s, int64_t t, int64_t h, int64_t kh, int64_t d) {
  Dims m{b, s, t, h, kh, d, h / kh, (t + 31) / 32 * 32, (d + 31) / 32 * 32, d / 2, (t + 31) / 32, false};
#ifdef QLORA_ATTENTION_AMX
  m.amx = d % 32 == 0 && amx_granted();
#endif
  return m;
}

// Key panels of a [T, D] matrix x (row stride ldx elements): word (j, p, c) = the pair p (elements
// 2p, 2p+1) of row 32j + c, zeros past T. For products over D with the rows as columns (q . k).
void pack_keys(const Dims& dm, const uint16_t* x, int64_t ldx, uint32_t* dst) {
  const uint32_t* xw = reinterpret_cast<const uint32_t*>(x);
  for (int64_t j = 0; j < dm.panels; ++j)
    for (int64_t c = 0; c < NR; ++c) {
      const int64_t t = j * NR + c;
      uint32_t* out = dst + j * dm.d2 * NR + c;
      if (t < dm.t)
        for (int64_t p = 0; p < dm.d2; ++p) out[p * NR] = xw[t * (ldx / 2) + p];
      else
        for (int64_t p = 0; p < dm.d2; ++p) out[p * NR] = 0;
    }
}

// Value panels of a [rows, D] matrix x (row stride ldx): word (jd, p, c) = (x[2p, 32jd + c],
// x[2p + 1, 32jd + c]) (low half, high half), zeros past `rows` and D; `pairs` of them per panel.
// For products over the rows with D as columns (p @ v).
void pack_values(const uint16_t* x, int64_t ldx, int64_t rows, int64_t d, int64_t d32, int64_t pairs, uint32_t* dst) {
  for (int64_t jd = 0; jd < d32 / NR; ++jd)
    for (int64_t p = 0; p < pairs; ++p) {
      uint32_t* out = dst + (jd * pairs + p) * NR;
      const int64_t r0 = 2 * p, r1 = 2 * p + 1;
      for (int64_t c = 0; c < NR; ++c) {
        const int64_t col = jd * NR + c;
        const uint32_t lo = (r0 < rows && col < d) ? x[r0 * ldx + col] : 0;
        const uint32_t hi = (r1 < rows && col < d) ? x[r1 * ldx + col] : 0;
        out[c] = lo | (hi << 16);
      }
    }
}

struct Operands {
  Dims dm;
  const uint16_t *q, *k, *v, *mask;
  float scale;  // bf16(head_dim**-0.5), as fp32
  int64_t q_row() const { return dm.h * dm.d; }    // elements between rows of q (and out, dq)
  int64_t kv_row() const { return dm.kh * dm.d; }  // between rows of k (and v, dk, dv)
  const uint16_t* q_at(int64_t b, int64_t s, int64_t h) const { return q + (b * dm.s + s) * q_row() + h * dm.d; }
};

// The 32-key panels a block of query rows r0 .. r0+rows-1 runs (live[j] = 1): those where some row
// has a mask entry above DEAD; every panel when some row has none.
void live_panels(const Operands& o, int64_t b, int64_t r0, int64_t rows, uint8_t* live) {
  const Dims& dm = o.dm;
  std::memset(live, 0, dm.panels);
  bool every_row = true;
  const __m512 dead = _mm512_set1_ps(DEAD);
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* m = o.mask + (b * dm.s + r0 + r) * dm.t;
    bool any = false;
    for (int64_t j = 0; j < dm.panels; ++j) {
      const int64_t t0 = j * NR;
      const __mmask16 a = _mm512_cmp_ps_mask(load_bf16(m + t0, lanes(dm.t - t0)), dead, _CMP_GT_OQ);
      const __mmask16 c = _mm512_cmp_ps_mask(load_bf16(m + t0 + 16, lanes(dm.t - t0 - 16)), dead, _CMP_GT_OQ);
      if (a | c) {
        live[j] = 1;
        any = true;
      }
    }
    every_row = every_row && any;
  }
  if (!every_row) std::memset(live, 1, dm.panels);
}

// The block's scores in sc [RB, T32] (fp32 values of the bf16 scores: bf16(bf16(bf16(q . k) *
// scale) + mask)), -inf past T, for the live panels only.
// c [rows, T32] (fp32) = x [rows, D] (bf16 rows of q, dout: row stride lda words) . the key panels
// kp over D, for the live panels only.
void times_keys(const Dims& dm, const uint32_t* x, int64_t lda, int64_t rows, const uint8_t* live,
                const uint32_t* kp, float* c) {
#ifdef QLORA_ATTENTION_AMX
  if (dm.amx) {  // rows of x read in place, but for a last block of fewer than RB rows (copied, zero-padded)
    thread_local Scratch pad_buf;
    const uint16_t* x16 = reinterpret_cast<const uint16_t*>(x);
    int64_t ld = 2 * lda;
    if (rows < RB) {
      uint16_t* pad = pad_buf.get<uint16_t>(RB * dm.d);
      std::memset(pad, 0, sizeof(uint16_t) * RB * dm.d);
      for (int64_t r = 0; r < rows; ++r) std::memcpy(pad + r * dm.d, x16 + r * ld, sizeof(uint16_t) * dm.d);
      x16 = pad, ld = dm.d;
    }
    for (int64_t j = 0; j < dm.panels; ++j)
      if (live[j]) {
        const uint32_t* panel = kp + j * dm.d2 * NR;
        amx_mm(rows, ld, dm.d / 32, [&](int64_t s) { return x16 + 32 * s; },
               [&](int64_t s) { return panel + 16 * NR * s; }, c + j * NR, dm.t32, false);
      }
    return;
  }
#endif
  for (int64_t j = 0; j < dm.panels; ++j)
    if (live[j]) mm(x, lda, 1, rows, kp + j * dm.d2 * NR, dm.d2, c + j * NR, dm.t32, false);
}

void scores(const Operands& o, const uint32_t* kpanels, int64_t b, int64_t h, int64_t r0, int64_t rows,
            const uint8_t* live, float* sc) {
  const Dims& dm = o.dm;
  times_keys(dm, reinterpret_cast<const uint32_t*>(o.q_at(b, r0, h)), o.q_row() / 2, rows, live, kpanels, sc);
  const __m512 scale = _mm512_set1_ps(o.scale), neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* m = o.mask + (b * dm.s + r0 + r) * dm.t;
    float* row = sc + r * dm.t32;
    for (int64_t j = 0; j < dm.panels; ++j) {
      if (!live[j]) continue;
      for (int64_t t0 = j * NR; t0 < (j + 1) * NR; t0 += 16) {
        const __mmask16 in = lanes(dm.t - t0);
        __m512 s = bf16_round(_mm512_mul_ps(bf16_round(_mm512_loadu_ps(row + t0)), scale));
        s = bf16_round(_mm512_add_ps(s, load_bf16(m + t0, in)));
        _mm512_storeu_ps(row + t0, _mm512_mask_mov_ps(neg_inf, in, s));
      }
    }
  }
}

// The probabilities of a block from its scores: p32 (fp32, in place of the scores) and p16 (bf16
// [RB, T32]), live panels only. stats: each row's (max, sum); with `given`, taken from there (the
// backward: the forward's values), else computed and stored there.
void probabilities(const Dims& dm, int64_t rows, const uint8_t* live, float* sc, uint16_t* p16, float* stats,
                   int64_t stats_stride, bool given) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = sc + r * dm.t32;
    float mx, sum;
    if (given) {
      mx = stats[r * stats_stride];
      sum = stats[r * stats_stride + 1];
    } else {
      __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < dm.panels; ++j)
        if (live[j]) m = _mm512_max_ps(m, _mm512_max_ps(_mm512_loadu_ps(row + j * NR), _mm512_loadu_ps(row + j * NR + 16)));
      mx = _mm512_reduce_max_ps(m);
    }
    const __m512 mv = _mm512_set1_ps(mx);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < dm.panels; ++j) {
      if (!live[j]) continue;
      for (int64_t t0 = j * NR; t0 < (j + 1) * NR; t0 += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + t0), mv));
        _mm512_storeu_ps(row + t0, e);
        acc = _mm512_add_ps(acc, e);
      }
    }
    if (!given) {
      sum = _mm512_reduce_add_ps(acc);
      stats[r * stats_stride] = mx;
      stats[r * stats_stride + 1] = sum;
    }
    const __m512 sv = _mm512_set1_ps(sum);
    uint16_t* prow = p16 + r * dm.t32;
    for (int64_t j = 0; j < dm.panels; ++j) {
      if (!live[j]) continue;
      for (int64_t t0 = j * NR; t0 < (j + 1) * NR; t0 += 16) {
        const __m512 p = _mm512_div_ps(_mm512_loadu_ps(row + t0), sv);
        _mm512_storeu_ps(row + t0, p);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(prow + t0), bf16_bits(bf16_round(p)));
      }
    }
  }
}

// c [rows, D32] = a [rows, T32] (bf16, row stride T32) @ the value panels vp (pairs T32 / 2), over
// the live panels' keys only (the others' a is 0).
void times_values(const Dims& dm, const uint16_t* a, int64_t rows, const uint8_t* live, const uint32_t* vp, float* c) {
  const uint32_t* aw = reinterpret_cast<const uint32_t*>(a);
  const int64_t pairs = dm.t32 / 2, half = NR / 2;
#ifdef QLORA_ATTENTION_AMX
  if (dm.amx) {  // one step per live panel (its 32 keys); a holds RB rows
    thread_local Scratch idx_buf;
    int64_t* at = idx_buf.get<int64_t>(dm.panels);
    int64_t n = 0;
    for (int64_t j = 0; j < dm.panels; ++j)
      if (live[j]) at[n++] = j;
    for (int64_t jd = 0; jd < dm.d32 / NR; ++jd)
      amx_mm(rows, dm.t32, n, [&](int64_t s) { return a + NR * at[s]; },
             [&](int64_t s) { return vp + (jd * pairs + half * at[s]) * NR; }, c + jd * NR, dm.d32, false);
    return;
  }
#endif
  bool first = true;
  for (int64_t j = 0; j < dm.panels; ++j) {
    if (!live[j]) continue;
    for (int64_t jd = 0; jd < dm.d32 / NR; ++jd)
      mm(aw + j * half, dm.t32 / 2, 1, rows, vp + (jd * pairs + j * half) * NR, half, c + jd * NR, dm.d32, !first);
    first = false;
  }
  if (first)
    for (int64_t r = 0; r < rows; ++r) std::memset(c + r * dm.d32, 0, sizeof(float) * dm.d32);
}

// AMX tiles configured for the scope of a work item on its thread (and released after), if on.
struct Tiles {
  bool on;
  explicit Tiles(bool amx) : on(amx) {
#ifdef QLORA_ATTENTION_AMX
    if (on) tiles_configure();
#endif
  }
  ~Tiles() {
#ifdef QLORA_ATTENTION_AMX
    if (on) _tile_release();
#endif
  }
};

void store_rows(const Dims& dm, const float* c, int64_t rows, uint16_t* out, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d0 = 0; d0 < dm.d; d0 += 16)
      _mm256_mask_storeu_epi16(out + r * ld + d0, lanes(dm.d - d0), bf16_bits(bf16_round(_mm512_loadu_ps(c + r * dm.d32 + d0))));
}

// Per-call buffers of the calling thread: key and value panels of every (batch, key head), and
// the backward's fp32 dk, dv partials per query head. Helpers on other threads write into them.
struct CallBuffers {
  Scratch a, b, c, dk, dv;
};

// The operands of both entry points, their shapes checked (o is set only on success).
ffi::Error operands(const ffi::Buffer<ffi::BF16>& q, const ffi::Buffer<ffi::BF16>& k, const ffi::Buffer<ffi::BF16>& v,
                    const ffi::Buffer<ffi::BF16>& mask, float scale, Operands& o) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 3)
    return ffi::Error::InvalidArgument("cpu attention: q [B, S, H, D], k and v [B, T, K, D], mask [B, S, T]");
  if (kd[0] != qd[0] || kd[3] != qd[3] || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] || vd[3] != kd[3] ||
      md[0] != qd[0] || md[1] != qd[1] || md[2] != kd[1] || kd[2] == 0 || qd[2] % kd[2] != 0 || qd[3] % 2 != 0)
    return ffi::Error::InvalidArgument("cpu attention: shapes do not agree (H a multiple of K, D even)");
  o = Operands{make_dims(qd[0], qd[1], kd[1], qd[2], kd[2], qd[3]), qlora_cpu::bf16_words(q), qlora_cpu::bf16_words(k), qlora_cpu::bf16_words(v), qlora_cpu::bf16_words(mask), scale};
  return ffi::Error::Success();
}

ffi::Error AttentionFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> k,
                            ffi::Buffer<ffi::BF16> v, ffi::Buffer<ffi::BF16> mask, ffi::Result<ffi::Buffer<ffi::BF16>> out,
                            ffi::Result<ffi::Buffer<ffi::F32>> stats, float scale) {
  Operands o{};
  if (auto e = operands(q, k, v, mask, scale, o); e.failure()) return e;
  const Dims& dm = o.dm;
  thread_local CallBuffers buf;
  uint32_t* kk = buf.a.get<uint32_t>(dm.b * dm.kh * dm.kpanel_words());
  uint32_t* vv = buf.b.get<uint32_t>(dm.b * dm.kh * dm.vpanel_words());
  auto pack = [&](int64_t i) {  // i = b * K + key head
    const int64_t b = i / dm.kh, kh = i % dm.kh, at = b * dm.t * o.kv_row() + kh * dm.d;
    pack_keys(dm, o.k + at, o.kv_row(), kk + i * dm.kpanel_words());
    pack_values(o.v + at, o.kv_row(), dm.t, dm.d, dm.d32, dm.t32 / 2, vv + i * dm.vpanel_words());
  };
  qlora_cpu::parallel_parts(pool, dm.b * dm.kh, pack);
  uint16_t* ob = qlora_cpu::bf16_words(*out);
  float* st = stats->typed_data();
  const int64_t blocks = (dm.s + RB - 1) / RB;
  auto work = [&](int64_t i) {  // i = (b * H + h) * blocks + block
    thread_local Scratch sc_buf, p_buf, o_buf, live_buf;
    const Tiles tiles(dm.amx);
    const int64_t bh = i / blocks, r0 = (i % blocks) * RB, rows = std::min(RB, dm.s - r0);
    const int64_t b = bh / dm.h, h = bh % dm.h, kv = b * dm.kh + h / dm.g;
    float* sc = sc_buf.get<float>(RB * dm.t32);
    uint16_t* p16 = p_buf.get<uint16_t>(RB * dm.t32);
    float* oc = o_buf.get<float>(RB * dm.d32);
    uint8_t* live = live_buf.get<uint8_t>(dm.panels);
    live_panels(o, b, r0, rows, live);
    scores(o, kk + kv * dm.kpanel_words(), b, h, r0, rows, live, sc);
    probabilities(dm, rows, live, sc, p16, st + (bh * dm.s + r0) * 2, 2, false);
    times_values(dm, p16, rows, live, vv + kv * dm.vpanel_words(), oc);
    store_rows(dm, oc, rows, ob + (b * dm.s + r0) * o.q_row() + h * dm.d, o.q_row());
  };
  qlora_cpu::parallel_parts(pool, dm.b * dm.h * blocks, work);
  return ffi::Error::Success();
}

ffi::Error AttentionBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> k,
                            ffi::Buffer<ffi::BF16> v, ffi::Buffer<ffi::BF16> mask, ffi::Buffer<ffi::F32> stats,
                            ffi::Buffer<ffi::BF16> dout, ffi::Result<ffi::Buffer<ffi::BF16>> dq,
                            ffi::Result<ffi::Buffer<ffi::BF16>> dk, ffi::Result<ffi::Buffer<ffi::BF16>> dv, float scale) {
  Operands o{};
  if (auto e = operands(q, k, v, mask, scale, o); e.failure()) return e;
  const Dims& dm = o.dm;
  const uint16_t* go = qlora_cpu::bf16_words(dout);
  const float* st = stats.typed_data();
  thread_local CallBuffers buf;
  uint32_t* kk = buf.a.get<uint32_t>(dm.b * dm.kh * dm.kpanel_words());  // k as key panels: the scores
  uint32_t* vk = buf.b.get<uint32_t>(dm.b * dm.kh * dm.kpanel_words());  // v as key panels: dprobs
  uint32_t* kv = buf.c.get<uint32_t>(dm.b * dm.kh * dm.vpanel_words());  // k as value panels: dq
  const int64_t part = dm.t32 * dm.d32;                                   // one query head's dk (dv) sums
  float* dkp = buf.dk.get<float>(dm.b * dm.h * part);
  float* dvp = buf.dv.get<float>(dm.b * dm.h * part);
  auto pack = [&](int64_t i) {
    const int64_t b = i / dm.kh, kh = i % dm.kh, at = b * dm.t * o.kv_row() + kh * dm.d;
    pack_keys(dm, o.k + at, o.kv_row(), kk + i * dm.kpanel_words());
    pack_keys(dm, o.v + at, o.kv_row(), vk + i * dm.kpanel_words());
    pack_values(o.k + at, o.kv_row(), dm.t, dm.d, dm.d32, dm.t32 / 2, kv + i * dm.vpanel_words());
  };
  qlora_cpu::parallel_parts(pool, dm.b * dm.kh, pack);
  uint16_t* dqb = qlora_cpu::bf16_words(*dq);
  const __m512 scale_v = _mm512_set1_ps(scale);
  auto work = [&](int64_t bh) {  // one query head of one example, every block: owns its dk, dv sums
    thread_local Scratch sc_buf, p_buf, dp_buf, ds_buf, c_buf, live_buf, xv_buf, at_buf;
    const Tiles tiles(dm.amx);
    const int64_t b = bh / dm.h, h = bh % dm.h, kvi = b * dm.kh + h / dm.g;
    float* sc = sc_buf.get<float>(RB * dm.t32);
    uint16_t* p16 = p_buf.get<uint16_t>(RB * dm.t32);
    float* dp = dp_buf.get<float>(RB * dm.t32);
    uint16_t* ds16 = ds_buf.get<uint16_t>(RB * dm.t32);
    float* c = c_buf.get<float>(RB * dm.d32);
    uint8_t* live = live_buf.get<uint8_t>(dm.panels);
    uint32_t* xv = xv_buf.get<uint32_t>(dm.d32 * (RB / 2));  // q or dout rows as value panels
    uint32_t* at = at_buf.get<uint32_t>((RB / 2) * dm.t32);  // dscores or probs, pairs of rows: [RB / 2, T32]
    float* dkb = dkp + bh * part;
    float* dvb = dvp + bh * part;
    std::memset(dkb, 0, sizeof(float) * part);
    std::memset(dvb, 0, sizeof(float) * part);
    const uint32_t* vkp = vk + kvi * dm.kpanel_words();
    for (int64_t r0 = 0; r0 < dm.s; r0 += RB) {
      const int64_t rows = std::min(RB, dm.s - r0);
      live_panels(o, b, r0, rows, live);
      scores(o, kk + kvi * dm.kpanel_words(), b, h, r0, rows, live, sc);
      probabilities(dm, rows, live, sc, p16, const_cast<float*>(st) + (bh * dm.s + r0) * 2, 2, true);
      const uint16_t* gq = go + (b * dm.s + r0) * o.q_row() + h * dm.d;  // dout rows of the block
      times_keys(dm, reinterpret_cast<const uint32_t*>(gq), o.q_row() / 2, rows, live, vkp, dp);
      for (int64_t r = 0; r < rows; ++r) {  // dscores
        float* prow = sc + r * dm.t32;
        float* drow = dp + r * dm.t32;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < dm.panels; ++j) {
          if (!live[j]) continue;
          for (int64_t t0 = j * NR; t0 < (j + 1) * NR; t0 += 16) {
            const __m512 g = bf16_round(_mm512_loadu_ps(drow + t0));
            _mm512_storeu_ps(drow + t0, g);
            acc = _mm512_add_ps(acc, _mm512_mul_ps(g, _mm512_loadu_ps(prow + t0)));
          }
        }
        const __m512 rs = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
        uint16_t* srow = ds16 + r * dm.t32;
        for (int64_t j = 0; j < dm.panels; ++j) {
          if (!live[j]) continue;
          for (int64_t t0 = j * NR; t0 < (j + 1) * NR; t0 += 16) {
            const __m512 d = bf16_round(_mm512_mul_ps(_mm512_loadu_ps(prow + t0), _mm512_sub_ps(_mm512_loadu_ps(drow + t0), rs)));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(srow + t0), bf16_bits(bf16_round(_mm512_mul_ps(d, scale_v))));
          }
        }
      }
      // dq rows of the block
      times_values(dm, ds16, rows, live, kv + kvi * dm.vpanel_words(), c);
      store_rows(dm, c, rows, dqb + (b * dm.s + r0) * o.q_row() + h * dm.d, o.q_row());
      // dk += dscores^T @ q and dv += probs^T @ dout, over the block's rows, live keys only
      const int64_t pairs = RB / 2;
      auto accumulate = [&](const uint16_t* a16, const uint16_t* x, float* sums) {
        pack_values(x, o.q_row(), rows, dm.d, dm.d32, pairs, xv);
#ifdef QLORA_ATTENTION_AMX
        if (dm.amx) {  // A = the panel's 32 keys as rows, the block's 16 pairs of query rows contiguous
          alignas(64) uint32_t ta[NR * 16];
          for (int64_t j = 0; j < dm.panels; ++j) {
            if (!live[j]) continue;
            for (int64_t half = 0; half < 2; ++half) {
              const int64_t t0 = j * NR + 16 * half;
              __m512i r[16];  // r[p] = the words (p, t0 .. t0+15), then (transposed) r[c] = key t0+c's 16 pairs
              for (int64_t p = 0; p < 16; ++p) {
                const __m512i lo = 2 * p < rows ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                    reinterpret_cast<const __m256i*>(a16 + (2 * p) * dm.t32 + t0))) : _mm512_setzero_si512();
                const __m512i hi = 2 * p + 1 < rows ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                    reinterpret_cast<const __m256i*>(a16 + (2 * p + 1) * dm.t32 + t0))) : _mm512_setzero_si512();
                r[p] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
              }
              transpose16(r);
              for (int64_t c = 0; c < 16; ++c) _mm512_store_si512(ta + (16 * half + c) * 16, r[c]);
            }
            const uint16_t* ta16 = reinterpret_cast<const uint16_t*>(ta);
            for (int64_t jd = 0; jd < dm.d32 / NR; ++jd)
              amx_mm(NR, 32, 1, [&](int64_t) { return ta16; }, [&](int64_t) { return xv + jd * pairs * NR; },
                     sums + j * NR * dm.d32 + jd * NR, dm.d32, true);
          }
          return;
        }
#endif
        for (int64_t j = 0; j < dm.panels; ++j) {
          if (!live[j]) continue;
          for (int64_t p = 0; p < pairs; ++p)  // word (p, t) = (a[2p, t], a[2p + 1, t]), zeros past the rows
            for (int64_t t0 = j * NR; t0 < (j + 1) * NR; t0 += 16) {
              const __m512i lo = 2 * p < rows ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                  reinterpret_cast<const __m256i*>(a16 + (2 * p) * dm.t32 + t0))) : _mm512_setzero_si512();
              const __m512i hi = 2 * p + 1 < rows ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                  reinterpret_cast<const __m256i*>(a16 + (2 * p + 1) * dm.t32 + t0))) : _mm512_setzero_si512();
              _mm512_storeu_si512(at + p * dm.t32 + t0, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
            }
          // rows of the product: the panel's keys (row stride 1 word, pair stride T32)
          for (int64_t jd = 0; jd < dm.d32 / NR; ++jd)
            mm(at + j * NR, 1, dm.t32, NR, xv + jd * pairs * NR, pairs, sums + j * NR * dm.d32 + jd * NR, dm.d32, true);
        }
      };
      accumulate(ds16, o.q_at(b, r0, h), dkb);
      accumulate(p16, gq, dvb);
    }
  };
  qlora_cpu::parallel_parts(pool, dm.b * dm.h, work);
  // dk, dv: the query heads' sums of each key head added in head order, rounded to bf16
  uint16_t* dkb = qlora_cpu::bf16_words(*dk);
  uint16_t* dvb = qlora_cpu::bf16_words(*dv);
  auto reduce = [&](int64_t i) {  // i = b * K + key head
    const int64_t b = i / dm.kh, kh = i % dm.kh;
    for (int64_t t = 0; t < dm.t; ++t)
      for (int64_t d0 = 0; d0 < dm.d; d0 += 16) {
        __m512 sk = _mm512_setzero_ps(), sv = _mm512_setzero_ps();
        for (int64_t g = 0; g < dm.g; ++g) {
          const int64_t off = (b * dm.h + kh * dm.g + g) * part + t * dm.d32 + d0;
          sk = _mm512_add_ps(sk, _mm512_loadu_ps(dkp + off));
          sv = _mm512_add_ps(sv, _mm512_loadu_ps(dvp + off));
        }
        const int64_t at = (b * dm.t + t) * o.kv_row() + kh * dm.d + d0;
        _mm256_mask_storeu_epi16(dkb + at, lanes(dm.d - d0), bf16_bits(bf16_round(sk)));
        _mm256_mask_storeu_epi16(dvb + at, lanes(dm.d - d0), bf16_bits(bf16_round(sv)));
      }
  };
  qlora_cpu::parallel_parts(pool, dm.b * dm.kh, reduce);
  // the fp32 partials are G times dk and dv: past 64 MiB (long sequences), not kept between calls
  if (2 * sizeof(float) * dm.b * dm.h * part > (size_t{64} << 20)) buf.dk = Scratch(), buf.dv = Scratch();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QloraAttentionFwd, AttentionFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QloraAttentionBwd, AttentionBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<float>("scale"));
#endif
