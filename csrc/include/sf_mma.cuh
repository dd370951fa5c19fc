// Tensor-core wrapper: mma.sync m16n8k16 with fp16 or bf16 operands and fp32 accumulation.
//
// D (16x8, fp32) = A (16x16, row-major) * B (16x8, "col": stored n-major) + C (16x8, fp32).
// Under nvcc this is the PTX instruction
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32   (sm_80+);
// under SF_SIMT an emulation that gathers the fragments of the 32 lanes through a warp exchange
// and computes each lane's four outputs with fp32 FMAs, so kernels written against the per-lane
// layout below run (and are tested) unchanged on the CPU.  fp32 kernels do not use this wrapper
// (tensor cores would round fp32 inputs to tf32); they multiply with FFMA.
//
// Per-lane fragment layout (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type"); g = lane / 4 ("groupID"), t = lane % 4 ("threadID_in_group"):
//   A: 4 x .b32 registers, each two elements (lower 16 bits = lower column):
//      a[0] = A[g][2t..2t+1]      a[1] = A[g+8][2t..2t+1]
//      a[2] = A[g][2t+8..2t+9]    a[3] = A[g+8][2t+8..2t+9]
//   B: 2 x .b32 registers (lower 16 bits = lower k):
//      b[0] = B[2t..2t+1][g]      b[1] = B[2t+8..2t+9][g]
//   C, D: 4 floats: c[i] = C[acc_row(lane, i)][acc_col(lane, i)]
//      = C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1].
// The whole warp (32 lanes, converged) must execute each call.
#pragma once

#include "sf_common.cuh"

namespace sf {

// Row and column of accumulator element i (0..3) held by `lane`.
SF_HOST_DEVICE inline int acc_row(int lane, int i) { return (lane >> 2) + ((i >> 1) << 3); }
SF_HOST_DEVICE inline int acc_col(int lane, int i) { return ((lane & 3) << 1) + (i & 1); }

// Element (half = 0 low, 1 high) of A register `reg` held by `lane`: its row and column.
SF_HOST_DEVICE inline int a_frag_row(int lane, int reg) { return (lane >> 2) + ((reg & 1) << 3); }
SF_HOST_DEVICE inline int a_frag_col(int lane, int reg, int half) {
  return ((lane & 3) << 1) + half + ((reg >> 1) << 3);
}
// Element of B register `reg` held by `lane`: its k (row) and n (column).
SF_HOST_DEVICE inline int b_frag_k(int lane, int reg, int half) { return ((lane & 3) << 1) + half + (reg << 3); }
SF_HOST_DEVICE inline int b_frag_n(int lane) { return lane >> 2; }

template <typename T>
SF_DEVICE_INLINE uint16_t bits16(T x) {
  static_assert(sizeof(T) == 2, "16-bit operand type expected");
  uint16_t u;
  memcpy(&u, &x, 2);
  return u;
}
template <typename T>
SF_DEVICE_INLINE T from_bits16(uint16_t u) {
  T x;
  memcpy(&x, &u, 2);
  return x;
}

// Two 16-bit values in one register, `lo` in the lower half.
template <typename T>
SF_DEVICE_INLINE uint32_t pack2(T lo, T hi) {
  return uint32_t(bits16(lo)) | (uint32_t(bits16(hi)) << 16);
}
// Round two floats to T and pack them.
template <typename T>
SF_DEVICE_INLINE uint32_t pack2_float(float lo, float hi) {
  return pack2<T>(from_float<T>(lo), from_float<T>(hi));
}
template <typename T>
SF_DEVICE_INLINE float unpack_lo(uint32_t r) { return to_float(from_bits16<T>(uint16_t(r & 0xFFFFu))); }
template <typename T>
SF_DEVICE_INLINE float unpack_hi(uint32_t r) { return to_float(from_bits16<T>(uint16_t(r >> 16))); }

// A fragment of the 16x16 tile A[m][k] = s[m * ld + k] (row-major; ld even, s 4-byte aligned).
template <typename T>
SF_DEVICE_INLINE void load_a_frag(uint32_t a[4], const T* s, int ld, int lane) {
  const int g = lane >> 2, c = (lane & 3) << 1;
  a[0] = *reinterpret_cast<const uint32_t*>(s + g * ld + c);
  a[1] = *reinterpret_cast<const uint32_t*>(s + (g + 8) * ld + c);
  a[2] = *reinterpret_cast<const uint32_t*>(s + g * ld + c + 8);
  a[3] = *reinterpret_cast<const uint32_t*>(s + (g + 8) * ld + c + 8);
}
// A fragment of the transposed tile: A[m][k] = s[k * ld + m] (e.g. P^T or dS^T from a row-major tile).
template <typename T>
SF_DEVICE_INLINE void load_a_frag_t(uint32_t a[4], const T* s, int ld, int lane) {
  const int g = lane >> 2, c = (lane & 3) << 1;
  a[0] = pack2(s[c * ld + g], s[(c + 1) * ld + g]);
  a[1] = pack2(s[c * ld + g + 8], s[(c + 1) * ld + g + 8]);
  a[2] = pack2(s[(c + 8) * ld + g], s[(c + 9) * ld + g]);
  a[3] = pack2(s[(c + 8) * ld + g + 8], s[(c + 9) * ld + g + 8]);
}
// B fragment of the 16x8 tile B[k][n] = s[n * ld + k] (n-major, e.g. K for Q K^T; ld even,
// s 4-byte aligned).
template <typename T>
SF_DEVICE_INLINE void load_b_frag(uint32_t b[2], const T* s, int ld, int lane) {
  const int g = lane >> 2, c = (lane & 3) << 1;
  b[0] = *reinterpret_cast<const uint32_t*>(s + g * ld + c);
  b[1] = *reinterpret_cast<const uint32_t*>(s + g * ld + c + 8);
}
// B fragment of the 16x8 tile B[k][n] = s[k * ld + n] (k-major, e.g. V for P V).
template <typename T>
SF_DEVICE_INLINE void load_b_frag_t(uint32_t b[2], const T* s, int ld, int lane) {
  const int g = lane >> 2, c = (lane & 3) << 1;
  b[0] = pack2(s[c * ld + g], s[(c + 1) * ld + g]);
  b[1] = pack2(s[(c + 8) * ld + g], s[(c + 9) * ld + g]);
}
// The A fragment (16x16) formed by two fp32 accumulators: c0 covers columns 0..7, c1 columns
// 8..15 (e.g. the probabilities P of a 16-row block re-used as the A operand of P V).
template <typename T>
SF_DEVICE_INLINE void acc_to_a_frag(uint32_t a[4], const float c0[4], const float c1[4]) {
  a[0] = pack2_float<T>(c0[0], c0[1]);
  a[1] = pack2_float<T>(c0[2], c0[3]);
  a[2] = pack2_float<T>(c1[0], c1[1]);
  a[3] = pack2_float<T>(c1[2], c1[3]);
}

#ifdef SF_SIMT
namespace simt {
struct MmaOperands {
  uint32_t a[4];
  uint32_t b[2];
};
}  // namespace simt

// d = A B + c for the warp's fragments; d may alias c.  T is __half or __nv_bfloat16.
template <typename T>
inline void mma_m16n8k16_f32(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  const simt::Warp& w = simt::runner().warps[simt::fiber().warp];
  if (w.lanes != simt::kWarpSize) simt::fail("mma_m16n8k16 needs a full warp of 32 threads");
  simt::MmaOperands mine;
  memcpy(mine.a, a, sizeof(mine.a));
  memcpy(mine.b, b, sizeof(mine.b));
  const unsigned char* buf = simt::warp_exchange(0xFFFFFFFFu, &mine, sizeof(mine));
  auto lane_ops = [&](int l) -> const simt::MmaOperands& {
    return *reinterpret_cast<const simt::MmaOperands*>(buf + l * simt::kExchangeSlot);
  };
  // A[m][k] lives in lane 4 * (m % 8) + (k % 8) / 2, register (m >= 8) + 2 * (k >= 8), half k % 2.
  auto A = [&](int m, int k) {
    uint32_t r = lane_ops(4 * (m & 7) + ((k & 7) >> 1)).a[(m >> 3) + 2 * (k >> 3)];
    return (k & 1) ? unpack_hi<T>(r) : unpack_lo<T>(r);
  };
  // B[k][n] lives in lane 4 * n + (k % 8) / 2, register k >= 8, half k % 2.
  auto B = [&](int k, int n) {
    uint32_t r = lane_ops(4 * n + ((k & 7) >> 1)).b[k >> 3];
    return (k & 1) ? unpack_hi<T>(r) : unpack_lo<T>(r);
  };
  const int lane = simt::lane_id();
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int m = acc_row(lane, i), n = acc_col(lane, i);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc = fmaf(A(m, k), B(k, n), acc);
    out[i] = acc;
  }
  memcpy(d, out, sizeof(out));
}
#else
template <typename T>
SF_DEVICE_INLINE void mma_m16n8k16_f32(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]);

template <>
SF_DEVICE_INLINE void mma_m16n8k16_f32<__half>(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                const float c[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}
template <>
SF_DEVICE_INLINE void mma_m16n8k16_f32<__nv_bfloat16>(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                       const float c[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}
#endif

}  // namespace sf
