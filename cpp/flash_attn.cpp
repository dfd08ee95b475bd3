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

std::vector<mx::array> attention(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    const AttentionOptions& o,
    mx::StreamOrDevice s) {
  const char* names[3] = {"q", "k", "v"};
  const char* layouts[3] = {"(B, Hq, Lq, D)", "(B, Hk, Lk, D)", "(B, Hk, Lk, Dv)"};
  const mx::array* qkv[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    if (qkv[i]->ndim() != 4)
      fail(std::string(names[i]) + " must be 4-D " + layouts[i] + "; got shape " +
           shape_str(qkv[i]->shape()));
    if (!is_supported_float(qkv[i]->dtype()))
      fail(std::string(names[i]) + " must be float32, float16 or bfloat16; got " +
           dtype_str(qkv[i]->dtype()));
  }
  if (k.dtype() != q.dtype() || v.dtype() != q.dtype())
    fail("q, k and v must have the same dtype; got " + dtype_str(q.dtype()) + ", " +
         dtype_str(k.dtype()) + ", " + dtype_str(v.dtype()));

  const int B = q.shape(0), Hq = q.shape(1), Lq = q.shape(2), D = q.shape(3);
  const int Hk = k.shape(1), Lk = k.shape(2), Dv = v.shape(3);
  if (k.shape(0) != B || v.shape(0) != B)
    fail("q, k and v must have the same batch size B; got q " + shape_str(q.shape()) +
         ", k " + shape_str(k.shape()) + ", v " + shape_str(v.shape()));
  if (v.shape(1) != Hk || v.shape(2) != Lk)
    fail("k and v must have the same heads and length (B, Hk, Lk, .); got k " +
         shape_str(k.shape()) + ", v " + shape_str(v.shape()));
  if (k.shape(3) != D)
    fail("k must have q's head dim D = " + std::to_string(D) + "; got shape " +
         shape_str(k.shape()));
  if (Hk == 0 || Hq % Hk != 0)
    fail("the number of query heads (" + std::to_string(Hq) +
         ") must be a multiple of the number of key/value heads (" + std::to_string(Hk) + ")");
  if (D < 1 || D > FA_MAX_HEAD_DIM)
    fail("head dim D must be in [1, " + std::to_string(FA_MAX_HEAD_DIM) + "]; got " +
         std::to_string(D));
  if (Dv < 1 || Dv > FA_MAX_HEAD_DIM)
    fail("value head dim Dv must be in [1, " + std::to_string(FA_MAX_HEAD_DIM) + "]; got " +
         std::to_string(Dv));

  AttnOptions opts;
  opts.scale = o.scale.value_or(1.0f / std::sqrt(float(D)));
  if (!std::isfinite(opts.scale)) fail("scale must be finite; got " + std::to_string(opts.scale));
  if (!(o.softcap >= 0.0f) || !std::isfinite(o.softcap))
    fail("softcap must be a finite number >= 0; got " + std::to_string(o.softcap));
  opts.softcap = o.softcap;

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

  auto stream = mx::to_stream(s);
  return mx::array::make_arrays(
      {{B, Hq, Lq, Dv}, {B, Hq, Lq}},
      {q.dtype(), mx::float32},
      std::make_shared<FlashAttention>(stream, opts),
      std::move(inputs));
}

// ---------------------------------------------------------------------------
// The primitive.
// ---------------------------------------------------------------------------

FlashParams make_params(const AttnOptions& opts, const std::vector<mx::array>& in) {
  const mx::array &q = in[0], &k = in[1], &v = in[2];
  FlashParams p{};
  p.B = q.shape(0);
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
  p.scale = opts.scale;
  p.softcap = opts.softcap;
  p.q_offset = p.Lk - p.Lq;
  p.window_left = opts.window_left;
  p.window_right = opts.window_right;
  p.mask_kind = opts.mask_kind;
  p.has_alibi = opts.has_alibi;
  p.has_sinks = opts.has_sinks;
  size_t next = 3;
  if (opts.mask_kind != FA_MASK_NONE) {
    for (int i = 0; i < 4; ++i) p.mask_strides[i] = in[next].strides()[i];
    ++next;
  }
  if (opts.has_alibi) {
    for (int i = 0; i < 2; ++i) p.alibi_strides[i] = in[next].strides()[i];
    ++next;
  }
  if (opts.has_sinks) {
    for (int i = 0; i < 2; ++i) p.sinks_strides[i] = in[next].strides()[i];
  }
  return p;
}

int num_forward_inputs(const AttnOptions& opts) {
  return 3 + (opts.mask_kind != FA_MASK_NONE) + opts.has_alibi + opts.has_sinks;
}

namespace {

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
  size_t next = 3;
  if (opts.mask_kind != FA_MASK_NONE) a.mask = in[next++].data<void>();
  if (opts.has_alibi) a.alibi = in[next++].data<float>();
  if (opts.has_sinks) a.sinks = in[next++].data<float>();
  return a;
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
  enc.dispatch([p = make_params(opts_, inputs), a, nout = outputs[0].nbytes(),
                nlse = outputs[1].nbytes()]() mutable {
    a.p = &p;
    poison({{a.out, nout}, {a.lse, nlse}});
    flash_cpu::forward(a);
  });
}

void FlashAttention::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[mlx_flash_attn.attention] the Metal (GPU) kernels are not available yet; "
      "pass stream=mx.cpu (or use mx.set_default_device(mx.cpu)) to run on the CPU.");
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
    const std::function<std::vector<mx::array>(std::vector<mx::array>)>& apply) {
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
  return vmap_by_folding(inputs, axes, stream(), [&](std::vector<mx::array> in) {
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
  const int nfwd = num_forward_inputs(opts_);
  const int mask_idx = opts_.mask_kind != FA_MASK_NONE ? 3 : -1;
  const int alibi_idx = opts_.has_alibi ? 3 + (mask_idx >= 0) : -1;
  const int sinks_idx = opts_.has_sinks ? nfwd - 1 : -1;
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
    else result.push_back(mx::zeros_like(primals[idx], stream())); // a boolean mask
  }
  return result;
}

// ---------------------------------------------------------------------------
// The backward primitive.
// ---------------------------------------------------------------------------

std::vector<mx::Shape> FlashAttentionVJP::output_shapes(const std::vector<mx::array>& in) {
  const auto &q = in[0], &k = in[1], &v = in[2];
  std::vector<mx::Shape> shapes = {q.shape(), k.shape(), v.shape()};
  const mx::Shape bh = {q.shape(0), q.shape(1)};
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
  const int nfwd = num_forward_inputs(opts_);
  const mx::array &out = inputs[nfwd], &lse = inputs[nfwd + 1];
  const mx::array &dout = inputs[nfwd + 2], &dlse = inputs[nfwd + 3];

  FlashParams p = make_params(opts_, inputs);
  for (int i = 0; i < 4; ++i) p.do_strides[i] = dout.strides()[i];
  for (int i = 0; i < 3; ++i) p.dlse_strides[i] = dlse.strides()[i];
  // out and lse come straight from the forward primitive: row-contiguous.

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
  enc.dispatch([p, a, bufs]() mutable {
    a.fwd.p = &p;
    poison(bufs);
    flash_cpu::backward(a);
  });
}

void FlashAttentionVJP::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[mlx_flash_attn.attention] the Metal (GPU) backward kernels are not available yet; "
      "pass stream=mx.cpu to run on the CPU.");
}

std::pair<std::vector<mx::array>, std::vector<int>> FlashAttentionVJP::vmap(
    const std::vector<mx::array>& inputs, const std::vector<int>& axes) {
  return vmap_by_folding(inputs, axes, stream(), [&](std::vector<mx::array> in) {
    auto shapes = output_shapes(in);
    auto dtypes = output_dtypes(in);
    return mx::array::make_arrays(std::move(shapes), std::move(dtypes),
                                  std::make_shared<FlashAttentionVJP>(stream(), opts_, extra_),
                                  std::move(in));
  });
}

} // namespace mlx_flash_attn
