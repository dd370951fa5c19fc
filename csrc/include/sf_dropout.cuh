// Attention dropout without a stored mask: keep(element) = u(seed, element index) >= p, where
// u is the first word of Philox-4x32-10 keyed by the seed with counter (index lo, index hi, 0, 0),
// top 24 bits scaled to [0, 1).  Forward and backward evaluate the same hash; the Python tests
// replay it bit for bit (semask_fast/backends/cuda: philox).
#pragma once

#include "sf_common.cuh"

namespace sf {

SF_DEVICE_INLINE uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

SF_DEVICE_INLINE uint32_t philox(uint64_t seed, uint64_t index) {
  uint32_t c0 = static_cast<uint32_t>(index), c1 = static_cast<uint32_t>(index >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = mulhi32(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = mulhi32(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Multiplier of a probability under dropout p: keep_scale (= 1 / (1 - p)) if kept, else 0; 1
// without dropout.  The seed lives in device memory (sf::seed_ptr) and is read only when dropout
// is on, so a call without dropout issues no load for it.
SF_DEVICE_INLINE float dropout_factor(const int64_t* seed, float p, float keep_scale, uint64_t index) {
  if (p <= 0.f) return 1.f;
  const float u = static_cast<float>(philox(static_cast<uint64_t>(*seed), index) >> 8) * (1.0f / 16777216.0f);
  return u >= p ? keep_scale : 0.f;
}

}  // namespace sf
