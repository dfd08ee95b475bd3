// Every SIMD collective the emulator offers, one output column each.
#include <metal_stdlib>
using namespace metal;

[[kernel]] void simd_ops(device const float* x [[buffer(0)]],
                         device float* out [[buffer(1)]],
                         device int* iout [[buffer(2)]],
                         uint gid [[thread_position_in_grid]],
                         uint lane [[thread_index_in_simdgroup]]) {
  float v = x[gid];
  device float* o = out + gid * 12;
  o[0] = simd_sum(v);
  o[1] = simd_max(v);
  o[2] = simd_min(v);
  o[3] = simd_prefix_inclusive_sum(v);
  o[4] = simd_prefix_exclusive_sum(v);
  o[5] = simd_shuffle(v, (lane * 7) % 32);
  o[6] = simd_shuffle_down(v, 3);
  o[7] = simd_shuffle_up(v, 5);
  o[8] = simd_broadcast(v, 9);
  o[9] = simd_shuffle_xor(v, 6);
  float2 p = simd_sum(float2(v, 2.0 * v));
  o[10] = p.y;
  half h = simd_max(half(v));
  o[11] = float(h);
  device int* io = iout + gid * 4;
  io[0] = simd_all(v > -1000.0) ? 1 : 0;
  io[1] = simd_any(v > 0.5) ? 1 : 0;
  io[2] = int(uint(ulong(simd_ballot(v > 0.0))));
  io[3] = simd_sum(int(lane));
}
