#include <metal_stdlib>
#include <vector>
[[kernel]] void k(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) { out[i] = 1.0; }
