// FlashAttention-2 backward for Apple GPUs.
//
// With S the score in log2 units, P = exp2(S - LSE * log2(e)) recomputed
// tile by tile from Q, K and the forward's LSE, and Delta = rowsum(dO * O) -
// dLSE (flash_bwd_delta):
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Delta)  (times tanh' under softcap),
//   dQ = scale * dS K  (flash_bwd_dq, one threadgroup per query block),
//   dK = scale * dS^T Q  (flash_bwd_dkv, one threadgroup per key block,
//   summing the query heads of its GQA group).
// Every output element has one owner, so there are no atomics and the
// results are the same bits from run to run. flash_bwd_dq also writes the
// additive mask's gradient and per-block ALiBi/sink partial sums, which
// flash_bwd_head_sums adds in a fixed order. With dropout multipliers z,
// dV uses P z and dS = P (dP z - Delta).

#include "flash_common.h"

// Delta per output row: one simdgroup per row. Grid: (rows, 1, 1) x 32.
template <typename T>
[[kernel]] void flash_bwd_delta(constant FlashParams& p [[buffer(FA_BUF_PARAMS)]],
                                const device T* out [[buffer(FA_BUF_OUT)]],
                                const device T* dout [[buffer(FA_BUF_DOUT)]],
                                const device float* dlse [[buffer(FA_BUF_DLSE)]],
                                device float* delta [[buffer(FA_BUF_DELTA)]],
                                uint row [[threadgroup_position_in_grid]],
                                ushort lane [[thread_index_in_simdgroup]]) {
  // (b, h, i) of the row; b is 0 when packed, where the batch strides are 0.
  const long i = row % p.Lq;
  const int h = (row / p.Lq) % p.Hq, b = row / (long(p.Lq) * p.Hq);
  const device T* d = dout + b * p.do_strides[0] + h * p.do_strides[1] + i * p.do_strides[2];
  float acc = 0.0f;
  for (int c = lane; c < p.Dv; c += 32) acc += float(d[c * p.do_strides[3]]) * float(out[row * p.Dv + c]);
  acc = simd_sum(acc);
  if (lane == 0)
    delta[row] = acc - dlse[b * p.dlse_strides[0] + h * p.dlse_strides[1] + i * p.dlse_strides[2]];
}

// dQ for FA_BLOCK_Q queries of one head. Grid: (query blocks, Hq, B).
template <typename T, int BD>
[[kernel, max_total_threads_per_threadgroup(FA_THREADS)]] void flash_bwd_dq(
    const device T* q [[buffer(FA_BUF_Q)]],
    const device T* k [[buffer(FA_BUF_K)]],
    const device T* v [[buffer(FA_BUF_V)]],
    constant FlashParams& p [[buffer(FA_BUF_PARAMS)]],
    const device uchar* mask [[buffer(FA_BUF_MASK)]],
    const device float* alibi [[buffer(FA_BUF_ALIBI)]],
    const device float* sinks [[buffer(FA_BUF_SINKS)]],
    const device int* seqs [[buffer(FA_BUF_SEQS)]],
    const device uint* key [[buffer(FA_BUF_KEY)]],
    const device float* lse [[buffer(FA_BUF_LSE)]],
    const device T* dout [[buffer(FA_BUF_DOUT)]],
    const device float* delta [[buffer(FA_BUF_DELTA)]],
    device T* dq [[buffer(FA_BUF_DQ)]],
    device float* dmask [[buffer(FA_BUF_DMASK)]],
    device float* dhead [[buffer(FA_BUF_DHEAD)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  constexpr int BK = fa_key_tile(sizeof(T), BD);
  constexpr int NF = BD / 8, NK = BK / 8;
  threadgroup T ks[BK * BD];
  threadgroup T vs[BK * BD];

  const int b = tg.z, h = tg.y, qb = tg.x, hk = h / p.gqa_ratio;
  const bool head_sums = fc_grad_alibi || fc_grad_sinks;
  device float* part = dhead + 2 * ((long(b) * p.Hq + h) * ((p.max_rows_q + FA_BLOCK_Q - 1) / FA_BLOCK_Q) + qb);
  const Seq sq = seq_of(p, seqs, b);
  const long i0 = sq.qbeg + long(qb) * FA_BLOCK_Q;
  if (i0 >= sq.qend) { // a short packed sequence: nothing to do but the partials
    if (head_sums && tid == 0) part[0] = part[1] = 0.0f;
    return;
  }
  const int nq = int(min(long(FA_BLOCK_Q), sq.qend - i0));

  const Lane ln = lane_coord(lane);
  const int r = sg * 8 + ln.row;
  const bool row_ok = r < nq;
  const long i = i0 + r;
  const long row = out_row(p, p.Hq, p.Lq, b, h, row_ok ? i : i0);

  long kbeg, kend;
  visible_keys(p, sq, i0, i0 + nq, &kbeg, &kend);

  // Q in log2 units and dO of this lane's row; its LSE (log2) and Delta.
  const float qscale = p.scale * M_LOG2E_F;
  frag_t qf[NF], df[NF], dqf[NF];
  load_row_frags<T, NF>(qf, q + b * p.q_strides[0] + h * p.q_strides[1] + i * p.q_strides[2],
                        p.q_strides[3], p.D, row_ok, qscale, ln);
  load_row_frags<T, NF>(df, dout + b * p.do_strides[0] + h * p.do_strides[1] + i * p.do_strides[2],
                        p.do_strides[3], p.Dv, row_ok, 1.0f, ln);
  for (int t = 0; t < NF; ++t) dqf[t] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  const float lse2 = row_ok ? lse[row] * M_LOG2E_F : -INFINITY;
  const float del = row_ok ? delta[row] : 0.0f;
  const float slope2 = fc_alibi ? per_head(alibi, p.alibi_strides, b, h) * M_LOG2E_F : 0.0f;
  const float cap2 = p.softcap * M_LOG2E_F;
  float dslope = 0.0f;

  // The mask gradient is 0 outside the visible keys.
  if (fc_grad_mask)
    for (long idx = tid; idx < long(nq) * p.Lk; idx += FA_THREADS) {
      const long j = idx % p.Lk;
      if (j < kbeg || j >= kend) dmask[(out_row(p, p.Hq, p.Lq, b, h, i0) + idx / p.Lk) * p.Lk + j] = 0.0f;
    }

  const device T* kh = k + b * p.k_strides[0] + hk * p.k_strides[1];
  const device T* vh = v + b * p.v_strides[0] + hk * p.v_strides[1];
  for (long j0 = kbeg; j0 < kend; j0 += BK) {
    const int nk = int(min(long(BK), kend - j0));
    threadgroup_barrier(mem_flags::mem_threadgroup);
    load_tile<T, BK, BD>(ks, kh + j0 * p.k_strides[2], p.k_strides[2], p.k_strides[3], 0, nk, p.D, tid);
    load_tile<T, BK, BD>(vs, vh + j0 * p.v_strides[2], p.v_strides[2], p.v_strides[3], 0, nk, p.Dv, tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);

    frag_t s[NK];
    for (int kk = 0; kk < NK; ++kk) {
      frag_t dp = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      s[kk] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      for (int t = 0; t < NF; ++t) {
        simdgroup_multiply_accumulate(s[kk], qf[t], load_frag(ks, BD, t * 8, kk * 8, ln, true), s[kk]);
        simdgroup_multiply_accumulate(dp, df[t], load_frag(vs, BD, t * 8, kk * 8, ln, true), dp);
      }
      // s[kk] becomes dS, the gradient of the (soft-capped) score.
      for (int e = 0; e < 2; ++e) {
        const int jj = kk * 8 + ln.col + e;
        const long j = j0 + jj;
        float capped = 0.0f, ds = 0.0f;
        if (row_ok && jj < nk && lse2 != -INFINITY) {
          const float x = modify_score(p, sq, mask, b, h, i, j, s[kk].thread_elements()[e], slope2, &capped);
          const float pe = exp2(x - lse2);
          const float z = fc_dropout && pe > 0.0f ? dropout_scale(p, key, b, h, i, j) : 1.0f;
          ds = pe * (dp.thread_elements()[e] * z - del);
        }
        if (fc_grad_mask && row_ok && jj < nk) dmask[row * p.Lk + j] = ds;
        if (fc_grad_alibi) dslope -= ds * float(abs(i + sq.shift - j));
        if (fc_softcap) ds *= 1.0f - (capped / cap2) * (capped / cap2);
        s[kk].thread_elements()[e] = ds;
      }
    }
    for (int t = 0; t < NF; ++t)
      for (int kk = 0; kk < NK; ++kk)
        simdgroup_multiply_accumulate(dqf[t], s[kk], load_frag(ks, BD, kk * 8, t * 8, ln, false), dqf[t]);
  }

  if (row_ok) {
    device T* dqrow = dq + row * p.D;
    for (int t = 0; t < NF; ++t)
      for (int e = 0; e < 2; ++e) {
        const int d = t * 8 + ln.col + e;
        if (d < p.D) dqrow[d] = T(dqf[t].thread_elements()[e] * p.scale);
      }
  }
  if (head_sums) {
    // d lse / d sink = P_sink; the sink carries no value.
    float dsink = 0.0f;
    if (fc_grad_sinks && row_ok && ln.col == 0)
      dsink = -exp(per_head(sinks, p.sinks_strides, b, h) - lse[row]) * del;
    dslope = simd_sum(dslope);
    dsink = simd_sum(dsink);
    // The K tile's memory is free now: it holds the simdgroups' sums.
    threadgroup float* sums = (threadgroup float*)ks;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (lane == 0) {
      sums[2 * sg] = dslope;
      sums[2 * sg + 1] = dsink;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) {
      part[0] = (sums[0] + sums[2]) + (sums[4] + sums[6]);
      part[1] = (sums[1] + sums[3]) + (sums[5] + sums[7]);
    }
  }
}

// dK and dV for FA_BLOCK_Q keys of one K/V head, over every query head of
// its group. Grid: (key blocks, Hk, B).
template <typename T, int BD>
[[kernel, max_total_threads_per_threadgroup(FA_THREADS)]] void flash_bwd_dkv(
    const device T* q [[buffer(FA_BUF_Q)]],
    const device T* k [[buffer(FA_BUF_K)]],
    const device T* v [[buffer(FA_BUF_V)]],
    constant FlashParams& p [[buffer(FA_BUF_PARAMS)]],
    const device uchar* mask [[buffer(FA_BUF_MASK)]],
    const device float* alibi [[buffer(FA_BUF_ALIBI)]],
    const device int* seqs [[buffer(FA_BUF_SEQS)]],
    const device uint* key [[buffer(FA_BUF_KEY)]],
    const device float* lse [[buffer(FA_BUF_LSE)]],
    const device T* dout [[buffer(FA_BUF_DOUT)]],
    const device float* delta [[buffer(FA_BUF_DELTA)]],
    device T* dk [[buffer(FA_BUF_DK)]],
    device T* dv [[buffer(FA_BUF_DV)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  constexpr int BQ = fa_key_tile(sizeof(T), BD); // query rows per tile
  constexpr int NF = BD / 8, NQ = BQ / 8;
  threadgroup T qs[BQ * BD];
  threadgroup T dos[BQ * BD];

  const int b = tg.z, hk = tg.y, kb = tg.x;
  const Seq sq = seq_of(p, seqs, b);
  const long j0 = sq.kbeg + long(kb) * FA_BLOCK_Q;
  if (j0 >= sq.kend) return;
  const int nk = int(min(long(FA_BLOCK_Q), sq.kend - j0));

  // This lane's key row.
  const Lane ln = lane_coord(lane);
  const int c = sg * 8 + ln.row;
  const bool key_ok = c < nk;
  const long j = j0 + c;

  frag_t kf[NF], vf[NF], dkf[NF], dvf[NF];
  load_row_frags<T, NF>(kf, k + b * p.k_strides[0] + hk * p.k_strides[1] + j * p.k_strides[2],
                        p.k_strides[3], p.D, key_ok, 1.0f, ln);
  load_row_frags<T, NF>(vf, v + b * p.v_strides[0] + hk * p.v_strides[1] + j * p.v_strides[2],
                        p.v_strides[3], p.Dv, key_ok, 1.0f, ln);
  for (int t = 0; t < NF; ++t) {
    dkf[t] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    dvf[t] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  long qbeg, qend;
  visible_queries(p, sq, j0, j0 + nk, &qbeg, &qend);
  const float qscale = p.scale * M_LOG2E_F, cap2 = p.softcap * M_LOG2E_F;

  for (int h = hk * p.gqa_ratio; h < (hk + 1) * p.gqa_ratio; ++h) {
    const float slope2 = fc_alibi ? per_head(alibi, p.alibi_strides, b, h) * M_LOG2E_F : 0.0f;
    const device T* qh = q + b * p.q_strides[0] + h * p.q_strides[1];
    const device T* dh = dout + b * p.do_strides[0] + h * p.do_strides[1];
    for (long i0 = qbeg; i0 < qend; i0 += BQ) {
      const int nq = int(min(long(BQ), qend - i0));
      threadgroup_barrier(mem_flags::mem_threadgroup);
      load_tile<T, BQ, BD>(qs, qh + i0 * p.q_strides[2], p.q_strides[2], p.q_strides[3], 0, nq, p.D, tid);
      load_tile<T, BQ, BD>(dos, dh + i0 * p.do_strides[2], p.do_strides[2], p.do_strides[3], 0, nq, p.Dv, tid);
      threadgroup_barrier(mem_flags::mem_threadgroup);

      // S^T = K Q^T and dP^T = V dO^T: rows are this simdgroup's keys.
      frag_t st[NQ], dpt[NQ];
      for (int qq = 0; qq < NQ; ++qq) {
        st[qq] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        dpt[qq] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        for (int t = 0; t < NF; ++t) {
          simdgroup_multiply_accumulate(st[qq], kf[t], load_frag(qs, BD, t * 8, qq * 8, ln, true), st[qq]);
          simdgroup_multiply_accumulate(dpt[qq], vf[t], load_frag(dos, BD, t * 8, qq * 8, ln, true), dpt[qq]);
        }
        for (int e = 0; e < 2; ++e) {
          const int ii = qq * 8 + ln.col + e;
          const long i = i0 + ii;
          float pz = 0.0f, ds = 0.0f;
          if (key_ok && ii < nq) {
            const long row = out_row(p, p.Hq, p.Lq, b, h, i);
            const float lse2 = lse[row] * M_LOG2E_F;
            float capped = 0.0f;
            const float x = modify_score(p, sq, mask, b, h, i, j, st[qq].thread_elements()[e] * qscale,
                                         slope2, &capped);
            if (lse2 != -INFINITY && x != -INFINITY) {
              const float pe = exp2(x - lse2);
              const float z = fc_dropout && pe > 0.0f ? dropout_scale(p, key, b, h, i, j) : 1.0f;
              pz = pe * z;
              ds = pe * (dpt[qq].thread_elements()[e] * z - delta[row]);
              if (fc_softcap) ds *= 1.0f - (capped / cap2) * (capped / cap2);
            }
          }
          st[qq].thread_elements()[e] = pz;
          dpt[qq].thread_elements()[e] = ds;
        }
      }
      // dV += (P z)^T dO, dK += dS^T Q.
      for (int t = 0; t < NF; ++t)
        for (int qq = 0; qq < NQ; ++qq) {
          simdgroup_multiply_accumulate(dvf[t], st[qq], load_frag(dos, BD, qq * 8, t * 8, ln, false), dvf[t]);
          simdgroup_multiply_accumulate(dkf[t], dpt[qq], load_frag(qs, BD, qq * 8, t * 8, ln, false), dkf[t]);
        }
    }
  }

  if (!key_ok) return; // no barrier follows
  const long row = out_row(p, p.Hk, p.Lk, b, hk, j);
  for (int t = 0; t < NF; ++t)
    for (int e = 0; e < 2; ++e) {
      const int d = t * 8 + ln.col + e;
      if (d < p.D) dk[row * p.D + d] = T(dkf[t].thread_elements()[e] * p.scale);
      if (d < p.Dv) dv[row * p.Dv + d] = T(dvf[t].thread_elements()[e]);
    }
}

// The ALiBi and sink gradients of each (batch, head): its query blocks'
// partial sums added in order. Grid: (B * Hq, 1, 1) x 1.
[[kernel]] void flash_bwd_head_sums(constant FlashParams& p [[buffer(FA_BUF_PARAMS)]],
                                    const device float* dhead [[buffer(FA_BUF_DHEAD)]],
                                    device float* dalibi [[buffer(FA_BUF_DALIBI)]],
                                    device float* dsinks [[buffer(FA_BUF_DSINKS)]],
                                    uint bh [[threadgroup_position_in_grid]]) {
  const int nqb = (p.max_rows_q + FA_BLOCK_Q - 1) / FA_BLOCK_Q;
  float a = 0.0f, s = 0.0f;
  for (int qb = 0; qb < nqb; ++qb) {
    a += dhead[2 * (long(bh) * nqb + qb)];
    s += dhead[2 * (long(bh) * nqb + qb) + 1];
  }
  if (fc_grad_alibi) dalibi[bh] = a;
  if (fc_grad_sinks) dsinks[bh] = s;
}

#define FA_BWD(T, BD)                                                                      \
  template [[host_name("flash_bwd_dq_" #T "_" #BD)]] [[kernel]] decltype(flash_bwd_dq<T, BD>) \
      flash_bwd_dq<T, BD>;                                                                 \
  template [[host_name("flash_bwd_dkv_" #T "_" #BD)]] [[kernel]]                           \
      decltype(flash_bwd_dkv<T, BD>) flash_bwd_dkv<T, BD>;
#define FA_BWD_DTYPES(BD) FA_BWD(float, BD) FA_BWD(half, BD) FA_BWD(bfloat, BD)
FA_HEAD_DIMS(FA_BWD_DTYPES)

template [[host_name("flash_bwd_delta_float")]] [[kernel]] decltype(flash_bwd_delta<float>)
    flash_bwd_delta<float>;
template [[host_name("flash_bwd_delta_half")]] [[kernel]] decltype(flash_bwd_delta<half>)
    flash_bwd_delta<half>;
template [[host_name("flash_bwd_delta_bfloat")]] [[kernel]] decltype(flash_bwd_delta<bfloat>)
    flash_bwd_delta<bfloat>;
