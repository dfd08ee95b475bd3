#include <metal_stdlib>
using namespace metal;
float first(thread const float* p) { return p[0]; }
[[kernel]] void k(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  out[i] = first(out);  // device pointer where a thread pointer is expected
}
