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

  m.def(
      "attention",
      [](const mx::array& q, const mx::array& k, const mx::array& v,
         std::optional<float> scale, std::string mask_mode, std::optional<mx::array> mask,
         bool causal, std::pair<int, int> window_size, float softcap,
         std::optional<mx::array> alibi_slopes, std::optional<mx::array> sinks,
         mx::StreamOrDevice s) {
        fa::AttentionOptions o;
        o.scale = scale;
        o.mask_mode = std::move(mask_mode);
        o.mask = std::move(mask);
        o.causal = causal;
        o.window_size = window_size;
        o.softcap = softcap;
        o.alibi_slopes = std::move(alibi_slopes);
        o.sinks = std::move(sinks);
        return fa::attention(q, k, v, o, s);
      },
      "q"_a, "k"_a, "v"_a, nb::kw_only(), "scale"_a.none(), "mask_mode"_a, "mask"_a.none(),
      "causal"_a, "window_size"_a, "softcap"_a, "alibi_slopes"_a.none(), "sinks"_a.none(),
      "stream"_a.none(),
      "Returns [out, lse]; see mlx_flash_attn.attention.");

  m.def("_set_poison_outputs", &fa::set_poison_outputs, "on"_a,
        "Test hook: fill outputs with NaN before every kernel run.");

  m.def("cpu_isa", &flash_cpu::isa_name,
        "The instruction set the CPU kernels use on this machine.");
}
