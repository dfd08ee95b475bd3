// The project's shared parameter header must compile as MSL, with the same
// layout as in host C++.
#include <metal_stdlib>
#include "flash_params.h"
using namespace metal;

[[kernel]] void read_params(constant FlashParams& p [[buffer(0)]],
                            device long* out [[buffer(1)]]) {
  out[0] = sizeof(FlashParams);
  out[1] = __builtin_offsetof(FlashParams, B);
  out[2] = __builtin_offsetof(FlashParams, scale);
  out[3] = __builtin_offsetof(FlashParams, k_strides);
  out[4] = __builtin_offsetof(FlashParams, has_sinks);
  out[5] = p.B;
  out[6] = long(p.scale * 1024.0);
  out[7] = p.k_strides[0];
  out[8] = p.k_strides[3];
  out[9] = p.has_sinks;
}
