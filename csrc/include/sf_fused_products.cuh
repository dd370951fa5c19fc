// Warp-tile products of a block holding a whole attention segment (queries and keys in one
// tile), fp16 / bf16 on tensor cores and fp32 on FFMA, both leaving their results in the mma
// accumulator layout (sf_warp_gemm.cuh) so that the caller's softmax recomputation and stores
// are one code for every dtype.
#pragma once

#include "sf_warp_gemm.cuh"

namespace sf {

// 16-byte and 8-byte shared-memory vectors of the fp32 products (one LDS.128 / LDS.64).
struct alignas(16) F4 {
  float v[4];
};
struct alignas(8) F2 {
  float x, y;
};
SF_DEVICE_INLINE F4 lds4(const float* s) { return *reinterpret_cast<const F4*>(s); }
SF_DEVICE_INLINE F2 lds2(const float* s) { return *reinterpret_cast<const F2*>(s); }

// The warp tile products of a block that holds a whole attention segment of FN <= 64 rows and
// keys (window attention's fused backward).  Every accumulator is a 16 x 8k tile in the mma
// layout (sf_mma.cuh): acc[tile][e] is row g + 8 (e / 2), column 8 tile + 2 t4 + e % 2 of the
// warp's tile (g = lane / 4, t4 = lane % 4).  Shared-memory layout of the caller:
//   qs, ks, dos [FN][LD], vs [FN][VLD] (rows = tokens, zero padded past N and d);
//   ps [FN][LP] P, dss [FN][LP] dS (dS[i][j] at dss[i * LP + j]).
// fp16 / bf16 (this primary template): mma.sync m16n8k16; the warp's dS stays in registers as
// the A operand of dQ = dS K; P is stored [i][j] and read transposed for dV.
template <typename T, int DP, int FN = 64>
struct FusedProducts {
  static constexpr int LD = DP + 8, LP = FN + 8, VLD = LD;  // +16 bytes: fragment loads spread over the banks
  static constexpr bool kFfma = false;
  static constexpr int KS = DP / 16, NT = DP / 8, ST = FN / 8;

  // S = Q K^T and dP = dO V^T for the warp's 16 rows x the window's keys (keys >= N stay 0).
  static SF_DEVICE_INLINE void scores(float s[ST][4], float dp[ST][4], const T* qs, const T* dos, const T* ks,
                                      const T* vs, int warp, int lane, int n) {
    zero_acc<ST>(s);
    zero_acc<ST>(dp);
    mma_abt2<T, ST, KS>(s, RowsA<T>{qs + warp * 16 * LD, LD}, ks, dp, RowsA<T>{dos + warp * 16 * LD, LD}, vs, LD,
                        lane, [n](int t) { return t * 8 < n; });  // keys past the window stay 0
  }

  // acc = dS K for the warp's rows; dS from the registers ds (as `scores` left S), rounded to T.
  static SF_DEVICE_INLINE void dq(float acc[NT][4], const float ds[ST][4], const T* /*dss*/, const T* ks, int /*warp*/,
                                  int lane, int n) {
    zero_acc<NT>(acc);
    mma_ab<T, FN / 16, NT>(acc, AccA<T>{ds}, ks, LD, lane, [n](int kk) { return kk * 16 < n; });
  }

  // dva = P^T dO and dka = dS^T Q for the warp's 16 keys (k = the window's rows).
  static SF_DEVICE_INLINE void dkv(float dva[NT][4], float dka[NT][4], const T* ps, const T* dss, const T* dos,
                                   const T* qs, int warp, int lane, int n) {
    zero_acc<NT>(dva);
    zero_acc<NT>(dka);
    mma_ab2<T, FN / 16, NT>(dva, ColsA<T>{ps + warp * 16, LP}, dos, dka, ColsA<T>{dss + warp * 16, LP}, qs, LD,
                            lane, [n](int kk) { return kk * 16 < n; });
  }
};

// fp32: FFMA from shared memory, a lane computing its own accumulator elements (rows g, g + 8,
// columns 2 t4, 2 t4 + 1 of each tile).  Rows are LD = DP + 4 floats apart (16 bytes of padding:
// the 8 rows g of a 16-byte load fall in distinct banks).  Operands contiguous along k are read
// 4 k at a time (F4), those contiguous along the output columns as column pairs (F2).
//   * dQ reads the warp's dS rows back from dss (fp32 dS is exact, so nothing is lost against
//     the registers);
//   * P is stored transposed (ps[j * LP + i]), so dV = P^T dO reads P^T rows with F4 loads, and
//     it is stored over V (the kernel waits for every warp's dP first): with lse, delta and the
//     table column, at most 86.4 KiB of shared memory at head_dim 64 (sm_86 / sm_89 give a
//     block 99 KiB);
//   * dS is the fp32 dS the table fold reads, so no separate fp32 copy.
// k runs over whole groups of 4 past N: the tiles are zero there (q, k, v, dO up to 64 rows,
// P and dS up to the next 16).
template <int DP, int FN>
struct FusedProducts<float, DP, FN> {
  static constexpr int LD = DP + 4, LP = FN + 4, VLD = LD > LP ? LD : LP;
  static constexpr bool kFfma = true;
  static constexpr int NT = DP / 8, ST = FN / 8;

  static SF_DEVICE_INLINE void scores(float s[ST][4], float dp[ST][4], const float* qs, const float* dos,
                                      const float* ks, const float* vs, int warp, int lane, int n) {
    const int g = lane >> 2, t4 = lane & 3;
    zero_acc<ST>(s);
    zero_acc<ST>(dp);
    const float* q0 = qs + (warp * 16 + g) * LD;
    const float* d0 = dos + (warp * 16 + g) * LD;
#pragma unroll 2
    for (int k = 0; k < DP; k += 4) {
      const F4 qa[2] = {lds4(q0 + k), lds4(q0 + 8 * LD + k)};
      const F4 da[2] = {lds4(d0 + k), lds4(d0 + 8 * LD + k)};
#pragma unroll
      for (int t = 0; t < ST; ++t) {
        if (t * 8 >= n) continue;  // keys past the window (uniform)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int key = t * 8 + 2 * t4 + c;
          const F4 kb = lds4(ks + key * LD + k), vb = lds4(vs + key * LD + k);
#pragma unroll
          for (int h2 = 0; h2 < 2; ++h2)
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
              s[t][2 * h2 + c] = fmaf(qa[h2].v[kk], kb.v[kk], s[t][2 * h2 + c]);
              dp[t][2 * h2 + c] = fmaf(da[h2].v[kk], vb.v[kk], dp[t][2 * h2 + c]);
            }
        }
      }
    }
  }

  // The warp's dS rows must be in dss (written by its own lanes: the __syncwarp publishes them).
  static SF_DEVICE_INLINE void dq(float acc[NT][4], const float (*/*ds*/)[4], const float* dss, const float* ks,
                                  int warp, int lane, int n) {
    const int g = lane >> 2, t4 = lane & 3;
    zero_acc<NT>(acc);
    __syncwarp();
    const float* a0 = dss + (warp * 16 + g) * LP;
#pragma unroll 2
    for (int j = 0; j < n; j += 4) {
      const F4 a[2] = {lds4(a0 + j), lds4(a0 + 8 * LP + j)};
#pragma unroll
      for (int jj = 0; jj < 4; ++jj)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const F2 kb = lds2(ks + (j + jj) * LD + nt * 8 + 2 * t4);
#pragma unroll
          for (int h2 = 0; h2 < 2; ++h2) {
            acc[nt][2 * h2] = fmaf(a[h2].v[jj], kb.x, acc[nt][2 * h2]);
            acc[nt][2 * h2 + 1] = fmaf(a[h2].v[jj], kb.y, acc[nt][2 * h2 + 1]);
          }
        }
    }
  }

  // ps holds P^T (ps[j * LP + i]).
  static SF_DEVICE_INLINE void dkv(float dva[NT][4], float dka[NT][4], const float* ps, const float* dss,
                                   const float* dos, const float* qs, int warp, int lane, int n) {
    const int g = lane >> 2, t4 = lane & 3;
    zero_acc<NT>(dva);
    zero_acc<NT>(dka);
    const int key = warp * 16 + g;
    const float* p0 = ps + key * LP;
#pragma unroll 2
    for (int i = 0; i < n; i += 4) {
      const F4 pa[2] = {lds4(p0 + i), lds4(p0 + 8 * LP + i)};
#pragma unroll
      for (int ii = 0; ii < 4; ++ii) {
        const float sa[2] = {dss[(i + ii) * LP + key], dss[(i + ii) * LP + key + 8]};
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const F2 ob = lds2(dos + (i + ii) * LD + nt * 8 + 2 * t4), qb = lds2(qs + (i + ii) * LD + nt * 8 + 2 * t4);
#pragma unroll
          for (int h2 = 0; h2 < 2; ++h2) {
            dva[nt][2 * h2] = fmaf(pa[h2].v[ii], ob.x, dva[nt][2 * h2]);
            dva[nt][2 * h2 + 1] = fmaf(pa[h2].v[ii], ob.y, dva[nt][2 * h2 + 1]);
            dka[nt][2 * h2] = fmaf(sa[h2], qb.x, dka[nt][2 * h2]);
            dka[nt][2 * h2 + 1] = fmaf(sa[h2], qb.y, dka[nt][2 * h2 + 1]);
          }
        }
      }
    }
  }
};

}  // namespace sf
