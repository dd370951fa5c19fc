// Warp reductions.  Every lane of the warp (converged, full mask) must call them.
//   warp_max / warp_sum: over the 32 lanes (a row whose keys are one per lane);
//   group_max / group_sum: over the 4 lanes of an mma row group (lanes 4g .. 4g + 3 hold the
//   columns of accumulator rows g and g + 8, sf_mma.cuh), butterfly order, so every lane of the
//   group gets the same, reproducible value.
#pragma once

#include "sf_common.cuh"

namespace sf {

SF_DEVICE_INLINE float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

SF_DEVICE_INLINE float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

SF_DEVICE_INLINE float group_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

SF_DEVICE_INLINE float group_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// sum over t < n of a[t] * b[t] in fp32 (e.g. delta_i = dO_i . O_i of attention's backward): the
// lanes take t = lane, lane + 32, ..., then warp_sum.
template <typename T, typename U>
SF_DEVICE_INLINE float warp_dot(const T* a, const U* b, int n, int lane) {
  float s = 0.f;
  for (int t = lane; t < n; t += 32) s += to_float(a[t]) * to_float(b[t]);
  return warp_sum(s);
}

}  // namespace sf
