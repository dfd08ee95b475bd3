// Building blocks shared by the CPU kernels (flash_fwd.cpp, flash_bwd.cpp):
// tile shapes, 16-float vectors, element conversions, the two block GEMMs and
// the score modifiers. Everything is in namespace flash_cpu::FA_ISA, so each
// instruction-set build gets its own copy.
#pragma once

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <new>

#if defined(__AVX__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "flash_cpu.h"

// The builds with bfloat16 dot products (bf16_gemm.h): AVX512-BF16's, AMX's,
// and FA_SOFT_BF16's (tests/test_emulated_builds.py: the same kernels on an
// emulated AVX-512 CPU without AVX512-BF16, its two instructions in software).
#if defined(__AVX512BF16__) || (defined(FA_SOFT_BF16) && defined(__AVX512F__))
#define FA_BF16_DOT 1
#endif

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
// CHUNK: 16-float vectors per row of a register block (64 keys of S, or 64
// columns of O, on AVX-512; 16 on AVX2, whose 16 registers then hold 6 rows
// x 2 halves of accumulators, 2 operand halves and a broadcast).
#if defined(__AVX512F__)
constexpr int ROWS = 4;
constexpr int CHUNK = 4;
#else
constexpr int ROWS = 6;
constexpr int CHUNK = 1;
#endif

// 16 floats. AVX-512: one register. Elsewhere a pair of 8-float halves:
// GCC keeps a 64-byte generic vector in memory when registers are narrower
// (AVX2 ran 40x slower that way), but keeps native-width halves in registers.
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
#if defined(__AVX512F__)
typedef float vf16 __attribute__((vector_size(64)));
inline vf16 vmax(vf16 a, vf16 b) { return a > b ? a : b; }
#else
struct vf16 {
  vf8 lo, hi;
  float operator[](int i) const { return i < 8 ? lo[i] : hi[i - 8]; }
};
inline vf16 operator+(vf16 a, vf16 b) { return {a.lo + b.lo, a.hi + b.hi}; }
inline vf16 operator-(vf16 a, vf16 b) { return {a.lo - b.lo, a.hi - b.hi}; }
inline vf16 operator*(vf16 a, vf16 b) { return {a.lo * b.lo, a.hi * b.hi}; }
inline vf16 operator+(vf16 a, float b) { return {a.lo + b, a.hi + b}; }
inline vf16 operator-(vf16 a, float b) { return {a.lo - b, a.hi - b}; }
inline vf16 operator*(vf16 a, float b) { return {a.lo * b, a.hi * b}; }
inline vf16& operator+=(vf16& a, vf16 b) { return a = a + b; }
inline vf8 vmax(vf8 a, vf8 b) { return a > b ? a : b; }
inline vf16 vmax(vf16 a, vf16 b) { return {vmax(a.lo, b.lo), vmax(a.hi, b.hi)}; }
#endif

#if defined(__AVX512F__)
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
#else
inline vf8 load8(const float* p) {
  vf8 v;
  memcpy(&v, p, sizeof(v));
  return v;
}
// Half by half: a whole-struct memcpy goes through the stack.
inline vf16 load16(const float* p) {
  vf16 v;
  memcpy(&v.lo, p, sizeof(vf8));
  memcpy(&v.hi, p + 8, sizeof(vf8));
  return v;
}
inline void store16(float* p, vf16 v) {
  memcpy(p, &v.lo, sizeof(vf8));
  memcpy(p + 8, &v.hi, sizeof(vf8));
}
inline vf16 splat(float x) {
  const vf8 h = {x, x, x, x, x, x, x, x}; // one broadcast (vf8{} + x adds 0 first)
  return {h, h};
}
#endif

constexpr float kLog2e = 1.4426950408889634f;

// 2^x for a vector, accurate to ~2 ulp of float32 over the range softmax
// needs; exactly 0 for -inf (masked scores). Polynomial instead of libm so
// it vectorises on every instruction set.
// 2^f on [-.5, .5]: degree 5, constant term 1, the other coefficients a
// least-squares fit of the relative error on 4000 Chebyshev points,
// reweighted by the error (Lawson) towards minimax: 9e-8 before float32
// rounding, within 2.3 ulp after. Degree 6 (1 ulp) is one more FMA per 8
// scores, and the softmax is bound by throughput: a 64 x 64 block took 11%
// longer.
template <typename V>
inline V exp2_poly(V f) {
  V r = V{} + 1.3264715e-3f;
  r = r * f + 9.671514e-3f;
  r = r * f + 5.550734e-2f;
  r = r * f + 2.4022242e-1f;
  r = r * f + 6.93147e-1f;
  return r * f + 1.0f;
}
#if defined(__AVX512F__)
// AVX-512: round and scale by 2^n in one instruction each; scalef flushes
// 2^-1000 (what -inf is clamped to) to 0 and saturates large n.
inline vf16 exp2v(vf16 x) {
  const __m512 xc = _mm512_max_ps(__m512(x), _mm512_set1_ps(-1000.0f));
  const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf16 f = vf16(_mm512_sub_ps(xc, n));
  return vf16(_mm512_scalef_ps(__m512(exp2_poly(f)), n));
}
#else
inline vf8 exp2v(vf8 x) {
  typedef int32_t vi8 __attribute__((vector_size(32)));
  const vf8 lo = vf8{} - 126.0f, hi = vf8{} + 127.0f;
  // Below lo (-inf among them) the result is replaced by 0 at the end, so
  // only the upper end is clamped; NaN passes through (MINPS returns its
  // second operand then: one instruction, where the select took two).
#if defined(__AVX__)
  const vf8 xc = vf8(_mm256_min_ps(__m256(hi), __m256(x)));
#else
  const vf8 xc = hi < x ? hi : x;
#endif
  // Adding 1.5 * 2^23 rounds to the nearest integer n and leaves n in the
  // low mantissa bits: the sum's bits shifted by 23 are n << 23, the
  // exponent field of 2^n (the rest shifts out).
  const vf8 t = xc + 12582912.0f;
  vf8 r = exp2_poly(xc - (t - 12582912.0f)); // f in [-0.5, 0.5]
  vi8 bits, tb;
  memcpy(&bits, &r, sizeof(bits));
  memcpy(&tb, &t, sizeof(tb));
  bits += tb << 23;
  memcpy(&r, &bits, sizeof(r));
  return x < lo ? vf8{} : r;
}
inline vf16 exp2v(vf16 x) { return {exp2v(x.lo), exp2v(x.hi)}; }
#endif

// tanh for softcap, vectorised (tanhf per score made a softcapped call 5x
// slower). Below |x| = 0.55: x + x u P(u), u = x^2, P a degree-4 fit like
// exp2_poly's (within 0.8 ulp of float32; 1 - 2 / (e + 1) would cancel near
// 0); above: 1 - 2 / (e^(2|x|) + 1), within a few ulp. NaN passes through.
template <typename V> // a native vector: vf8, or vf16 with AVX-512
inline V tanh_native(V x) {
  const V ax = x < 0.0f ? -x : x;
  const V u = ax * ax;
  V r = V{} - 6.2742704e-3f;
  r = r * u + 2.1071702e-2f;
  r = r * u - 5.3852316e-2f;
  r = r * u + 1.3332586e-1f;
  r = r * u - 3.3333316e-1f;
  const V small = ax + ax * (u * r);
  const V big = 1.0f - 2.0f / (exp2v(ax * (2.0f * kLog2e)) + 1.0f);
  const V t = ax < 0.55f ? small : big;
  return x < 0.0f ? -t : t;
}
#if defined(__AVX512F__)
inline vf16 tanhv(vf16 x) { return tanh_native(x); }
#else
inline vf16 tanhv(vf16 x) { return {tanh_native(x.lo), tanh_native(x.hi)}; }
#endif

// The sum of a vector's two 8-float halves.
inline vf8 fold8(vf8 v) { return v; }
inline vf8 fold8(vf16 v) {
#if defined(__AVX512F__)
  return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  return v.lo + v.hi;
#endif
}

// Horizontal max and sum as trees (4 dependent steps, not 15: they run once
// per row per block).
#if defined(__AVX512F__)
inline float hmax(vf16 v) {
  return _mm512_reduce_max_ps(__m512(v));
}
inline float hsum(vf16 v) {
  return _mm512_reduce_add_ps(__m512(v));
}
#else
// In registers: the halves, then the 128-bit quarters, then pairs (a
// round trip through memory stalls on store forwarding at every step).
template <typename F>
inline float reduce(vf16 v, F op) {
  const vf8 x = op(v.lo, v.hi);
  vf4 a = op(__builtin_shufflevector(x, x, 0, 1, 2, 3), __builtin_shufflevector(x, x, 4, 5, 6, 7));
  a = op(a, __builtin_shufflevector(a, a, 2, 3, 0, 1));
  a = op(a, __builtin_shufflevector(a, a, 1, 0, 3, 2));
  return a[0];
}
inline float hmax(vf16 v) {
  return reduce(v, [](auto a, auto b) { return b > a ? b : a; });
}
inline float hsum(vf16 v) {
  return reduce(v, [](auto a, auto b) { return a + b; });
}
#endif

// ---------------------------------------------------------------------------
// Element types: float, and 16-bit floats kept as raw bits.
// ---------------------------------------------------------------------------
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };
template <typename T>
constexpr bool is_bf16 = false;
template <>
constexpr bool is_bf16<bf16_t> = true;

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
#elif defined(__aarch64__) // the hardware's conversion, which loops vectorise
  __fp16 h; // Arm's half type: GCC 12 has no _Float16 in C++
  memcpy(&h, &x.bits, 2);
  return float(h);
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
#elif defined(__aarch64__)
  const __fp16 h = __fp16(x);
  f16_t r;
  memcpy(&r.bits, &h, 2);
  return r;
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
  int d = 0;
#if defined(__F16C__)
  // float16: 8 per instruction; to_float converts one (decoding float16 took
  // 2.4x as long as bfloat16 that way).
  if constexpr (sizeof(T) == 2 && !is_bf16<T>)
    for (; stride == 1 && d + 8 <= n; d += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d));
      const vf8 x = vf8(_mm256_cvtph_ps(h)) * mul;
      memcpy(dst + d, &x, sizeof(x));
    }
#endif
  if (stride == 1) {
    for (; d < n; ++d) dst[d] = to_float(src[d]) * mul;
  } else {
    for (; d < n; ++d) dst[d] = to_float(src[d * stride]) * mul;
  }
}

#if defined(FA_BF16_DOT)
// 32 floats rounded to bfloat16 (bf16_gemm.h).
inline __m512i to_bf16x32(__m512 lo, __m512 hi);
#endif

// Writes n floats times mul at dst as T, rounded as from_float rounds
// (GCC vectorises that loop for bfloat16). Faster where the CPU converts:
// float16 8 per F16C instruction (from_float's scalar conversions left a
// causal 256-token float16 forward and backward 6-7% slower), bfloat16 32
// per to_bf16x32 in the dot-product builds (forward 3%, backward 1%
// faster), whose VCVTNE2PS2BF16 also flushes float32 denormals (below
// 1.2e-38) to zero, as it does in P's rounding.
template <typename T>
inline void store_row(const float* src, int n, float mul, T* dst) {
  int d = 0;
#if defined(FA_BF16_DOT)
  if constexpr (is_bf16<T>)
    for (; d + 32 <= n; d += 32) {
      const __m512 m = _mm512_set1_ps(mul);
      _mm512_storeu_si512(dst + d, to_bf16x32(_mm512_mul_ps(_mm512_loadu_ps(src + d), m),
                                              _mm512_mul_ps(_mm512_loadu_ps(src + d + 16), m)));
    }
#endif
#if defined(__F16C__)
  if constexpr (sizeof(T) == 2 && !is_bf16<T>)
    for (; d + 8 <= n; d += 8) {
      vf8 x;
      memcpy(&x, src + d, sizeof(x));
      const __m128i h = _mm256_cvtps_ph(__m256(x * mul), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d), h);
    }
#endif
  for (; d < n; ++d) dst[d] = from_float<T>(src[d] * mul);
}

// 16 contiguous elements as float32 (load16 for float): the decoding
// kernels read 16-bit K and V rows in place, converted in registers.
#if defined(__AVX512F__)
inline vf16 load16(const bf16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return vf16(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
}
inline vf16 load16(const f16_t* p) {
  return vf16(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
#else
#if defined(__AVX2__)
inline vf8 bf16x8(const bf16_t* p) { // generic widening: 4 instructions per 8 (GCC 12)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return vf8(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
}
#else
inline vf8 bf16x8(const bf16_t* p) {
  typedef uint16_t vu16x8 __attribute__((vector_size(16)));
  typedef uint32_t vu32x8 __attribute__((vector_size(32)));
  vu16x8 h;
  memcpy(&h, p, sizeof(h));
  return vf8(__builtin_convertvector(h, vu32x8) << 16);
}
#endif
inline vf8 load8(const bf16_t* p) { return bf16x8(p); }
inline vf8 load8(const f16_t* p) {
#if defined(__F16C__)
  return vf8(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  vf8 v;
  for (int i = 0; i < 8; ++i) v[i] = to_float(p[i]);
  return v;
#endif
}
inline vf16 load16(const bf16_t* p) { return {load8(p), load8(p + 8)}; }
inline vf16 load16(const f16_t* p) { return {load8(p), load8(p + 8)}; }
#endif

// The cache line at p into L2 (T1: rows streamed from memory) or into L1
// (T0: a few rows ahead, already in L2). Prefetches never fault.
template <typename T>
inline void prefetch_l2(const T* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p), 0, 2);
}
template <typename T>
inline void prefetch_l1(const T* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p), 0, 3);
}
// Prefetches the cache lines of n contiguous elements into L2 (decoding's
// next block: into L1, its 32-64 KiB evicted the block in use from a 32 KiB
// L1; into L2 decoding ran 4-18% faster, 4k-32k keys, 2 threads).
template <typename T>
inline void prefetch(const T* src, int n) {
  for (size_t i = 0; i < n * sizeof(T); i += 64) prefetch_l2(reinterpret_cast<const char*>(src) + i);
}

// The transpose of an (n x d) matrix X in panels of xw rows of X, each a
// d x xw block (xw = all rows: one plain d x n matrix): where X[i][0] is;
// X[i][c] is xw floats further per column c.
inline const float* transposed_at(const float* xt, long i, int xw, int d) {
  return xt + size_t(i / xw) * xw * d + i % xw;
}

// ---------------------------------------------------------------------------
// Block GEMMs. pv_rows is always inlined: each call site's constant strides
// and null alpha then specialise its loop (GCC once kept it out of line in
// the backward, every stride a runtime multiply: 10% slower). qk_rows never
// is: its 6 row offsets need their own registers (inlined into the
// backward's scores, GCC spilled them and the K pointer inside the loop).
// ---------------------------------------------------------------------------
#define FA_GEMM inline __attribute__((always_inline))

// S[r][c0:c1] = sum_d Q[r][d] * Kt[d][c0:c1] for R rows, the other columns
// of [0, BK) set to 0 (c0, c1 multiples of 16 * CHUNK). Kt: the block's
// keys in panels of xw (transposed_at; kt at a panel boundary, or within
// one panel that holds the whole block). Key chunks of 16 * CHUNK, each a
// pass over d with R x CHUNK accumulators.
template <int R>
__attribute__((noinline)) void qk_rows(const float* q, int ldq, const float* kt, int xw, int D,
                                       float* s, int c0 = 0, int c1 = BK) {
  for (int k0 = 0; k0 < BK; k0 += 16 * CHUNK) {
    vf16 acc[R][CHUNK];
    const float* kc[CHUNK];
    for (int c = 0; c < CHUNK; ++c) {
      kc[c] = transposed_at(kt, k0 + c * 16, xw, D);
      for (int r = 0; r < R; ++r) acc[r][c] = vf16{};
    }
    const int dn = k0 >= c0 && k0 < c1 ? D : 0; // no pass: zeros
    for (int d = 0; d < dn; ++d) {
      vf16 kv[CHUNK];
      for (int c = 0; c < CHUNK; ++c) kv[c] = load16(kc[c] + size_t(d) * xw);
      for (int r = 0; r < R; ++r) {
        const vf16 qb = splat(q[r * ldq + d]);
        for (int c = 0; c < CHUNK; ++c) acc[r][c] += qb * kv[c];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < CHUNK; ++c) store16(s + r * BK + k0 + c * 16, acc[r][c]);
  }
}

// O[r][c0 : c0+16*NC] = alpha[r] * O[r][...] + sum_j P[r][j] * V[j][...]
// (alpha = 1 when null). P[r][j] is at p[r * ldp + j * ldj]: ldj = 1 for P,
// or ldp = 1 to multiply by the transpose of a row-major block. V's columns
// come in chunks of 16, vcs elements apart (16 for plain rows); V of 16-bit
// elements (decoding, in place) is converted as it is loaded. kPf (plain
// rows): each row read also prefetches its columns pfo elements on
// (decoding's V rows, streamed; see Task::run), and into L1 those 4 rows
// on, in L2 by then (32/8 heads float32, 4k keys, one thread: 4% faster;
// past the last row it touches nothing). A template argument: a run-time
// test left the AVX2 forward 2-3% slower.
template <int R, int NC, bool kPf, typename TV>
FA_GEMM void pv_rows(const float* p, int ldp, int ldj, const float* alpha, const TV* v,
                     int ldv, int vcs, int nk, float* o, int ldo, long pfo) {
  vf16 acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c)
      acc[r][c] = load16(o + r * ldo + c * 16) * (alpha ? alpha[r] : 1.0f);
  for (int j = 0; j < nk; ++j) {
    vf16 vv[NC];
    if constexpr (kPf) {
      prefetch(v + j * ldv + pfo, 16 * NC);
      for (int c = 0; c < NC; ++c) prefetch_l1(v + (j + 4) * ldv + c * vcs);
    }
    for (int c = 0; c < NC; ++c) vv[c] = load16(v + j * ldv + c * vcs);
    for (int r = 0; r < R; ++r) {
      vf16 pb = splat(p[r * ldp + j * ldj]);
      for (int c = 0; c < NC; ++c) acc[r][c] += pb * vv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) store16(o + r * ldo + c * 16, acc[r][c]);
}

// pv_rows over all n columns of V (row stride ldv, column chunks vcs apart)
// and O (row stride n; n a multiple of 16), in chunks of at most 16 * CHUNK
// columns to stay in registers.
template <int R, bool kPf = false, typename TV>
FA_GEMM void pv_block(const float* p, int ldp, int ldj, const float* alpha, const TV* v,
                      int ldv, int vcs, int n, int nk, float* o, long pfo = 0) {
  int c = 0;
  for (; c + 16 * CHUNK <= n; c += 16 * CHUNK)
    pv_rows<R, CHUNK, kPf>(p, ldp, ldj, alpha, v + c / 16 * vcs, ldv, vcs, nk, o + c, n, pfo);
  if constexpr (CHUNK > 1) {
    const TV* vc = v + c / 16 * vcs;
    switch ((n - c) / 16) {
      case 3: pv_rows<R, 3, kPf>(p, ldp, ldj, alpha, vc, ldv, vcs, nk, o + c, n, pfo); break;
      case 2: pv_rows<R, 2, kPf>(p, ldp, ldj, alpha, vc, ldv, vcs, nk, o + c, n, pfo); break;
      case 1: pv_rows<R, 1, kPf>(p, ldp, ldj, alpha, vc, ldv, vcs, nk, o + c, n, pfo); break;
      default: break;
    }
  }
}

// The transpose of 8 rows of 8 floats, in registers: pairs of rows
// interleaved, then pairs of pairs, then the 128-bit halves swapped.
inline void transpose8(vf8 (&r)[8]) {
  vf8 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4)
    for (int k = 0; k < 2; ++k) {
      u[i + 2 * k] = __builtin_shufflevector(t[i + k], t[i + k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * k + 1] =
          __builtin_shufflevector(t[i + k], t[i + k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int c = 0; c < 4; ++c) {
    r[c] = __builtin_shufflevector(u[c], u[c + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[c + 4] = __builtin_shufflevector(u[c], u[c + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// Rows [0, np) of an (n x d) matrix X (element strides rs, cs) converted
// to float32 times mul, zero past n rows: transposed into xt in panels of
// xw rows (transposed_at), and as rows of ldr floats into xr, zero past d
// columns; either may be null. ldr is a multiple of 16; where it is less
// than d the columns go on in chunks of ldr, xcs floats apart (X[i][c] at
// xr[(c / ldr) * xcs + i * ldr + c % ldr]). How the kernels convert an
// operand once per head. np is a multiple of xw and xw of 8: 8 rows at a
// time are transposed in registers and written as one 8-float run per
// column (row by row, every float written lands on another line).
template <typename T>
inline void convert_rows(const T* x, long n, int d, fa_index_t rs, fa_index_t cs, float mul,
                         int np, float* xt, int xw, float* xr, int ldr, size_t xcs = 0) {
  const int d8 = (d + 7) / 8 * 8, d16 = (d + 15) / 16 * 16;
  const int w = ldr < d ? d16 : ldr; // columns of xr written per row
  float rows[8][FA_MAX_HEAD_DIM];
  for (int i0 = 0; i0 < np; i0 += 8) {
    for (int t = 0; t < 8; ++t) {
      const long i = i0 + t;
      if (i < n)
        load_row(x + i * rs, cs, d, mul, rows[t]);
      else
        memset(rows[t], 0, sizeof(float) * d);
      for (int c = d; c < d16; ++c) rows[t][c] = 0.0f;
      // 16-float stores (a memcpy of d floats was a libc call per row).
      if (xr)
        for (int c = 0; c < w; c += 16)
          store16(xr + c / ldr * xcs + size_t(i) * ldr + c % ldr,
                  c < d16 ? load16(rows[t] + c) : vf16{});
    }
    if (!xt) continue;
    float* panel = const_cast<float*>(transposed_at(xt, i0, xw, d));
    for (int c0 = 0; c0 < d8; c0 += 8) {
      vf8 r[8];
      for (int t = 0; t < 8; ++t) memcpy(&r[t], rows[t] + c0, sizeof(vf8));
      transpose8(r);
      for (int c = c0; c < d && c < c0 + 8; ++c)
        memcpy(panel + size_t(c) * xw, &r[c - c0], sizeof(vf8));
    }
  }
}

// The kernels make float32 copies of their operands for this many bytes of
// K/V heads at a time (a wave; at least one head per thread): memory stays
// bounded whatever the batch, heads or length, and a wave's copies stay in
// the last-level cache while its tasks read them.
constexpr size_t kWaveBytes = size_t(16) << 20;
// The bfloat16 kernels' packs (bf16_gemm.h), half the size of float32
// copies, come in waves of at most 2 MiB, near the L2 caches: against all
// heads at once, 8 x 8 heads of 1024 tokens ran 0-10% (forward, median 3%)
// and 5-9% (backward) faster (2 threads; RESULTS.md).
constexpr size_t kBf16WaveBytes = size_t(2) << 20;
// Whether each thread should copy whole K/V heads of head_bytes of copies
// each (of nkv) into a buffer of its own (kCopyScratch), one at a
// time, and run all of a head's tasks, rather than copy a wave of heads
// together and share out its tasks: so the copies never leave the cache of
// the core that made them, and no barrier parts copying from computing (in
// waves, a 256-token bfloat16 forward on 2 threads spent 4x as long
// copying as on one: copies made on one core, read on the other). Where
// the copies fit a core's L2 (Zen 4's; against half of it, 1-8% faster at
// 384-1024 tokens, no clear change against 2 MiB) and whole heads share out
// evenly (at most a tenth of a round idle).
constexpr size_t kOwnHeadBytes = size_t(1) << 20;
inline bool own_heads(size_t head_bytes, int64_t nkv) {
  const int64_t t = num_threads();
  return head_bytes <= kOwnHeadBytes && nkv >= 2 * t && ((nkv + t - 1) / t * t - nkv) * 10 <= nkv;
}

// K/V heads per wave, of nkv, when each takes head_bytes of copies: at most
// what kWaveBytes holds, in whole rounds of one head per thread (at least
// one round), evened out over the waves. The fused backward runs one task
// per head: waves of 7 and 1 heads (768 tokens, d128, 8 heads, 2 threads)
// left a core idle through the second wave (forward+backward 0.78-0.93x
// PyTorch's; 1.04-1.05x in waves of 4 and 4).
inline int64_t wave_heads(size_t head_bytes, int64_t nkv, size_t wave_bytes = kWaveBytes) {
  const int64_t t = num_threads();
  int64_t w = int64_t(wave_bytes / head_bytes) / t * t;
  w = w < t ? t : w;
  const int64_t waves = nkv > w ? (nkv + w - 1) / w : 1;
  w = ((nkv + waves - 1) / waves + t - 1) / t * t;
  return w > nkv ? nkv : w;
}

// A 64-byte aligned buffer of n elements (free() it), or bad_alloc.
template <typename T>
inline T* alloc_aligned(size_t n) {
  void* p = aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
  if (!p) throw std::bad_alloc();
  return static_cast<T*>(p);
}

// The buffer of a call's wave of copies (n bytes): the calling thread's
// kWaveScratch, kept from call to call, where n <= kWaveBytes; larger ones
// (long sequences, where a call takes seconds) are allocated per call, and
// *own is set to them to free() after it (else null). A buffer allocated
// per call was, on runs of calls, a heap that glibc mapped for the call and
// unmapped after it, so every page of it faulted in again (384 d128
// float32 forward+backward, 8 heads: 2241 faults, 6.8 -> 9.5 ms a call).
inline void* wave_buffer(size_t n, void** own) {
  *own = n > kWaveBytes ? alloc_aligned<uint8_t>(n) : nullptr;
  return *own ? *own : thread_scratch(n, kWaveScratch);
}

// Runs a row-blocked kernel over n rows: full blocks of ROWS, then the
// tail (< ROWS rows) in blocks of 4, 2 and 1.
template <typename F>
inline void for_row_blocks(int n, F&& f) {
  int i = 0;
  for (; i + ROWS <= n; i += ROWS) f.template operator()<ROWS>(i);
  if constexpr (ROWS > 4)
    if (i + 4 <= n) f.template operator()<4>(i), i += 4;
  if (i + 2 <= n) f.template operator()<2>(i), i += 2;
  if (i < n) f.template operator()<1>(i);
}

// The lane sums of 8 vectors: out[t] = sum of a[t]'s 8 lanes. Pairwise
// shuffles of whole vectors (3 levels for 8 sums), where 8 separate
// horizontal sums would take 8 x 3 dependent steps.
inline vf8 lane_sums(const vf8 (&a)[8]) {
  vf8 b[4], c[2];
  for (int t = 0; t < 4; ++t) // b[t] = pair sums of a[2t] and a[2t+1], interleaved
    b[t] = __builtin_shufflevector(a[2 * t], a[2 * t + 1], 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(a[2 * t], a[2 * t + 1], 1, 3, 9, 11, 5, 7, 13, 15);
  for (int t = 0; t < 2; ++t) // c[t] = a[4t..4t+3] summed over lanes 0-3, then 4-7
    c[t] = __builtin_shufflevector(b[2 * t], b[2 * t + 1], 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(b[2 * t], b[2 * t + 1], 1, 3, 9, 11, 5, 7, 13, 15);
  return __builtin_shufflevector(c[0], c[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(c[0], c[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

// qk_keys's step in float32: a vector V (vf16 or vf8) of a Q row and a K row
// (of any element type, converted as loaded) per multiply-add. (bf16_gemm.h
// has the bfloat16 pairs' step.)
template <typename V>
struct FloatDotOf {
  using Acc = V;
  static constexpr int kStep = sizeof(V) / sizeof(float);
  static constexpr bool groups(int) { return false; } // see Bf16Dot
  template <typename T>
  static V load(const T* p) {
    if constexpr (kStep == 16) return load16(p);
    else return load8(p);
  }
  static V madd(V acc, V q, V k) { return acc + q * k; }
};
using FloatDot = FloatDotOf<vf16>;
// 16-bit K rows. Where vectors are 8 floats (AVX2, NEON), in 8-float steps:
// the registers of 4 accumulators of 16 floats then hold 8 of 8, 2 keys'
// for 4 GQA rows, so each Q vector loaded serves 2 keys (AVX2, one thread,
// bfloat16 and float16 decoding, 32/8 heads D 128, 1k-4k keys: 10-13%
// faster, D 80 17%, 16/8 heads D 64 6%; MHA within 2%, float16 8% faster).
// float32 rows were 2-5% slower that way (1k-16k keys): they keep FloatDot.
#if defined(__AVX512F__)
using Narrow16Dot = FloatDot;
#else
using Narrow16Dot = FloatDotOf<vf8>;
#endif

// S[r][j] = scale Q[r] . K[j] for R rows and keys [0, nk) (decoding: too few
// rows to pay for transposing K): dot products with K's rows, read in place
// (ldk elements apart), Dot::kStep elements per step (FloatDot, Narrow16Dot,
// Bf16Dot). KG keys per pass over d, so each K vector loaded serves R rows:
// R x KG accumulators, as many as fit in registers beside the operands (16 zmm
// with AVX-512, 8 ymm otherwise: 4 vf16 or 8 vf8). Their sums come out 8 at a
// time (lane_sums). Where Dot groups R rows (Bf16Dot::groups), q holds them
// packed and Dot computes their passes. Columns [nk, round_up(nk, KG)) repeat
// key nk - 1, for the masks to hide. Each pass prefetches KG of the npf rows
// from pf (K's rows ldk apart, D long), rows streamed from memory (see
// Task::run): spread over the work, where a burst of them stalled on the fill
// buffers (2 threads, 4k-32k keys: 2-21% faster); without groups, a line of
// each per step over d. There it also brings the next pass's rows into L1 (T0),
// a line per step: its KG rows, read 64 bytes of each in turn, are a pattern
// the L1 prefetchers don't follow (float32 decoding, 4k keys, one thread:
// 32/8 heads 6-12%, MHA 23%, D 256 32% faster); a pass of one row (KG = 1: AVX2
// vf16, 3+ rows) they do follow, and there these prefetches cost bfloat16
// decoding 6-7%.
template <int R, typename Dot, typename TQ, typename TK>
FA_GEMM void qk_keys(Dot, const TQ* q, int ldq, const TK* k, long ldk, int D, int nk, float scale,
                     float* s, const TK* pf = nullptr, int npf = 0) {
  // The rows of a pass over keys [j, j + G).
  auto keys = [&]<int G>(int j, const TK* (&kr)[G]) {
    static_assert(BK % G == 0, "a pass's keys stay in the block");
    for (int t = 0; t < G; ++t) kr[t] = k + (j + t < nk ? j + t : nk - 1) * ldk;
  };
  // A pass's sums (sums[r * G + t]: row r, key j + t) into S.
  auto store = [&](int j, int G, const float* sums) {
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < G; ++t) s[r * BK + j + t] = sums[r * G + t] * scale;
  };
  if constexpr (Dot::groups(R)) { // q: the R rows packed by Dot::pack_rows
    for (int j = 0; j < nk; j += Dot::kGroupKeys) {
      const TK* kr[Dot::kGroupKeys];
      keys(j, kr);
      for (int t = 0; t < Dot::kGroupKeys && j + t < npf; ++t) prefetch(pf + (j + t) * ldk, D);
      Dot::template group_sums<R>(q, ldq, D, kr, scale, s + j, BK);
    }
  } else {
    constexpr int kAcc =
        (ROWS * CHUNK >= 16 ? 16 : 4) * int(sizeof(vf16) / sizeof(typename Dot::Acc));
    constexpr int KG = kAcc / R > 1 ? kAcc / R : 1;
    const int Dn = D / Dot::kStep * Dot::kStep;
    for (int j = 0; j < nk; j += KG) {
      const TK* kr[KG];
      keys(j, kr);
      // This pass's rows to prefetch from memory (pf) and the next pass's
      // (one row a pass, read in order, the L1 prefetchers follow).
      const int nfar = npf - j < 0 ? 0 : npf - j < KG ? npf - j : KG;
      const int after = nk - j - KG; // keys after this pass
      const int nnear = KG == 1 || after < 0 ? 0 : after < KG ? after : KG;
      typename Dot::Acc acc[R][KG];
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < KG; ++t) acc[r][t] = typename Dot::Acc{};
      for (int d = 0; d < Dn; d += Dot::kStep) {
        if (d * sizeof(TK) % 64 == 0) { // a step may cover less than a line
          for (int t = 0; t < nfar; ++t) prefetch_l2(pf + (j + t) * ldk + d);
          for (int t = 0; t < nnear; ++t) prefetch_l1(kr[t] + KG * ldk + d);
        }
        decltype(Dot::load(k)) kv[KG];
        for (int t = 0; t < KG; ++t) kv[t] = Dot::load(kr[t] + d);
        for (int r = 0; r < R; ++r) {
          const auto qv = Dot::load(q + r * ldq + d);
          for (int t = 0; t < KG; ++t) acc[r][t] = Dot::madd(acc[r][t], qv, kv[t]);
        }
      }
      float sums[(R * KG + 7) / 8 * 8];
      for (int g = 0; g < R * KG; g += 8) {
        vf8 h[8];
        for (int u = 0; u < 8; ++u) {
          const int i = g + u < R * KG ? g + u : 0; // a partial group's rest: ignored
          h[u] = fold8(acc[i / KG][i % KG]);
        }
        const vf8 x = lane_sums(h);
        memcpy(sums + g, &x, sizeof(x));
      }
      for (int t = 0; Dn < D && t < nfar; ++t) prefetch_l2(pf + (j + t) * ldk + Dn);
      for (int d = Dn; d < D; ++d)
        for (int r = 0; r < R; ++r)
          for (int t = 0; t < KG; ++t)
            sums[r * KG + t] += to_float(q[r * ldq + d]) * to_float(kr[t][d]);
      store(j, KG, sums);
    }
  }
}

// ---------------------------------------------------------------------------
// Score modifiers, applied in the API's order: softcap, then ALiBi, the mask
// array and the causal/window limits.
// ---------------------------------------------------------------------------

inline void apply_softcap(const FlashParams& p, float* srow, int n) {
  const float inv = 1.0f / p.softcap;
  int j = 0;
  for (; j + 16 <= n; j += 16) store16(srow + j, tanhv(load16(srow + j) * inv) * p.softcap);
  if (j == n) return;
  float tail[16] = {}; // the last partial chunk, through the same tanhv
  memcpy(tail, srow + j, sizeof(float) * (n - j));
  store16(tail, tanhv(load16(tail) * inv) * p.softcap);
  memcpy(srow + j, tail, sizeof(float) * (n - j));
}

// One batch entry's sequence (see FlashParams::has_seqs): its query rows
// [q0, q0 + nq), key rows [k0, k0 + nk), and shift = the key aligned with
// query row i is i + shift. Its tasks cover query rows [qrows_begin,
// qrows_end) and key rows [krows_begin, krows_end): the whole padded batch
// entry, or (packed) only the sequence's own rows.
struct Seq {
  long q0, nq, k0, nk, shift;
  long qrows_begin, qrows_end, krows_begin, krows_end;
};

inline Seq seq_of(const FlashParams& p, const int32_t* seqs, int b) {
  if (!p.has_seqs) return {0, p.Lq, 0, p.Lk, p.q_offset, 0, p.Lq, 0, p.Lk};
  const int32_t* x = seqs + 4 * b;
  // Padded batches: lengths beyond the arrays are clamped to them.
  long nq = x[1] < 0 ? 0 : x[1] > p.Lq - x[0] ? p.Lq - x[0] : x[1];
  long nk = x[3] < 0 ? 0 : x[3] > p.Lk - x[2] ? p.Lk - x[2] : x[3];
  Seq sq{x[0], nq, x[2], nk, (x[2] - x[0]) + (nk - nq), 0, p.Lq, 0, p.Lk};
  if (p.packed) {
    sq.qrows_begin = sq.q0;
    sq.qrows_end = sq.q0 + nq;
    sq.krows_begin = sq.k0;
    sq.krows_end = sq.k0 + nk;
  }
  return sq;
}

// Block `index` of `size` rows within [begin, end): sets its first row and
// returns its row count, 0 past the end (a short packed sequence).
inline int block_rows(long begin, long end, long index, int size, long* first) {
  *first = begin + index * size;
  return *first >= end ? 0 : end - *first < size ? int(end - *first) : size;
}

// Per-thread scratch split into float arrays, each starting on a 64-byte
// boundary: the sizes are listed once, next to the pointers they set.
struct Slot {
  float** ptr;
  size_t n;
};
template <int N>
inline void carve_scratch(const Slot (&slots)[N]) {
  size_t total = 0;
  for (const Slot& sl : slots) total += (sl.n + 15) / 16 * 16;
  float* base = static_cast<float*>(thread_scratch(total * sizeof(float)));
  for (const Slot& sl : slots) {
    *sl.ptr = base;
    base += (sl.n + 15) / 16 * 16;
  }
}

// Where batch entry b, head h, row i lives in a row-contiguous (B, H, L, n)
// output of L rows per head (packed: one (H, L, n) buffer shared by all b).
inline size_t out_row(const FlashParams& p, int H, long L, int b, int h, long i) {
  return (size_t(p.packed ? 0 : b) * H + h) * L + i;
}

// The dropout multiplier of score (b, h, i, j): 0 or 1 / (1 - p). A
// counter-based hash (SplitMix64's finaliser over the element's index and
// the key), so any pass and any backend regenerates the same mask.
inline uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
inline void dropout_row(const FlashParams& p, int b, int h, long i, long j0, int n, float* row) {
  const uint64_t key = mix64((uint64_t(p.seed[1]) << 32) | p.seed[0]);
  const uint64_t base = ((uint64_t(b) * p.Hq + h) * uint64_t(p.Lq) + i) * uint64_t(p.Lk) + j0;
  const uint32_t threshold = uint32_t(double(p.dropout_p) * 4294967296.0);
  const float keep_scale = 1.0f / (1.0f - p.dropout_p);
  for (int j = 0; j < n; ++j) {
    const uint32_t u = uint32_t(mix64(base + j + key) >> 32);
    row[j] *= u >= threshold ? keep_scale : 0.0f;
  }
}

// ALiBi, mask and window for row i of batch b, head h, keys [j0, j0 + nk);
// columns [nk, BK), keys outside the sequence and every hidden key become -inf.
inline void apply_bias_and_mask(const FlashParams& p, const Seq& sq, const void* mask, int b,
                                int h, long i, long j0, int nk, float slope, float* srow) {
  const long diag = i + sq.shift; // the key aligned with query i
  if (p.has_alibi) {
    // In int (lengths are): int -> float vectorises, long -> float does not
    // before AVX-512 (ALiBi cost 50-85% of a 1024-token call in long).
    const int d0 = int(diag - j0);
    for (int j = 0; j < nk; ++j) srow[j] -= slope * float(abs(d0 - j));
  }
  if (p.mask_kind != FA_MASK_NONE) {
    const fa_index_t base = b * p.mask_strides[0] + h * p.mask_strides[1] +
                            i * p.mask_strides[2] + j0 * p.mask_strides[3];
    const fa_index_t st = p.mask_strides[3];
    if (p.mask_kind == FA_MASK_BOOL) {
      const uint8_t* mk = static_cast<const uint8_t*>(mask) + base;
      for (int j = 0; j < nk; ++j) srow[j] = mk[j * st] ? srow[j] : -INFINITY;
    } else {
      const float* mk = static_cast<const float*>(mask) + base;
      for (int j = 0; j < nk; ++j) srow[j] += mk[j * st];
    }
  }
  // Keys this row may see, relative to the block: keep columns [lo, hi).
  long lo = sq.k0 - j0, hi = sq.k0 + sq.nk - j0;
  if (hi > nk) hi = nk;
  if (lo < 0) lo = 0;
  if (i < sq.q0 || i >= sq.q0 + sq.nq) hi = lo; // a padding row
  if (p.window_left >= 0 && diag - p.window_left - j0 > lo) lo = diag - p.window_left - j0;
  if (p.window_right >= 0 && diag + p.window_right + 1 - j0 < hi)
    hi = diag + p.window_right + 1 - j0;
  if (hi < lo) hi = lo;
  if (lo == 0 && hi == BK) return;
  // One branch-free pass over the row (vectorised), where loops over the
  // hidden columns alone were 1.4% of a causal 256-token bfloat16 call.
  const int l = int(lo < BK ? lo : BK), e = int(hi);
  for (int j = 0; j < BK; ++j) srow[j] = j < l || j >= e ? -INFINITY : srow[j];
}

// Keys [*beg, *end) that some query in rows [i0, i1) may see.
inline void visible_keys(const FlashParams& p, const Seq& sq, long i0, long i1, long* beg,
                         long* end) {
  *beg = sq.k0;
  *end = sq.k0 + sq.nk;
  if (i0 < sq.q0) i0 = sq.q0;
  if (i1 > sq.q0 + sq.nq) i1 = sq.q0 + sq.nq;
  if (i1 <= i0) *end = *beg;
  if (p.window_left >= 0 && i0 + sq.shift - p.window_left > *beg)
    *beg = i0 + sq.shift - p.window_left;
  if (p.window_right >= 0 && i1 - 1 + sq.shift + p.window_right + 1 < *end)
    *end = i1 - 1 + sq.shift + p.window_right + 1;
}

// Keys [*beg, *end) that every query in rows [i0, i1) sees (none if a row
// is outside the sequence).
inline void keys_seen_by_all(const FlashParams& p, const Seq& sq, long i0, long i1, long* beg,
                             long* end) {
  *beg = sq.k0;
  *end = sq.k0 + sq.nk;
  if (i0 < sq.q0 || i1 > sq.q0 + sq.nq || i1 <= i0) *end = *beg;
  if (p.window_left >= 0 && i1 - 1 + sq.shift - p.window_left > *beg)
    *beg = i1 - 1 + sq.shift - p.window_left;
  if (p.window_right >= 0 && i0 + sq.shift + p.window_right + 1 < *end)
    *end = i0 + sq.shift + p.window_right + 1;
}

// Whether [a0, a1) and [b0, b1) share an element (false if either is empty):
// a block pair a task may skip.
inline bool ranges_meet(long a0, long a1, long b0, long b1) {
  return a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1;
}

// The part of [beg, end) in block [base, base + n), relative to base and
// widened to whole chunks of w (a divisor of BK; the end may then pass n):
// the columns (or rows) of a block that a register block must compute.
inline void block_span(long beg, long end, long base, int n, int w, int* c0, int* c1) {
  beg = beg < base ? 0 : beg - base;
  end = end > base + n ? n : end - base;
  *c0 = end <= beg ? 0 : int(beg) / w * w;
  *c1 = end <= beg ? 0 : (int(end) + w - 1) / w * w;
}

// Columns [*c0, *c1) of key block [j0, j0 + nk) that some query in [i0, i1)
// may see, in chunks of w (block_span): what a register block of rows
// computes of S (and dP) and of P V (and dS K). On the diagonal of a causal
// or window mask that is part of the block; the masks make the other
// columns -inf in S (apply_bias_and_mask), so 0 in P and dS.
inline void visible_cols(const FlashParams& p, const Seq& sq, long i0, long i1, long j0, int nk,
                         int w, int* c0, int* c1) {
  long beg, end;
  visible_keys(p, sq, i0, i1, &beg, &end);
  block_span(beg, end, j0, nk, w, c0, c1);
}

// Widens [*beg, *end) to cover [b0, b1) (either may be empty): the keys
// that some query block of a task sees.
inline void widen(long b0, long b1, long* beg, long* end) {
  if (b0 >= b1) return;
  const bool first = *beg >= *end;
  *beg = first || b0 < *beg ? b0 : *beg;
  *end = first || b1 > *end ? b1 : *end;
}

// Queries [*beg, *end) that may see some key in [j0, j1).
inline void visible_queries(const FlashParams& p, const Seq& sq, long j0, long j1, long* beg,
                            long* end) {
  *beg = sq.q0;
  *end = sq.q0 + sq.nq;
  if (j0 < sq.k0) j0 = sq.k0;
  if (j1 > sq.k0 + sq.nk) j1 = sq.k0 + sq.nk;
  if (j1 <= j0) *end = *beg;
  if (p.window_right >= 0 && j0 - sq.shift - p.window_right > *beg)
    *beg = j0 - sq.shift - p.window_right;
  if (p.window_left >= 0 && j1 - 1 - sq.shift + p.window_left + 1 < *end)
    *end = j1 - 1 - sq.shift + p.window_left + 1;
}

// The per-(batch, head) scalars of the ALiBi slopes and sinks inputs.
inline float per_head(const float* x, const fa_index_t* strides, int b, int h) {
  return x[b * strides[0] + h * strides[1]];
}

} // namespace
} // namespace FA_ISA
} // namespace flash_cpu
