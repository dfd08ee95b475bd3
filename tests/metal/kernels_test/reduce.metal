// Threadgroup-memory tree reduction: one partial sum per threadgroup.
#include <metal_stdlib>
using namespace metal;

template <int N>
[[kernel]] void reduce_sum(device const float* x [[buffer(0)]],
                           device float* partial [[buffer(1)]],
                           constant uint& n [[buffer(2)]],
                           uint gid [[thread_position_in_grid]],
                           uint tid [[thread_index_in_threadgroup]],
                           uint3 tgpos [[threadgroup_position_in_grid]]) {
  threadgroup float buf[N];
  buf[tid] = gid < n ? x[gid] : 0.0;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = N / 2; s > 0; s >>= 1) {
    if (tid < s) buf[tid] += buf[tid + s];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (tid == 0) partial[tgpos.x] = buf[0];
}

template [[host_name("reduce_sum_128")]] [[kernel]] void reduce_sum<128>(
    device const float* x [[buffer(0)]], device float* partial [[buffer(1)]], constant uint& n [[buffer(2)]],
    uint gid [[thread_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
    uint3 tgpos [[threadgroup_position_in_grid]]);

// Same reduction through a [[threadgroup(0)]] buffer sized at launch.
[[kernel]] void reduce_sum_dyn(device const float* x [[buffer(0)]],
                               device float* partial [[buffer(1)]],
                               threadgroup float* buf [[threadgroup(0)]],
                               uint gid [[thread_position_in_grid]],
                               uint tid [[thread_index_in_threadgroup]],
                               uint ntg [[threads_per_threadgroup]],
                               uint tg [[threadgroup_position_in_grid]]) {
  buf[tid] = x[gid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = ntg / 2; s > 0; s >>= 1) {
    if (tid < s) buf[tid] += buf[tid + s];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (tid == 0) partial[tg] = buf[0];
}
