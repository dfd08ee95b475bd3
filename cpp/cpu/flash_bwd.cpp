// FlashAttention-2 backward on the CPU.
//
// With S = scale * Q K^T (then softcap, ALiBi, masks), P = exp(S - LSE) and
// Delta = rowsum(dO * O) - dLSE, the gradients are
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Delta)  (times tanh' under softcap),
//   dQ = scale * dS K,  dK = scale * dS^T Q.
// P is recomputed block by block from Q, K and the saved LSE, so memory stays
// O(L). Two passes keep every output owned by exactly one task, so results
// are bit-identical from run to run (no atomics, no racing accumulators):
//   - dQ pass, one task per (batch, query head, query block), also writing
//     the additive-mask gradient rows and per-task ALiBi/sink partial sums;
//   - dK/dV pass, one task per (batch, key/value head, key block), summing
//     over the query heads of its GQA group.
// The partial sums are reduced afterwards in a fixed order.

#include <stdlib.h>

#include <new>

#include "kernel_common.h"

namespace flash_cpu {
namespace FA_ISA {
namespace {

inline int pad16(int n) {
  return (n + 15) / 16 * 16;
}

template <typename T>
struct Backward {
  const BackwardArgs& a;
  const FlashParams& p;
  const float* delta; // (B, Hq, Lq)
  float* partials;    // (B, Hq, nqb, 2): ALiBi and sink gradient sums per dQ task
  int nqb;            // query blocks per (batch, head)

  const T* q_row(int b, int h, long i) const {
    return static_cast<const T*>(a.fwd.q) + b * p.q_strides[0] + h * p.q_strides[1] +
           i * p.q_strides[2];
  }
  const T* do_row(int b, int h, long i) const {
    return static_cast<const T*>(a.dout) + b * p.do_strides[0] + h * p.do_strides[1] +
           i * p.do_strides[2];
  }
  size_t row_index(int b, int h, long i) const { // into (B, Hq, Lq) arrays
    return out_row(p, p.Hq, p.Lq, b, h, i);
  }

  // Queries [i0, i0 + nq) of head h: Q * scale (row stride Dp), dO (row
  // stride dvp), zero-padded, and their LSE and Delta.
  void load_queries(int b, int h, long i0, int nq, float* qf, float* dof, float* lse,
                    float* del) const {
    const int D = p.D, Dv = p.Dv, Dp = pad16(D), dvp = pad16(Dv);
    for (int i = 0; i < nq; ++i) {
      load_row(q_row(b, h, i0 + i), p.q_strides[3], D, p.scale, qf + i * Dp);
      for (int d = D; d < Dp; ++d) qf[i * Dp + d] = 0.0f;
      load_row(do_row(b, h, i0 + i), p.do_strides[3], Dv, 1.0f,
               dof + i * dvp);
      for (int d = Dv; d < dvp; ++d) dof[i * dvp + d] = 0.0f;
      lse[i] = a.fwd.lse[row_index(b, h, i0 + i)];
      del[i] = delta[row_index(b, h, i0 + i)];
    }
  }

  // Keys [j0, j0 + nk) of kv head hk as K^T (D x BK), V^T (Dv x BK) and, if
  // km is given, K (BK x Dp); zero-padded.
  void load_keys(int b, int hk, long j0, int nk, float* kt, float* vt, float* km) const {
    const int D = p.D, Dv = p.Dv, Dp = pad16(D);
    const T* k = static_cast<const T*>(a.fwd.k) + b * p.k_strides[0] + hk * p.k_strides[1];
    const T* v = static_cast<const T*>(a.fwd.v) + b * p.v_strides[0] + hk * p.v_strides[1];
    float row[FA_MAX_HEAD_DIM];
    for (int j = 0; j < nk; ++j) {
      load_row(k + (j0 + j) * p.k_strides[2], p.k_strides[3], D, 1.0f, row);
      for (int d = 0; d < D; ++d) kt[d * BK + j] = row[d];
      if (km) {
        memcpy(km + j * Dp, row, sizeof(float) * D);
        for (int d = D; d < Dp; ++d) km[j * Dp + d] = 0.0f;
      }
      load_row(v + (j0 + j) * p.v_strides[2], p.v_strides[3], Dv, 1.0f, row);
      for (int d = 0; d < Dv; ++d) vt[d * BK + j] = row[d];
    }
    for (int j = nk; j < BK; ++j) {
      for (int d = 0; d < D; ++d) kt[d * BK + j] = 0.0f;
      for (int d = 0; d < Dv; ++d) vt[d * BK + j] = 0.0f;
    }
  }

  // S = Qs K^T and dP = dO V^T for one (query block, key block) pair, then
  // S -> P and dP -> dS (the gradient of the score after softcap, i.e. of
  // the biases and additive mask). cap keeps the capped scores for tanh'.
  void scores(const Seq& sq, int b, int h, long i0, int nq, long j0, int nk, float slope,
              const float* qf,
              const float* dof, const float* kt, const float* vt, const float* lse,
              const float* del, float* s, float* dp, float* cap) const {
    const int Dp = pad16(p.D), dvp = pad16(p.Dv);
    for_row_blocks(nq, [&]<int R>(int i) {
      qk_rows<R>(qf + i * Dp, Dp, kt, p.D, s + i * BK);
      qk_rows<R>(dof + i * dvp, dvp, vt, p.Dv, dp + i * BK);
    });
    const vf16 l2e = splat(kLog2e);
    for (int i = 0; i < nq; ++i) {
      float* srow = s + i * BK;
      float* dprow = dp + i * BK;
      if (p.softcap > 0.0f) {
        apply_softcap(p, srow, nk);
        memcpy(cap + i * BK, srow, sizeof(float) * BK);
      }
      apply_bias_and_mask(p, sq, a.fwd.mask, b, h, i0 + i, j0, nk, slope, srow);
      if (lse[i] == -INFINITY) { // the row saw no key: P = 0
        memset(srow, 0, sizeof(float) * BK);
        memset(dprow, 0, sizeof(float) * BK);
        continue;
      }
      // With dropout (multipliers z): O = (P z) V, so dV uses P z, and
      // dS = P (dP z - Delta). Without, z = 1.
      float z[BK];
      if (p.dropout_p > 0.0f) {
        for (int j = 0; j < BK; ++j) z[j] = 1.0f;
        dropout_row(p, b, h, i0 + i, j0, nk, z);
      }
      const vf16 m = splat(lse[i] * kLog2e), dl = splat(del[i]);
      for (int c = 0; c < BK; c += 16) {
        vf16 pr = exp2v(load16(srow + c) * l2e - m);
        vf16 dpr = load16(dprow + c);
        if (p.dropout_p > 0.0f) {
          const vf16 zc = load16(z + c);
          store16(dprow + c, pr * (dpr * zc - dl));
          store16(srow + c, pr * zc);
        } else {
          store16(dprow + c, pr * (dpr - dl));
          store16(srow + c, pr);
        }
      }
    }
  }

  // dS of the capped score -> dS of the raw score: times 1 - tanh^2.
  void softcap_chain(int nq, float* dp, const float* cap) const {
    const vf16 inv = splat(1.0f / p.softcap), one = splat(1.0f);
    for (int i = 0; i < nq; ++i)
      for (int c = 0; c < BK; c += 16) {
        vf16 t = load16(cap + i * BK + c) * inv;
        store16(dp + i * BK + c, load16(dp + i * BK + c) * (one - t * t));
      }
  }

  // --- dQ pass: query block qb of head h in batch b. ---
  void dq_task(int b, int h, int qb) const {
    const Seq sq = seq_of(p, a.fwd.seqs, b);
    long i0;
    const int nq = block_rows(sq.qrows_begin, sq.qrows_end, qb, BQ, &i0);
    if (nq == 0) return;
    const int hk = h / p.gqa_ratio;
    const int D = p.D, Dp = pad16(D), dvp = pad16(p.Dv);
    float *qf, *dqa, *dof, *s, *dp, *cap, *lse, *del, *kt, *vt, *km;
    carve_scratch({{&qf, size_t(BQ) * Dp}, {&dqa, size_t(BQ) * Dp}, {&dof, size_t(BQ) * dvp},
                   {&s, BQ * BK}, {&dp, BQ * BK}, {&cap, BQ * BK}, {&lse, BQ}, {&del, BQ},
                   {&kt, size_t(D) * BK}, {&vt, size_t(p.Dv) * BK}, {&km, size_t(BK) * Dp}});

    load_queries(b, h, i0, nq, qf, dof, lse, del);
    memset(dqa, 0, sizeof(float) * BQ * Dp);
    if (a.dmask)
      memset(a.dmask + row_index(b, h, i0) * p.Lk, 0, sizeof(float) * nq * size_t(p.Lk));
    const float slope = p.has_alibi ? per_head(a.fwd.alibi, p.alibi_strides, b, h) : 0.0f;
    double dslope = 0.0;

    long kbeg, kend;
    visible_keys(p, sq, i0, i0 + nq, &kbeg, &kend);
    for (long j0 = kbeg; j0 < kend; j0 += BK) {
      const int nk = kend - j0 < BK ? int(kend - j0) : BK;
      load_keys(b, hk, j0, nk, kt, vt, km);
      scores(sq, b, h, i0, nq, j0, nk, slope, qf, dof, kt, vt, lse, del, s, dp, cap);
      for (int i = 0; i < nq; ++i) {
        const float* dsrow = dp + i * BK;
        if (a.dmask) memcpy(a.dmask + row_index(b, h, i0 + i) * p.Lk + j0, dsrow, sizeof(float) * nk);
        if (a.dalibi) {
          const long diag = i0 + i + sq.shift;
          for (int j = 0; j < nk; ++j) {
            const long dist = diag - (j0 + j);
            dslope -= double(dsrow[j]) * double(dist < 0 ? -dist : dist);
          }
        }
      }
      if (p.softcap > 0.0f) softcap_chain(nq, dp, cap);
      for_row_blocks(nq, [&]<int R>(int i) {
        pv_block<R>(dp + i * BK, BK, nullptr, km, Dp, nk, dqa + i * Dp);
      });
    }

    T* dq = static_cast<T*>(a.dq) + row_index(b, h, i0) * D;
    for (int i = 0; i < nq; ++i)
      for (int d = 0; d < D; ++d) dq[i * D + d] = from_float<T>(dqa[i * Dp + d] * p.scale);

    double dsink = 0.0;
    if (a.dsinks) { // d lse / d sink = P_sink; the sink carries no value
      const float sink = per_head(a.fwd.sinks, p.sinks_strides, b, h);
      for (int i = 0; i < nq; ++i) dsink -= double(expf(sink - lse[i])) * del[i];
    }
    float* part = partials + 2 * (size_t(b * p.Hq + h) * nqb + qb);
    part[0] = float(dslope);
    part[1] = float(dsink);
  }

  // --- dK/dV pass: key block kb of kv head hk in batch b. ---
  void dkv_task(int b, int hk, int kb) const {
    const Seq sq = seq_of(p, a.fwd.seqs, b);
    long j0;
    const int nk = block_rows(sq.krows_begin, sq.krows_end, kb, BK, &j0);
    if (nk == 0) return;
    const int D = p.D, Dv = p.Dv, Dp = pad16(D), dvp = pad16(Dv);
    float *kt, *vt, *dka, *dva, *pt, *dst, *qf, *dof, *s, *dp, *cap, *lse, *del;
    carve_scratch({{&kt, size_t(D) * BK}, {&vt, size_t(Dv) * BK}, {&dka, size_t(BK) * Dp},
                   {&dva, size_t(BK) * dvp}, {&pt, BK * BQ}, {&dst, BK * BQ},
                   {&qf, size_t(BQ) * Dp}, {&dof, size_t(BQ) * dvp}, {&s, BQ * BK},
                   {&dp, BQ * BK}, {&cap, BQ * BK}, {&lse, BQ}, {&del, BQ}});

    load_keys(b, hk, j0, nk, kt, vt, nullptr);
    memset(dka, 0, sizeof(float) * BK * Dp);
    memset(dva, 0, sizeof(float) * BK * dvp);
    long qbeg, qend;
    visible_queries(p, sq, j0, j0 + nk, &qbeg, &qend);
    for (int h = hk * p.gqa_ratio; h < (hk + 1) * p.gqa_ratio; ++h) {
      const float slope = p.has_alibi ? per_head(a.fwd.alibi, p.alibi_strides, b, h) : 0.0f;
      for (long i0 = qbeg; i0 < qend; i0 += BQ) {
        const int nq = qend - i0 < BQ ? int(qend - i0) : BQ;
        load_queries(b, h, i0, nq, qf, dof, lse, del);
        scores(sq, b, h, i0, nq, j0, nk, slope, qf, dof, kt, vt, lse, del, s, dp, cap);
        if (p.softcap > 0.0f) softcap_chain(nq, dp, cap);
        for (int i = 0; i < nq; ++i)
          for (int j = 0; j < nk; ++j) {
            pt[j * BQ + i] = s[i * BK + j];
            dst[j * BQ + i] = dp[i * BK + j];
          }
        for_row_blocks(nk, [&]<int R>(int j) {
          pv_block<R>(pt + j * BQ, BQ, nullptr, dof, dvp, nq, dva + j * dvp);
          pv_block<R>(dst + j * BQ, BQ, nullptr, qf, Dp, nq, dka + j * Dp);
        });
      }
    }
    const size_t kv_row = out_row(p, p.Hk, p.Lk, b, hk, j0);
    T* dk = static_cast<T*>(a.dk) + kv_row * D;
    T* dv = static_cast<T*>(a.dv) + kv_row * Dv;
    for (int j = 0; j < nk; ++j) {
      for (int d = 0; d < D; ++d) dk[j * D + d] = from_float<T>(dka[j * Dp + d]);
      for (int d = 0; d < Dv; ++d) dv[j * Dv + d] = from_float<T>(dva[j * dvp + d]);
    }
  }

  // Delta = rowsum(dO * O) - dLSE for the rows of batch b, head h.
  void delta_rows(int b, int h, float* out) const {
    const Seq sq = seq_of(p, a.fwd.seqs, b);
    for (long i = sq.qrows_begin; i < sq.qrows_end; ++i) {
      const T* o = static_cast<const T*>(a.fwd.out) + row_index(b, h, i) * p.Dv;
      const T* dorow = do_row(b, h, i);
      float acc = 0.0f;
      for (int d = 0; d < p.Dv; ++d) acc += to_float(dorow[d * p.do_strides[3]]) * to_float(o[d]);
      const float dl = a.dlse[b * p.dlse_strides[0] + h * p.dlse_strides[1] +
                              i * p.dlse_strides[2]];
      out[row_index(b, h, i)] = acc - dl;
    }
  }
};

template <typename F>
void parallel(int64_t n, const F& f) {
  parallel_for(n, [](void* ctx, int64_t i) { (*static_cast<const F*>(ctx))(i); },
               const_cast<F*>(&f));
}

template <typename T>
void run_backward(const BackwardArgs& a) {
  const FlashParams& p = *a.fwd.p;
  const int nqb = (p.max_rows_q + BQ - 1) / BQ, nkb = (p.max_rows_k + BK - 1) / BK;
  const int64_t nbh = int64_t(p.B) * p.Hq;
  float* delta = static_cast<float*>(malloc(sizeof(float) * (nbh * p.Lq + 2 * nbh * nqb + 1)));
  if (!delta) throw std::bad_alloc();
  Backward<T> bw{a, p, delta, delta + nbh * p.Lq, nqb};

  parallel(nbh, [&](int64_t bh) { bw.delta_rows(int(bh / p.Hq), int(bh % p.Hq), delta); });
  // Last query blocks first: under causal masks they see the most keys.
  parallel(nbh * nqb, [&](int64_t t) {
    const int64_t bh = t / nqb;
    bw.dq_task(int(bh / p.Hq), int(bh % p.Hq), nqb - 1 - int(t % nqb));
  });
  parallel(int64_t(p.B) * p.Hk * nkb, [&](int64_t t) {
    const int64_t bh = t / nkb;
    bw.dkv_task(int(bh / p.Hk), int(bh % p.Hk), int(t % nkb));
  });
  for (int64_t bh = 0; bh < nbh; ++bh) { // fixed-order reduction of the partials
    double d_alibi = 0.0, d_sink = 0.0;
    for (int qb = 0; qb < nqb; ++qb) {
      d_alibi += bw.partials[2 * (bh * nqb + qb)];
      d_sink += bw.partials[2 * (bh * nqb + qb) + 1];
    }
    if (a.dalibi) a.dalibi[bh] = float(d_alibi);
    if (a.dsinks) a.dsinks[bh] = float(d_sink);
  }
  free(delta);
}

} // namespace

void backward(const BackwardArgs& a) {
  switch (a.fwd.dtype) {
    case DType::f32: run_backward<float>(a); break;
    case DType::f16: run_backward<f16_t>(a); break;
    case DType::bf16: run_backward<bf16_t>(a); break;
  }
}

} // namespace FA_ISA
} // namespace flash_cpu
