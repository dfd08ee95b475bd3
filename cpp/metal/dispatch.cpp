// The Metal dispatcher: every choice eval_gpu makes, with its reasons.

#include "metal/dispatch.h"

#include <algorithm>
#include <stdexcept>

namespace mlx_flash_attn::metal {

namespace {

int cdiv(long a, long b) {
  return int((a + b - 1) / b);
}

// Kernels are instantiated for a few head dims (FA_HEAD_DIMS); a call takes
// the smallest that holds both D and Dv and the kernels zero-pad the rest,
// so any head dim up to FA_MAX_HEAD_DIM runs with at most ~33% padding.
int head_dim_bucket(const FlashParams& p) {
  const int need = std::max(p.D, p.Dv);
#define FA_PICK(BD) \
  if (need <= BD) return BD;
  FA_HEAD_DIMS(FA_PICK)
#undef FA_PICK
  throw std::invalid_argument("[mlx_flash_attn] head dim above FA_MAX_HEAD_DIM");
}

int elem_size(const std::string& dtype) {
  return dtype == "float" ? 4 : 2;
}

// The option constants every attention kernel reads: a feature that is off
// is compiled out of the pipeline.
std::vector<std::pair<int, bool>> option_constants(const FlashParams& p) {
  return {{FA_FC_MASK_BOOL, p.mask_kind == FA_MASK_BOOL},
          {FA_FC_MASK_ADD, p.mask_kind == FA_MASK_ADDITIVE},
          {FA_FC_WINDOW, p.window_left >= 0 || p.window_right >= 0},
          {FA_FC_SOFTCAP, p.softcap > 0.0f},
          {FA_FC_ALIBI, p.has_alibi != 0},
          {FA_FC_SINKS, p.has_sinks != 0},
          {FA_FC_SEQS, p.has_seqs != 0},
          {FA_FC_DROPOUT, p.dropout_p > 0.0f}};
}

// Rows of the (B, Hq, Lq) outputs (one shared (Hq, Lq) set when packed).
long output_rows(const FlashParams& p) {
  return long(p.packed ? 1 : p.B) * p.Hq * p.Lq;
}

// Heads per block: the largest divisor of the GQA group size that fits in a
// block's rows. Stacking the query heads that share a K/V head lets one K/V
// tile serve all of them, so decoding reads K and V once per group.
int heads_per_block(const FlashParams& p) {
  int g = std::min(p.gqa_ratio, FA_BLOCK_Q);
  while (p.gqa_ratio % g) --g;
  return g;
}

} // namespace

Plan plan_forward(const FlashParams& in, const std::string& dtype, const Tuning& tune) {
  Plan plan{in, {}, {}};
  FlashParams& p = plan.params;
  const int bd = head_dim_bucket(p);
  const int bk = fa_key_tile(elem_size(dtype), bd);
  p.heads_per_block = heads_per_block(p);
  p.rows_per_head = FA_BLOCK_Q / p.heads_per_block;
  const int nqb = cdiv(p.max_rows_q, p.rows_per_head);
  const int groups = p.Hq / p.heads_per_block;

  // Flash-decoding: when there are too few query blocks to fill the GPU
  // (decoding: Lq = 1, one block per K/V head), the keys are split across
  // threadgroups, as many as fill it but none shorter than min_split_keys,
  // and a second kernel merges the partial results by their LSE.
  const long blocks = long(nqb) * groups * p.B;
  int splits = 1;
  if (blocks < tune.target_blocks)
    splits = int(std::clamp<long>(std::min<long>(cdiv(tune.target_blocks, blocks),
                                                 p.max_rows_k / tune.min_split_keys),
                                  1, tune.max_splits));
  p.split_keys = cdiv(cdiv(p.max_rows_k, splits), bk) * bk;
  p.n_splits = splits > 1 ? cdiv(p.max_rows_k, p.split_keys) : 1;
  const bool split = p.n_splits > 1;

  Launch fwd{"flash_fwd_" + dtype + "_" + std::to_string(bd), option_constants(p),
             {nqb * p.n_splits, groups, p.B}, {FA_THREADS, 1, 1},
             {FA_BUF_Q, FA_BUF_K, FA_BUF_V, FA_BUF_PARAMS, FA_BUF_MASK, FA_BUF_ALIBI,
              FA_BUF_SINKS, FA_BUF_SEQS, FA_BUF_KEY, FA_BUF_OUT, FA_BUF_LSE, FA_BUF_O_PART,
              FA_BUF_LSE_PART}};
  fwd.constants.push_back({FA_FC_SPLIT, split});
  plan.launches.push_back(fwd);
  if (split) {
    const long rows = output_rows(p);
    plan.scratch = {{FA_BUF_O_PART, size_t(p.n_splits) * rows * p.Dv},
                    {FA_BUF_LSE_PART, size_t(p.n_splits) * rows}};
    plan.launches.push_back({"flash_fwd_combine_" + dtype, {}, {int(rows), 1, 1}, {32, 1, 1},
                             {FA_BUF_O_PART, FA_BUF_LSE_PART, FA_BUF_PARAMS, FA_BUF_OUT,
                              FA_BUF_LSE}});
  }
  return plan;
}

Plan plan_backward(const FlashParams& in, const std::string& dtype, bool grad_mask,
                   bool grad_alibi, bool grad_sinks) {
  Plan plan{in, {}, {}};
  FlashParams& p = plan.params;
  const int bd = head_dim_bucket(p);
  const std::string suffix = dtype + "_" + std::to_string(bd);
  // The backward blocks hold one head each (no GQA stacking): dK/dV blocks
  // sum over the group's query heads themselves.
  p.heads_per_block = 1;
  p.rows_per_head = FA_BLOCK_Q;
  p.n_splits = 1;
  const long rows = output_rows(p);
  const int nqb = cdiv(p.max_rows_q, FA_BLOCK_Q), nkb = cdiv(p.max_rows_k, FA_BLOCK_Q);

  std::vector<std::pair<int, bool>> fc = option_constants(p);
  fc.push_back({FA_FC_GRAD_MASK, grad_mask});
  fc.push_back({FA_FC_GRAD_ALIBI, grad_alibi});
  fc.push_back({FA_FC_GRAD_SINKS, grad_sinks});

  // 1. Delta = rowsum(dO * O) - dLSE, one simdgroup per row.
  plan.scratch.push_back({FA_BUF_DELTA, size_t(rows)});
  plan.launches.push_back({"flash_bwd_delta_" + dtype, {}, {int(rows), 1, 1}, {32, 1, 1},
                           {FA_BUF_PARAMS, FA_BUF_OUT, FA_BUF_DOUT, FA_BUF_DLSE, FA_BUF_DELTA}});
  // 2. dQ (and the mask gradient, ALiBi/sink partial sums) per query block;
  // 3. dK, dV per key block. Each output element has one owner: no atomics,
  // so results are the same bits from run to run.
  const bool head_sums = grad_alibi || grad_sinks;
  if (head_sums) plan.scratch.push_back({FA_BUF_DHEAD, size_t(p.B) * p.Hq * nqb * 2});
  plan.launches.push_back({"flash_bwd_dq_" + suffix, fc, {nqb, p.Hq, p.B}, {FA_THREADS, 1, 1},
                           {FA_BUF_Q, FA_BUF_K, FA_BUF_V, FA_BUF_PARAMS, FA_BUF_MASK,
                            FA_BUF_ALIBI, FA_BUF_SINKS, FA_BUF_SEQS, FA_BUF_KEY, FA_BUF_LSE,
                            FA_BUF_DOUT, FA_BUF_DELTA, FA_BUF_DQ, FA_BUF_DMASK, FA_BUF_DHEAD}});
  plan.launches.push_back({"flash_bwd_dkv_" + suffix, fc, {nkb, p.Hk, p.B}, {FA_THREADS, 1, 1},
                           {FA_BUF_Q, FA_BUF_K, FA_BUF_V, FA_BUF_PARAMS, FA_BUF_MASK,
                            FA_BUF_ALIBI, FA_BUF_SEQS, FA_BUF_KEY, FA_BUF_LSE, FA_BUF_DOUT,
                            FA_BUF_DELTA, FA_BUF_DK, FA_BUF_DV}});
  // 4. The per-head gradients: the partial sums added in a fixed order.
  if (head_sums)
    plan.launches.push_back({"flash_bwd_head_sums", fc, {p.B * p.Hq, 1, 1}, {1, 1, 1},
                             {FA_BUF_PARAMS, FA_BUF_DHEAD, FA_BUF_DALIBI, FA_BUF_DSINKS}});
  return plan;
}

} // namespace mlx_flash_attn::metal
