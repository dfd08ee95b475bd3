// eval_gpu of both primitives (Apple only): encodes the launch plan of
// dispatch.cpp with MLX's Metal command encoder. Every decision (kernels,
// function constants, grids, scratch) is made by the plan; this file only
// binds buffers and dispatches, as the emulator tests (tests/metal) do.

#include <dlfcn.h>

#include <filesystem>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/metal/device.h"
#include "mlx/backend/metal/utils.h"

#include "primitives.h"

namespace mlx_flash_attn {

namespace {

// The directory of this extension module: mlx_flash_attn.metallib is
// installed next to it (CMakeLists.txt), in a wheel as in the build tree.
const std::string& module_dir() {
  static const std::string dir = [] {
    Dl_info info;
    if (!dladdr(reinterpret_cast<const void*>(&module_dir), &info) || !info.dli_fname)
      throw std::runtime_error("[mlx_flash_attn] cannot locate the extension module");
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return dir;
}

// The name a specialization is cached under: one pipeline per kernel and
// function-constant combination. With no constants it is the kernel's own
// name, which MLX loads without specializing.
std::string specialized_name(const metal::Launch& launch) {
  std::string name = launch.kernel;
  for (auto [index, value] : launch.constants)
    name += "_" + std::to_string(index) + (value ? "t" : "f");
  return name;
}

// The array bound at one FA_BUF_* slot: an input, or an output or scratch
// array, which is registered as written so that MLX's encoder puts a memory
// barrier between the launch that writes it and a later one that reads it.
struct Binding {
  const mx::array* input = nullptr;
  mx::array* written = nullptr;
};

void encode_plan(const metal::Plan& plan, const std::vector<mx::array>& inputs,
                 std::vector<mx::array>& outputs,
                 const std::pair<std::vector<int>, std::vector<int>>& slots, mx::Stream s) {
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));

  // Float32 temporaries, alive until the command buffer completes.
  std::vector<mx::array> scratch;
  scratch.reserve(plan.scratch.size());
  for (const auto& sc : plan.scratch) {
    scratch.emplace_back(mx::Shape{int(sc.elements)}, mx::float32, nullptr,
                         std::vector<mx::array>{});
    scratch.back().set_data(mx::allocator::malloc(scratch.back().nbytes()));
  }

  std::unordered_map<int, Binding> bound;
  for (size_t i = 0; i < inputs.size(); ++i) bound[slots.first[i]].input = &inputs[i];
  for (size_t i = 0; i < outputs.size(); ++i) bound[slots.second[i]].written = &outputs[i];
  for (size_t i = 0; i < scratch.size(); ++i) bound[plan.scratch[i].buffer].written = &scratch[i];

  auto& d = mx::metal::device(s.device);
  auto* lib = d.get_library("mlx_flash_attn", module_dir());
  auto& enc = mx::metal::get_command_encoder(s);

  for (const auto& launch : plan.launches) {
    // An empty grid (no query rows, or no keys for dK/dV) runs no
    // threadgroup: skipped rather than dispatched with a zero size.
    if (launch.grid[0] == 0 || launch.grid[1] == 0 || launch.grid[2] == 0) continue;

    // The constants point into the plan, which outlives the pipeline lookup.
    mx::metal::MTLFCList fc;
    for (const auto& c : launch.constants)
      fc.emplace_back(&c.second, MTL::DataType::DataTypeBool, NS::UInteger(c.first));
    const std::string name = specialized_name(launch);
    auto* kernel = d.get_kernel(launch.kernel, lib, name, fc);
    const MTL::Size group(launch.threads[0], launch.threads[1], launch.threads[2]);
    mx::check_kernel_threadgroup_size(kernel, group, name);
    enc.set_compute_pipeline_state(kernel);

    // Arrays are bound at their offsets (set_input_array adds array::offset):
    // a strided view is read from its first element through the element
    // strides in FlashParams. A buffer this call lacks gets q: its function
    // constant keeps the kernel off it, but every declared buffer is bound.
    for (int slot : launch.buffers) {
      auto it = bound.find(slot);
      if (slot == FA_BUF_PARAMS)
        enc.set_bytes(plan.params, FA_BUF_PARAMS);
      else if (it == bound.end())
        enc.set_input_array(inputs[0], slot);
      else if (it->second.written)
        enc.set_output_array(*it->second.written, slot);
      else
        enc.set_input_array(*it->second.input, slot);
    }
    enc.dispatch_threadgroups(MTL::Size(launch.grid[0], launch.grid[1], launch.grid[2]), group);
  }
  enc.add_temporaries(std::move(scratch));
}

} // namespace

void FlashAttention::eval_gpu(const std::vector<mx::array>& inputs,
                              std::vector<mx::array>& outputs) {
  encode_plan(metal_plan(inputs), inputs, outputs, buffer_slots(), stream());
}

void FlashAttentionVJP::eval_gpu(const std::vector<mx::array>& inputs,
                                 std::vector<mx::array>& outputs) {
  encode_plan(metal_plan(inputs), inputs, outputs, buffer_slots(), stream());
}

} // namespace mlx_flash_attn
