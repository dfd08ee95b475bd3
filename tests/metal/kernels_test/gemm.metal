// 8x8 simdgroup_matrix GEMM: C (M x N) = A (M x K) * B (K x N).
// A threadgroup of 4 simdgroups computes a 32x32 tile; each simdgroup a 16x16
// quarter from 2x2 fragments of 8x8.
#include <metal_stdlib>
using namespace metal;

template <typename T>
[[kernel]] void gemm_tile(device const T* A [[buffer(0)]],
                          device const T* B [[buffer(1)]],
                          device float* C [[buffer(2)]],
                          constant uint3& mnk [[buffer(3)]],
                          uint2 tg [[threadgroup_position_in_grid]],
                          uint sg [[simdgroup_index_in_threadgroup]]) {
  const uint N = mnk.y, K = mnk.z;
  const uint row0 = tg.y * 32 + (sg / 2) * 16, col0 = tg.x * 32 + (sg % 2) * 16;
  simdgroup_matrix<float, 8, 8> acc[2][2];
  for (int i = 0; i < 2; i++)
    for (int j = 0; j < 2; j++) acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0);
  for (uint k = 0; k < K; k += 8) {
    simdgroup_matrix<T, 8, 8> a[2], b[2];
    for (int i = 0; i < 2; i++) simdgroup_load(a[i], A + (row0 + 8 * i) * K + k, K);
    for (int j = 0; j < 2; j++) simdgroup_load(b[j], B, N, ulong2(col0 + 8 * j, k));
    for (int i = 0; i < 2; i++)
      for (int j = 0; j < 2; j++) simdgroup_multiply_accumulate(acc[i][j], a[i], b[j], acc[i][j]);
  }
  for (int i = 0; i < 2; i++)
    for (int j = 0; j < 2; j++) simdgroup_store(acc[i][j], C + (row0 + 8 * i) * N + col0 + 8 * j, N);
}
template [[host_name("gemm_float")]] [[kernel]] decltype(gemm_tile<float>) gemm_tile<float>;
template [[host_name("gemm_half")]] [[kernel]] decltype(gemm_tile<half>) gemm_tile<half>;

// One 8x8 product; A is loaded through thread_elements() in Apple's layout,
// B with a transposed simdgroup_load, C stored through thread_elements().
[[kernel]] void mma_elements(device const float* A [[buffer(0)]],
                             device const float* Bt [[buffer(1)]],
                             device float* C [[buffer(2)]],
                             ushort lane [[thread_index_in_simdgroup]]) {
  const ushort qid = lane / 4;
  const ushort row = (qid & 4) + (lane / 2) % 4;
  const ushort col = (qid & 2) * 2 + (lane % 2) * 2;
  simdgroup_float8x8 a, b, c;
  a.thread_elements()[0] = A[row * 8 + col];
  a.thread_elements()[1] = A[row * 8 + col + 1];
  simdgroup_load(b, Bt, 8, ulong2(0, 0), true);
  simdgroup_multiply(c, a, b);
  thread auto& e = c.thread_elements();
  C[row * 8 + col] = e.x;
  C[row * 8 + col + 1] = e.y;
}
