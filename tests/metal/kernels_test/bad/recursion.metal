#include <metal_stdlib>
using namespace metal;
int fact(int n) { return n <= 1 ? 1 : n * fact(n - 1); }
[[kernel]] void k(device int* out [[buffer(0)]], uint i [[thread_position_in_grid]]) { out[i] = fact(int(i)); }
