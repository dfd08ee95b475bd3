// FlashAttention-2 backward on the CPU.
//
// With S = scale * Q K^T (then softcap, ALiBi, masks), P = exp(S - LSE) and
// Delta = rowsum(dO * O) - dLSE, the gradients are
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Delta)  (times tanh' under softcap),
//   dQ = scale * dS K,  dK = scale * dS^T Q.
// P is recomputed block by block from Q, K and the saved LSE, so memory stays
// O(L). Two passes keep every output owned by exactly one task, so results
// are bit-identical from run to run (no atomics, no racing accumulators):
//   - dQ pass, one task per (batch, query head, run of query blocks), also writing
//     the additive-mask gradient rows and per-task ALiBi/sink partial sums;
//   - dK/dV pass, one task per (batch, key/value head, key block), summing
//     over the query heads of its GQA group.
// The partial sums are reduced afterwards in a fixed order.

#include "kernel_common.h"

#if defined(FA_BF16_DOT)
#include "bf16_gemm.h"
#endif

namespace flash_cpu {
namespace FA_ISA {
namespace {

// Key blocks per dK/dV step of the fused pass (fused_task): Q, dO and the
// dQ sums are streamed in once for all of them. At long lengths they
// outgrow the caches (2 threads, d128: 4k keys non-causal 10%, 8k causal
// 15% faster than one block; no clear change at 256-2k keys).
constexpr int kFusedKeyBlocks = 4;
// Query blocks per dQ task of the two-pass backward, at most, for the same
// reason: K^T, V^T and K rows are streamed in once for all of them.
constexpr int kDqBlocks = 4;

inline int pad16(int n) {
  return (n + 15) / 16 * 16;
}

// Operands converted to float32 once (the FMA kernels), for K/V heads
// [kv_first, kv_first + wave) and their query heads (see run_backward): per
// K/V head K^T and V^T in panels of kw keys (convert_rows) and K rows (lkp
// x Dp); per query head Q times scale (lqp x Dp) and dO (lqp x dvp). Rows
// padded with zeros to a block multiple plus one block. kw = BK (one
// contiguous block per BK keys; a D x lkp matrix's rows lie on D pages at
// long lengths) unless packed sequences start key blocks anywhere (kw = lkp).
struct FloatPacks {
  int lkp, lqp, kw;
  int64_t kv_first, wave;
  float *kt, *vt, *km, *qf, *dof;
};

// bfloat16 operands packed for the dot-product GEMMs (bf16_gemm.h), in
// the builds that have them (amx, avx512bf16), for the K/V heads
// [kv_first, kv_first + wave) and their query heads (like FloatPacks):
// per K/V head K^T and V^T (transposed pairs) and K (row pairs); per query
// head Q and dO as plain rows and as row pairs. Rows are padded to a block
// multiple plus one block (tasks may start mid-block), D and Dv to 32.
struct Bf16Packs {
  int lkp, lqp, dp, dvp;
  int64_t kv_first, wave;
  uint16_t *kt, *vt, *kr, *qrow, *dorow, *qr, *dor;
  // Offsets of the wave's head `kv` / `qh` (counted from the wave's first)
  // in the packs.
  size_t key_d(size_t kv) const { return kv * lkp * dp; }     // kt, kr
  size_t key_dv(size_t kv) const { return kv * lkp * dvp; }   // vt
  size_t query_d(size_t qh) const { return qh * lqp * dp; }   // qrow, qr
  size_t query_dv(size_t qh) const { return qh * lqp * dvp; } // dorow, dor
};

template <typename T>
struct Backward {
  const BackwardArgs& a;
  const FlashParams& p;
  const float* delta; // (B, Hq, Lq)
  float* partials;    // (B, Hq, nqb, 2): ALiBi and sink gradient sums per dQ task
  int nqb;            // query blocks per (batch, head)
  const Bf16Packs* bf; // bfloat16 with dot products: the packed operands; else null
  const FloatPacks* fp; // otherwise: the float32 operands

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
  // The ALiBi and sink partial sums of dQ task (batch b, head h, block qb).
  float* partial(int b, int h, int qb) const {
    return partials + 2 * (size_t(b * p.Hq + h) * nqb + qb);
  }

  // The LSE and Delta of rows [i0, i0 + nq) of head h and, with the float32
  // packs, their Q (scaled) and dO rows.
  void query_rows(int b, int h, long i0, int nq, const float*& qf, const float*& dof, float* lse,
                  float* del) const {
    if (fp) {
      const size_t qh = size_t(p.packed ? 0 : b) * p.Hq + h - fp->kv_first * p.gqa_ratio;
      qf = fp->qf + (qh * fp->lqp + i0) * pad16(p.D);
      dof = fp->dof + (qh * fp->lqp + i0) * pad16(p.Dv);
    }
    for (int i = 0; i < nq; ++i) {
      lse[i] = a.fwd.lse[row_index(b, h, i0 + i)];
      del[i] = delta[row_index(b, h, i0 + i)];
    }
  }
  // K^T, V^T (in panels of fp->kw keys) and K rows from key j0 of K/V head hk.
  void key_cols(int b, int hk, long j0, const float*& kt, const float*& vt,
                const float*& km) const {
    const size_t kv = size_t(p.packed ? 0 : b) * p.Hk + hk - fp->kv_first;
    kt = transposed_at(fp->kt + kv * fp->lkp * p.D, j0, fp->kw, p.D);
    vt = transposed_at(fp->vt + kv * fp->lkp * p.Dv, j0, fp->kw, p.Dv);
    km = fp->km + (kv * fp->lkp + j0) * pad16(p.D);
  }

  // S = Qs K^T and dP = dO V^T for one (query block, key block) pair (each
  // register block of rows only the keys it sees, visible_cols), then
  // S -> P and dP -> dS (the gradient of the score after softcap, i.e. of
  // the biases and additive mask). cap keeps the capped scores for tanh'.
  void scores(const Seq& sq, int b, int h, long i0, int nq, long j0, int nk, float slope,
              const float* qf, const float* dof, const float* kt, const float* vt, int kw,
              const float* lse, const float* del, float* s, float* dp, float* cap) const {
    const int Dp = pad16(p.D), dvp = pad16(p.Dv);
    for_row_blocks(nq, [&]<int R>(int i) {
      int c0, c1;
      visible_cols(p, sq, i0 + i, i0 + i + R, j0, nk, 16 * CHUNK, &c0, &c1);
      qk_rows<R>(qf + i * Dp, Dp, kt, kw, p.D, s + i * BK, c0, c1);
      qk_rows<R>(dof + i * dvp, dvp, vt, kw, p.Dv, dp + i * BK, c0, c1);
    });
    probabilities(sq, b, h, i0, nq, j0, nk, slope, lse, del, s, dp, cap);
  }

  // From S (scaled scores) and dP = dO V^T of a block: P (times dropout)
  // over S and dS over dP.
  void probabilities(const Seq& sq, int b, int h, long i0, int nq, long j0, int nk, float slope,
                     const float* lse, const float* del, float* s, float* dp, float* cap) const {
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

  // dQ rows [i, i + R) of the block of query rows from i0 (dqa, row stride
  // Dp) += dS K over the keys of block [j0, j0 + nk) they see (dS is 0 at
  // the others); K rows km from key j0.
  template <int R>
  FA_GEMM void dq_rows(const Seq& sq, long i0, int i, long j0, int nk, const float* ds,
                       const float* km, float* dqa) const {
    const int Dp = pad16(p.D);
    int c0, c1;
    visible_cols(p, sq, i0 + i, i0 + i + R, j0, nk, 1, &c0, &c1);
    pv_block<R>(ds + i * BK + c0, BK, 1, nullptr, km + c0 * Dp, Dp, 16, Dp, c1 - c0, dqa + i * Dp);
  }

#if defined(FA_BF16_DOT)
  // The bfloat16 operands of one block of query rows [i0, i0 + nq) of head h.
  struct Bf16Block {
    size_t qh, kv;  // query head and K/V head in the packs
    uint16_t* ds16; // BQ x BK bfloat16 scratch, zero past the block's rows
  };
  Bf16Block bf16_block(int b, int h, int hk, float* scratch) const {
    Bf16Block ab{size_t(p.packed ? 0 : b) * p.Hq + h - bf->kv_first * p.gqa_ratio,
                 size_t(p.packed ? 0 : b) * p.Hk + hk - bf->kv_first,
                 reinterpret_cast<uint16_t*>(scratch)};
    memset(ab.ds16, 0, sizeof(uint16_t) * BQ * BK);
    tiles_begin();
    return ab;
  }
  // The span (see bf16_gemm.h) of the keys [j0, j0 + nk) that query rows
  // i0 + [r, r + R) see, in chunks of w.
  auto seen_keys(const Seq& sq, long i0, long j0, int nk, int w) const {
    return [this, &sq, i0, j0, nk, w](int r, int R, int* k0, int* k1) {
      visible_cols(p, sq, i0 + r, i0 + r + R, j0, nk, w, k0, k1);
    };
  }
  // S (scaled) and dP = dO V^T of nq query rows from i0 of query head qh
  // and keys [j0, j0 + BK) of K/V head kv, nk of them in the sequence.
  void bf16_scores(const Seq& sq, size_t qh, size_t kv, long i0, int nq, long j0, int nk,
                   float* s, float* dp) const {
    gemm_abt(bf->qrow + bf->query_d(qh) + size_t(i0) * bf->dp, nq, bf->dp, bf->dp,
             bf->kt + bf->key_d(kv), bf->lkp, j0, p.scale, s, seen_keys(sq, i0, j0, nk, 16));
    gemm_abt(bf->dorow + bf->query_dv(qh) + size_t(i0) * bf->dvp, nq, bf->dvp, bf->dvp,
             bf->vt + bf->key_dv(kv), bf->lkp, j0, 1.0f, dp, seen_keys(sq, i0, j0, nk, 16));
  }
#endif

  // The gradients that dS (the score gradient before softcap's chain rule)
  // gives directly: the additive mask's block, and the ALiBi slope's sum.
  void score_grads(const Seq& sq, int b, int h, long i0, int nq, long j0, int nk, const float* dp,
                   double* dslope) const {
    for (int i = 0; i < nq; ++i) {
      const float* dsrow = dp + i * BK;
      if (a.dmask) memcpy(a.dmask + row_index(b, h, i0 + i) * p.Lk + j0, dsrow, sizeof(float) * nk);
      if (a.dalibi) {
        const long diag = i0 + i + sq.shift;
        for (int j = 0; j < nk; ++j) {
          const long dist = diag - (j0 + j);
          *dslope -= double(dsrow[j]) * double(dist < 0 ? -dist : dist);
        }
      }
    }
  }

  // dQ (times scale) of rows [i0, i0 + nq) of head h from float32 sums,
  // the sink gradient of those rows, and the task's ALiBi/sink partials.
  void write_dq(int b, int h, long i0, int nq, const float* dqa, const float* lse,
                const float* del, double dslope, int qb) const {
    const int D = p.D, Dp = pad16(D);
    T* dq = static_cast<T*>(a.dq) + row_index(b, h, i0) * D;
    for (int i = 0; i < nq; ++i)
      store_row(dqa + i * Dp, D, p.scale, dq + i * D);
    double dsink = 0.0;
    if (a.dsinks) { // d lse / d sink = P_sink; the sink carries no value
      const float sink = per_head(a.fwd.sinks, p.sinks_strides, b, h);
      for (int i = 0; i < nq; ++i) dsink -= double(expf(sink - lse[i])) * del[i];
    }
    float* part = partial(b, h, qb);
    part[0] = float(dslope);
    part[1] = float(dsink);
  }

  // --- dQ pass: query blocks [qt * nqs, qt * nqs + nqs) of head h in batch
  // b (nqs = 1 with bfloat16 dot products). Each key block any of them sees is taken once and
  // used by each block that sees some key of it. ---
  void dq_task(int b, int h, int qt, int nqs) const {
    const Seq sq = seq_of(p, a.fwd.seqs, b);
    const int hk = h / p.gqa_ratio;
    const int Dp = pad16(p.D);
    float *dqa, *s, *dp, *cap, *lse, *del, *tmp, *ds;
    carve_scratch({{&dqa, size_t(nqs) * BQ * Dp}, {&s, BQ * BK}, {&dp, BQ * BK},
                   {&cap, BQ * BK}, {&lse, size_t(nqs) * BQ}, {&del, size_t(nqs) * BQ},
                   {&tmp, bf ? size_t(BQ) * bf->dp : 0}, {&ds, bf ? size_t(BQ) * BK / 2 : 0}});
    // Query block t: rows [i0, i0 + nq), its Q and dO, keys [kbeg, kend) it
    // may see, its ALiBi slope sum; its dQ sums, LSE and Delta at t * BQ.
    struct QBlock {
      long i0, kbeg, kend;
      int nq;
      const float *qf, *dof;
      double dslope;
    };
    QBlock blk[kDqBlocks];
    int nb = 0;
    long kbeg = 0, kend = 0; // keys any block sees
    for (; nb < nqs; ++nb) {
      QBlock& q = blk[nb];
      q.nq = block_rows(sq.qrows_begin, sq.qrows_end, qt * nqs + nb, BQ, &q.i0);
      if (q.nq == 0) break; // past a short packed sequence (its partials stay 0)
      q.qf = q.dof = nullptr;
      q.dslope = 0.0;
      query_rows(b, h, q.i0, q.nq, q.qf, q.dof, lse + nb * BQ, del + nb * BQ);
      if (a.dmask)
        memset(a.dmask + row_index(b, h, q.i0) * p.Lk, 0, sizeof(float) * q.nq * size_t(p.Lk));
      visible_keys(p, sq, q.i0, q.i0 + q.nq, &q.kbeg, &q.kend);
      // bfloat16 packs and K^T in BK-key panels are read by whole blocks: blocks
      // start at multiples of BK, the per-row masks hide the keys outside
      // [kbeg, kend).
      if (bf || fp->kw == BK) q.kbeg = q.kbeg / BK * BK;
      widen(q.kbeg, q.kend, &kbeg, &kend);
    }
    if (nb == 0) return;
    memset(dqa, 0, sizeof(float) * nb * BQ * Dp);
    const float slope = p.has_alibi ? per_head(a.fwd.alibi, p.alibi_strides, b, h) : 0.0f;
#if defined(FA_BF16_DOT)
    const Bf16Block ab = bf ? bf16_block(b, h, hk, ds) : Bf16Block{};
#endif
    for (long j0 = kbeg; j0 < kend; j0 += BK) {
      // Keys past a block's own range are hidden by its rows' masks (bfloat16 packs:
      // whole blocks up to Lk, as packed).
      const long last = bf ? p.Lk : kend;
      const int nk = last - j0 < BK ? int(last - j0) : BK;
      const float *kt = nullptr, *vt = nullptr, *km = nullptr;
      if (!bf) key_cols(b, hk, j0, kt, vt, km);
      for (int t = 0; t < nb; ++t) {
        QBlock& q = blk[t];
        if (!ranges_meet(j0, j0 + nk, q.kbeg, q.kend)) continue;
        float *qdqa = dqa + t * BQ * Dp, *qlse = lse + t * BQ, *qdel = del + t * BQ;
#if defined(FA_BF16_DOT)
        if (bf) {
          bf16_scores(sq, ab.qh, ab.kv, q.i0, q.nq, j0, nk, s, dp);
          probabilities(sq, b, h, q.i0, q.nq, j0, nk, slope, qlse, qdel, s, dp, cap);
        } else
#endif
        {
          scores(sq, b, h, q.i0, q.nq, j0, nk, slope, q.qf, q.dof, kt, vt, fp->kw, qlse, qdel, s,
                 dp, cap);
        }
        score_grads(sq, b, h, q.i0, q.nq, j0, nk, dp, &q.dslope);
        if (p.softcap > 0.0f) softcap_chain(q.nq, dp, cap);
#if defined(FA_BF16_DOT)
        if (bf) { // dQ += dS K
          for (int i = 0; i < q.nq; ++i) to_bf16(dp + i * BK, BK, ab.ds16 + i * BK);
          gemm_ab_add(ab.ds16, q.nq, bf->kr + bf->key_d(ab.kv), bf->dp, j0, Dp, nullptr, qdqa, Dp,
                      tmp, seen_keys(sq, q.i0, j0, nk, 2));
          continue;
        }
#endif
        for_row_blocks(q.nq, [&]<int R>(int i) { dq_rows<R>(sq, q.i0, i, j0, nk, dp, km, qdqa); });
      }
    }
#if defined(FA_BF16_DOT)
    if (bf) tiles_end();
#endif
    for (int t = 0; t < nb; ++t)
      write_dq(b, h, blk[t].i0, blk[t].nq, dqa + t * BQ * Dp, lse + t * BQ, del + t * BQ,
               blk[t].dslope, qt * nqs + t);
  }

  // --- dK/dV pass: key blocks [kb * nkb, kb * nkb + nkb) of kv head hk in
  // batch b (nkb > 1 only in the fused pass), each block of query rows
  // used by all of them in turn. In the fused pass (fused_task) also dQ +=
  // dS K into dqa (the task's query heads x rows from row0, see Fused) and
  // the score gradients. ---
  struct Fused {
    float* dqa;
    double* dslope; // per query head of the group
    long row0, rows;
  };
  void dkv_task(int b, int hk, int kb, int nkb, const Fused* fz = nullptr) const {
    const Seq sq = seq_of(p, a.fwd.seqs, b);
    // bfloat16: key blocks start on an even row, where K's packed pairs do
    // (the fused dQ += dS K reads them from the block's first key): a
    // packed sequence's odd first row brings in its neighbour's last,
    // whose P and dS are 0 here and whose dK and dV are not written.
    const long kbegin = bf ? sq.krows_begin / 2 * 2 : sq.krows_begin;
    long j0;
    const int nk = block_rows(kbegin, sq.krows_end, kb, nkb * BK, &j0);
    if (nk == 0 || j0 + nk <= sq.krows_begin) return;
    const int D = p.D, Dv = p.Dv, Dp = pad16(D), dvp = pad16(Dv);
    float *dka, *dva, *s, *dp, *cap, *lse, *del, *tmp, *pd16;
    const size_t cols16 = bf ? size_t(bf->dp > bf->dvp ? bf->dp : bf->dvp) : 0;
    const size_t blocks16 = bf ? size_t(BK) * BQ * 3 / 2 : 0; // floats for 3 bfloat16 blocks
    carve_scratch({{&dka, size_t(nk) * Dp}, {&dva, size_t(nk) * dvp}, {&s, BQ * BK},
                   {&dp, BQ * BK}, {&cap, BQ * BK}, {&lse, BQ}, {&del, BQ},
                   {&tmp, BK * cols16}, {&pd16, blocks16}});
    const float *qf = nullptr, *dof = nullptr;

    memset(dka, 0, sizeof(float) * nk * Dp);
    memset(dva, 0, sizeof(float) * nk * dvp);
    long qbeg, qend;
    visible_queries(p, sq, j0, j0 + nk, &qbeg, &qend);
#if defined(FA_BF16_DOT)
    if (bf)
      return dkv_task_bf16(b, hk, sq, j0, nk, qbeg, qend, dka, dva,
                           {s, dp, cap, lse, del, tmp, reinterpret_cast<uint16_t*>(pd16)},
                           fz);
#endif
    for (int h = hk * p.gqa_ratio; h < (hk + 1) * p.gqa_ratio; ++h) {
      const float slope = p.has_alibi ? per_head(a.fwd.alibi, p.alibi_strides, b, h) : 0.0f;
      const int hh = h - hk * p.gqa_ratio;
      for (long i0 = qbeg; i0 < qend; i0 += BQ) {
        const int nq = qend - i0 < BQ ? int(qend - i0) : BQ;
        query_rows(b, h, i0, nq, qf, dof, lse, del);
        long kbeg, kend; // keys these rows may see: blocks outside are skipped
        visible_keys(p, sq, i0, i0 + nq, &kbeg, &kend);
        for (int jb = 0; jb < nk; jb += BK) {
          const int nkj = nk - jb < BK ? nk - jb : BK;
          if (!ranges_meet(j0 + jb, j0 + jb + nkj, kbeg, kend)) continue;
          const float *kt, *vt, *km;
          key_cols(b, hk, j0 + jb, kt, vt, km);
          scores(sq, b, h, i0, nq, j0 + jb, nkj, slope, qf, dof, kt, vt, fp->kw, lse, del, s, dp,
                 cap);
          if (fz) score_grads(sq, b, h, i0, nq, j0 + jb, nkj, dp, fz->dslope + hh);
          if (p.softcap > 0.0f) softcap_chain(nq, dp, cap);
          // dV += P^T dO and dK += dS^T Q, reading P and dS transposed.
          float *dvj = dva + jb * dvp, *dkj = dka + jb * Dp;
          for_row_blocks(nkj, [&]<int R>(int j) {
            long qbeg, qend; // the rows that see keys [j, j + R): P and dS are 0 elsewhere
            visible_queries(p, sq, j0 + jb + j, j0 + jb + j + R, &qbeg, &qend);
            int r0, r1;
            block_span(qbeg, qend, i0, nq, 1, &r0, &r1);
            pv_block<R>(s + r0 * BK + j, 1, BK, nullptr, dof + r0 * dvp, dvp, 16, dvp, r1 - r0,
                        dvj + j * dvp);
            pv_block<R>(dp + r0 * BK + j, 1, BK, nullptr, qf + r0 * Dp, Dp, 16, Dp, r1 - r0,
                        dkj + j * Dp);
          });
          if (fz) {
            float* dqa = fz->dqa + (hh * fz->rows + (i0 - fz->row0)) * Dp;
            for_row_blocks(nq, [&]<int R>(int i) {
              dq_rows<R>(sq, i0, i, j0 + jb, nkj, dp, km, dqa);
            });
          }
        }
      }
    }
    write_dkv(b, hk, j0, nk, dka, dva, 1.0f);
  }

  // --- Fused pass: every key block of K/V head hk in batch b, dQ of its
  // query heads summed over them in one buffer: 5 block GEMMs per (query,
  // key) block pair instead of the two passes' 7, with no atomics (the
  // task owns those dQ rows). With enough heads to keep the cores busy
  // (run_backward). ---
  void fused_task(int b, int hk, int nkb) const {
    const Seq sq = seq_of(p, a.fwd.seqs, b);
    // The bfloat16 packs' query blocks are aligned to BQ: with packed
    // sequences one may start before this sequence's rows. Those rows'
    // dS is 0 (they see none of its keys): dqa has room for them.
    const long row0 = bf ? sq.qrows_begin / BQ * BQ : sq.qrows_begin;
    const long rows = sq.qrows_end - row0;
    const int g = p.gqa_ratio, Dp = pad16(p.D);
    float* dqa = alloc_aligned<float>(size_t(g) * rows * Dp + 1);
    double* dslope = alloc_aligned<double>(g);
    memset(dqa, 0, sizeof(float) * size_t(g) * rows * Dp);
    for (int hh = 0; hh < g; ++hh) {
      dslope[hh] = 0.0;
      if (a.dmask)
        memset(a.dmask + row_index(b, hk * g + hh, sq.qrows_begin) * p.Lk, 0,
               sizeof(float) * size_t(sq.qrows_end - sq.qrows_begin) * p.Lk);
    }
    const Fused fz{dqa, dslope, row0, rows};
    for (int kb = 0; kb * kFusedKeyBlocks < nkb; ++kb) dkv_task(b, hk, kb, kFusedKeyBlocks, &fz);
    float lse[BQ], del[BQ];
    for (int hh = 0; hh < g; ++hh) {
      const int h = hk * g + hh;
      for (int qb = 0; qb < nqb; ++qb) { // the dQ pass's blocks, partials per block
        long i0;
        const int nq = block_rows(sq.qrows_begin, sq.qrows_end, qb, BQ, &i0);
        const float *unused_q, *unused_do;
        if (nq == 0) continue;
        query_rows(b, h, i0, nq, unused_q, unused_do, lse, del);
        write_dq(b, h, i0, nq, dqa + (hh * rows + (i0 - row0)) * Dp, lse, del,
                 qb == 0 ? dslope[hh] : 0.0, qb);
      }
    }
    free(dslope);
    free(dqa);
  }

  // dK (times dk_scale) and dV of keys [j0, j0 + nk) of K/V head hk.
  void write_dkv(int b, int hk, long j0, int nk, const float* dka, const float* dva,
                 float dk_scale) const {
    const int D = p.D, Dv = p.Dv, Dp = pad16(D), dvp = pad16(Dv);
    const size_t kv_row = out_row(p, p.Hk, p.Lk, b, hk, j0);
    T* dk = static_cast<T*>(a.dk) + kv_row * D;
    T* dv = static_cast<T*>(a.dv) + kv_row * Dv;
    for (int j = 0; j < nk; ++j) {
      store_row(dka + j * Dp, D, dk_scale, dk + j * D);
      store_row(dva + j * dvp, Dv, 1.0f, dv + j * Dv);
    }
  }

#if defined(FA_BF16_DOT)
  // The dK/dV task with bfloat16 dot products: query blocks aligned to BQ
  // (Q and dO are read in pairs of rows); per key block, S and dP as in
  // the dQ pass, then P^T and dS^T (rounded and transposed in registers) times the
  // packed dO and Q, and in the fused pass dQ += dS K.
  // The dK/dV task's scratch: float32 blocks, tmp (BK x the wider padded
  // head dim) and three bfloat16 blocks: P^T, dS^T (BK x BQ) and dS (BQ x BK).
  struct DkvScratch {
    float *s, *dp, *cap, *lse, *del, *tmp;
    uint16_t* pd16;
  };
  // Rounds 4 runs of 8 floats to bfloat16, into 8 elements at each of
  // out[0], out[step], out[2 step], out[3 step].
  static void round4x8(const vf8* r, uint16_t* out, int step) {
    const __m512i h = to_bf16x32(
        _mm512_insertf32x8(_mm512_castps256_ps512(__m256(r[0])), __m256(r[1]), 1),
        _mm512_insertf32x8(_mm512_castps256_ps512(__m256(r[2])), __m256(r[3]), 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_extracti32x4_epi32(h, 0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + step), _mm512_extracti32x4_epi32(h, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * step), _mm512_extracti32x4_epi32(h, 2));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 3 * step), _mm512_extracti32x4_epi32(h, 3));
  }
  // x (nq x BK, rows past nq taken as 0) rounded to bfloat16: transposed
  // into xt (BK x BQ) and, unless null, as rows into xr (BQ x BK); by 8 x 8
  // blocks in registers, with no float32 copy.
  static void round_transpose(const float* x, int nq, uint16_t* xt, uint16_t* xr) {
    for (int i0 = 0; i0 < BQ; i0 += 8)
      for (int j0 = 0; j0 < BK; j0 += 8) {
        vf8 r[8];
        for (int t = 0; t < 8; ++t)
          if (i0 + t < nq)
            memcpy(&r[t], x + (i0 + t) * BK + j0, sizeof(vf8));
          else
            r[t] = vf8{};
        if (xr)
          for (int t = 0; t < 8; t += 4) round4x8(r + t, xr + (i0 + t) * BK + j0, BK);
        transpose8(r);
        for (int k = 0; k < 8; k += 4) round4x8(r + k, xt + (j0 + k) * BQ + i0, BQ);
      }
  }
  void dkv_task_bf16(int b, int hk, const Seq& sq, long j0, int nk, long qbeg, long qend,
                     float* dka, float* dva, const DkvScratch& w, const Fused* fz) const {
    float *s = w.s, *dp = w.dp, *cap = w.cap, *lse = w.lse, *del = w.del, *tmp = w.tmp;
    uint16_t *pt16 = w.pd16, *dst16 = w.pd16 + BK * BQ, *ds16 = w.pd16 + 2 * BK * BQ;
    const int Dp = pad16(p.D), dvp = pad16(p.Dv);
    const size_t kv = size_t(p.packed ? 0 : b) * p.Hk + hk - bf->kv_first;
    tiles_begin();
    for (int h = hk * p.gqa_ratio; h < (hk + 1) * p.gqa_ratio; ++h) {
      const float slope = p.has_alibi ? per_head(a.fwd.alibi, p.alibi_strides, b, h) : 0.0f;
      const int hh = h - hk * p.gqa_ratio;
      const size_t qh = size_t(p.packed ? 0 : b) * p.Hq + h - bf->kv_first * p.gqa_ratio;
      for (long i0 = qbeg / BQ * BQ; i0 < qend; i0 += BQ) {
        const int nq = qend - i0 < BQ ? int(qend - i0) : BQ;
        const float *unused_q, *unused_do; // the packs hold Q and dO here
        query_rows(b, h, i0, nq, unused_q, unused_do, lse, del);
        long kbeg, kend; // keys these rows may see: blocks outside are skipped
        visible_keys(p, sq, i0, i0 + nq, &kbeg, &kend);
        for (int jb = 0; jb < nk; jb += BK) {
          const long jj = j0 + jb;
          const int nkj = nk - jb < BK ? nk - jb : BK;
          if (!ranges_meet(jj, jj + nkj, kbeg, kend)) continue;
          bf16_scores(sq, qh, kv, i0, nq, jj, nkj, s, dp);
          probabilities(sq, b, h, i0, nq, jj, nkj, slope, lse, del, s, dp, cap);
          if (fz) score_grads(sq, b, h, i0, nq, jj, nkj, dp, fz->dslope + hh);
          if (p.softcap > 0.0f) softcap_chain(nq, dp, cap);
          round_transpose(s, nq, pt16, nullptr);
          round_transpose(dp, nq, dst16, fz ? ds16 : nullptr);
          // dV += (P z)^T dO, dK += dS^T Q, over the queries that see each
          // register block's keys (P and dS are 0 elsewhere).
          auto seen_by = [&](int r, int R, int* r0, int* r1) {
            long qb, qe;
            visible_queries(p, sq, jj + r, jj + r + R, &qb, &qe);
            block_span(qb, qe, i0, nq, 2, r0, r1);
          };
          gemm_ab_add(pt16, nkj, bf->dor + bf->query_dv(qh), bf->dvp, i0, dvp, nullptr,
                      dva + jb * dvp, dvp, tmp, seen_by);
          gemm_ab_add(dst16, nkj, bf->qr + bf->query_d(qh), bf->dp, i0, Dp, nullptr,
                      dka + jb * Dp, Dp, tmp, seen_by);
          if (fz) { // dQ += dS K
            float* dqa = fz->dqa + (hh * fz->rows + (i0 - fz->row0)) * Dp;
            gemm_ab_add(ds16, nq, bf->kr + bf->key_d(kv), bf->dp, jj, Dp, nullptr, dqa, Dp, tmp,
                        seen_keys(sq, i0, jj, nkj, 2));
          }
        }
      }
    }
    tiles_end();
    const int lead = j0 < sq.krows_begin ? int(sq.krows_begin - j0) : 0; // see dkv_task
    write_dkv(b, hk, j0 + lead, nk - lead, dka + lead * Dp, dva + lead * dvp,
              p.scale); // Q was not scaled here
  }
#endif

  // Delta = rowsum(dO * O) - dLSE for the rows of batch b, head h.
  void delta_rows(int b, int h, float* out) const {
    const Seq sq = seq_of(p, a.fwd.seqs, b);
    for (long i = sq.qrows_begin; i < sq.qrows_end; ++i) {
      const T* o = static_cast<const T*>(a.fwd.out) + row_index(b, h, i) * p.Dv;
      const T* dorow = do_row(b, h, i);
      // dO's row as float32 (any stride: a broadcast dO, from a sum's
      // gradient, sums in the same order), then 16 partial sums (one serial
      // chain of adds was 2% of a causal 1024-token bfloat16 backward).
      float dof[FA_MAX_HEAD_DIM];
      load_row(dorow, p.do_strides[3], p.Dv, 1.0f, dof);
      vf16 part = vf16{};
      int d = 0;
      for (; d + 16 <= p.Dv; d += 16) part += load16(dof + d) * load16(o + d);
      float acc = hsum(part);
      for (; d < p.Dv; ++d) acc += dof[d] * to_float(o[d]);
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

#if defined(FA_BF16_DOT)
// Sets pk's sizes; returns the bytes of one K/V head's packs with its
// query heads'.
size_t size_packs(const FlashParams& p, Bf16Packs& pk) {
  pk.lkp = round_up(p.Lk, BK) + BK;
  pk.lqp = round_up(p.Lq, BQ) + BQ;
  pk.dp = round_up(p.D, 32);
  pk.dvp = round_up(p.Dv, 32);
  const size_t key = 2 * pk.key_d(1) + pk.key_dv(1);
  const size_t query = size_t(p.gqa_ratio) * (2 * pk.query_d(1) + 2 * pk.query_dv(1));
  return (key + query) * sizeof(uint16_t);
}
// Packs the bfloat16 operands of item i of K/V heads [pk.kv_first,
// pk.kv_first + n) and their query heads: K/V head i, or query head i - n.
void copy_operands(const BackwardArgs& a, const Bf16Packs& pk, int64_t n, int64_t i) {
  const FlashParams& p = *a.fwd.p;
  if (i < n) {
    const int64_t kv = pk.kv_first + i;
    const int b = int(kv / p.Hk), hk = int(kv % p.Hk);
    const uint16_t* k = static_cast<const uint16_t*>(a.fwd.k) + b * p.k_strides[0] + hk * p.k_strides[1];
    const uint16_t* v = static_cast<const uint16_t*>(a.fwd.v) + b * p.v_strides[0] + hk * p.v_strides[1];
    pack_transposed_pairs(k, p.Lk, p.D, p.k_strides[2], p.k_strides[3], pk.lkp, pk.dp, pk.kt + pk.key_d(i));
    pack_row_pairs(k, p.Lk, p.D, p.k_strides[2], p.k_strides[3], pk.lkp, pk.dp, pk.kr + pk.key_d(i));
    pack_transposed_pairs(v, p.Lk, p.Dv, p.v_strides[2], p.v_strides[3], pk.lkp, pk.dvp, pk.vt + pk.key_dv(i));
  } else {
    const int64_t j = i - n, qh = pk.kv_first * p.gqa_ratio + j;
    const int b = int(qh / p.Hq), h = int(qh % p.Hq);
    const uint16_t* q = static_cast<const uint16_t*>(a.fwd.q) + b * p.q_strides[0] + h * p.q_strides[1];
    const uint16_t* d = static_cast<const uint16_t*>(a.dout) + b * p.do_strides[0] + h * p.do_strides[1];
    pack_rows(q, p.Lq, p.D, p.q_strides[2], p.q_strides[3], pk.lqp, pk.dp, pk.qrow + pk.query_d(j));
    pack_row_pairs(q, p.Lq, p.D, p.q_strides[2], p.q_strides[3], pk.lqp, pk.dp, pk.qr + pk.query_d(j));
    pack_rows(d, p.Lq, p.Dv, p.do_strides[2], p.do_strides[3], pk.lqp, pk.dvp, pk.dorow + pk.query_dv(j));
    pack_row_pairs(d, p.Lq, p.Dv, p.do_strides[2], p.do_strides[3], pk.lqp, pk.dvp, pk.dor + pk.query_dv(j));
  }
}
#endif

// Points pk's packs into buf, for pk.wave K/V heads from pk.kv_first.
void place_packs(const FlashParams& p, Bf16Packs& pk, void* buf) {
  const int64_t nq = pk.wave * p.gqa_ratio;
  pk.kt = static_cast<uint16_t*>(buf);
  pk.kr = pk.kt + pk.key_d(pk.wave);
  pk.vt = pk.kr + pk.key_d(pk.wave);
  pk.qrow = pk.vt + pk.key_dv(pk.wave);
  pk.qr = pk.qrow + pk.query_d(nq);
  pk.dorow = pk.qr + pk.query_d(nq);
  pk.dor = pk.dorow + pk.query_dv(nq);
}

// Converts the backward's operands of item i of K/V heads [fp.kv_first,
// fp.kv_first + n) and their query heads to float32: K/V head i, or query
// head i - n. A K/V head's query heads are contiguous: (batch, K/V head)
// i has query heads [i * gqa_ratio, (i + 1) * gqa_ratio) of (batch, head),
// packed or not.
template <typename T>
void copy_operands(const BackwardArgs& a, const FloatPacks& fp, int64_t n, int64_t i) {
  const FlashParams& p = *a.fwd.p;
  const int Dp = pad16(p.D), dvp = pad16(p.Dv);
  if (i < n) {
    const int64_t kv = fp.kv_first + i;
    const int b = int(kv / p.Hk), hk = int(kv % p.Hk);
    convert_rows(static_cast<const T*>(a.fwd.k) + b * p.k_strides[0] + hk * p.k_strides[1], p.Lk,
                 p.D, p.k_strides[2], p.k_strides[3], 1.0f, fp.lkp,
                 fp.kt + i * size_t(fp.lkp) * p.D, fp.kw, fp.km + i * size_t(fp.lkp) * Dp, Dp);
    convert_rows(static_cast<const T*>(a.fwd.v) + b * p.v_strides[0] + hk * p.v_strides[1], p.Lk,
                 p.Dv, p.v_strides[2], p.v_strides[3], 1.0f, fp.lkp,
                 fp.vt + i * size_t(fp.lkp) * p.Dv, fp.kw, nullptr, 0);
  } else {
    const int64_t j = i - n, qh = fp.kv_first * p.gqa_ratio + j;
    const int b = int(qh / p.Hq), h = int(qh % p.Hq);
    convert_rows(static_cast<const T*>(a.fwd.q) + b * p.q_strides[0] + h * p.q_strides[1], p.Lq,
                 p.D, p.q_strides[2], p.q_strides[3], p.scale, fp.lqp, nullptr, 0,
                 fp.qf + j * size_t(fp.lqp) * Dp, Dp);
    convert_rows(static_cast<const T*>(a.dout) + b * p.do_strides[0] + h * p.do_strides[1], p.Lq,
                 p.Dv, p.do_strides[2], p.do_strides[3], 1.0f, fp.lqp, nullptr, 0,
                 fp.dof + j * size_t(fp.lqp) * dvp, dvp);
  }
}

// Sets fp's sizes; returns the bytes of one K/V head's copies with its
// query heads'.
size_t size_packs(const FlashParams& p, FloatPacks& fp) {
  const int Dp = pad16(p.D), dvp = pad16(p.Dv);
  fp.lkp = (p.Lk + BK - 1) / BK * BK + BK;
  fp.kw = p.packed ? fp.lkp : BK;
  fp.lqp = (p.Lq + BQ - 1) / BQ * BQ + BQ;
  const size_t key_floats = size_t(fp.lkp) * (p.D + p.Dv + Dp);
  const size_t query_floats = size_t(fp.lqp) * (Dp + dvp) * p.gqa_ratio;
  return (key_floats + query_floats) * sizeof(float);
}
// Points fp's copies into buf, for fp.wave K/V heads from fp.kv_first.
void place_packs(const FlashParams& p, FloatPacks& fp, void* buf) {
  const int Dp = pad16(p.D);
  fp.kt = static_cast<float*>(buf);
  fp.vt = fp.kt + fp.wave * size_t(fp.lkp) * p.D;
  fp.km = fp.vt + fp.wave * size_t(fp.lkp) * p.Dv;
  fp.qf = fp.km + fp.wave * size_t(fp.lkp) * Dp;
  fp.dof = fp.qf + fp.wave * p.gqa_ratio * size_t(fp.lqp) * Dp;
}

// The backward of K/V heads [first, first + n) (for each, every packed
// sequence): one fused task per head (fused), or the dQ tasks, last query
// blocks first (under causal masks they see the most keys), then the dK/dV
// tasks.
template <typename T>
void run_heads(const Backward<T>& bw, int64_t first, int64_t n, int nkb, bool fused) {
  const FlashParams& p = bw.p;
  const int nseq = p.packed ? p.B : 1, nqb = bw.nqb;
  if (fused) {
    parallel(n * nseq, [&](int64_t t) {
      const int64_t kv = first + t / nseq;
      bw.fused_task(p.packed ? int(t % nseq) : int(kv / p.Hk), int(kv % p.Hk), nkb);
    });
    return;
  }
  // kDqBlocks query blocks per dQ task (1 with bfloat16 dot products), fewer where that would
  // leave less than 4 tasks per thread.
  const int64_t nqh = n * p.gqa_ratio * nseq;
  int nqs = bw.bf ? 1 : kDqBlocks, nqt;
  for (;; nqs /= 2) {
    nqt = (nqb + nqs - 1) / nqs;
    if (nqs == 1 || nqh * nqt >= 4 * num_threads()) break;
  }
  parallel(nqh * nqt, [&](int64_t t) {
    const int qt = nqt - 1 - int(t % nqt), s = int(t / nqt % nseq);
    const int64_t qh = first * p.gqa_ratio + t / nqt / nseq;
    bw.dq_task(p.packed ? s : int(qh / p.Hq), int(qh % p.Hq), qt, nqs);
  });
  parallel(n * nseq * nkb, [&](int64_t t) {
    const int kb = int(t % nkb), s = int(t / nkb % nseq);
    const int64_t kv = first + t / nkb / nseq;
    bw.dkv_task(p.packed ? s : int(kv / p.Hk), int(kv % p.Hk), kb, 1);
  });
}

template <typename T>
void run_backward(const BackwardArgs& a) {
  const FlashParams& p = *a.fwd.p;
  const int nqb = (p.max_rows_q + BQ - 1) / BQ, nkb = (p.max_rows_k + BK - 1) / BK;
  const int64_t nbh = int64_t(p.B) * p.Hq, nkv = int64_t(p.packed ? 1 : p.B) * p.Hk;
  float* delta = alloc_aligned<float>(nbh * p.Lq + 2 * nbh * nqb + 1);
  // Partial sums start at 0: blocks past a short packed sequence have no
  // task rows to write theirs.
  memset(delta + nbh * p.Lq, 0, sizeof(float) * 2 * nbh * nqb);
  // bfloat16 with dot products: the GEMMs run on bfloat16 pairs over
  // operands packed, otherwise on FMAs over operands converted to float32.
  Bf16Packs packs{};
  FloatPacks fpacks{};
  size_t head_bytes = 0; // per K/V head with its query heads
#if defined(FA_BF16_DOT)
  if constexpr (is_bf16<T>) head_bytes = size_packs(p, packs);
#endif
  const bool bf = head_bytes != 0;
  if (!bf) head_bytes = size_packs(p, fpacks);
  Backward<T> bw{a, p, delta, delta + nbh * p.Lq, nqb, bf ? &packs : nullptr,
                 bf ? nullptr : &fpacks};
  // Points w at pk or fp, laid out in buf for K/V heads [first, first + n).
  auto place = [&](Backward<T>& w, Bf16Packs& pk, FloatPacks& fp, void* buf, int64_t first,
                   int64_t n) {
    if (bf) {
      pk.kv_first = first, pk.wave = n;
      place_packs(p, pk, buf);
    } else {
      fp.kv_first = first, fp.wave = n;
      place_packs(p, fp, buf);
    }
    w.bf = bf ? &pk : nullptr;
    w.fp = bf ? nullptr : &fp;
  };
  // Item i of K/V heads [first, first + n) and their query heads (see copy_operands).
  auto copy = [&](const Backward<T>& w, int64_t n, int64_t i) {
#if defined(FA_BF16_DOT)
    if (w.bf) return copy_operands(a, *w.bf, n, i);
#endif
    copy_operands<T>(a, *w.fp, n, i);
  };

  const int nseq = p.packed ? p.B : 1;
  // The delta rows of query head qh (index (batch, head)), in every packed
  // sequence: computed where the head's operands are copied, on both paths
  // below. A pass over all heads before took a round of the pool of its own
  // and read O and dO apart from the copy that reads dO again (own heads,
  // 2 threads, D 64: causal bfloat16 256 tokens 0.91x the time, 384 0.96x,
  // 512 0.97x, 1024 1.00x; waves: 0.97-1.00x, within the noise).
  auto deltas = [&](int64_t qh) {
    for (int s = 0; s < nseq; ++s)
      bw.delta_rows(p.packed ? s : int(qh / p.Hq), int(qh % p.Hq), delta);
  };
  // Fused per-head tasks when there are enough to share out (two per
  // thread); else the two passes' finer tasks.
  const bool fused = nkv * nseq >= 2 * num_threads();
  if (fused && own_heads(head_bytes, nkv)) { // each thread a head at a time
    parallel(nkv, [&](int64_t kv) {
      for (int64_t qh = kv * p.gqa_ratio; qh < (kv + 1) * p.gqa_ratio; ++qh) deltas(qh);
      Backward<T> own = bw;
      Bf16Packs pk = packs;
      FloatPacks fp = fpacks;
      place(own, pk, fp, thread_scratch(head_bytes, kCopyScratch), kv, 1);
      for (int64_t i = 0; i <= p.gqa_ratio; ++i) copy(own, 1, i);
      for (int s = 0; s < nseq; ++s)
        own.fused_task(p.packed ? s : int(kv / p.Hk), int(kv % p.Hk), nkb);
    });
  } else { // a wave of heads at a time
    const int64_t wave = wave_heads(head_bytes, nkv, bf ? kBf16WaveBytes : kWaveBytes);
    void* own;
    void* buf = wave_buffer(wave * head_bytes, &own);
    for (int64_t first = 0; first < nkv; first += wave) {
      const int64_t n = nkv - first < wave ? nkv - first : wave;
      place(bw, packs, fpacks, buf, first, wave);
      parallel(n * (1 + p.gqa_ratio), [&](int64_t i) {
        copy(bw, n, i);
        if (i >= n) deltas(first * p.gqa_ratio + i - n);
      });
      run_heads(bw, first, n, nkb, fused);
    }
    free(own);
  }
  for (int64_t bh = 0; bh < nbh; ++bh) { // fixed-order reduction of the partials
    double d_alibi = 0.0, d_sink = 0.0;
    for (int qb = 0; qb < nqb; ++qb) {
      const float* part = bw.partial(int(bh / p.Hq), int(bh % p.Hq), qb);
      d_alibi += part[0];
      d_sink += part[1];
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
