// FlashAttention-2 forward on the CPU.
//
// Each task owns up to kSubBlocks blocks of BQ queries of one (batch, query
// head). It streams the visible keys in blocks of BK; each query block that
// sees a key block computes S = Q K^T (register-blocked), score modifiers
// (softcap, ALiBi, masks, window), an online softmax in float32 and O += P V,
// so memory stays O(BQ x (D + BK)) per query block and no L x L matrix
// exists. Pairs of blocks wholly outside the causal/sliding window are never
// visited; on the blocks the window's edge crosses, each register block of
// rows computes only the keys it sees (visible_cols).
//
// This file is compiled once per instruction set with FA_ISA set to that
// set's namespace (avx512, avx2, generic); GCC/Clang vector extensions map
// the 16-float vectors below onto whatever registers the flags allow.
// Include nothing but C headers and our own plain headers here (see
// flash_cpu.h for why). Shared pieces live in kernel_common.h.

#include "kernel_common.h"

#if defined(FA_BF16_DOT)
#include "bf16_gemm.h"
#endif

namespace flash_cpu {
namespace FA_ISA {
namespace {

// ---------------------------------------------------------------------------
// One task: query blocks of a group of heads in batch b.
// ---------------------------------------------------------------------------
// GQA: the query heads that share a key/value head go into one task, their
// rows stacked, so each K/V block is read and converted once per group, not
// once per head (the traffic that bounds decoding). Heads per task: the
// largest divisor of the group size that fits in BQ rows.
inline int heads_per_task(const FlashParams& p) {
  int g = p.gqa_ratio < BQ ? p.gqa_ratio : BQ;
  while (p.gqa_ratio % g) --g;
  return g;
}

// Query blocks per task, at most: each K/V block is read once for all of
// them. At long lengths K/V outgrow the caches, and streaming them in once
// per 64 query rows held both threads back (2 threads, 8k-16k keys d128:
// 4 blocks 5-15% faster than 1).
constexpr int kSubBlocks = 4;

// A task whose K and V blocks, read as they stream by (decoding), take
// more than this prefetches them (see load_kv): at up to 1 MiB per task
// (1k-2k keys) the prefetches cost 9-11% (2026-12-02, Zen 4: L2 1 MiB per
// core), with 2 MiB (float32) they saved 14-22% (an earlier machine).
constexpr size_t kStreamBytes = size_t(1) << 20;
// Such a task prefetches K's rows one block ahead, spread over qk_keys's
// passes, and V's, used after the block's softmax, this many blocks ahead,
// spread over the P V pass: each V row read prefetches its columns kVAhead
// blocks on. (V's rows prefetched in a burst at the block's start left
// decoding 7-9% slower on one thread, 4k-16k keys; spread over qk_keys's
// passes beside K's, 8-17% slower than over the P V pass at 16k-32k keys,
// 1-2 threads, float32 and bfloat16: the score pass alone then kept both
// streams' misses in flight. 2 blocks ahead: 0-3% faster than 3.)
constexpr int kVAhead = 2;

// K^T and V of K/V heads [first, first + n) (index (batch, K/V head), see
// TaskOrder) converted to float32 once, for the tasks that share them (see
// run_all): K^T as one D x 16 panel per 16 keys (transposed_at), so a pass
// of qk_rows over d reads one contiguous run (D x BK blocks, rows 256 bytes
// apart: 3-6% slower at D = 128, where a block outgrows L1), V as
// dvp / 16 column chunks of lkp x 16 (a PV pass reads one chunk of 64 rows:
// contiguous, where rows 512+ bytes apart share a few L1 sets), keys padded
// with zeros to a block multiple (tasks read whole blocks from a block
// boundary). v is null where V is read in place (see run_all).
struct FloatKV {
  float* kt = nullptr;
  float* v = nullptr;
  int lkp = 0;
  int vcols = 0; // V's copied columns (dvp), 0 where V is read in place
  int64_t first = 0;
};

// Tasks in the order K/V head (batch-major; the packed sequences of a
// varlen call share each K/V head, so all their tasks sit under it), query
// heads sharing it, query block: so the tasks of a range of K/V heads form a
// range of indices. Last query blocks first: with causal masking they see
// the most keys, and dynamic hand-out then balances the cores.
struct TaskOrder {
  int nqt, gpk, B, Hk; // tasks per query head group, groups per K/V head
  bool packed;
  int64_t kv_heads() const { return int64_t(packed ? 1 : B) * Hk; }
  int64_t per_kv_head() const { return int64_t(packed ? B : 1) * gpk * nqt; }
  void decode(int64_t i, int* b, int* hg, int* qt) const {
    *qt = nqt - 1 - int(i % nqt);
    i /= nqt;
    const int g = int(i % gpk);
    i /= gpk;
    const int hk = packed ? int(i / B) : int(i % Hk);
    *b = packed ? int(i % B) : int(i / Hk);
    *hg = hk * gpk + g;
  }
};

// Decoding with fewer tasks than cores: each task's keys are cut into n
// chunks of whole blocks, run as separate tasks that store their normalised
// output rows and LSEs here, merged by LSE afterwards (Task::merge). Task
// slot (b * groups + hg, chunk): rows at o + (slot * BQ + r) * dvp and
// lse + slot * BQ + r.
struct SplitKeys {
  int n = 1;
  float* o = nullptr;
  float* lse = nullptr;
};

template <typename T>
struct Task {
  const ForwardArgs& a;
  const FlashParams& p;
  int hpt;  // query heads per block
  int nqi;  // query rows per head per block: BQ / hpt
  int nsub; // query blocks per task (run_all)
  FloatKV kv;
  SplitKeys split;

  // run_packed's layout: n heads' K^T, then their V (if copied), from head first.
  size_t head_bytes() const { return size_t(kv.lkp) * (p.D + kv.vcols) * sizeof(float); }
  void place(void* buf, int64_t n, int64_t first) {
    kv.kt = static_cast<float*>(buf);
    kv.v = kv.vcols ? kv.kt + n * size_t(kv.lkp) * p.D : nullptr;
    kv.first = first;
  }

  size_t split_slot(int b, int hg, int chunk) const {
    return (size_t(b) * (p.Hq / hpt) + hg) * split.n + chunk;
  }

  // One query block of a task: rows r of head h0 + r / nqh, query i0 + r %
  // nqh, from row r0 of the task's Q, O, m, l and alpha; keys [kbeg, kend)
  // visible to some of them.
  struct QBlock {
    long i0, kbeg, kend;
    int nqh, nq, r0;
  };

  // Query blocks [qt * nsub, qt * nsub + nsub) of head group hg in batch b;
  // with a split (decoding, nsub = 1) only the keys of chunk `chunk`.
  void run(int b, int hg, int qt, int chunk = 0) const {
    const Seq sq = seq_of(p, a.seqs, b);
    const int h0 = hg * hpt;
    const int hk = h0 / p.gqa_ratio;
    const int D = p.D, Dv = p.Dv;
    const int dvp = (Dv + 15) / 16 * 16;
    QBlock blk[kSubBlocks];
    int nb = 0;
    long kbeg = 0, kend = 0; // keys any block sees
    for (; nb < nsub; ++nb) {
      QBlock& q = blk[nb];
      q.nqh = block_rows(sq.qrows_begin, sq.qrows_end, qt * nsub + nb, nqi, &q.i0);
      if (q.nqh == 0) break;
      q.nq = hpt * q.nqh;
      q.r0 = nb * BQ;
      visible_keys(p, sq, q.i0, q.i0 + q.nqh, &q.kbeg, &q.kend);
      // Converted K^T is read by whole blocks: start at one, the per-row
      // masks hide the keys before kbeg.
      if (kv.kt) q.kbeg = q.kbeg / BK * BK;
      widen(q.kbeg, q.kend, &kbeg, &kend);
    }
    if (nb == 0) return;
    if (split.n > 1) { // this chunk of whole blocks
      const long per = ((kend - kbeg + split.n - 1) / split.n + BK - 1) / BK * BK;
      kbeg = kbeg + chunk * per < kend ? kbeg + chunk * per : kend;
      kend = kbeg + per < kend ? kbeg + per : kend;
    }

    // Q (scaled), O accumulator, m, l (a vector of partial sums per row) and
    // alpha per query block; decoding's K and V blocks as float32 rows where
    // they are not read in place; one S/P block, and P as bfloat16 (pb).
    const size_t rows = size_t(nb) * BQ;
    float *qf, *kr, *vf, *s, *o, *m, *l, *alpha, *pb;
    const int dq = (D + 15) / 16 * 16; // q16's row stride (below)
    carve_scratch({{&qf, rows * D}, {&kr, size_t(dq) * BK}, {&vf, size_t(BK) * dvp},
                   {&s, size_t(BQ) * BK}, {&o, rows * dvp}, {&m, rows}, {&l, rows * 16},
                   {&alpha, rows}, {&pb, size_t(BQ) * BK / 2}});

    // Only the blocks' rows (decoding: 1-4 of the 64, where clearing all
    // of O was 4% of a 512-key call).
    for (int t = 0; t < nb; ++t) {
      const QBlock& q = blk[t];
      for (int i = q.r0; i < q.r0 + q.nq; ++i) {
        m[i] = -INFINITY;
        store16(l + i * 16, vf16{});
      }
      memset(o + size_t(q.r0) * dvp, 0, sizeof(float) * q.nq * dvp);
    }

    const T* k = static_cast<const T*>(a.k) + b * p.k_strides[0] + hk * p.k_strides[1];
    const T* v = static_cast<const T*>(a.v) + b * p.v_strides[0] + hk * p.v_strides[1];

    for (int t = 0; t < nb && kbeg < kend; ++t) {
      const QBlock& q = blk[t];
      for (int r = 0; r < q.nq; ++r) {
        const T* row = static_cast<const T*>(a.q) + b * p.q_strides[0] +
                       (h0 + r / q.nqh) * p.q_strides[1] + (q.i0 + r % q.nqh) * p.q_strides[2];
        load_row(row, p.q_strides[3], D, p.scale, qf + (q.r0 + r) * D);
      }
    }

    const bool stream = size_t(kend - kbeg) * (D + Dv) * sizeof(T) > kStreamBytes;
    // Decoding (one query block, K and V not converted beforehand): S from
    // dot products with K's rows (qk_keys), not a transpose of each block
    // (which took 1.1-3.2x as long for 8-64 rows: 4k keys, 2 threads). K
    // and V are read in place where their rows are contiguous (V's a
    // multiple of 16 long), converted in registers, else through float32
    // copies of the block's rows (copying them all made decoding 12-64%
    // slower: 4k-32k keys, 2 threads).
    const bool decoding = !kv.kt;
    const bool k_rows = decoding && p.k_strides[3] == 1;
    const bool v_rows = decoding && p.v_strides[3] == 1 && dvp == Dv;
    // V's rows read in place: prefetched by the P V pass (else by load_kv).
    const bool v_ahead = stream && v_rows;
#if defined(FA_BF16_DOT)
    // bfloat16 K rows in place meet Q's rows as they are (Bf16Dot), in kr,
    // which holds no K here: dq apart, for_row_blocks' blocks of rows that
    // Bf16Dot groups packed for its group_sums.
    const bool k_pairs = is_bf16<T> && k_rows;
    bf16_t* q16 = reinterpret_cast<bf16_t*>(kr);
    for (int r = 0; k_pairs && r < blk[0].nq; ++r) {
      const uint16_t* row = static_cast<const uint16_t*>(a.q) + b * p.q_strides[0] +
                            (h0 + r / blk[0].nqh) * p.q_strides[1] +
                            (blk[0].i0 + r % blk[0].nqh) * p.q_strides[2];
      for (int d = 0; d < D; ++d) q16[r * dq + d] = bf16_t{row[d * p.q_strides[3]]};
    }
    if (k_pairs)
      for_row_blocks(blk[0].nq, [&]<int R>(int i) {
        if constexpr (Bf16Dot::groups(R)) Bf16Dot::pack_rows<R>(q16 + i * dq, dq, D);
      });
    // V's rows in place meet P rounded to bfloat16 (p16), as in Bf16Task
    // (dot_rows<..., kRows>).
    const bool v_pairs = is_bf16<T> && v_rows;
    uint16_t* p16 = reinterpret_cast<uint16_t*>(pb);
#else
    const bool k_pairs = false, v_pairs = false;
#endif
    for (long j0 = kbeg; j0 < kend; j0 += BK) {
      const int nk = kend - j0 < BK ? int(kend - j0) : BK;
      // K^T and V: converted once per head beforehand, or read per block here.
      const float *ktb = nullptr, *vb = vf;
      int ldv = dvp, vcs = 16;
      if (kv.kt) {
        const size_t slot = size_t(p.packed ? 0 : b) * p.Hk + hk - kv.first;
        ktb = transposed_at(kv.kt + slot * kv.lkp * D, j0, 16, D);
        if (kv.v) {
          vb = kv.v + slot * kv.lkp * dvp + j0 * 16;
          ldv = 16;
          vcs = kv.lkp * 16;
        } else {
          vb = reinterpret_cast<const float*>(v + j0 * p.v_strides[2]);
          ldv = int(p.v_strides[2]);
        }
      } else {
        load_kv(k, v, j0, nk, stream && !v_ahead, k_rows ? nullptr : kr, v_rows ? nullptr : vf,
                dvp);
      }
      for (int t = 0; t < nb; ++t) {
        const QBlock& q = blk[t];
        if (!ranges_meet(j0, j0 + nk, q.kbeg, q.kend)) continue;
        const float* qrows = qf + q.r0 * D;
        float* ob = o + q.r0 * dvp;
        auto cols = [&](int r, int R, int w, int* c0, int* c1) {
          block_cols(sq, q.i0, q.nqh, j0, nk, r, R, w, c0, c1);
        };
        // K's rows in place (kb) and, streamed, those to prefetch: the next
        // block's K rows; V's kVAhead blocks on (pfo elements on: while
        // that block is whole).
        const long ldk = p.k_strides[2];
        auto rows_from = [&](long j) {
          return int(p.Lk - j < 0 ? 0 : p.Lk - j < BK ? p.Lk - j : BK);
        };
        const int npf = stream ? rows_from(j0 + BK) : 0;
        const long pfo =
            v_ahead && rows_from(j0 + kVAhead * BK) == BK ? kVAhead * BK * p.v_strides[2] : 0;
        auto scores = [&](auto dot, const auto* qb, int ldq, const auto* kb, long ld, float scale,
                          int np) {
          for_row_blocks(q.nq, [&]<int R>(int i) {
            qk_keys<R>(dot, qb + i * ldq, ldq, kb, ld, D, nk, scale, s + i * BK,
                       np ? kb + BK * ld : nullptr, i == 0 ? np : 0);
          });
        };
        if (k_pairs) {
#if defined(FA_BF16_DOT)
          if constexpr (is_bf16<T>) scores(Bf16Dot{}, q16, dq, k + j0 * ldk, ldk, p.scale, npf);
#endif
        } else if (k_rows) {
          if constexpr (sizeof(T) == 2)
            scores(Narrow16Dot{}, qrows, D, k + j0 * ldk, ldk, 1.0f, npf);
          else
            scores(FloatDot{}, qrows, D, k + j0 * ldk, ldk, 1.0f, npf);
        } else if (decoding)
          scores(FloatDot{}, qrows, D, kr, D, 1.0f, 0);
        else
          for_row_blocks(q.nq, [&]<int R>(int i) {
            int c0, c1;
            cols(i, R, 16 * CHUNK, &c0, &c1);
            qk_rows<R>(qrows + i * D, D, ktb, 16, D, s + i * BK, c0, c1);
          });
        probabilities(b, sq, h0, q.nqh, q.i0, q.nq, j0, nk, s, m + q.r0, l + q.r0 * 16,
                      alpha + q.r0, POverS{s});
        auto values = [&](const auto* vr, int ldr, int cs, long pf) {
          for_row_blocks(q.nq, [&]<int R>(int i) {
            int c0, c1;
            cols(i, R, 1, &c0, &c1);
            if (i == 0 && pf)
              pv_block<R, true>(s + c0, BK, 1, alpha + q.r0, vr + c0 * ldr, ldr, cs, dvp, c1 - c0,
                                ob, pf);
            else
              pv_block<R>(s + i * BK + c0, BK, 1, alpha + q.r0 + i, vr + c0 * ldr, ldr, cs, dvp,
                          c1 - c0, ob + i * dvp);
          });
        };
        if (v_pairs) {
#if defined(FA_BF16_DOT)
          const uint16_t* vr = reinterpret_cast<const uint16_t*>(v + j0 * p.v_strides[2]);
          for (int r = 0; r < q.nq; ++r) to_bf16(s + r * BK, BK, p16 + r * BK);
          for_row_blocks(q.nq, [&]<int R>(int i) {
            int c0, c1;
            cols(i, R, 2, &c0, &c1);
            const int n = (c1 < nk ? c1 : nk) - c0;
            dot_cols<R, true>(p16 + i * BK + c0, BK, n, vr + c0 * p.v_strides[2],
                              size_t(p.v_strides[2]), dvp, ob + i * dvp, dvp, true, alpha + q.r0 + i,
                              1.0f, i == 0 ? pfo : 0);
          });
#endif
        } else if (v_rows)
          values(v + j0 * p.v_strides[2], int(p.v_strides[2]), 16, pfo);
        else
          values(vb, ldv, vcs, 0);
      }
    }
#if defined(FA_BF16_DOT)
    for (int r = 0; v_pairs && r < blk[0].nq; ++r) from_pair_order(o + r * dvp, dvp);
#endif
    if (split.n == 1) {
      for (int t = 0; t < nb; ++t) {
        const QBlock& q = blk[t];
        finish_heads(b, h0, q.i0, q.nqh, o + q.r0 * dvp, m + q.r0, l + q.r0 * 16, dvp);
      }
      return;
    }
    const size_t slot = split_slot(b, hg, chunk);
    for (int r = 0; r < blk[0].nq; ++r) {
      const float li = hsum(load16(l + r * 16)), inv = li > 0.0f ? 1.0f / li : 0.0f;
      split.lse[slot * BQ + r] = li > 0.0f ? m[r] + logf(li) : -INFINITY;
      for (int d = 0; d < dvp; ++d) split.o[(slot * BQ + r) * dvp + d] = o[r * dvp + d] * inv;
    }
  }

  // The columns [*c0, *c1) of key block [j0, j0 + nk), in chunks of w, that
  // rows [r, r + R) of a query block see (visible_cols). Its rows are nqh
  // queries from i0 of each head in turn; rows of two heads: all nqh.
  void block_cols(const Seq& sq, long i0, int nqh, long j0, int nk, int r, int R, int w, int* c0,
                  int* c1) const {
    const bool one_head = r / nqh == (r + R - 1) / nqh;
    const long i = i0 + (one_head ? r % nqh : 0);
    visible_cols(p, sq, i, one_head ? i + R : i0 + nqh, j0, nk, w, c0, c1);
  }

  // Merges the chunks of task (b, hg) of a split decode (see SplitKeys), the
  // sink logit with them, and writes O and the LSE as finish() does.
  void merge(int b, int hg) const {
    const Seq sq = seq_of(p, a.seqs, b);
    long i0;
    const int nqh = block_rows(sq.qrows_begin, sq.qrows_end, 0, nqi, &i0);
    const int Dv = p.Dv, dvp = (Dv + 15) / 16 * 16;
    const size_t slot0 = split_slot(b, hg, 0);
    float acc[FA_MAX_HEAD_DIM];
    for (int r = 0; r < hpt * nqh; ++r) {
      const int h = hg * hpt + r / nqh;
      const long i = i0 + r % nqh;
      T* out = static_cast<T*>(a.out) + out_row(p, p.Hq, p.Lq, b, h, i) * Dv;
      float* lse = a.lse + out_row(p, p.Hq, p.Lq, b, h, i);
      const float sink = p.has_sinks ? per_head(a.sinks, p.sinks_strides, b, h) : -INFINITY;
      float mx = sink;
      for (int c = 0; c < split.n; ++c) {
        const float lc = split.lse[(slot0 + c) * BQ + r];
        mx = lc > mx ? lc : mx;
      }
      if (mx == -INFINITY) { // no visible key and no sink
        for (int d = 0; d < Dv; ++d) out[d] = from_float<T>(0.0f);
        *lse = -INFINITY;
        continue;
      }
      float den = p.has_sinks ? expf(sink - mx) : 0.0f;
      for (int d = 0; d < Dv; ++d) acc[d] = 0.0f;
      for (int c = 0; c < split.n; ++c) {
        const float w = expf(split.lse[(slot0 + c) * BQ + r] - mx);
        const float* oc = split.o + ((slot0 + c) * BQ + r) * dvp;
        den += w;
        for (int d = 0; d < Dv; ++d) acc[d] += w * oc[d];
      }
      for (int d = 0; d < Dv; ++d) out[d] = from_float<T>(acc[d] / den);
      *lse = mx + logf(den);
    }
  }

  // S (scores of rows h0 + r / nqh, i0 + r % nqh and keys [j0, j0 + nk),
  // scaled, or still to be scaled by `raw`) -> P, put by emit
  // (softmax_update): score modifiers, the online softmax update, then
  // dropout (after the running sum: l normalises the undropped softmax; it
  // needs P over S). `raw` goes into the softmax's own multiply-add, or
  // (prescale) a pass before the modifiers.
  template <typename Emit>
  void probabilities(int b, const Seq& sq, int h0, int nqh, long i0, int nq, long j0, int nk,
                     float* s, float* m, float* l, float* alpha, const Emit& emit,
                     float raw = 1.0f) const {
    // A whole block that all rows see, without modifiers, needs none of
    // the per-row work below (most blocks of most calls).
    long beg, end;
    keys_seen_by_all(p, sq, i0, i0 + nqh, &beg, &end);
    const bool modified = p.softcap != 0.0f || p.has_alibi || p.mask_kind != FA_MASK_NONE;
    const bool plain = !modified && nk == BK && j0 >= beg && j0 + BK <= end;
    // S scaled before the per-row work where that adds to it or caps it; the
    // limits alone (-inf) commute with a positive scale: the softmax applies
    // it (raw = 0 would make -inf x 0 = NaN there).
    const bool prescale = raw != 1.0f && !plain && (modified || !(raw > 0.0f));
    for (int r = 0; r < nq && !plain; ++r) {
      const int h = h0 + r / nqh;
      const float slope = p.has_alibi ? per_head(a.alibi, p.alibi_strides, b, h) : 0.0f;
      if (prescale)
        for (int c = 0; c < BK; c += 16) store16(s + r * BK + c, load16(s + r * BK + c) * raw);
      if (p.softcap > 0.0f) apply_softcap(p, s + r * BK, nk);
      apply_bias_and_mask(p, sq, a.mask, b, h, i0 + r % nqh, j0, nk, slope, s + r * BK);
    }
    softmax_update(nq, s, m, l, alpha, emit, prescale ? 1.0f : raw);
    if (p.dropout_p > 0.0f)
      for (int r = 0; r < nq; ++r) dropout_row(p, b, h0 + r / nqh, i0 + r % nqh, j0, nk, s + r * BK);
  }

  // finish() for each head of the task.
  void finish_heads(int b, int h0, long i0, int nqh, float* o, float* m, float* l, int dvp) const {
    for (int hh = 0; hh < hpt; ++hh) {
      const int r = hh * nqh;
      finish(b, h0 + hh, i0, nqh, o + r * dvp, m + r, l + r * 16, dvp);
    }
  }

  // Decoding: converts keys [j0, j0 + nk) to float, each where non-null:
  // K's rows (D apart) into kr, V (BK x dvp) into vf, zero-padded so the
  // fixed-width GEMM reads defined values. With `stream` (K and V larger
  // than the caches: read from memory, once; kStreamBytes) it prefetches
  // the next block's V rows (the P V pass does where it reads them in
  // place): the hardware prefetchers alone kept two threads at 14 GB/s of
  // the 23-32 an earlier machine streamed (decoding float32, 4k-32k keys:
  // 14-20% faster).
  void load_kv(const T* k, const T* v, long j0, int nk, bool stream, float* kr, float* vf,
               int dvp) const {
    const int D = p.D, Dv = p.Dv;
    // Rows read in place, from the caches: nothing to do (this loop's checks
    // alone made 1k-key decoding 4-14% slower).
    if (!stream && !kr && !vf) return;
    for (int j = 0; j < nk; ++j) {
      const long next = j0 + BK + j;
      if (stream && next < p.Lk && p.v_strides[3] == 1) prefetch(v + next * p.v_strides[2], Dv);
      if (kr) load_row(k + (j0 + j) * p.k_strides[2], p.k_strides[3], D, 1.0f, kr + j * D);
      if (vf) {
        load_row(v + (j0 + j) * p.v_strides[2], p.v_strides[3], Dv, 1.0f, vf + j * dvp);
        for (int d = Dv; d < dvp; ++d) vf[j * dvp + d] = 0.0f;
      }
    }
    if (vf && nk < BK) memset(vf + nk * dvp, 0, sizeof(float) * size_t(BK - nk) * dvp);
  }

  // Online softmax: per row, new max m, rescale factor alpha for the old
  // accumulator, P = exp(S - m) handed to emit, running sum l kept as 16
  // partial sums per row (reduced once, in finish). The maxima come first,
  // so the alphas take one vector exp2 per 16 rows, not a serial one per row.
  // emit(i, c, e0, e1) puts P[i][c, c + 32) (POverS: over S; the bfloat16
  // forward rounds it into its GEMM operand instead). S is scaled by raw
  // (>= 0: the maxima of raw x S are S's; no -inf in S unless raw > 0)
  // here, in the maxima and the exponent's multiply-add.
  template <typename Emit>
  void softmax_update(int nq, float* s, float* m, float* l, float* alpha, const Emit& emit,
                      float raw) const {
    for (int i = 0; i < nq; ++i) {
      const float* row = s + i * BK;
      vf16 mv = load16(row);
      for (int c = 16; c < BK; c += 16) mv = vmax(mv, load16(row + c));
      const float mx = hmax(mv) * raw;
      const float m_new = mx > m[i] ? mx : m[i];
      alpha[i] = m_new == -INFINITY ? 0.0f : (m[i] - m_new) * kLog2e; // exp2: 1 or 0 from -inf
      m[i] = m_new;
    }
    for (int i = 0; i < nq; i += 16) // the alpha buffer holds BQ: a partial tail is harmless
      store16(alpha + i, exp2v(load16(alpha + i)));
    const vf16 l2e = splat(kLog2e * raw);
    for (int i = 0; i < nq; ++i) {
      const float* row = s + i * BK;
      if (m[i] == -INFINITY) { // nothing visible yet: P = 0, O stays 0
        for (int c = 0; c < BK; c += 32) emit(i, c, vf16{}, vf16{});
        continue;
      }
      const vf16 mb = splat(m[i] * kLog2e);
      vf16 sum = vf16{};
      for (int c = 0; c < BK; c += 32) {
        const vf16 e0 = exp2v(load16(row + c) * l2e - mb);
        const vf16 e1 = exp2v(load16(row + c + 16) * l2e - mb);
        emit(i, c, e0, e1);
        sum += e0;
        sum += e1;
      }
      store16(l + i * 16, load16(l + i * 16) * alpha[i] + sum);
    }
  }
  struct POverS {
    float* s;
    void operator()(int i, int c, vf16 e0, vf16 e1) const {
      store16(s + i * BK + c, e0);
      store16(s + i * BK + c + 16, e1);
    }
  };

  // Folds in the sink logit, normalises and writes O and the natural-log LSE.
  // A row that saw no key gets zeros and lse = -inf (or the sink logit).
  void finish(int b, int h, long i0, int nq, float* o, float* m, float* l, int dvp) const {
    const int Dv = p.Dv;
    T* out = static_cast<T*>(a.out) + out_row(p, p.Hq, p.Lq, b, h, i0) * Dv;
    float* lse = a.lse + out_row(p, p.Hq, p.Lq, b, h, i0);
    const float sink = p.has_sinks ? per_head(a.sinks, p.sinks_strides, b, h) : 0.0f;
    for (int i = 0; i < nq; ++i) {
      float mi = m[i], li = hsum(load16(l + i * 16)), corr = 1.0f;
      if (p.has_sinks) {
        const float m_new = sink > mi ? sink : mi;
        corr = exp2f((mi - m_new) * kLog2e);
        li = li * corr + exp2f((sink - m_new) * kLog2e);
        mi = m_new;
      }
      const float inv = li > 0.0f ? corr / li : 0.0f;
      store_row(o + i * dvp, Dv, inv, out + i * Dv);
      lse[i] = li > 0.0f ? mi + logf(li) : -INFINITY;
    }
  }
};

#if defined(FA_BF16_DOT)
// ---------------------------------------------------------------------------
// bfloat16 with dot-product instructions (AMX tiles or AVX512-BF16, see
// bf16_gemm.h): the same task with the two block GEMMs on bfloat16 pairs.
// K and V are packed into its layouts beforehand (a wave of heads at a
// time, see run_bf16), so the per-block work is the GEMMs and the float32
// softmax in between.
// ---------------------------------------------------------------------------
struct Bf16Task {
  const Task<bf16_t>& base; // options, softmax and finish are shared
  int lkp, dp, dvp;         // keys padded to BK, D to 32, Dv to 16
  uint16_t* kpack;          // K^T and V tiles of the (batch, K/V head)s
  uint16_t* vpack;          // (K/V heads when packed) that run_packed
  int64_t first = 0;        // placed, from head `first` on

  size_t k_elems() const { return size_t(lkp) * dp; }
  size_t v_elems() const { return size_t(lkp) * dvp; }
  size_t head_bytes() const { return (k_elems() + v_elems()) * sizeof(uint16_t); }
  void place(void* buf, int64_t n, int64_t first_head) {
    kpack = static_cast<uint16_t*>(buf);
    vpack = kpack + n * k_elems();
    first = first_head;
  }

  void run(int b, int hg, int qb) const {
    const ForwardArgs& a = base.a;
    const FlashParams& p = base.p;
    const Seq sq = seq_of(p, a.seqs, b);
    long i0;
    const int nqh = block_rows(sq.qrows_begin, sq.qrows_end, qb, base.nqi, &i0);
    if (nqh == 0) return;
    const int nq = base.hpt * nqh, rows = (nq + 31) / 32 * 32;
    const int h0 = hg * base.hpt, hk = h0 / p.gqa_ratio;
    long kbeg, kend;
    visible_keys(p, sq, i0, i0 + nqh, &kbeg, &kend);

    float *qraw, *s, *o, *pv, *m, *l, *alpha, *praw;
    carve_scratch({{&qraw, size_t(BQ) * dp / 2}, {&s, size_t(2) * BQ * BK}, {&o, size_t(BQ) * dvp},
                   {&pv, size_t(BQ) * dvp}, {&m, BQ}, {&l, BQ * 16}, {&alpha, BQ},
                   {&praw, size_t(BQ) * BK / 2}});
    uint16_t* q16 = reinterpret_cast<uint16_t*>(qraw);
    uint16_t* p16 = reinterpret_cast<uint16_t*>(praw);
    memset(q16, 0, sizeof(uint16_t) * size_t(rows) * dp);
    memset(p16, 0, sizeof(uint16_t) * size_t(rows) * BK);
    memset(o, 0, sizeof(float) * size_t(rows) * dvp);
    for (int i = 0; i < nq; ++i) {
      m[i] = -INFINITY;
      store16(l + i * 16, vf16{});
    }
    // Q rows as raw bfloat16; the scale's magnitude is applied to S in
    // float32 (by the softmax, see probabilities), its sign here (exact in
    // bfloat16: the sign bit), so the softmax's maxima stay S's maxima.
    const uint16_t sign = p.scale < 0.0f ? 0x8000 : 0;
    const float raw = fabsf(p.scale);
    for (int r = 0; r < nq && kbeg < kend; ++r) {
      const uint16_t* q = static_cast<const uint16_t*>(a.q) + b * p.q_strides[0] +
                          (h0 + r / nqh) * p.q_strides[1] + (i0 + r % nqh) * p.q_strides[2];
      for (int d = 0; d < p.D; ++d) q16[r * dp + d] = q[d * p.q_strides[3]] ^ sign;
    }
    const size_t head = size_t(p.packed ? 0 : b) * p.Hk + hk - first;
    const uint16_t* kt = kpack + head * k_elems();
    const uint16_t* vp = vpack + head * v_elems();

    tiles_begin();
    // Blocks aligned to BK, where the packing put them; the per-row masks
    // hide the keys of a block outside [kbeg, kend). S of the next block
    // is computed before this block's softmax, so that on tiles its dot
    // products run beside the vector work instead of each waiting on the other.
    auto keys = [&](long j0, int w) { // the GEMMs' spans (bf16_gemm.h)
      return [&, j0, w](int r, int R, int* k0, int* k1) {
        base.block_cols(sq, i0, nqh, j0, p.Lk - j0 < BK ? int(p.Lk - j0) : BK, r, R, w, k0, k1);
      };
    };
    auto scores = [&](long j0, float* out) {
      if (j0 < kend) gemm_abt(q16, nq, dp, dp, kt, lkp, j0, 1.0f, out, keys(j0, 16));
    };
    float* s_next = s + BQ * BK;
    scores(kbeg / BK * BK, s);
    for (long j0 = kbeg / BK * BK; j0 < kend; j0 += BK) {
      const int nk = p.Lk - j0 < BK ? int(p.Lk - j0) : BK;
      scores(j0 + BK, s_next);
      if (p.dropout_p > 0.0f) {
        base.probabilities(b, sq, h0, nqh, i0, nq, j0, nk, s, m, l, alpha, Task<bf16_t>::POverS{s},
                           raw);
        for (int r = 0; r < nq; ++r) to_bf16(s + r * BK, BK, p16 + r * BK);
      } else { // P rounded as it is made
        base.probabilities(b, sq, h0, nqh, i0, nq, j0, nk, s, m, l, alpha,
                           [p16](int i, int c, vf16 e0, vf16 e1) {
                             _mm512_storeu_si512(p16 + i * BK + c, to_bf16x32(e0, e1));
                           }, raw);
      }
      gemm_ab_add(p16, nq, vp, dvp, j0, dvp, alpha, o, dvp, pv, keys(j0, 2)); // O = alpha O + P V
      float* done = s;
      s = s_next;
      s_next = done;
    }
    tiles_end();
    base.finish_heads(b, h0, i0, nqh, o, m, l, dvp);
  }
};
#endif

// Runs t.run(b, group, qt) for tasks [begin, end) of `order`.
template <typename TaskT>
void run_tasks(const TaskT& t, const TaskOrder& order, int64_t begin, int64_t end) {
  struct Ctx { const TaskT* t; const TaskOrder* order; int64_t begin; } ctx{&t, &order, begin};
  parallel_for(end - begin, [](void* c, int64_t i) {
    const Ctx& x = *static_cast<const Ctx*>(c);
    int b, hg, qb;
    x.order->decode(x.begin + i, &b, &hg, &qb);
    x.t->run(b, hg, qb);
  }, &ctx);
}

// Runs the tasks of `order` on copies of K and V that pack(t, slot, i)
// makes of K/V head i into slot `slot` of t's buffers (t.place): each
// thread a head at a time into its own buffer (own_heads), or a wave of
// (batch, K/V head)s at a time within wave_bytes, the wave's heads copied
// in parallel, then its tasks run.
template <typename TaskT, typename Pack>
void run_packed(TaskT& t, const TaskOrder& order, size_t wave_bytes, const Pack& pack) {
  const int64_t nkv = order.kv_heads();
  const size_t hb = t.head_bytes();
  if (own_heads(hb, nkv)) {
    struct Ctx { const TaskT& t; const TaskOrder& order; const Pack& pack; size_t hb; } ctx{
        t, order, pack, hb};
    parallel_for(nkv, [](void* c, int64_t i) {
      const Ctx& x = *static_cast<const Ctx*>(c);
      TaskT own = x.t;
      own.place(thread_scratch(x.hb, kCopyScratch), 1, i);
      x.pack(own, 0, i);
      const int64_t per = x.order.per_kv_head();
      for (int64_t j = i * per; j < (i + 1) * per; ++j) {
        int b, hg, qt;
        x.order.decode(j, &b, &hg, &qt);
        own.run(b, hg, qt);
      }
    }, &ctx);
    return;
  }
  const int64_t wave = wave_heads(hb, nkv, wave_bytes), per = order.per_kv_head();
  void* own;
  void* buf = wave_buffer(wave * hb, &own);
  for (int64_t first = 0; first < nkv; first += wave) {
    const int64_t n = nkv - first < wave ? nkv - first : wave;
    t.place(buf, wave, first);
    struct Ctx { const TaskT& t; const Pack& pack; int64_t first; } ctx{t, pack, first};
    parallel_for(n, [](void* c, int64_t slot) {
      const Ctx& x = *static_cast<const Ctx*>(c);
      x.pack(x.t, slot, x.first + slot);
    }, &ctx);
    run_tasks(t, order, first * per, (first + n) * per);
  }
  free(own);
}

#if defined(FA_BF16_DOT)
void run_bf16(const Task<bf16_t>& task, const TaskOrder& order) {
  const FlashParams& p = task.p;
  Bf16Task bf{task, round_up(p.Lk, BK), round_up(p.D, 32), round_up(p.Dv, 16), nullptr, nullptr};
  run_packed(bf, order, kBf16WaveBytes, [&](const Bf16Task& t, int64_t slot, int64_t i) {
    const int b = int(i / p.Hk), hk = int(i % p.Hk);
    const uint16_t* k =
        static_cast<const uint16_t*>(task.a.k) + b * p.k_strides[0] + hk * p.k_strides[1];
    const uint16_t* v =
        static_cast<const uint16_t*>(task.a.v) + b * p.v_strides[0] + hk * p.v_strides[1];
    pack_transposed_pairs(k, p.Lk, p.D, p.k_strides[2], p.k_strides[3], t.lkp, t.dp,
                          t.kpack + slot * t.k_elems());
    pack_row_pairs(v, p.Lk, p.Dv, p.v_strides[2], p.v_strides[3], t.lkp, t.dvp,
                   t.vpack + slot * t.v_elems());
  });
}
#endif

// Decoding: one task per group of query heads (and sequence) sharing a K/V
// head. With fewer than two tasks per thread, cores would idle: the keys
// of each task are split (SplitKeys), at least 4 blocks per chunk.
template <typename T>
void run_decode(Task<T>& task, const TaskOrder& order) {
  const FlashParams& p = task.p;
  const int64_t ntasks = order.kv_heads() * order.per_kv_head();
  int64_t n = (2 * num_threads() + ntasks - 1) / ntasks;
  n = n > p.max_rows_k / (4 * BK) ? p.max_rows_k / (4 * BK) : n;
  if (n < 2) return run_tasks(task, order, 0, ntasks);
  const int dvp = (p.Dv + 15) / 16 * 16;
  task.split.n = int(n);
  float* buf = alloc_aligned<float>(size_t(ntasks) * n * BQ * (dvp + 1));
  task.split.o = buf;
  task.split.lse = buf + size_t(ntasks) * n * BQ * dvp;
  struct Ctx { const Task<T>* t; const TaskOrder* order; } ctx{&task, &order};
  parallel_for(ntasks * n, [](void* c, int64_t i) {
    const Ctx& x = *static_cast<const Ctx*>(c);
    int b, hg, qb;
    x.order->decode(i / x.t->split.n, &b, &hg, &qb);
    x.t->run(b, hg, qb, int(i % x.t->split.n));
  }, &ctx);
  parallel_for(ntasks, [](void* c, int64_t i) {
    const Ctx& x = *static_cast<const Ctx*>(c);
    int b, hg, qb;
    x.order->decode(i, &b, &hg, &qb);
    x.t->merge(b, hg);
  }, &ctx);
  free(buf);
}

template <typename T>
void run_all(const ForwardArgs& a) {
  const FlashParams& p = *a.p;
  const int hpt = heads_per_task(p);
  Task<T> task{a, p, hpt, BQ / hpt, 1, {}};
  const int nqb = (p.max_rows_q + task.nqi - 1) / task.nqi; // query blocks per head group
  TaskOrder order{nqb, p.gqa_ratio / hpt, p.B, p.Hk, bool(p.packed)};
  const int64_t nkv = order.kv_heads(), ntasks = nkv * order.per_kv_head();
  if (ntasks == 0) return;
  // Converting (packing) K and V up front costs about one pass over them:
  // worth it when several query blocks reuse them, not for decoding (one
  // block per head, few rows), where the blocks are converted as they
  // stream by. One full block of rows (64 queries, or 16 of 4 GQA heads)
  // with D <= 64 still gains from the packed GEMMs, where a key's row dot
  // products are short (2 threads, D 32-64, 64-4k keys: float32 0.72-0.89x
  // the time, bfloat16 0.75-0.99x; at D = 128 up to 1.23x slower), given tasks
  // enough for the threads (the decode path splits keys among them).
  const bool pack_one = hpt * p.max_rows_q == BQ && p.D <= 64 && ntasks >= 2 * num_threads();
  if (nqb < 2 && !pack_one) return run_decode(task, order);
#if defined(FA_BF16_DOT)
  if constexpr (is_bf16<T>) return run_bf16(task, order);
#endif
  // kSubBlocks query blocks per task, fewer where that would leave less
  // than 4 tasks per thread.
  for (task.nsub = kSubBlocks;; task.nsub /= 2) {
    order.nqt = (nqb + task.nsub - 1) / task.nsub;
    if (task.nsub == 1 || nkv * order.per_kv_head() >= 4 * num_threads()) break;
  }
  task.nsub = (nqb + order.nqt - 1) / order.nqt; // evened out: 3 + 3 blocks, not 4 + 2
  FloatKV& kv = task.kv;
  const int dvp = (p.Dv + 15) / 16 * 16;
  kv.lkp = (p.Lk + BK - 1) / BK * BK;
  // float32 V rows of at most 64 unit-stride columns, all of them covered
  // by the GEMM (no zero columns to add), are read in place, not copied:
  // copying into column chunks gained nothing at D = 64 but 2-7% at D = 128
  // (2 threads; ab_kernels.sh, RESULTS.md).
  const bool v_in_place = sizeof(T) == sizeof(float) && p.v_strides[3] == 1 && dvp == p.Dv &&
                          p.v_strides[2] <= 64;
  kv.vcols = v_in_place ? 0 : dvp;
  run_packed(task, order, kWaveBytes, [&](const Task<T>& t, int64_t slot, int64_t i) {
    const int b = int(i / p.Hk), hk = int(i % p.Hk);
    const int lkp = t.kv.lkp;
    convert_rows(static_cast<const T*>(a.k) + b * p.k_strides[0] + hk * p.k_strides[1], p.Lk, p.D,
                 p.k_strides[2], p.k_strides[3], 1.0f, lkp,
                 t.kv.kt + slot * size_t(lkp) * p.D, 16, nullptr, 0);
    if (t.kv.v)
      convert_rows(static_cast<const T*>(a.v) + b * p.v_strides[0] + hk * p.v_strides[1], p.Lk,
                   p.Dv, p.v_strides[2], p.v_strides[3], 1.0f, lkp, nullptr, 0,
                   t.kv.v + slot * size_t(dvp) * lkp, 16, size_t(lkp) * 16);
  });
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
