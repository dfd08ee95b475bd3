// Which Metal kernels a call runs, with which block sizes, function constants
// and grids: decided here, in plain C++ that builds and is unit-tested on any
// platform. eval_gpu (eval_gpu.cpp, Apple only) encodes the plan as it is;
// the emulator tests (tests/metal/test_flash_kernels.py) run the same plan.
#pragma once

#include <array>
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "flash_kernels.h"
#include "flash_params.h"

namespace mlx_flash_attn::metal {

// One kernel launch.
struct Launch {
  std::string kernel;                         // host_name in mlx_flash_attn.metallib
  std::vector<std::pair<int, bool>> constants; // (FA_FC_*, value), every constant the kernel reads
  std::array<int, 3> grid;                    // threadgroups
  std::array<int, 3> threads;                 // threads per threadgroup
  std::vector<int> buffers;                   // the FA_BUF_* slots the kernel binds
};

// A float32 temporary the plan needs, bound at FA_BUF_* `buffer`.
struct Scratch {
  int buffer;
  size_t elements;
};

struct Plan {
  FlashParams params; // the caller's, with the launch geometry filled in
  std::vector<Launch> launches;
  std::vector<Scratch> scratch;
};

// When the forward splits the keys (flash-decoding); tests lower
// min_split_keys to exercise the split kernels at small sizes.
struct Tuning {
  long target_blocks = 256;  // threadgroups that keep an Apple GPU busy
  long min_split_keys = 256; // keys per split, at least
  long max_splits = 64;
};

// Kernel dtype names: "float", "half" or "bfloat".
Plan plan_forward(const FlashParams& p, const std::string& dtype, const Tuning& tune = {});

// grad_mask / grad_alibi / grad_sinks: which extra gradients to write.
Plan plan_backward(const FlashParams& p, const std::string& dtype, bool grad_mask,
                   bool grad_alibi, bool grad_sinks);

} // namespace mlx_flash_attn::metal
