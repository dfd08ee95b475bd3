#include <metal_stdlib>
using namespace metal;
[[kernel]] void k(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]] [[fancy_index]]) {
  out[i] = 1.0;
}
