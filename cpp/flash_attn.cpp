// attention(): the one place where arguments are checked and turned into the
// FlashAttention primitive's inputs and options; plus the primitive's
// shape, equivalence, vmap and CPU evaluation.

#include <atomic>
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

void FlashAttention::eval_cpu(const std::vector<mx::array>& inputs,
                              std::vector<mx::array>& outputs) {
  mx::array& out = outputs[0];
  mx::array& lse = outputs[1];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  lse.set_data(mx::allocator::malloc(lse.nbytes()));

  FlashParams p = make_params(opts_, inputs);
  flash_cpu::ForwardArgs a{};
  a.dtype = inputs[0].dtype() == mx::float32   ? flash_cpu::DType::f32
            : inputs[0].dtype() == mx::float16 ? flash_cpu::DType::f16
                                               : flash_cpu::DType::bf16;
  a.q = inputs[0].data<void>();
  a.k = inputs[1].data<void>();
  a.v = inputs[2].data<void>();
  size_t next = 3;
  if (opts_.mask_kind != FA_MASK_NONE) a.mask = inputs[next++].data<void>();
  if (opts_.has_alibi) a.alibi = inputs[next++].data<float>();
  if (opts_.has_sinks) a.sinks = inputs[next++].data<float>();
  a.out = out.data<void>();
  a.lse = lse.data<float>();

  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& x : inputs) enc.set_input_array(x);
  enc.set_output_array(out);
  enc.set_output_array(lse);
  // MLX keeps the input and output buffers alive until the task has run.
  enc.dispatch([p, a, nout = out.nbytes(), nlse = lse.nbytes()]() mutable {
    a.p = &p;
    if (poison_outputs()) { // tests: elements the kernel misses stay NaN
      std::memset(a.out, 0xff, nout);
      std::memset(a.lse, 0xff, nlse);
    }
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

// vmap: fold the mapped axis into the batch axis. Every input has the batch
// axis first (the mask, slopes and sinks are (B, ...) views), so the mapped
// axis moves to the front, unmapped inputs are broadcast along it, and the
// two leading axes merge.
std::pair<std::vector<mx::array>, std::vector<int>> FlashAttention::vmap(
    const std::vector<mx::array>& inputs, const std::vector<int>& axes) {
  int n = 0;
  for (size_t i = 0; i < inputs.size(); ++i)
    if (axes[i] >= 0) n = inputs[i].shape(axes[i]);
  const int B = [&] {
    const auto& q = inputs[0];
    return axes[0] >= 0 ? q.shape(axes[0] == 0 ? 1 : 0) : q.shape(0);
  }();

  std::vector<mx::array> folded;
  for (size_t i = 0; i < inputs.size(); ++i) {
    mx::array x = axes[i] >= 0 ? mx::moveaxis(inputs[i], axes[i], 0, stream())
                               : mx::expand_dims(inputs[i], 0, stream());
    mx::Shape shape = x.shape();
    shape[0] = n;
    x = mx::broadcast_to(x, shape, stream());
    mx::Shape merged(shape.begin() + 1, shape.end());
    merged[0] = n * B;
    folded.push_back(mx::reshape(x, merged, stream()));
  }
  auto outs = mx::array::make_arrays(
      output_shapes(folded), {inputs[0].dtype(), mx::float32},
      std::make_shared<FlashAttention>(stream(), opts_), folded);
  std::vector<mx::array> result;
  for (auto& o : outs) {
    mx::Shape shape = o.shape();
    shape[0] = B;
    shape.insert(shape.begin(), n);
    result.push_back(mx::reshape(o, shape, stream()));
  }
  return {result, {0, 0}};
}

} // namespace mlx_flash_attn
