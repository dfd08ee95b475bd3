// Scalar/vector semantics: per-op half rounding, vector constructors that
// convert values (never bitcast), swizzles, as_type, bfloat.
#include <metal_stdlib>
using namespace metal;

[[kernel]] void half_ops(device const half* a [[buffer(0)]],
                         device const half* b [[buffer(1)]],
                         device half* out [[buffer(2)]],
                         uint i [[thread_position_in_grid]]) {
  half x = a[i], y = b[i];
  half t = x * y;          // rounded to half here...
  half r = t + x - y;      // ...and after every operation
  out[2 * i] = r;
  half2 v = half2(x, y) * half2(y, x) + 0.5h;
  out[2 * i + 1] = v.x;
}

[[kernel]] void vectors(device const int4* iv [[buffer(0)]],
                        device float4* out [[buffer(1)]],
                        device uint* bits [[buffer(2)]],
                        device bfloat* bf [[buffer(3)]],
                        uint i [[thread_position_in_grid]]) {
  int4 a = iv[i];
  float4 f = float4(a);                  // value conversion
  float2 lo = f.xy, hi = float2(f.w);    // swizzle, broadcast
  out[4 * i + 0] = f;
  out[4 * i + 1] = float4(lo, hi);
  out[4 * i + 2] = float4(f.zyx, 7.5);
  out[4 * i + 3] = (float4)a + float4(half4(a)) * 0.0;  // C-style cast converts too
  bits[i] = as_type<uint>(f.x);
  bf[i] = bfloat(f.x * 1.00390625);      // rounds to nearest even
  bool4 m = bool4(a > 2);
  if (all(m)) bits[i] = 0xFFFFFFFFu;
}
