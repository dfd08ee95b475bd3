// Python bindings: the C++ attention() as mlx_flash_attn._ext.attention.
// Argument checking happens in C++ (flash_attn.cpp); this layer only
// converts types. NB_DOMAIN mlx (set in CMakeLists.txt) shares MLX's type
// registry, so mx.array and mx.Stream cross the boundary without copies.

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <sstream>

#include "mlx/transforms.h"

#include "cpu/flash_cpu.h"
#include "flash_attn.h"
#include "primitives.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace fa = mlx_flash_attn;
namespace mx = mlx::core;

namespace {

nb::bytes raw_bytes(const mx::array& x) {
  return nb::bytes(x.data<char>(), x.data_size() * x.itemsize());
}

bool is_ours(const mx::array& a) {
  return a.has_primitive() && (dynamic_cast<fa::FlashAttention*>(&a.primitive()) ||
                               dynamic_cast<fa::FlashAttentionVJP*>(&a.primitive()));
}

// See "_metal_plan" below: the first FlashAttention(VJP) node found from
// `root` through the graph's inputs. Evaluates that node's inputs only.
nb::dict metal_plan(const mx::array& root, std::optional<long> min_split_keys) {
  std::vector<mx::array> todo = {root};
  size_t next = 0;
  while (next < todo.size() && !is_ours(todo[next])) {
    for (const auto& x : todo[next].inputs()) todo.push_back(x);
    ++next;
  }
  if (next == todo.size())
    throw std::invalid_argument("_metal_plan: no unevaluated FlashAttention node under the array");
  const mx::array a = todo[next];
  std::vector<mx::array> inputs = a.inputs();
  mx::eval(inputs);
  fa::metal::Plan plan;
  std::pair<std::vector<int>, std::vector<int>> slots;
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  if (auto* f = dynamic_cast<fa::FlashAttention*>(&a.primitive())) {
    fa::metal::Tuning tune;
    if (min_split_keys) tune.min_split_keys = *min_split_keys;
    plan = f->metal_plan(inputs, tune);
    slots = f->buffer_slots();
    shapes = f->output_shapes(inputs);
    dtypes = {inputs[0].dtype(), mx::float32};
  } else {
    auto* g = dynamic_cast<fa::FlashAttentionVJP*>(&a.primitive());
    plan = g->metal_plan(inputs);
    slots = g->buffer_slots();
    shapes = g->output_shapes(inputs);
    dtypes = g->output_dtypes(inputs);
  }
  nb::list launches;
  for (const auto& l : plan.launches) {
    nb::dict d, fc;
    for (auto [idx, on] : l.constants) fc[nb::int_(idx)] = on;
    d["kernel"] = l.kernel;
    d["constants"] = fc;
    d["grid"] = nb::make_tuple(l.grid[0], l.grid[1], l.grid[2]);
    d["threads"] = nb::make_tuple(l.threads[0], l.threads[1], l.threads[2]);
    d["buffers"] = l.buffers;
    launches.append(d);
  }
  nb::dict scratch, ins;
  for (const auto& s : plan.scratch) scratch[nb::int_(s.buffer)] = s.elements;
  for (size_t i = 0; i < inputs.size(); ++i) ins[nb::int_(slots.first[i])] = raw_bytes(inputs[i]);
  nb::list outs;
  for (size_t i = 0; i < shapes.size(); ++i) {
    std::ostringstream dt;
    dt << dtypes[i];
    outs.append(nb::make_tuple(slots.second[i], std::vector<int>(shapes[i].begin(), shapes[i].end()),
                               dt.str()));
  }
  nb::dict r;
  r["params"] = nb::bytes(reinterpret_cast<const char*>(&plan.params), sizeof(FlashParams));
  r["geometry"] = nb::dict();
  r["geometry"]["heads_per_block"] = plan.params.heads_per_block;
  r["geometry"]["rows_per_head"] = plan.params.rows_per_head;
  r["geometry"]["n_splits"] = plan.params.n_splits;
  r["geometry"]["split_keys"] = plan.params.split_keys;
  r["launches"] = launches;
  r["scratch"] = scratch;
  r["inputs"] = ins;
  r["outputs"] = outs;
  return r;
}

} // namespace

NB_MODULE(_ext, m) {
  m.doc() = "Native part of mlx_flash_attn; use mlx_flash_attn.attention.";

  // Options shared by both entry points, in one keyword-only tail.
  auto options = [](std::optional<float> scale, std::string mask_mode,
                    std::optional<mx::array> mask, bool causal, std::pair<int, int> window_size,
                    float softcap, std::optional<mx::array> alibi_slopes,
                    std::optional<mx::array> sinks, float dropout_p, std::optional<mx::array> key,
                    std::optional<mx::array> q_lengths, std::optional<mx::array> kv_lengths,
                    std::string padding_side) {
    fa::AttentionOptions o;
    o.scale = scale;
    o.mask_mode = std::move(mask_mode);
    o.mask = std::move(mask);
    o.causal = causal;
    o.window_size = window_size;
    o.softcap = softcap;
    o.alibi_slopes = std::move(alibi_slopes);
    o.sinks = std::move(sinks);
    o.dropout_p = dropout_p;
    o.key = std::move(key);
    o.q_lengths = std::move(q_lengths);
    o.kv_lengths = std::move(kv_lengths);
    o.padding_side = std::move(padding_side);
    return o;
  };

  m.def(
      "attention",
      [options](const mx::array& q, const mx::array& k, const mx::array& v,
                std::optional<float> scale, std::string mask_mode, std::optional<mx::array> mask,
                bool causal, std::pair<int, int> window_size, float softcap,
                std::optional<mx::array> alibi_slopes, std::optional<mx::array> sinks,
                float dropout_p, std::optional<mx::array> key,
                std::optional<mx::array> q_lengths, std::optional<mx::array> kv_lengths,
                std::string padding_side, mx::StreamOrDevice s) {
        return fa::attention(
            q, k, v,
            options(scale, std::move(mask_mode), std::move(mask), causal, window_size, softcap,
                    std::move(alibi_slopes), std::move(sinks), dropout_p, std::move(key),
                    std::move(q_lengths), std::move(kv_lengths), std::move(padding_side)),
            s);
      },
      "q"_a, "k"_a, "v"_a, nb::kw_only(), "scale"_a.none(), "mask_mode"_a, "mask"_a.none(),
      "causal"_a, "window_size"_a, "softcap"_a, "alibi_slopes"_a.none(), "sinks"_a.none(),
      "dropout_p"_a, "key"_a.none(), "q_lengths"_a.none(), "kv_lengths"_a.none(),
      "padding_side"_a, "stream"_a.none(),
      "Returns [out, lse]; see mlx_flash_attn.attention.");

  m.def(
      "attention_varlen",
      [options](const mx::array& q, const mx::array& k, const mx::array& v,
                const mx::array& cu_q, const mx::array& cu_k, int max_q, int max_k,
                std::optional<float> scale, bool causal, std::pair<int, int> window_size,
                float softcap, std::optional<mx::array> alibi_slopes,
                std::optional<mx::array> sinks, float dropout_p, std::optional<mx::array> key,
                mx::StreamOrDevice s) {
        return fa::attention_varlen(
            q, k, v, cu_q, cu_k, max_q, max_k,
            options(scale, "", std::nullopt, causal, window_size, softcap,
                    std::move(alibi_slopes), std::move(sinks), dropout_p, std::move(key),
                    std::nullopt, std::nullopt, "right"),
            s);
      },
      "q"_a, "k"_a, "v"_a, "cu_seqlens_q"_a, "cu_seqlens_k"_a, "max_seqlen_q"_a,
      "max_seqlen_k"_a, nb::kw_only(), "scale"_a.none(), "causal"_a, "window_size"_a,
      "softcap"_a, "alibi_slopes"_a.none(), "sinks"_a.none(), "dropout_p"_a, "key"_a.none(),
      "stream"_a.none(),
      "Returns [out, lse]; see mlx_flash_attn.attention_varlen.");

  m.def("_set_poison_outputs", &fa::set_poison_outputs, "on"_a,
        "Test hook: fill outputs with NaN before every kernel run.");

  m.def("_metal_plan", &metal_plan, "array"_a, "min_split_keys"_a.none(),
        "Test hook: the Metal kernel plan of the primitive that computes `array`, with "
        "its inputs' bytes, as eval_gpu would run it (tests/metal/test_flash_kernels.py).");

#ifdef FA_HAVE_METAL
  m.attr("has_metal") = true;
#else
  m.attr("has_metal") = false;
#endif

  m.def("cpu_isa", &flash_cpu::isa_name,
        "The instruction set the CPU kernels use on this machine.");
}
