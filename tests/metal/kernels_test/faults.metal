// Planted faults: each kernel breaks one rule the emulator must catch.
#include <metal_stdlib>
using namespace metal;

// Reads a neighbour's threadgroup slot without a barrier in between.
[[kernel]] void missing_barrier(device float* out [[buffer(0)]],
                                uint tid [[thread_index_in_threadgroup]],
                                uint n [[threads_per_threadgroup]]) {
  threadgroup float buf[256];
  buf[tid] = float(tid);
  out[tid] = buf[(tid + 40) % n];
}

// Same with the barrier: race-free.
[[kernel]] void with_barrier(device float* out [[buffer(0)]],
                             uint tid [[thread_index_in_threadgroup]],
                             uint n [[threads_per_threadgroup]]) {
  threadgroup float buf[256];
  buf[tid] = float(tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = buf[(tid + 40) % n];
}

// Threads of the first simdgroup return before the barrier.
[[kernel]] void early_return(device float* out [[buffer(0)]],
                             uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float buf[64];
  if (tid < 32) return;
  buf[tid] = 1.0;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = buf[tid ^ 1];
}

// Barrier inside a branch only some simdgroups take.
[[kernel]] void divergent_barrier(device float* out [[buffer(0)]],
                                  uint tid [[thread_index_in_threadgroup]]) {
  if (tid >= 32) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[tid] = 1.0;
  threadgroup_barrier(mem_flags::mem_device);
}

// Writes one element past the end of `out`.
[[kernel]] void oob_write(device float* out [[buffer(0)]],
                          constant uint& n [[buffer(1)]],
                          uint gid [[thread_position_in_grid]]) {
  if (gid <= n) out[gid] = 1.0;
}

// Reads past the end of a constant buffer.
[[kernel]] void oob_read(device float* out [[buffer(0)]],
                         constant float* table [[buffer(1)]],
                         uint gid [[thread_position_in_grid]]) {
  out[gid] = table[gid * 2];
}

// 40 KB of threadgroup memory: over Apple's 32 KB.
[[kernel]] void too_much_tg(device float* out [[buffer(0)]],
                            uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float a[6144];
  threadgroup float b[4096];
  a[tid] = 1.0;
  b[tid] = 2.0;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = a[tid] + b[tid];
}

// Lanes of one simdgroup at different collectives.
[[kernel]] void divergent_simd(device float* out [[buffer(0)]],
                               uint lane [[thread_index_in_simdgroup]]) {
  float v = float(lane);
  if (lane < 16) v = simd_sum(v);
  else v = simd_max(v);
  out[lane] = v;
}

// Dereferences a pointer it built from an integer.
[[kernel]] void wild_pointer(device float* out [[buffer(0)]],
                             uint tid [[thread_index_in_threadgroup]]) {
  thread float* p = (thread float*)(ulong(tid) * 8 + 16);
  out[tid] = *p;
}

// A 1 MB local array overflows the fiber stack.
[[kernel]] void big_stack(device float* out [[buffer(0)]],
                          uint tid [[thread_index_in_threadgroup]]) {
  float big[262144];
  for (uint i = 0; i < 262144; i += 1024) big[262143 - i] = float(i + tid);
  out[tid] = big[tid * 7];
}

// Half the lanes wait at a SIMD collective, the other half at a barrier.
[[kernel]] void deadlock(device float* out [[buffer(0)]],
                         uint lane [[thread_index_in_simdgroup]]) {
  float v = float(lane);
  if (lane < 16) v = simd_sum(v);
  else threadgroup_barrier(mem_flags::mem_threadgroup);
  out[lane] = v;
}

// Reads threadgroup memory nobody wrote: sees the 0xFF poison.
[[kernel]] void read_poison(device uint* out [[buffer(0)]],
                            uint tid [[thread_index_in_threadgroup]]) {
  threadgroup uint buf[64];
  buf[2 * tid] = tid;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = buf[2 * tid + 1];
}
