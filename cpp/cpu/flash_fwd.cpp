// FlashAttention-2 forward on the CPU.
//
// Each task owns one (batch, query head, block of BQ queries). It streams the
// visible keys in blocks of BK: S = Q K^T (register-blocked), score
// modifiers (softcap, ALiBi, masks, window), an online softmax in float32 and
// O += P V, so memory stays O(BQ x (D + BK)) per thread and no L x L matrix
// exists. Blocks wholly outside the causal/sliding window are never visited.
//
// This file is compiled once per instruction set with FA_ISA set to that
// set's namespace (avx512, avx2, generic); GCC/Clang vector extensions map
// the 16-float vectors below onto whatever registers the flags allow.
// Include nothing but C headers and our own plain headers here (see
// flash_cpu.h for why).

#include <math.h>
#include <string.h>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "flash_cpu.h"

#ifndef FA_ISA
#error "FA_ISA must name the instruction-set namespace"
#endif

namespace flash_cpu {
namespace FA_ISA {
namespace {

// ---------------------------------------------------------------------------
// Tile shapes, in one place.
// BK keys per block = 4 vectors of 16 floats, the width of one S row tile.
// BQ queries per task: enough rows to amortise converting a K/V block to
// float32, few enough that Q, S and O of one task stay in L2.
// ROWS: query rows per register block of the two block GEMMs, bounded by the
// vector register file (32 zmm on AVX-512, 16 ymm = 8 vf16 on AVX2).
// ---------------------------------------------------------------------------
constexpr int BK = 64;
constexpr int BQ = 64;
#if defined(__AVX512F__)
constexpr int ROWS = 4;
#else
constexpr int ROWS = 2;
#endif

typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

inline vf16 load16(const float* p) {
  vf16 v;
  memcpy(&v, p, sizeof(v));
  return v;
}
inline void store16(float* p, vf16 v) {
  memcpy(p, &v, sizeof(v));
}
inline vf16 splat(float x) {
  return vf16{} + x;
}

constexpr float kLog2e = 1.4426950408889634f;

// 2^x for a vector, accurate to ~1 ulp of float32 over the range softmax
// needs; exactly 0 below -126 (masked scores are -inf). Polynomial instead of
// libm so it vectorises on every instruction set.
inline vf16 exp2v(vf16 x) {
  vf16 xc = x < -126.0f ? splat(-126.0f) : x;
  xc = xc > 127.0f ? splat(127.0f) : xc;
  const float magic = 12582912.0f; // 1.5 * 2^23: rounds to nearest integer
  vf16 n = (xc + magic) - magic;
  vf16 f = xc - n; // [-0.5, 0.5]
  // Taylor series of 2^f = e^(f ln2) to degree 7: error < 1e-8 on [-.5, .5].
  vf16 r = splat(1.5252733804059840e-5f);
  r = r * f + 1.5403530393381608e-4f;
  r = r * f + 1.3333558146428443e-3f;
  r = r * f + 9.6181291076284772e-3f;
  r = r * f + 5.5504108664821580e-2f;
  r = r * f + 2.4022650695910071e-1f;
  r = r * f + 6.9314718055994531e-1f;
  r = r * f + 1.0f;
  vi16 bits;
  memcpy(&bits, &r, sizeof(bits));
  bits += __builtin_convertvector(n, vi16) << 23;
  vf16 out;
  memcpy(&out, &bits, sizeof(out));
  return x < -126.0f ? splat(0.0f) : out;
}

inline float hmax(vf16 v) {
  float m = v[0];
  for (int i = 1; i < 16; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
inline float hsum(vf16 v) {
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// ---------------------------------------------------------------------------
// Element types: float, and 16-bit floats kept as raw bits.
// ---------------------------------------------------------------------------
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

inline float to_float(float x) { return x; }
inline float to_float(bf16_t x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline float to_float(f16_t x) {
#if defined(__F16C__)
  return _cvtsh_ss(x.bits);
#else
  uint32_t sign = uint32_t(x.bits & 0x8000) << 16;
  uint32_t exp = (x.bits >> 10) & 0x1f;
  uint32_t man = x.bits & 0x3ff;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else { // subnormal: renormalise
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400));
    u = sign | uint32_t(112 - e) << 23 | ((man & 0x3ff) << 13);
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) { return x; }
template <>
inline bf16_t from_float<bf16_t>(float x) { // round to nearest even
  uint32_t u;
  memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{uint16_t(u >> 16)};
}
template <>
inline f16_t from_float<f16_t>(float x) { // round to nearest even
#if defined(__F16C__)
  return f16_t{uint16_t(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT))};
#else
  uint32_t u;
  memcpy(&u, &x, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16_t{uint16_t(sign | 0x7e00u)}; // NaN
  if (a >= 0x477ff000u) return f16_t{uint16_t(sign | 0x7c00u)}; // overflow
  if (a < 0x38800000u) { // subnormal or zero in half
    float af;
    memcpy(&af, &a, 4);
    // Adding 0.5 aligns the half subnormal step (2^-24) to the float ulp,
    // so the FPU's own round-to-nearest-even does the rounding.
    float t = af + 0.5f;
    uint32_t tu;
    memcpy(&tu, &t, 4);
    return f16_t{uint16_t(sign | (tu - 0x3f000000u))};
  }
  uint32_t odd = (a >> 13) & 1u;
  a += 0xc8000fffu + odd; // rebias exponent (-112 << 23) and round
  return f16_t{uint16_t(sign | (a >> 13))};
#endif
}

// Reads n elements at src with element stride `stride` as float32 times mul.
template <typename T>
inline void load_row(const T* src, fa_index_t stride, int n, float mul, float* dst) {
  if (stride == 1) {
    for (int d = 0; d < n; ++d) dst[d] = to_float(src[d]) * mul;
  } else {
    for (int d = 0; d < n; ++d) dst[d] = to_float(src[d * stride]) * mul;
  }
}

// ---------------------------------------------------------------------------
// Block GEMMs.
// ---------------------------------------------------------------------------

// S[r][0:BK] = sum_d Q[r][d] * Kt[d][0:BK] for R rows.
template <int R>
inline void qk_rows(const float* q, int ldq, const float* kt, int D, float* s) {
  vf16 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = vf16{};
  for (int d = 0; d < D; ++d) {
    const float* kd = kt + d * BK;
    vf16 k0 = load16(kd), k1 = load16(kd + 16), k2 = load16(kd + 32), k3 = load16(kd + 48);
    for (int r = 0; r < R; ++r) {
      vf16 qb = splat(q[r * ldq + d]);
      acc[r][0] += qb * k0;
      acc[r][1] += qb * k1;
      acc[r][2] += qb * k2;
      acc[r][3] += qb * k3;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) store16(s + r * BK + c * 16, acc[r][c]);
}

// O[r][c0 : c0+16*NC] = alpha[r] * O[r][...] + sum_j P[r][j] * V[j][...].
template <int R, int NC>
inline void pv_rows(const float* p, const float* alpha, const float* v, int ldv,
                    int nk, float* o, int ldo) {
  vf16 acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = load16(o + r * ldo + c * 16) * alpha[r];
  for (int j = 0; j < nk; ++j) {
    vf16 vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = load16(v + j * ldv + c * 16);
    for (int r = 0; r < R; ++r) {
      vf16 pb = splat(p[r * BK + j]);
      for (int c = 0; c < NC; ++c) acc[r][c] += pb * vv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) store16(o + r * ldo + c * 16, acc[r][c]);
}

template <int R>
inline void pv_block(const float* p, const float* alpha, const float* v, int dvp,
                     int nk, float* o) {
  int c = 0;
  for (; c + 64 <= dvp; c += 64) pv_rows<R, 4>(p, alpha, v + c, dvp, nk, o + c, dvp);
  switch ((dvp - c) / 16) {
    case 3: pv_rows<R, 3>(p, alpha, v + c, dvp, nk, o + c, dvp); break;
    case 2: pv_rows<R, 2>(p, alpha, v + c, dvp, nk, o + c, dvp); break;
    case 1: pv_rows<R, 1>(p, alpha, v + c, dvp, nk, o + c, dvp); break;
    default: break;
  }
}

// Runs a row-blocked kernel over n rows: full blocks of ROWS, then the tail.
template <typename F>
inline void for_row_blocks(int n, F&& f) {
  int i = 0;
  for (; i + ROWS <= n; i += ROWS) f.template operator()<ROWS>(i);
  for (; i < n; ++i) f.template operator()<1>(i);
}

// ---------------------------------------------------------------------------
// One task: queries [i0, i0 + nq) of head h in batch b.
// ---------------------------------------------------------------------------
template <typename T>
struct Task {
  const ForwardArgs& a;
  const FlashParams& p;

  void run(int b, int h, int i0) const {
    const int nq = p.Lq - i0 < BQ ? p.Lq - i0 : BQ;
    const int hk = h / p.gqa_ratio;
    const int D = p.D, Dv = p.Dv;
    const int dvp = (Dv + 15) / 16 * 16;
    const int wl = p.window_left, wr = p.window_right, off = p.q_offset;

    // Keys any row of this block can see; rows narrow it further below.
    long kbeg = 0, kend = p.Lk;
    if (wl >= 0 && long(i0) + off - wl > kbeg) kbeg = long(i0) + off - wl;
    if (wr >= 0 && long(i0 + nq - 1) + off + wr + 1 < kend)
      kend = long(i0 + nq - 1) + off + wr + 1;

    // Scratch: Q (scaled), K^T block, V block, S/P block, O accumulator, m, l.
    size_t nfloat = size_t(BQ) * D + size_t(D) * BK + size_t(BK) * dvp + size_t(BQ) * BK +
                    size_t(BQ) * dvp + 3 * BQ;
    float* qf = static_cast<float*>(thread_scratch(nfloat * sizeof(float)));
    float* kt = qf + size_t(BQ) * D;
    float* vf = kt + size_t(D) * BK;
    float* s = vf + size_t(BK) * dvp;
    float* o = s + size_t(BQ) * BK;
    float* m = o + size_t(BQ) * dvp;
    float* l = m + BQ;
    float* alpha = l + BQ;

    for (int i = 0; i < nq; ++i) {
      m[i] = -INFINITY;
      l[i] = 0.0f;
    }
    memset(o, 0, sizeof(float) * size_t(BQ) * dvp);

    const T* q = static_cast<const T*>(a.q) + b * p.q_strides[0] + h * p.q_strides[1];
    const T* k = static_cast<const T*>(a.k) + b * p.k_strides[0] + hk * p.k_strides[1];
    const T* v = static_cast<const T*>(a.v) + b * p.v_strides[0] + hk * p.v_strides[1];

    if (kbeg < kend) {
      for (int i = 0; i < nq; ++i)
        load_row(q + (i0 + i) * p.q_strides[2], p.q_strides[3], D, p.scale, qf + i * D);
    }
    const float slope = p.has_alibi
        ? a.alibi[b * p.alibi_strides[0] + h * p.alibi_strides[1]] : 0.0f;

    for (long j0 = kbeg; j0 < kend; j0 += BK) {
      const int nk = kend - j0 < BK ? int(kend - j0) : BK;
      load_kv(k, v, j0, nk, kt, vf, dvp);

      for_row_blocks(nq, [&]<int R>(int i) { qk_rows<R>(qf + i * D, D, kt, D, s + i * BK); });

      for (int i = 0; i < nq; ++i)
        modify_scores(b, h, i0 + i, j0, nk, slope, s + i * BK);

      softmax_update(nq, nk, s, m, l, alpha);
      for_row_blocks(nq, [&]<int R>(int i) {
        pv_block<R>(s + i * BK, alpha + i, vf, dvp, nk, o + i * dvp);
      });
    }

    finish(b, h, i0, nq, o, m, l, dvp);
  }

  // Converts keys [j0, j0 + nk) to float: K transposed (D x BK), V (BK x dvp),
  // both zero-padded so the fixed-width GEMMs read defined values.
  void load_kv(const T* k, const T* v, long j0, int nk, float* kt, float* vf, int dvp) const {
    const int D = p.D, Dv = p.Dv;
    float row[FA_MAX_HEAD_DIM];
    for (int j = 0; j < nk; ++j) {
      load_row(k + (j0 + j) * p.k_strides[2], p.k_strides[3], D, 1.0f, row);
      for (int d = 0; d < D; ++d) kt[d * BK + j] = row[d];
      load_row(v + (j0 + j) * p.v_strides[2], p.v_strides[3], Dv, 1.0f, vf + j * dvp);
      for (int d = Dv; d < dvp; ++d) vf[j * dvp + d] = 0.0f;
    }
    for (int d = 0; d < D; ++d)
      for (int j = nk; j < BK; ++j) kt[d * BK + j] = 0.0f;
    if (nk < BK) memset(vf + nk * dvp, 0, sizeof(float) * size_t(BK - nk) * dvp);
  }

  // Applies, in the API's order, softcap, ALiBi, the mask array and the
  // window/causal limits to one row of scaled scores; columns >= nk get -inf.
  void modify_scores(int b, int h, int i, long j0, int nk, float slope, float* srow) const {
    if (p.softcap > 0.0f) {
      const float inv = 1.0f / p.softcap;
      for (int j = 0; j < nk; ++j) srow[j] = p.softcap * tanhf(srow[j] * inv);
    }
    const long diag = long(i) + p.q_offset; // the key aligned with query i
    if (p.has_alibi) {
      for (int j = 0; j < nk; ++j) {
        long dist = diag - (j0 + j);
        srow[j] -= slope * float(dist < 0 ? -dist : dist);
      }
    }
    if (p.mask_kind != FA_MASK_NONE) {
      const fa_index_t base = b * p.mask_strides[0] + h * p.mask_strides[1] +
                              i * p.mask_strides[2] + j0 * p.mask_strides[3];
      const fa_index_t st = p.mask_strides[3];
      if (p.mask_kind == FA_MASK_BOOL) {
        const uint8_t* mk = static_cast<const uint8_t*>(a.mask) + base;
        for (int j = 0; j < nk; ++j) srow[j] = mk[j * st] ? srow[j] : -INFINITY;
      } else {
        const float* mk = static_cast<const float*>(a.mask) + base;
        for (int j = 0; j < nk; ++j) srow[j] += mk[j * st];
      }
    }
    // Window limits relative to this block: keep columns [lo, hi).
    long lo = 0, hi = nk;
    if (p.window_left >= 0 && diag - p.window_left - j0 > lo) lo = diag - p.window_left - j0;
    if (p.window_right >= 0 && diag + p.window_right + 1 - j0 < hi)
      hi = diag + p.window_right + 1 - j0;
    if (hi < lo) hi = lo;
    for (long j = 0; j < lo && j < BK; ++j) srow[j] = -INFINITY;
    for (long j = hi; j < BK; ++j) srow[j] = -INFINITY;
  }

  // Online softmax: per row, new max m, rescale factor alpha for the old
  // accumulator, P = exp(S - m) written over S, running sum l.
  void softmax_update(int nq, int nk, float* s, float* m, float* l, float* alpha) const {
    for (int i = 0; i < nq; ++i) {
      float* row = s + i * BK;
      vf16 r0 = load16(row), r1 = load16(row + 16), r2 = load16(row + 32), r3 = load16(row + 48);
      vf16 mx4 = r0 > r1 ? r0 : r1;
      vf16 mx4b = r2 > r3 ? r2 : r3;
      mx4 = mx4 > mx4b ? mx4 : mx4b;
      const float mx = hmax(mx4);
      const float m_new = mx > m[i] ? mx : m[i];
      if (m_new == -INFINITY) { // nothing visible yet: P = 0, O stays 0
        alpha[i] = 1.0f;
        memset(row, 0, sizeof(float) * BK);
        continue;
      }
      alpha[i] = exp2f((m[i] - m_new) * kLog2e);
      const vf16 mb = splat(m_new * kLog2e);
      const vf16 l2e = splat(kLog2e);
      r0 = exp2v(r0 * l2e - mb);
      r1 = exp2v(r1 * l2e - mb);
      r2 = exp2v(r2 * l2e - mb);
      r3 = exp2v(r3 * l2e - mb);
      store16(row, r0);
      store16(row + 16, r1);
      store16(row + 32, r2);
      store16(row + 48, r3);
      l[i] = l[i] * alpha[i] + hsum((r0 + r1) + (r2 + r3));
      m[i] = m_new;
    }
    (void)nk;
  }

  // Folds in the sink logit, normalises and writes O and the natural-log LSE.
  // A row that saw no key gets zeros and lse = -inf (or the sink logit).
  void finish(int b, int h, int i0, int nq, float* o, float* m, float* l, int dvp) const {
    const int Dv = p.Dv;
    T* out = static_cast<T*>(a.out) + ((size_t(b) * p.Hq + h) * p.Lq + i0) * Dv;
    float* lse = a.lse + (size_t(b) * p.Hq + h) * p.Lq + i0;
    const float sink = p.has_sinks
        ? a.sinks[b * p.sinks_strides[0] + h * p.sinks_strides[1]] : 0.0f;
    for (int i = 0; i < nq; ++i) {
      float mi = m[i], li = l[i], corr = 1.0f;
      if (p.has_sinks) {
        const float m_new = sink > mi ? sink : mi;
        corr = exp2f((mi - m_new) * kLog2e);
        li = li * corr + exp2f((sink - m_new) * kLog2e);
        mi = m_new;
      }
      const float inv = li > 0.0f ? corr / li : 0.0f;
      for (int d = 0; d < Dv; ++d) out[i * Dv + d] = from_float<T>(o[i * dvp + d] * inv);
      lse[i] = li > 0.0f ? mi + logf(li) : -INFINITY;
    }
  }
};

template <typename T>
void run_all(const ForwardArgs& a) {
  const FlashParams& p = *a.p;
  const int nqb = (p.Lq + BQ - 1) / BQ;
  const int64_t ntasks = int64_t(p.B) * p.Hq * nqb;
  if (ntasks == 0) return;
  Task<T> task{a, p};
  struct Ctx { const Task<T>* t; int nqb; int Hq; } ctx{&task, nqb, p.Hq};
  // Task order: the last query blocks first, since with causal masking they
  // see the most keys; dynamic hand-out then balances the cores.
  parallel_for(ntasks, [](void* c, int64_t t) {
    const Ctx& x = *static_cast<const Ctx*>(c);
    const int qb = x.nqb - 1 - int(t % x.nqb);
    const int64_t bh = t / x.nqb;
    x.t->run(int(bh / x.Hq), int(bh % x.Hq), qb * BQ);
  }, &ctx);
}

} // namespace

void forward(const ForwardArgs& a) {
  switch (a.dtype) {
    case DType::f32: run_all<float>(a); break;
    case DType::f16: run_all<f16_t>(a); break;
    case DType::bf16: run_all<bf16_t>(a); break;
  }
}

} // namespace FA_ISA
} // namespace flash_cpu
