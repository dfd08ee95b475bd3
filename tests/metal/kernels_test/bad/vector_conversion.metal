#include <metal_stdlib>
using namespace metal;
[[kernel]] void k(device float4* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  int4 a = int4(i);
  float4 f = a;  // MSL has no implicit vector conversion
  out[i] = f;
}
