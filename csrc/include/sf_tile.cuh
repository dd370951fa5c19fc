// Staging tiles of a row-major matrix into shared memory (zero padded), shared by the kernels.
#pragma once

#include "sf_common.cuh"

#include <type_traits>

namespace sf {

// x converted to the staging type S (a 16-bit tile keeps the input's bits).
template <typename S, typename T>
SF_DEVICE_INLINE S convert(T x) {
  if constexpr (std::is_same_v<S, T>) return x;
  else return from_float<S>(to_float(x));
}

// Rows [row0, row0 + rows) x cols [col0, col0 + width) of an (n, cols) matrix with row stride rs
// into dst (row stride ld) as S, zero outside the matrix.  Threads first, first + step, ... share
// the elements (the block: threadIdx.x, blockDim.x; a warp: lane, 32).  A compile-time width
// (the padded head_dim) turns the index arithmetic into shifts.
template <typename S, typename T>
SF_DEVICE_INLINE void stage_tile(S* dst, int ld, const T* src, int64_t rs, int row0, int rows, int n, int col0,
                                 int width, int cols, int first, int step) {
  const S zero = from_float<S>(0.f);
  for (int e = first; e < rows * width; e += step) {
    const int r = e / width, t = e % width;
    const int row = row0 + r, col = col0 + t;
    dst[r * ld + t] = (row < n && col < cols) ? convert<S>(src[row * rs + col]) : zero;
  }
}

// 16 bytes, moved by one load or store.
struct alignas(16) Chunk16 {
  uint32_t w[4];
};

// stage_tile of rows x [0, DP) with d columns, rows rs elements apart, moving 16-byte chunks: d,
// rs and src 16-byte multiples (the caller checks); a 16-bit tile (rows and base 16-byte aligned)
// stores them whole.
template <int DP, typename S, typename T>
SF_DEVICE_INLINE void stage_tile_16b(S* dst, int ld, const T* src, int64_t rs, int row0, int rows, int n, int d,
                                     int first, int step) {
  constexpr int V = 16 / sizeof(T), CPR = DP / V;  // elements per chunk, chunks per padded row
  for (int e = first; e < rows * CPR; e += step) {
    const int r = e / CPR, t = (e % CPR) * V, row = row0 + r;
    Chunk16 c{};
    if (row < n && t < d) c = *reinterpret_cast<const Chunk16*>(src + row * rs + t);
    if constexpr (std::is_same_v<S, T> && sizeof(T) == 2) {
      *reinterpret_cast<Chunk16*>(dst + r * ld + t) = c;
    } else {
      const T* x = reinterpret_cast<const T*>(&c);
#pragma unroll
      for (int v = 0; v < V; ++v) dst[r * ld + t + v] = convert<S>(x[v]);
    }
  }
}

}  // namespace sf
