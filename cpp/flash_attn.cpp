// attention(): the one place where arguments are checked and turned into the
// FlashAttention primitive's inputs and options; plus the primitive's
// shape, equivalence, vmap and CPU evaluation.

#include <algorithm>
#include <atomic>
#include <functional>
#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/random.h"
#include "mlx/transforms.h"

#include "cpu/flash_cpu.h"
#include "flash_attn.h"
#include "primitives.h"

namespace mlx_flash_attn {

namespace {

std::string shape_str(const mx::Shape& s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

std::string dtype_str(mx::Dtype t) {
  std::ostringstream os;
  os << t;
  return os.str();
}

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[mlx_flash_attn.attention] " + msg);
}

bool is_supported_float(mx::Dtype t) {
  return t == mx::float32 || t == mx::float16 || t == mx::bfloat16;
}

// True if `s` broadcasts to `target` under NumPy rules (right-aligned).
bool broadcastable(const mx::Shape& s, const mx::Shape& target) {
  if (s.size() > target.size()) return false;
  size_t off = target.size() - s.size();
  for (size_t i = 0; i < s.size(); ++i)
    if (s[i] != 1 && s[i] != target[off + i]) return false;
  return true;
}

// Per-head values (ALiBi slopes, sink logits): (Hq,) or (B, Hq), any float
// dtype; returned as a float32 (B, Hq) view.
mx::array per_head(const mx::array& a, const char* name, int B, int Hq, mx::StreamOrDevice s) {
  bool ok = (a.ndim() == 1 && a.shape(0) == Hq) ||
            (a.ndim() == 2 && a.shape(0) == B && a.shape(1) == Hq);
  if (!ok)
    fail(std::string(name) + " must have shape (Hq,) = (" + std::to_string(Hq) +
         ",) or (B, Hq) = (" + std::to_string(B) + ", " + std::to_string(Hq) +
         "); got " + shape_str(a.shape()));
  if (!mx::issubdtype(a.dtype(), mx::floating))
    fail(std::string(name) + " must be a floating-point array; got " + dtype_str(a.dtype()));
  return mx::broadcast_to(mx::astype(a, mx::float32, s), {B, Hq}, s);
}

} // namespace

static std::atomic<bool> g_poison{false};
void set_poison_outputs(bool on) { g_poison = on; }
bool poison_outputs() { return g_poison; }

namespace {

const char* const kQkvNames[3] = {"q", "k", "v"};

// Ranks and dtypes of q, k, v; layouts describes the expected dims.
void check_qkv(const mx::array* qkv[3], size_t ndim, const char* const layouts[3]) {
  for (int i = 0; i < 3; ++i)
    if (qkv[i]->ndim() != ndim)
      fail(std::string(kQkvNames[i]) + " must be " + std::to_string(ndim) + "-D " + layouts[i] +
           "; got shape " + shape_str(qkv[i]->shape()));
  for (int i = 0; i < 3; ++i)
    if (!is_supported_float(qkv[i]->dtype()))
      fail(std::string(kQkvNames[i]) + " must be float32, float16 or bfloat16; got " +
           dtype_str(qkv[i]->dtype()));
  if (qkv[1]->dtype() != qkv[0]->dtype() || qkv[2]->dtype() != qkv[0]->dtype())
    fail("q, k and v must have the same dtype; got " + dtype_str(qkv[0]->dtype()) + ", " +
         dtype_str(qkv[1]->dtype()) + ", " + dtype_str(qkv[2]->dtype()));
}

// Heads and head dims, shared by the padded and packed layouts.
void check_heads(int Hq, int Hk, int D, int Dk, int Dv, const std::string& shapes) {
  if (Dk != D)
    fail("k must have q's head dim D = " + std::to_string(D) + "; got " + shapes);
  if (Hk == 0 || Hq % Hk != 0)
    fail("the number of query heads (" + std::to_string(Hq) +
         ") must be a multiple of the number of key/value heads (" + std::to_string(Hk) + ")");
  if (D < 1 || D > FA_MAX_HEAD_DIM)
    fail("head dim D must be in [1, " + std::to_string(FA_MAX_HEAD_DIM) + "]; got " +
         std::to_string(D));
  if (Dv < 1 || Dv > FA_MAX_HEAD_DIM)
    fail("value head dim Dv must be in [1, " + std::to_string(FA_MAX_HEAD_DIM) + "]; got " +
         std::to_string(Dv));
}

// A (B,) integer length per batch entry, clamped to [0, L], as int32.
mx::array lengths(const mx::array& a, const char* name, int B, int L, mx::StreamOrDevice s) {
  if (a.ndim() != 1 || a.shape(0) != B)
    fail(std::string(name) + " must have shape (B,) = (" + std::to_string(B) + ",); got " +
         shape_str(a.shape()));
  if (!mx::issubdtype(a.dtype(), mx::integer))
    fail(std::string(name) + " must be an integer array; got " + dtype_str(a.dtype()));
  return mx::clip(mx::astype(a, mx::int32, s), mx::array(0), mx::array(L), s);
}

// Checks the options every entry point shares, appends the optional inputs
// after q, k, v and builds the primitive. q, k, v are (B, H, L, D) views;
// with packed, B = 1 and seqs gives the `entries` sequences.
std::vector<mx::array> build(const mx::array& q, const mx::array& k, const mx::array& v,
                             const AttentionOptions& o, std::optional<mx::array> seqs,
                             bool packed, int entries, int max_q, int max_k,
                             mx::StreamOrDevice s) {
  const int B = entries, Hq = q.shape(1), Lq = q.shape(2), D = q.shape(3);
  const int Lk = k.shape(2), Dv = v.shape(3);

  AttnOptions opts;
  opts.scale = o.scale.value_or(1.0f / std::sqrt(float(D)));
  if (!std::isfinite(opts.scale)) fail("scale must be finite; got " + std::to_string(opts.scale));
  if (!(o.softcap >= 0.0f) || !std::isfinite(o.softcap))
    fail("softcap must be a finite number >= 0; got " + std::to_string(o.softcap));
  opts.softcap = o.softcap;
  if (!(o.dropout_p >= 0.0f && o.dropout_p < 1.0f))
    fail("dropout_p must be in [0, 1); got " + std::to_string(o.dropout_p));
  opts.dropout_p = o.dropout_p;

  auto [wl, wr] = o.window_size;
  if (wl < -1 || wr < -1)
    fail("window_size must be (left, right) with each >= 0, or -1 for unbounded; got (" +
         std::to_string(wl) + ", " + std::to_string(wr) + ")");
  bool causal = o.causal;
  if (!o.mask_mode.empty()) {
    if (o.mask_mode != "causal")
      fail("mask must be None, \"causal\" or an array; got the string \"" + o.mask_mode + "\"");
    causal = true;
  }
  if (causal) wr = (wr < 0) ? 0 : std::min(wr, 0);
  opts.window_left = wl;
  opts.window_right = wr;

  std::vector<mx::array> inputs = {q, k, v};
  if (o.mask) {
    if (packed)
      fail("mask arrays are not supported by attention_varlen; use causal or window_size");
    const mx::array& m = *o.mask;
    const mx::Shape full = {B, Hq, Lq, Lk};
    if (!broadcastable(m.shape(), full))
      fail("mask must be broadcastable to (B, Hq, Lq, Lk) = " + shape_str(full) + "; got shape " +
           shape_str(m.shape()));
    if (m.dtype() == mx::bool_) {
      opts.mask_kind = FA_MASK_BOOL;
      inputs.push_back(mx::broadcast_to(m, full, s));
    } else if (mx::issubdtype(m.dtype(), mx::floating)) {
      opts.mask_kind = FA_MASK_ADDITIVE;
      inputs.push_back(mx::broadcast_to(mx::astype(m, mx::float32, s), full, s));
    } else {
      fail("mask must be a boolean array (True keeps) or a floating-point additive array; got " +
           dtype_str(m.dtype()));
    }
  }
  if (o.alibi_slopes) {
    opts.has_alibi = true;
    inputs.push_back(per_head(*o.alibi_slopes, "alibi_slopes", B, Hq, s));
  }
  if (o.sinks) {
    opts.has_sinks = true;
    inputs.push_back(per_head(*o.sinks, "sinks", B, Hq, s));
  }
  if (seqs) {
    opts.has_seqs = true;
    opts.packed = packed;
    inputs.push_back(mx::contiguous(*seqs, false, s));
  }
  opts.max_rows_q = max_q;
  opts.max_rows_k = max_k;
  if (opts.dropout_p > 0.0f) {
    mx::array key = o.key ? *o.key : mx::random::bits({2}, 4, std::nullopt, s);
    if (key.dtype() != mx::uint32 || key.size() != 2)
      fail("key must be an mx.random.key (2 uint32 values); got " + dtype_str(key.dtype()) +
           " of shape " + shape_str(key.shape()));
    inputs.push_back(mx::contiguous(mx::reshape(key, {2}, s), false, s));
  }

  return mx::array::make_arrays(
      {{q.shape(0), Hq, Lq, Dv}, {q.shape(0), Hq, Lq}},
      {q.dtype(), mx::float32},
      std::make_shared<FlashAttention>(mx::to_stream(s), opts),
      std::move(inputs));
}

} // namespace

std::vector<mx::array> attention(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    const AttentionOptions& o,
    mx::StreamOrDevice s) {
  const char* const layouts[3] = {"(B, Hq, Lq, D)", "(B, Hk, Lk, D)", "(B, Hk, Lk, Dv)"};
  const mx::array* qkv[3] = {&q, &k, &v};
  check_qkv(qkv, 4, layouts);

  const int B = q.shape(0), Hq = q.shape(1), Lq = q.shape(2);
  const int Hk = k.shape(1), Lk = k.shape(2);
  if (k.shape(0) != B || v.shape(0) != B)
    fail("q, k and v must have the same batch size B; got q " + shape_str(q.shape()) +
         ", k " + shape_str(k.shape()) + ", v " + shape_str(v.shape()));
  if (v.shape(1) != Hk || v.shape(2) != Lk)
    fail("k and v must have the same heads and length (B, Hk, Lk, .); got k " +
         shape_str(k.shape()) + ", v " + shape_str(v.shape()));
  check_heads(Hq, Hk, q.shape(3), k.shape(3), v.shape(3),
              "shape " + shape_str(k.shape()));

  // Padded batches: each entry's valid rows, at the start (right padding)
  // or the end (left padding) of its Lq query and Lk key rows.
  std::optional<mx::array> seqs;
  if (o.q_lengths || o.kv_lengths) {
    if (o.padding_side != "right" && o.padding_side != "left")
      fail("padding_side must be \"right\" or \"left\"; got \"" + o.padding_side + "\"");
    mx::array ql = o.q_lengths ? lengths(*o.q_lengths, "q_lengths", B, Lq, s)
                               : mx::full({B}, Lq, mx::int32, s);
    mx::array kl = o.kv_lengths ? lengths(*o.kv_lengths, "kv_lengths", B, Lk, s)
                                : mx::full({B}, Lk, mx::int32, s);
    const bool left = o.padding_side == "left";
    mx::array q0 = left ? mx::subtract(mx::array(Lq), ql, s) : mx::zeros({B}, mx::int32, s);
    mx::array k0 = left ? mx::subtract(mx::array(Lk), kl, s) : mx::zeros({B}, mx::int32, s);
    seqs = mx::stack({q0, ql, k0, kl}, 1, s);
  }
  return build(q, k, v, o, seqs, false, B, Lq, Lk, s);
}

std::vector<mx::array> attention_varlen(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    const mx::array& cu_seqlens_q,
    const mx::array& cu_seqlens_k,
    int max_seqlen_q,
    int max_seqlen_k,
    const AttentionOptions& o,
    mx::StreamOrDevice s) {
  const char* const layouts[3] = {"(total_q, Hq, D)", "(total_k, Hk, D)", "(total_k, Hk, Dv)"};
  const mx::array* qkv[3] = {&q, &k, &v};
  check_qkv(qkv, 3, layouts);
  if (v.shape(0) != k.shape(0) || v.shape(1) != k.shape(1))
    fail("k and v must have the same length and heads (total_k, Hk, .); got k " +
         shape_str(k.shape()) + ", v " + shape_str(v.shape()));
  check_heads(q.shape(1), k.shape(1), q.shape(2), k.shape(2), v.shape(2),
              "shape " + shape_str(k.shape()));
  if (o.q_lengths || o.kv_lengths)
    fail("q_lengths and kv_lengths are for padded batches; attention_varlen takes cu_seqlens");

  // The offsets decide the task layout, so they are read here (as
  // FlashAttention does with max_seqlen on the host).
  const mx::array* cus[2] = {&cu_seqlens_q, &cu_seqlens_k};
  const char* cu_names[2] = {"cu_seqlens_q", "cu_seqlens_k"};
  const int totals[2] = {q.shape(0), k.shape(0)};
  const int maxes[2] = {max_seqlen_q, max_seqlen_k};
  if (cu_seqlens_q.ndim() != 1 || cu_seqlens_q.size() < 1)
    fail("cu_seqlens_q must be a 1-D (B + 1,) int32 array; got shape " +
         shape_str(cu_seqlens_q.shape()));
  const int B = cu_seqlens_q.shape(0) - 1;
  for (int t = 0; t < 2; ++t) {
    const mx::array& cu = *cus[t];
    if (cu.dtype() != mx::int32 || cu.ndim() != 1 || cu.shape(0) != B + 1)
      fail(std::string(cu_names[t]) + " must be an int32 array of shape (B + 1,) = (" +
           std::to_string(B + 1) + ",); got " + dtype_str(cu.dtype()) + " " +
           shape_str(cu.shape()));
    mx::array c = cu;
    mx::eval(c);
    const int32_t* x = c.data<int32_t>();
    int longest = 0;
    if (x[0] != 0) fail(std::string(cu_names[t]) + " must start at 0; got " + std::to_string(x[0]));
    for (int b = 0; b < B; ++b) {
      if (x[b + 1] < x[b])
        fail(std::string(cu_names[t]) + " must be non-decreasing; got " + std::to_string(x[b]) +
             " then " + std::to_string(x[b + 1]) + " at index " + std::to_string(b));
      longest = std::max(longest, x[b + 1] - x[b]);
    }
    if (x[B] != totals[t])
      fail(std::string(cu_names[t]) + " must end at the number of rows of " +
           (t ? "k" : "q") + " (" + std::to_string(totals[t]) + "); got " + std::to_string(x[B]));
    if (maxes[t] < longest)
      fail(std::string(t ? "max_seqlen_k" : "max_seqlen_q") + " (" + std::to_string(maxes[t]) +
           ") is shorter than the longest sequence (" + std::to_string(longest) + ")");
  }
  auto starts = [&](const mx::array& cu) { return mx::slice(cu, {0}, {B}, s); };
  auto lens = [&](const mx::array& cu) {
    return mx::subtract(mx::slice(cu, {1}, {B + 1}, s), mx::slice(cu, {0}, {B}, s), s);
  };
  mx::array seqs = mx::stack(
      {starts(cu_seqlens_q), lens(cu_seqlens_q), starts(cu_seqlens_k), lens(cu_seqlens_k)}, 1, s);
  // (total, H, D) -> (1, H, total, D) views: no copies.
  auto as4 = [&](const mx::array& x) {
    return mx::expand_dims(mx::transpose(x, {1, 0, 2}, s), 0, s);
  };
  auto outs = build(as4(q), as4(k), as4(v), o, seqs, true, B, std::max(max_seqlen_q, 0),
                    std::max(max_seqlen_k, 0), s);
  // out (1, Hq, total_q, Dv) -> (total_q, Hq, Dv); lse (1, Hq, total_q) -> (Hq, total_q).
  return {mx::transpose(mx::squeeze(outs[0], 0, s), {1, 0, 2}, s), mx::squeeze(outs[1], 0, s)};
}

// ---------------------------------------------------------------------------
// The primitive.
// ---------------------------------------------------------------------------

InputIndex input_index(const AttnOptions& opts) {
  InputIndex ix;
  int next = 3;
  if (opts.mask_kind != FA_MASK_NONE) ix.mask = next++;
  if (opts.has_alibi) ix.alibi = next++;
  if (opts.has_sinks) ix.sinks = next++;
  if (opts.has_seqs) ix.seqs = next++;
  if (opts.dropout_p > 0.0f) ix.key = next++;
  ix.count = next;
  return ix;
}

int batch_entries(const AttnOptions& opts, const std::vector<mx::array>& in) {
  return opts.packed ? in[input_index(opts).seqs].shape(0) : in[0].shape(0);
}

FlashParams make_params(const AttnOptions& opts, const std::vector<mx::array>& in) {
  const mx::array &q = in[0], &k = in[1], &v = in[2];
  const InputIndex ix = input_index(opts);
  FlashParams p{};
  p.B = batch_entries(opts, in);
  p.Hq = q.shape(1);
  p.Lq = q.shape(2);
  p.D = q.shape(3);
  p.Hk = k.shape(1);
  p.Lk = k.shape(2);
  p.Dv = v.shape(3);
  p.gqa_ratio = p.Hq / p.Hk;
  for (int i = 0; i < 4; ++i) {
    p.q_strides[i] = q.strides()[i];
    p.k_strides[i] = k.strides()[i];
    p.v_strides[i] = v.strides()[i];
  }
  if (opts.packed) // every sequence indexes the one (H, total, D) buffer
    p.q_strides[0] = p.k_strides[0] = p.v_strides[0] = 0;
  p.scale = opts.scale;
  p.softcap = opts.softcap;
  p.q_offset = p.Lk - p.Lq;
  p.window_left = opts.window_left;
  p.window_right = opts.window_right;
  p.mask_kind = opts.mask_kind;
  p.has_alibi = opts.has_alibi;
  p.has_sinks = opts.has_sinks;
  p.has_seqs = opts.has_seqs;
  p.packed = opts.packed;
  p.max_rows_q = opts.packed ? opts.max_rows_q : p.Lq;
  p.max_rows_k = opts.packed ? opts.max_rows_k : p.Lk;
  p.dropout_p = opts.dropout_p; // p.seed is read when the key has been computed
  if (ix.mask >= 0)
    for (int i = 0; i < 4; ++i) p.mask_strides[i] = in[ix.mask].strides()[i];
  if (ix.alibi >= 0)
    for (int i = 0; i < 2; ++i) p.alibi_strides[i] = in[ix.alibi].strides()[i];
  if (ix.sinks >= 0)
    for (int i = 0; i < 2; ++i) p.sinks_strides[i] = in[ix.sinks].strides()[i];
  return p;
}

namespace {

// The backward's FlashParams: the forward's plus the cotangents' strides.
// out and lse come straight from the forward primitive: row-contiguous.
FlashParams backward_params(const AttnOptions& opts, const std::vector<mx::array>& inputs) {
  const int nfwd = input_index(opts).count;
  const mx::array &dout = inputs[nfwd + 2], &dlse = inputs[nfwd + 3];
  FlashParams p = make_params(opts, inputs);
  for (int i = 0; i < 4; ++i) p.do_strides[i] = dout.strides()[i];
  for (int i = 0; i < 3; ++i) p.dlse_strides[i] = dlse.strides()[i];
  if (opts.packed) p.do_strides[0] = p.dlse_strides[0] = 0;
  return p;
}

// The FA_BUF_* slots of the forward inputs (FlashAttention's inputs; the
// backward's start with them).
std::vector<int> forward_input_slots(const AttnOptions& opts) {
  const InputIndex ix = input_index(opts);
  std::vector<int> slots(ix.count);
  slots[0] = FA_BUF_Q;
  slots[1] = FA_BUF_K;
  slots[2] = FA_BUF_V;
  if (ix.mask >= 0) slots[ix.mask] = FA_BUF_MASK;
  if (ix.alibi >= 0) slots[ix.alibi] = FA_BUF_ALIBI;
  if (ix.sinks >= 0) slots[ix.sinks] = FA_BUF_SINKS;
  if (ix.seqs >= 0) slots[ix.seqs] = FA_BUF_SEQS;
  if (ix.key >= 0) slots[ix.key] = FA_BUF_KEY;
  return slots;
}

std::string metal_dtype(mx::Dtype t) {
  return t == mx::float32 ? "float" : t == mx::float16 ? "half" : "bfloat";
}

flash_cpu::DType kernel_dtype(mx::Dtype t) {
  return t == mx::float32 ? flash_cpu::DType::f32
         : t == mx::float16 ? flash_cpu::DType::f16
                            : flash_cpu::DType::bf16;
}

// Kernel arguments for the forward inputs (p and the outputs left unset).
flash_cpu::ForwardArgs forward_args(const AttnOptions& opts, const std::vector<mx::array>& in) {
  flash_cpu::ForwardArgs a{};
  a.dtype = kernel_dtype(in[0].dtype());
  a.q = in[0].data<void>();
  a.k = in[1].data<void>();
  a.v = in[2].data<void>();
  const InputIndex ix = input_index(opts);
  if (ix.mask >= 0) a.mask = in[ix.mask].data<void>();
  if (ix.alibi >= 0) a.alibi = in[ix.alibi].data<float>();
  if (ix.sinks >= 0) a.sinks = in[ix.sinks].data<float>();
  if (ix.seqs >= 0) a.seqs = in[ix.seqs].data<int32_t>();
  return a;
}

// The dropout key's bytes, read inside the dispatched task: by then the
// array that computes it has run.
const uint32_t* key_data(const AttnOptions& opts, const std::vector<mx::array>& in) {
  const InputIndex ix = input_index(opts);
  return ix.key >= 0 ? in[ix.key].data<uint32_t>() : nullptr;
}

void set_seed(FlashParams& p, const uint32_t* key) {
  if (key) {
    p.seed[0] = key[0];
    p.seed[1] = key[1];
  }
}

// Allocates the outputs and registers the arrays with the CPU encoder, which
// keeps their buffers alive until the dispatched task has run.
mx::cpu::CommandEncoder& prepare(mx::Stream s, const std::vector<mx::array>& inputs,
                                 std::vector<mx::array>& outputs) {
  auto& enc = mx::cpu::get_command_encoder(s);
  for (auto& x : inputs) enc.set_input_array(x);
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
    enc.set_output_array(o);
  }
  return enc;
}

// Test hook (see set_poison_outputs): NaN bytes in every output.
void poison(const std::vector<std::pair<void*, size_t>>& bufs) {
  if (poison_outputs())
    for (auto [ptr, n] : bufs) std::memset(ptr, 0xff, n);
}

} // namespace

void FlashAttention::eval_cpu(const std::vector<mx::array>& inputs,
                              std::vector<mx::array>& outputs) {
  auto& enc = prepare(stream(), inputs, outputs);
  flash_cpu::ForwardArgs a = forward_args(opts_, inputs);
  a.out = outputs[0].data<void>();
  a.lse = outputs[1].data<float>();
  enc.dispatch([p = make_params(opts_, inputs), a, key = key_data(opts_, inputs),
                nout = outputs[0].nbytes(), nlse = outputs[1].nbytes()]() mutable {
    set_seed(p, key);
    a.p = &p;
    poison({{a.out, nout}, {a.lse, nlse}});
    flash_cpu::forward(a);
  });
}

#ifndef FA_HAVE_METAL
// Builds without Metal (Linux, or MLX without MLX_BUILD_METAL); on a Mac
// eval_gpu is in metal/eval_gpu.cpp.
static void no_metal() {
  throw std::runtime_error(
      "[mlx_flash_attn.attention] this build has no Metal kernels (MLX was built without "
      "Metal); pass stream=mx.cpu (or use mx.set_default_device(mx.cpu)) to run on the CPU.");
}
void FlashAttention::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  no_metal();
}
void FlashAttentionVJP::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  no_metal();
}
#endif

metal::Plan FlashAttention::metal_plan(const std::vector<mx::array>& inputs,
                                       const metal::Tuning& tune) const {
  return metal::plan_forward(make_params(opts_, inputs), metal_dtype(inputs[0].dtype()), tune);
}

std::pair<std::vector<int>, std::vector<int>> FlashAttention::buffer_slots() const {
  return {forward_input_slots(opts_), {FA_BUF_OUT, FA_BUF_LSE}};
}

std::vector<mx::Shape> FlashAttention::output_shapes(const std::vector<mx::array>& in) {
  const auto& q = in[0];
  return {{q.shape(0), q.shape(1), q.shape(2), in[2].shape(3)},
          {q.shape(0), q.shape(1), q.shape(2)}};
}

bool FlashAttention::is_equivalent(const mx::Primitive& other) const {
  return opts_ == static_cast<const FlashAttention&>(other).opts_;
}

// vmap: fold the mapped axis into the batch axis. Every input and output of
// both primitives has the batch axis first (the mask, slopes and sinks are
// (B, ...) views), so the mapped axis moves to the front, unmapped inputs are
// broadcast along it, the two leading axes merge, and the outputs split again.
static std::pair<std::vector<mx::array>, std::vector<int>> vmap_by_folding(
    const std::vector<mx::array>& inputs, const std::vector<int>& axes, mx::Stream s,
    const AttnOptions& opts,
    const std::function<std::vector<mx::array>(std::vector<mx::array>)>& apply) {
  if (opts.packed || opts.dropout_p > 0.0f)
    throw std::invalid_argument(
        "[mlx_flash_attn.attention] vmap is not supported with attention_varlen or dropout; "
        "fold the mapped axis into the batch instead.");
  int n = 0;
  for (size_t i = 0; i < inputs.size(); ++i)
    if (axes[i] >= 0) n = inputs[i].shape(axes[i]);
  const auto& q = inputs[0];
  const int B = q.shape(axes[0] == 0 ? 1 : 0);

  std::vector<mx::array> folded;
  for (size_t i = 0; i < inputs.size(); ++i) {
    mx::array x = axes[i] >= 0 ? mx::moveaxis(inputs[i], axes[i], 0, s)
                               : mx::expand_dims(inputs[i], 0, s);
    mx::Shape shape = x.shape();
    shape[0] = n;
    x = mx::broadcast_to(x, shape, s);
    mx::Shape merged(shape.begin() + 1, shape.end());
    merged[0] = n * B;
    folded.push_back(mx::reshape(x, merged, s));
  }
  std::vector<mx::array> result;
  for (auto& o : apply(std::move(folded))) {
    mx::Shape shape = o.shape();
    shape[0] = B;
    shape.insert(shape.begin(), n);
    result.push_back(mx::reshape(o, shape, s));
  }
  return {result, std::vector<int>(result.size(), 0)};
}

std::pair<std::vector<mx::array>, std::vector<int>> FlashAttention::vmap(
    const std::vector<mx::array>& inputs, const std::vector<int>& axes) {
  return vmap_by_folding(inputs, axes, stream(), opts_, [&](std::vector<mx::array> in) {
    auto shapes = output_shapes(in);
    return mx::array::make_arrays(std::move(shapes), {in[0].dtype(), mx::float32},
                                  std::make_shared<FlashAttention>(stream(), opts_),
                                  std::move(in));
  });
}

std::vector<mx::array> FlashAttention::jvp(
    const std::vector<mx::array>&, const std::vector<mx::array>&, const std::vector<int>&) {
  throw std::invalid_argument(
      "[FlashAttention] jvp (forward-mode differentiation) is not implemented; "
      "use mx.grad, mx.vjp or mx.value_and_grad.");
}

std::vector<mx::array> FlashAttention::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  const InputIndex ix = input_index(opts_);
  const int mask_idx = ix.mask, alibi_idx = ix.alibi, sinks_idx = ix.sinks;
  auto wanted = [&](int idx) {
    return idx >= 0 && std::find(argnums.begin(), argnums.end(), idx) != argnums.end();
  };
  ExtraGrads extra;
  extra.mask = opts_.mask_kind == FA_MASK_ADDITIVE && wanted(mask_idx);
  extra.alibi = wanted(alibi_idx);
  extra.sinks = wanted(sinks_idx);

  std::vector<mx::array> inputs(primals.begin(), primals.end());
  inputs.push_back(outputs[0]);
  inputs.push_back(outputs[1]);
  inputs.push_back(cotangents[0]);
  inputs.push_back(cotangents.size() > 1 ? cotangents[1]
                                         : mx::zeros_like(outputs[1], stream()));
  auto prim = std::make_shared<FlashAttentionVJP>(stream(), opts_, extra);
  auto grads = mx::array::make_arrays(prim->output_shapes(inputs), prim->output_dtypes(inputs),
                                      prim, inputs);

  std::vector<mx::array> result;
  int next_extra = 3;
  auto take_extra = [&](bool on) { return on ? grads[next_extra++] : mx::array(0.0f); };
  mx::array dmask = take_extra(extra.mask);
  mx::array dalibi = take_extra(extra.alibi);
  mx::array dsinks = take_extra(extra.sinks);
  for (int idx : argnums) {
    if (idx < 3) result.push_back(grads[idx]);
    else if (idx == mask_idx && extra.mask) result.push_back(dmask);
    else if (idx == alibi_idx) result.push_back(dalibi);
    else if (idx == sinks_idx) result.push_back(dsinks);
    else result.push_back(mx::zeros_like(primals[idx], stream())); // bool mask, seqs, key
  }
  return result;
}

// ---------------------------------------------------------------------------
// The backward primitive.
// ---------------------------------------------------------------------------

std::vector<mx::Shape> FlashAttentionVJP::output_shapes(const std::vector<mx::array>& in) {
  const auto &q = in[0], &k = in[1], &v = in[2];
  std::vector<mx::Shape> shapes = {q.shape(), k.shape(), v.shape()};
  const mx::Shape bh = {batch_entries(opts_, in), q.shape(1)};
  if (extra_.mask) shapes.push_back({q.shape(0), q.shape(1), q.shape(2), k.shape(2)});
  if (extra_.alibi) shapes.push_back(bh);
  if (extra_.sinks) shapes.push_back(bh);
  return shapes;
}

std::vector<mx::Dtype> FlashAttentionVJP::output_dtypes(const std::vector<mx::array>& in) const {
  std::vector<mx::Dtype> dtypes(3 + extra_.mask + extra_.alibi + extra_.sinks, mx::float32);
  dtypes[0] = dtypes[1] = dtypes[2] = in[0].dtype();
  return dtypes;
}

bool FlashAttentionVJP::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const FlashAttentionVJP&>(other);
  return opts_ == o.opts_ && extra_ == o.extra_;
}

void FlashAttentionVJP::eval_cpu(const std::vector<mx::array>& inputs,
                                 std::vector<mx::array>& outputs) {
  auto& enc = prepare(stream(), inputs, outputs);
  const int nfwd = input_index(opts_).count;
  const mx::array &out = inputs[nfwd], &lse = inputs[nfwd + 1];
  const mx::array &dout = inputs[nfwd + 2], &dlse = inputs[nfwd + 3];

  FlashParams p = backward_params(opts_, inputs);
  flash_cpu::BackwardArgs a{};
  a.fwd = forward_args(opts_, inputs);
  a.fwd.out = const_cast<void*>(static_cast<const void*>(out.data<char>()));
  a.fwd.lse = const_cast<float*>(lse.data<float>());
  a.dout = dout.data<void>();
  a.dlse = dlse.data<float>();
  a.dq = outputs[0].data<void>();
  a.dk = outputs[1].data<void>();
  a.dv = outputs[2].data<void>();
  int next = 3;
  if (extra_.mask) a.dmask = outputs[next++].data<float>();
  if (extra_.alibi) a.dalibi = outputs[next++].data<float>();
  if (extra_.sinks) a.dsinks = outputs[next++].data<float>();

  std::vector<std::pair<void*, size_t>> bufs;
  for (auto& o : outputs) bufs.emplace_back(o.data<void>(), o.nbytes());
  enc.dispatch([p, a, bufs, key = key_data(opts_, inputs)]() mutable {
    set_seed(p, key);
    a.fwd.p = &p;
    poison(bufs);
    flash_cpu::backward(a);
  });
}

metal::Plan FlashAttentionVJP::metal_plan(const std::vector<mx::array>& inputs) const {
  return metal::plan_backward(backward_params(opts_, inputs), metal_dtype(inputs[0].dtype()),
                              extra_.mask, extra_.alibi, extra_.sinks);
}

std::pair<std::vector<int>, std::vector<int>> FlashAttentionVJP::buffer_slots() const {
  std::vector<int> in = forward_input_slots(opts_);
  in.insert(in.end(), {FA_BUF_OUT, FA_BUF_LSE, FA_BUF_DOUT, FA_BUF_DLSE});
  std::vector<int> out = {FA_BUF_DQ, FA_BUF_DK, FA_BUF_DV};
  if (extra_.mask) out.push_back(FA_BUF_DMASK);
  if (extra_.alibi) out.push_back(FA_BUF_DALIBI);
  if (extra_.sinks) out.push_back(FA_BUF_DSINKS);
  return {in, out};
}

std::pair<std::vector<mx::array>, std::vector<int>> FlashAttentionVJP::vmap(
    const std::vector<mx::array>& inputs, const std::vector<int>& axes) {
  return vmap_by_folding(inputs, axes, stream(), opts_, [&](std::vector<mx::array> in) {
    auto shapes = output_shapes(in);
    auto dtypes = output_dtypes(in);
    return mx::array::make_arrays(std::move(shapes), std::move(dtypes),
                                  std::make_shared<FlashAttentionVJP>(stream(), opts_, extra_),
                                  std::move(in));
  });
}

} // namespace mlx_flash_attn
