// Warp-tile products on tensor cores (fp16 / bf16 operands, fp32 accumulators), built on
// sf_mma.cuh.  An accumulator tile is float[N][4]: N 8-column tiles of the warp's 16 rows in the
// mma layout (acc[tile][e] is row g + 8 (e / 2), column 8 tile + 2 t4 + e % 2; g = lane / 4,
// t4 = lane % 4).  The A operand (16 rows x 16 k per k-step) comes from one of the sources below;
// the B operand is a shared-memory tile, n-major (rows = output columns, e.g. K in Q K^T) for
// mma_abt, k-major (rows = k, e.g. V in P V) for mma_ab.  k-steps run in increasing order, so a
// product is the same whatever loop order the compiler schedules.  The whole warp must call.
#pragma once

#include "sf_mma.cuh"

namespace sf {

// ------------------------------------------------------------- A operands --
// The warp's 16 rows of a row-major tile in shared memory: A[m][k] = s[m * ld + k].
template <typename T>
struct RowsA {
  const T* s;
  int ld;
  SF_DEVICE_INLINE void load(uint32_t a[4], int kk, int lane) const { load_a_frag<T>(a, s + kk * 16, ld, lane); }
};
// The transpose of a row-major tile: A[m][k] = s[k * ld + m] (e.g. P^T from P stored [i][j]).
template <typename T>
struct ColsA {
  const T* s;
  int ld;
  SF_DEVICE_INLINE void load(uint32_t a[4], int kk, int lane) const {
    load_a_frag_t<T>(a, s + kk * 16 * ld, ld, lane);
  }
};
// Fragments already in registers (frag[k-step][4]).
struct FragsA {
  const uint32_t (*frag)[4];
  SF_DEVICE_INLINE void load(uint32_t a[4], int kk, int) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = frag[kk][i];
  }
};
// An accumulator tile re-used as A (k-step kk = its 8-column tiles 2 kk, 2 kk + 1), rounded to T
// (e.g. the probabilities P of S = Q K^T as the A operand of P V, as flash attention does).
template <typename T>
struct AccA {
  const float (*acc)[4];
  SF_DEVICE_INLINE void load(uint32_t a[4], int kk, int) const { acc_to_a_frag<T>(a, acc[2 * kk], acc[2 * kk + 1]); }
};

// Every tile takes part.
struct AllLive {
  SF_DEVICE_INLINE constexpr bool operator()(int) const { return true; }
};

template <int N>
SF_DEVICE_INLINE void zero_acc(float acc[N][4]) {
#pragma unroll
  for (int t = 0; t < N; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;
}

// ------------------------------------------------------------------ products --
// s += A B^T over KS k-steps (KS = 0: `ksteps`, known at run time): s[st] covers B's rows
// [8 st, 8 st + 8) of the n-major tile b (row stride ld).  Tiles with !live(st) are left as they
// are (a warp-uniform condition).
template <typename T, int ST, int KS = 0, typename A, typename Live = AllLive>
SF_DEVICE_INLINE void mma_abt(float s[ST][4], const A& a, const T* b, int ld, int lane, Live live = {},
                              int ksteps = KS) {
  auto step = [&](int kk) {
    uint32_t af[4];
    a.load(af, kk, lane);
#pragma unroll
    for (int st = 0; st < ST; ++st) {
      if (!live(st)) continue;
      uint32_t bf[2];
      load_b_frag<T>(bf, b + st * 8 * ld + kk * 16, ld, lane);
      mma_m16n8k16_f32<T>(s[st], af, bf, s[st]);
    }
  };
  if constexpr (KS > 0) {
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) step(kk);
  } else {
    for (int kk = 0; kk < ksteps; ++kk) step(kk);
  }
}

// Two products over the same k-steps and tiles: s += A1 B1^T and t += A2 B2^T (e.g. S = Q K^T
// with dP = dO V^T).
template <typename T, int ST, int KS, typename A1, typename A2, typename Live = AllLive>
SF_DEVICE_INLINE void mma_abt2(float s[ST][4], const A1& a1, const T* b1, float t[ST][4], const A2& a2, const T* b2,
                               int ld, int lane, Live live = {}) {
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    uint32_t f1[4], f2[4];
    a1.load(f1, kk, lane);
    a2.load(f2, kk, lane);
#pragma unroll
    for (int st = 0; st < ST; ++st) {
      if (!live(st)) continue;
      uint32_t bf[2];
      load_b_frag<T>(bf, b1 + st * 8 * ld + kk * 16, ld, lane);
      mma_m16n8k16_f32<T>(s[st], f1, bf, s[st]);
      load_b_frag<T>(bf, b2 + st * 8 * ld + kk * 16, ld, lane);
      mma_m16n8k16_f32<T>(t[st], f2, bf, t[st]);
    }
  }
}

// o += A B over KT k-steps: o[nt] covers B's columns [8 nt, 8 nt + 8) of the k-major tile b (row
// stride ld).  K-steps with !live(kk) are skipped (their A is zero; warp-uniform).
template <typename T, int KT, int NT, typename A, typename Live = AllLive>
SF_DEVICE_INLINE void mma_ab(float o[NT][4], const A& a, const T* b, int ld, int lane, Live live = {}) {
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    if (!live(kk)) continue;
    uint32_t af[4];
    a.load(af, kk, lane);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t bf[2];
      load_b_frag_t<T>(bf, b + kk * 16 * ld + nt * 8, ld, lane);
      mma_m16n8k16_f32<T>(o[nt], af, bf, o[nt]);
    }
  }
}

// Two at once: o1 += A1 B1 and o2 += A2 B2 (e.g. dV += P^T dO with dK += dS^T Q).
template <typename T, int KT, int NT, typename A1, typename A2, typename Live = AllLive>
SF_DEVICE_INLINE void mma_ab2(float o1[NT][4], const A1& a1, const T* b1, float o2[NT][4], const A2& a2, const T* b2,
                              int ld, int lane, Live live = {}) {
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    if (!live(kk)) continue;
    uint32_t f1[4], f2[4];
    a1.load(f1, kk, lane);
    a2.load(f2, kk, lane);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t bf[2];
      load_b_frag_t<T>(bf, b1 + kk * 16 * ld + nt * 8, ld, lane);
      mma_m16n8k16_f32<T>(o1[nt], f1, bf, o1[nt]);
      load_b_frag_t<T>(bf, b2 + kk * 16 * ld + nt * 8, ld, lane);
      mma_m16n8k16_f32<T>(o2[nt], f2, bf, o2[nt]);
    }
  }
}

}  // namespace sf
