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

#include "cpu/flash_cpu.h"
#include "flash_attn.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace fa = mlx_flash_attn;
namespace mx = mlx::core;

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

  m.def("cpu_isa", &flash_cpu::isa_name,
        "The instruction set the CPU kernels use on this machine.");
}
