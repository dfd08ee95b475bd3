// FlashAttention-2 forward for Apple GPUs, prefill and decode.
//
// A threadgroup of 4 simdgroups owns a block of FA_BLOCK_Q = 32 query rows:
// rows_per_head queries of each of heads_per_block query heads that share a
// K/V head (GQA heads stacked, so a K/V tile serves the whole group). Each
// simdgroup holds 8 rows: Q, the O accumulator and the scores live in 8x8
// simdgroup matrices; K and V tiles stream through threadgroup memory.
// Softmax statistics stay in registers, in float32 and log2 units.
//
// Decode (flash-decoding): with fc_split the keys are cut into n_splits
// ranges, one threadgroup each, which write a partial O and LSE; then
// flash_fwd_combine merges them by LSE.
//
// Grid: (query blocks * n_splits, Hq / heads_per_block, B); FA_THREADS threads.

#include "flash_common.h"

template <typename T, int BD>
[[kernel, max_total_threads_per_threadgroup(FA_THREADS)]] void flash_fwd(
    const device T* q [[buffer(FA_BUF_Q)]],
    const device T* k [[buffer(FA_BUF_K)]],
    const device T* v [[buffer(FA_BUF_V)]],
    constant FlashParams& p [[buffer(FA_BUF_PARAMS)]],
    const device uchar* mask [[buffer(FA_BUF_MASK)]],
    const device float* alibi [[buffer(FA_BUF_ALIBI)]],
    const device float* sinks [[buffer(FA_BUF_SINKS)]],
    const device int* seqs [[buffer(FA_BUF_SEQS)]],
    const device uint* key [[buffer(FA_BUF_KEY)]],
    device T* out [[buffer(FA_BUF_OUT)]],
    device float* lse [[buffer(FA_BUF_LSE)]],
    device float* o_part [[buffer(FA_BUF_O_PART)]],
    device float* lse_part [[buffer(FA_BUF_LSE_PART)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]]) {
  constexpr int BK = fa_key_tile(sizeof(T), BD);
  constexpr int NF = BD / 8; // head-dim fragments
  constexpr int NK = BK / 8; // key fragments of a tile
  threadgroup T ks[BK * BD];
  threadgroup T vs[BK * BD];

  const int b = tg.z;
  const int split = tg.x % p.n_splits, qb = tg.x / p.n_splits;
  const Seq sq = seq_of(p, seqs, b);
  const long i0 = sq.qbeg + long(qb) * p.rows_per_head;
  if (i0 >= sq.qend) return; // the whole threadgroup: a short packed sequence
  const int nqh = int(min(long(p.rows_per_head), sq.qend - i0));
  const int hk = tg.y * p.heads_per_block / p.gqa_ratio;

  // This lane's row: head h, query i.
  const Lane ln = lane_coord(lane);
  const int r = sg * 8 + ln.row;
  const int hh = r / p.rows_per_head, ii = r % p.rows_per_head;
  const bool row_ok = hh < p.heads_per_block && ii < nqh;
  const int h = tg.y * p.heads_per_block + min(hh, p.heads_per_block - 1);
  const long i = i0 + ii;

  // Keys of this threadgroup: those the block may see, within its split.
  long kbeg, kend;
  visible_keys(p, sq, i0, i0 + nqh, &kbeg, &kend);
  if (fc_split) {
    const long s0 = sq.kbeg + long(split) * p.split_keys;
    kbeg = max(kbeg, s0);
    kend = min(kend, s0 + p.split_keys);
  }

  // Q, pre-multiplied by scale * log2(e): scores come out in log2 units.
  const float qscale = p.scale * M_LOG2E_F;
  frag_t qf[NF], of[NF];
  load_row_frags<T, NF>(qf, q + b * p.q_strides[0] + h * p.q_strides[1] + i * p.q_strides[2],
                        p.q_strides[3], p.D, row_ok && kbeg < kend, qscale, ln);
  for (int t = 0; t < NF; ++t) of[t] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  const float slope2 = fc_alibi ? per_head(alibi, p.alibi_strides, b, h) * M_LOG2E_F : 0.0f;
  float m = -INFINITY, l = 0.0f;

  const device T* kh = k + b * p.k_strides[0] + hk * p.k_strides[1];
  const device T* vh = v + b * p.v_strides[0] + hk * p.v_strides[1];
  for (long j0 = kbeg; j0 < kend; j0 += BK) {
    const int nk = int(min(long(BK), kend - j0));
    threadgroup_barrier(mem_flags::mem_threadgroup); // the previous tile is consumed
    load_tile<T, BK, BD>(ks, kh + j0 * p.k_strides[2], p.k_strides[2], p.k_strides[3], 0, nk, p.D,
                         tid);
    load_tile<T, BK, BD>(vs, vh + j0 * p.v_strides[2], p.v_strides[2], p.v_strides[3], 0, nk, p.Dv,
                         tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // S = Q K^T for this simdgroup's 8 rows.
    frag_t s[NK];
    for (int kk = 0; kk < NK; ++kk) {
      s[kk] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      for (int t = 0; t < NF; ++t)
        simdgroup_multiply_accumulate(s[kk], qf[t], load_frag(ks, BD, t * 8, kk * 8, ln, true),
                                      s[kk]);
    }

    // Score modifiers, then the online softmax of the lane's row.
    float mx = -INFINITY;
    for (int kk = 0; kk < NK; ++kk)
      for (int e = 0; e < 2; ++e) {
        const int jj = kk * 8 + ln.col + e;
        float capped;
        float x = row_ok && jj < nk
                      ? modify_score(p, sq, mask, b, h, i, j0 + jj, s[kk].thread_elements()[e],
                                     slope2, &capped)
                      : -INFINITY;
        s[kk].thread_elements()[e] = x;
        mx = max(mx, x);
      }
    const float m_new = max(m, row_max(mx));
    // A row that has seen nothing yet keeps P = 0 and O = 0.
    const float alpha = m_new == -INFINITY ? 1.0f : exp2(m - m_new);
    float psum = 0.0f;
    for (int kk = 0; kk < NK; ++kk)
      for (int e = 0; e < 2; ++e) {
        const float x = s[kk].thread_elements()[e];
        const float pe = m_new == -INFINITY ? 0.0f : exp2(x - m_new);
        psum += pe;
        // Dropout after the running sum: l normalises the undropped softmax.
        s[kk].thread_elements()[e] =
            fc_dropout && pe > 0.0f
                ? pe * dropout_scale(p, key, b, h, i, j0 + kk * 8 + ln.col + e)
                : pe;
      }
    l = l * alpha + row_sum(psum);
    m = m_new;

    // O = alpha * O + P V.
    for (int t = 0; t < NF; ++t) {
      of[t].thread_elements()[0] *= alpha;
      of[t].thread_elements()[1] *= alpha;
      for (int kk = 0; kk < NK; ++kk)
        simdgroup_multiply_accumulate(of[t], s[kk], load_frag(vs, BD, kk * 8, t * 8, ln, false),
                                      of[t]);
    }
  }

  // The sink joins the denominator once: in split 0 when the keys are split.
  if (fc_sinks && (!fc_split || split == 0)) {
    const float sink2 = per_head(sinks, p.sinks_strides, b, h) * M_LOG2E_F;
    const float m_new = max(m, sink2);
    const float corr = exp2(m - m_new);
    l = l * corr + exp2(sink2 - m_new);
    m = m_new;
    for (int t = 0; t < NF; ++t) {
      of[t].thread_elements()[0] *= corr;
      of[t].thread_elements()[1] *= corr;
    }
  }
  if (!row_ok) return; // no barrier follows
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  const float row_lse = l > 0.0f ? (m + log2(l)) * M_LN2_F : -INFINITY;
  const long row = out_row(p, p.Hq, p.Lq, b, h, i);
  if (fc_split) {
    const long at = long(split) * (p.packed ? 1 : p.B) * p.Hq * p.Lq + row;
    for (int t = 0; t < NF; ++t)
      for (int e = 0; e < 2; ++e) {
        const int d = t * 8 + ln.col + e;
        if (d < p.Dv) o_part[at * p.Dv + d] = of[t].thread_elements()[e] * inv;
      }
    if (ln.col == 0) lse_part[at] = row_lse;
  } else {
    for (int t = 0; t < NF; ++t)
      for (int e = 0; e < 2; ++e) {
        const int d = t * 8 + ln.col + e;
        if (d < p.Dv) out[row * p.Dv + d] = T(of[t].thread_elements()[e] * inv);
      }
    if (ln.col == 0) lse[row] = row_lse;
  }
}

// Merges the n_splits partial results of every output row: one simdgroup
// per row. Grid: (rows, 1, 1) threadgroups of 32 threads.
template <typename T>
[[kernel]] void flash_fwd_combine(const device float* o_part [[buffer(FA_BUF_O_PART)]],
                                  const device float* lse_part [[buffer(FA_BUF_LSE_PART)]],
                                  constant FlashParams& p [[buffer(FA_BUF_PARAMS)]],
                                  device T* out [[buffer(FA_BUF_OUT)]],
                                  device float* lse [[buffer(FA_BUF_LSE)]],
                                  uint row [[threadgroup_position_in_grid]],
                                  ushort lane [[thread_index_in_simdgroup]]) {
  const long rows = long(p.packed ? 1 : p.B) * p.Hq * p.Lq;
  float m = -INFINITY;
  for (int s = 0; s < p.n_splits; ++s) m = max(m, lse_part[s * rows + row]);
  float wsum = 0.0f;
  for (int s = 0; s < p.n_splits; ++s)
    wsum += m == -INFINITY ? 0.0f : exp(lse_part[s * rows + row] - m);
  for (int d = lane; d < p.Dv; d += 32) {
    float acc = 0.0f;
    for (int s = 0; s < p.n_splits; ++s) {
      const float ls = lse_part[s * rows + row];
      if (ls != -INFINITY) acc += exp(ls - m) * o_part[(s * rows + row) * p.Dv + d];
    }
    out[row * p.Dv + d] = T(wsum > 0.0f ? acc / wsum : 0.0f);
  }
  if (lane == 0) lse[row] = wsum > 0.0f ? m + log(wsum) : -INFINITY;
}

#define FA_FWD(T, BD) \
  template [[host_name("flash_fwd_" #T "_" #BD)]] [[kernel]] decltype(flash_fwd<T, BD>) \
      flash_fwd<T, BD>;
#define FA_FWD_DTYPES(BD) FA_FWD(float, BD) FA_FWD(half, BD) FA_FWD(bfloat, BD)
FA_HEAD_DIMS(FA_FWD_DTYPES)

template [[host_name("flash_fwd_combine_float")]] [[kernel]] decltype(flash_fwd_combine<float>)
    flash_fwd_combine<float>;
template [[host_name("flash_fwd_combine_half")]] [[kernel]] decltype(flash_fwd_combine<half>)
    flash_fwd_combine<half>;
template [[host_name("flash_fwd_combine_bfloat")]] [[kernel]] decltype(flash_fwd_combine<bfloat>)
    flash_fwd_combine<bfloat>;
