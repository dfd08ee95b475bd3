// Row softmax with SIMD collectives: one simdgroup per row, butterfly max
// via simd_shuffle_xor, sum via simd_sum.
#include <metal_stdlib>
using namespace metal;

template <typename T>
[[kernel]] void softmax_rows(device const T* x [[buffer(0)]],
                             device T* y [[buffer(1)]],
                             constant int& cols [[buffer(2)]],
                             uint row [[threadgroup_position_in_grid]],
                             uint lane [[thread_index_in_simdgroup]]) {
  device const T* xr = x + row * cols;
  float m = -numeric_limits<float>::infinity();
  for (int j = lane; j < cols; j += 32) m = max(m, float(xr[j]));
  for (ushort s = 16; s > 0; s >>= 1) m = max(m, simd_shuffle_xor(m, s));
  float sum = 0;
  for (int j = lane; j < cols; j += 32) sum += fast::exp(float(xr[j]) - m);
  sum = simd_sum(sum);
  float inv = 1.0 / sum;
  for (int j = lane; j < cols; j += 32) y[row * cols + j] = T(exp(float(xr[j]) - m) * inv);
}

#define instantiate_softmax(tname, type) \
  template [[host_name("softmax_" #tname)]] [[kernel]] decltype(softmax_rows<type>) softmax_rows<type>;
instantiate_softmax(float32, float)
instantiate_softmax(float16, half)
