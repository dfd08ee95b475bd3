// Histogram through threadgroup atomics, merged with device atomics, and a
// float sum accumulated across threadgroups.
#include <metal_stdlib>
using namespace metal;

[[kernel]] void histogram(device const uint* x [[buffer(0)]],
                          device atomic_uint* hist [[buffer(1)]],
                          device atomic_float* total [[buffer(2)]],
                          uint gid [[thread_position_in_grid]],
                          uint tid [[thread_index_in_threadgroup]]) {
  threadgroup atomic_int local[16];
  if (tid < 16) atomic_store_explicit(&local[tid], 0, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  uint v = x[gid];
  atomic_fetch_add_explicit(&local[v % 16], 1, memory_order_relaxed);
  atomic_fetch_add_explicit(total, float(v), memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid < 16)
    atomic_fetch_add_explicit(&hist[tid], uint(atomic_load_explicit(&local[tid], memory_order_relaxed)),
                              memory_order_relaxed);
}
