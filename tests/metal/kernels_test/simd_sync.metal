// Lanes exchanging values through threadgroup memory inside one simdgroup:
// legal after simdgroup_barrier, a race without it. Uses the `kernel` keyword.
#include <metal_stdlib>
using namespace metal;

kernel void rotate_synced(device float* out [[buffer(0)]],
                          uint tid [[thread_index_in_threadgroup]],
                          uint lane [[thread_index_in_simdgroup]],
                          uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float buf[64];
  buf[tid] = float(tid);
  simdgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = buf[sg * 32 + (lane + 1) % 32];
}

kernel void rotate_unsynced(device float* out [[buffer(0)]],
                            uint tid [[thread_index_in_threadgroup]],
                            uint lane [[thread_index_in_simdgroup]],
                            uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float buf[64];
  buf[tid] = float(tid);
  out[tid] = buf[sg * 32 + (lane + 1) % 32];
}

// Across simdgroups a simdgroup_barrier is not enough.
kernel void cross_simdgroup(device float* out [[buffer(0)]],
                            uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float buf[64];
  buf[tid] = float(tid);
  simdgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = buf[(tid + 32) % 64];
}
