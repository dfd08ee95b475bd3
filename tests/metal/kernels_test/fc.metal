// Function constants and host_name instantiations.
#include <metal_stdlib>
using namespace metal;

constant bool do_scale [[function_constant(0)]];
constant int bias [[function_constant(1)]];
constant float factor [[function_constant(2)]];
constant bool has_bias = is_function_constant_defined(bias);
constant bool scale_and_bias = do_scale && has_bias;

template <typename T, int STRIDE>
[[kernel]] void affine(device const T* x [[buffer(0)]],
                       device T* y [[buffer(1)]],
                       uint i [[thread_position_in_grid]]) {
  T v = x[i * STRIDE];
  if (do_scale) v = T(float(v) * factor);
  if (has_bias) v += T(bias);
  if (scale_and_bias) v += T(1000);
  y[i] = v;
}
template [[host_name("affine_f32_s1")]] [[kernel]] void affine<float, 1>(
    device const float* x [[buffer(0)]], device float* y [[buffer(1)]], uint i [[thread_position_in_grid]]);
template [[host_name("affine_f16_s2")]] [[kernel]] void affine<half, 2>(
    device const half* x [[buffer(0)]], device half* y [[buffer(1)]], uint i [[thread_position_in_grid]]);
