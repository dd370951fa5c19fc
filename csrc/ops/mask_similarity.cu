// mask_similarity: Segmenter's masks S = (P / |P|) (C / |C|)^T, optionally LayerNorm over the
// K classes (`mask_norm`), forward and backward (SPEC.md section 4, reference.mask_similarity).
//
// P: (B, Np, D) patches, C: (B, K, D) classes, out: (B, Np, K).  No epsilon in the norms, as the
// official code.  All arithmetic in fp32; fp16/bf16 products on tensor cores (sf_mma.cuh), fp32
// products with FFMA.  The normalisation is folded into the GEMMs: S = rinv_p * (P C^T) * rinv_c.
//
// Forward (one launch)
//   similarity_kernel    one block per (b, 32 rows of P): loops over K in 64-column tiles and D in
//                        32-deep tiles staged in shared memory; |P_n| and |C_k| come from the staged
//                        tiles (no pass over P or C of its own); with LayerNorm the 32 x K rows of S
//                        stay in shared memory for the epilogue.
// Backward (dY -> dP, dC, dw, db; two launches, nothing saved but the inputs)
//   dpatch_kernel        per block of rows: recomputes S in shared memory, then dS (LayerNorm
//                        backward) in place, rowdot_n = sum_k dS S (= p^.dp^), per-block column
//                        partials of sum_n dS S (= c^.dc^), sum dY s^ (dw), sum dY (db); writes
//                        G = dS (the A operand of the dC GEMM) and finishes its rows of
//                        dP = rinv_p (dS c^ - P rinv_p rowdot) from the dS still in shared memory
//   dclass_kernel        dC = rinv_c (G^T p^ - C rinv_c coldot), coldot (and dw, db) summed from the
//                        partials in a fixed order at the start of the block (deterministic)
// So P and C are read once per launch, and the only intermediate in global memory is G (the size
// of dY) and the small partials.  Only what autograd needs is computed: without dP the row blocks
// skip the dP GEMM, without dC they write neither G nor the coldot partials and dclass_kernel
// runs (with norm) only the blocks summing dw, db.

#include <type_traits>

#include "sf_common.cuh"
#include "sf_reduce.cuh"
#include "sf_warp_gemm.cuh"

namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int BM = 32;         // rows per block
constexpr int BN = 64;         // columns per tile
constexpr int BK = 32;         // depth per staged tile
constexpr int LDS = BK + 8;    // smem row stride: even (32-bit fragment loads), skews banks

// The 32x64 block tile: warp w computes rows 16 * (w % 2) .. +16 and columns 32 * (w / 2) .. +32,
// four 16x8 accumulators in the mma.m16n8k16 layout (sf::acc_row / sf::acc_col).
// As: [BM][LDS] (A[m][k]), Bs: [BN][LDS] (B[k][n] stored n-major).
template <typename T>
SF_DEVICE_INLINE void warp_tile(float acc[4][4], const T* As, const T* Bs, int warp, int lane) {
  const int wm = (warp & 1) * 16, wn = (warp >> 1) * 32;
  if constexpr (std::is_same_v<T, float>) {
    const int g = lane >> 2, c = (lane & 3) * 2;
#pragma unroll 4
    for (int k = 0; k < BK; ++k) {
      const float a0 = As[(wm + g) * LDS + k], a1 = As[(wm + g + 8) * LDS + k];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const float b0 = Bs[(wn + nt * 8 + c) * LDS + k], b1 = Bs[(wn + nt * 8 + c + 1) * LDS + k];
        acc[nt][0] = fmaf(a0, b0, acc[nt][0]);
        acc[nt][1] = fmaf(a0, b1, acc[nt][1]);
        acc[nt][2] = fmaf(a1, b0, acc[nt][2]);
        acc[nt][3] = fmaf(a1, b1, acc[nt][3]);
      }
    }
  } else {
    sf::mma_abt<T, 4, BK / 16>(acc, sf::RowsA<T>{As + wm * LDS, LDS}, Bs + wn * LDS, LDS, lane);
  }
}

using sf::warp_sum;

// Mean and 1 / std of a row of K scores (LayerNorm over the classes, biased variance), by one warp.
SF_DEVICE_INLINE void layer_norm_stats(const float* row, int K, float eps, int lane, float& mean, float& rstd) {
  mean = 0.f;
  for (int c = lane; c < K; c += 32) mean += row[c];
  mean = warp_sum(mean) / K;
  float var = 0.f;
  for (int c = lane; c < K; c += 32) var += (row[c] - mean) * (row[c] - mean);
  rstd = 1.f / sqrtf(warp_sum(var) / K + eps);
}

// Sum over a warp's lanes of the partial sums of squares of staged rows, to inverse norms.
template <int E>
SF_DEVICE_INLINE void store_rinv(const float (&sq)[E], float* rinv, int warp, int lane) {
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const float s = warp_sum(sq[e]);
    if (lane == 0) rinv[warp + 4 * e] = 1.f / sqrtf(s);
  }
}

// S rows [m0, m0 + BM) of batch b, scaled to cosines, delivered tile by tile to `emit(r, c, s)`.
// The inverse norms come from the staged tiles: rinv_p of these rows into rinv_s (BM floats) and
// rinv_c of every class into rinv_cs (K rounded up to BN floats), both in shared memory.
template <typename T, typename Emit>
SF_DEVICE_INLINE void cosine_rows(const T* __restrict__ P, const T* __restrict__ C, int64_t b, int m0, int Np,
                                  int K, int D, T* As, T* Bs, float* rinv_s, float* rinv_cs, Emit emit) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const T* Pb = P + b * Np * int64_t(D);
  const T* Cb = C + b * K * int64_t(D);
  constexpr int EP = BM * BK / kThreads, EC = BN * BK / kThreads;
  float sq[EP];  // this thread's partial |P|^2 of rows warp + 4 e (first K tile only)
  for (int e = 0; e < EP; ++e) sq[e] = 0.f;
  for (int n0 = 0; n0 < K; n0 += BN) {
    float acc[4][4] = {};
    float sqc[EC] = {};  // partial |C|^2 of this tile's classes n0 + warp + 4 e
    for (int d0 = 0; d0 < D; d0 += BK) {
      __syncthreads();  // the previous tiles are consumed
#pragma unroll
      for (int e = 0; e < EP; ++e) {
        const int r = warp + 4 * e, k = lane;  // idx = tid + kThreads * e
        T v = sf::from_float<T>(0.f);
        if (m0 + r < Np && d0 + k < D) v = Pb[int64_t(m0 + r) * D + d0 + k];
        As[r * LDS + k] = v;
        if (n0 == 0) {
          const float f = sf::to_float(v);
          sq[e] = fmaf(f, f, sq[e]);
        }
      }
#pragma unroll
      for (int e = 0; e < EC; ++e) {
        const int n = warp + 4 * e, k = lane;
        T v = sf::from_float<T>(0.f);
        if (n0 + n < K && d0 + k < D) v = Cb[int64_t(n0 + n) * D + d0 + k];
        Bs[n * LDS + k] = v;
        const float f = sf::to_float(v);
        sqc[e] = fmaf(f, f, sqc[e]);
      }
      __syncthreads();
      warp_tile(acc, As, Bs, warp, lane);
    }
    if (n0 == 0) store_rinv(sq, rinv_s, warp, lane);
    store_rinv(sqc, rinv_cs + n0, warp, lane);
    __syncthreads();
    const int wm = (warp & 1) * 16, wn = (warp >> 1) * 32;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = wm + sf::acc_row(lane, i), c = n0 + wn + nt * 8 + sf::acc_col(lane, i);
        if (m0 + r < Np && c < K) emit(r, c, acc[nt][i] * rinv_s[r] * rinv_cs[c]);
      }
    }
  }
}

// The B operand of the gradient GEMMs: Bs[n][k] = X[k0 + k][n0 + n] * scale[k0 + k] (X is
// depth x D, row-major; the scale turns rows into unit rows), zero outside X; coalesced along D.
template <typename T>
SF_DEVICE_INLINE void stage_scaled_b(T* Bs, const T* __restrict__ X, const float* scale, int k0, int n0, int depth,
                                     int D) {
#pragma unroll
  for (int e = 0; e < BN * BK / kThreads; ++e) {
    const int idx = threadIdx.x + kThreads * e, n = idx % BN, k = idx / BN;
    float v = 0.f;
    if (n0 + n < D && k0 + k < depth) v = sf::to_float(X[int64_t(k0 + k) * D + n0 + n]) * scale[k0 + k];
    Bs[n * LDS + k] = sf::from_float<T>(v);
  }
}

// Classes rounded up to whole K tiles: the length of the shared rinv_c array.
SF_HOST_DEVICE constexpr int class_tiles_len(int K) { return (K + BN - 1) / BN * BN; }

// out[b, m0 + r, :] for one block of rows; with NORM the LayerNorm over K as epilogue.
// Dynamic shared memory: rinv_c (class_tiles_len(K) floats), then with NORM the [BM][Kpad] cosines.
template <typename T, bool NORM>
__global__ void __launch_bounds__(kThreads)
    similarity_kernel(const T* __restrict__ P, const T* __restrict__ C, const float* __restrict__ weight,
                      const float* __restrict__ bias, T* __restrict__ out, int Np, int K, int D, int Kpad,
                      float eps) {
  SF_STATIC_SHARED(T, As, BM * LDS);
  SF_STATIC_SHARED(T, Bs, BN * LDS);
  SF_STATIC_SHARED(float, rinv_s, BM);
  SF_DYNAMIC_SHARED(float, rinv_cs);
  float* S = rinv_cs + class_tiles_len(K);
  const int64_t b = blockIdx.y;
  const int m0 = blockIdx.x * BM;
  T* outb = out + b * Np * int64_t(K);
  cosine_rows<T>(P, C, b, m0, Np, K, D, As, Bs, rinv_s, rinv_cs, [&](int r, int c, float s) {
    if constexpr (NORM) {
      S[r * Kpad + c] = s;
    } else {
      outb[int64_t(m0 + r) * K + c] = sf::from_float<T>(s);
    }
  });
  if constexpr (NORM) {
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int r = warp; r < BM && m0 + r < Np; r += kThreads / 32) {
      const float* row = S + r * Kpad;
      float mean, rstd;
      layer_norm_stats(row, K, eps, lane, mean, rstd);
      for (int c = lane; c < K; c += 32) {
        float y = (row[c] - mean) * rstd;
        if (weight) y *= weight[c];
        if (bias) y += bias[c];
        outb[int64_t(m0 + r) * K + c] = sf::from_float<T>(y);
      }
    }
  }
}

// Backward, first launch (see the file comment).  Per block of rows: S, then dS in place; G = dS
// (in T) to global memory; rinv_p, rowdot; column partials (fixed order) for coldot, dw, db; the
// block's rows of dP; the blocks of the first row tile also store rinv_c for dclass_kernel.
// dP null: dP not wanted (no dP GEMM); G null: dC not wanted (no G, rinv_p, rinv_c, colpart); both
// null (the LayerNorm parameters' gradients alone): only the column pass's wpart, bpart.
// Dynamic shared memory: rinv_c (class_tiles_len(K) floats), then [BM][Kpad] scores.
template <typename T, bool NORM>
// minBlocks = 1: without it ptxas capped this kernel's registers for occupancy and spilled (sm_90).
__global__ void __launch_bounds__(kThreads, 1)
    dpatch_kernel(const T* __restrict__ P, const T* __restrict__ C, const T* __restrict__ dY,
                  const float* __restrict__ weight, T* __restrict__ G, T* __restrict__ dP,
                  float* __restrict__ rinv_p, float* __restrict__ rinv_c, float* __restrict__ colpart,
                  float* __restrict__ wpart, float* __restrict__ bpart, int Np, int K, int D, int Kpad, float eps) {
  SF_STATIC_SHARED(T, As, BM * LDS);
  SF_STATIC_SHARED(T, Bs, BN * LDS);
  SF_STATIC_SHARED(float, rinv_s, BM);
  SF_STATIC_SHARED(float, mean_s, BM);
  SF_STATIC_SHARED(float, rstd_s, BM);
  SF_STATIC_SHARED(float, a1_s, BM);
  SF_STATIC_SHARED(float, a2_s, BM);
  SF_STATIC_SHARED(float, rowdot_s, BM);
  SF_DYNAMIC_SHARED(float, rinv_cs);
  float* S = rinv_cs + class_tiles_len(K);  // [BM][Kpad] cosines, then dS
  const int64_t b = blockIdx.y;
  const int m0 = blockIdx.x * BM;
  const int rows = min(BM, Np - m0);
  cosine_rows<T>(P, C, b, m0, Np, K, D, As, Bs, rinv_s, rinv_cs,
                 [&](int r, int c, float s) { S[r * Kpad + c] = s; });
  __syncthreads();
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const T* dYb = dY + b * Np * int64_t(K);
  auto dscore_of = [&](int r, int c, float& shat, float& dy) {
    // dS for element (r, c) once the row statistics are in shared memory, rounded to T as the
    // GEMM operand it becomes.
    const float s = S[r * Kpad + c];
    dy = sf::to_float(dYb[int64_t(m0 + r) * K + c]);
    float ds = dy;
    shat = s;
    if constexpr (NORM) {
      shat = (s - mean_s[r]) * rstd_s[r];
      const float dshat = weight ? dy * weight[c] : dy;
      ds = rstd_s[r] * (dshat - a1_s[r] - shat * a2_s[r]);
    }
    return sf::to_float(sf::from_float<T>(ds));
  };
  // Row pass: one warp per row.
  for (int r = warp; r < rows; r += kThreads / 32) {
    const float* row = S + r * Kpad;
    if constexpr (NORM) {
      float mean, rstd;
      layer_norm_stats(row, K, eps, lane, mean, rstd);
      float a1 = 0.f, a2 = 0.f;
      for (int c = lane; c < K; c += 32) {
        const float dy = sf::to_float(dYb[int64_t(m0 + r) * K + c]);
        const float dshat = weight ? dy * weight[c] : dy;
        a1 += dshat;
        a2 += dshat * (row[c] - mean) * rstd;
      }
      a1 = warp_sum(a1) / K;
      a2 = warp_sum(a2) / K;
      if (lane == 0) mean_s[r] = mean, rstd_s[r] = rstd, a1_s[r] = a1, a2_s[r] = a2;
      __syncwarp();
    }
    float dot = 0.f;
    if (dP || G) {
      for (int c = lane; c < K; c += 32) {
        float shat, dy;
        const float ds = dscore_of(r, c, shat, dy);
        dot = fmaf(ds, row[c], dot);
        if (G) G[(b * Np + m0 + r) * int64_t(K) + c] = sf::from_float<T>(ds);
      }
    }
    dot = warp_sum(dot);
    if (lane == 0) {
      rowdot_s[r] = dot;
      if (G) rinv_p[b * Np + m0 + r] = rinv_s[r];
    }
  }
  if (G && blockIdx.x == 0)
    for (int c = tid; c < K; c += kThreads) rinv_c[b * K + c] = rinv_cs[c];
  __syncthreads();
  // Column pass: one thread per class, rows in order; then dS replaces S in place (each element is
  // read and written by one thread, after every thread's last read of S in the row pass).
  const int64_t part = (b * gridDim.x + blockIdx.x) * int64_t(K);
  for (int c = tid; c < K; c += kThreads) {
    float cd = 0.f, dw = 0.f, db = 0.f;
#pragma unroll 1  // unrolled, the non-LayerNorm variant ran out of registers on sm_90
    for (int r = 0; r < rows; ++r) {
      float shat, dy;
      const float ds = dscore_of(r, c, shat, dy);
      cd = fmaf(ds, S[r * Kpad + c], cd);
      dw = fmaf(dy, shat, dw);
      db += dy;
      S[r * Kpad + c] = ds;
    }
    if (colpart) colpart[part + c] = cd;
    if constexpr (NORM) {
      wpart[part + c] = dw;
      bpart[part + c] = db;
    }
  }
  if (!dP) return;  // (uniform over the block)
  // dP rows = rinv_p (dS c^ - P rinv_p rowdot), c^ = C rinv_c: A = dS (shared), B = C tiles.
  const T* Cb = C + b * K * int64_t(D);
  const T* Pb = P + b * Np * int64_t(D);
  T* dPb = dP + b * Np * int64_t(D);
  const int wm = (warp & 1) * 16, wn = (warp >> 1) * 32;
  for (int n0 = 0; n0 < D; n0 += BN) {
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += BK) {
      __syncthreads();  // dS complete (first pass), the previous tiles consumed (later ones)
#pragma unroll
      for (int e = 0; e < BM * BK / kThreads; ++e) {
        const int idx = tid + kThreads * e, m = idx / BK, k = idx % BK;
        As[m * LDS + k] = sf::from_float<T>(m < rows && k0 + k < K ? S[m * Kpad + k0 + k] : 0.f);
      }
      stage_scaled_b(Bs, Cb, rinv_cs, k0, n0, K, D);
      __syncthreads();
      warp_tile(acc, As, Bs, warp, lane);
    }
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = wm + sf::acc_row(lane, i), n = n0 + wn + nt * 8 + sf::acc_col(lane, i);
        if (m < rows && n < D) {
          const float rp = rinv_s[m];
          const int64_t o = int64_t(m0 + m) * D + n;
          dPb[o] = sf::from_float<T>(rp * (acc[nt][i] - sf::to_float(Pb[o]) * rp * rowdot_s[m]));
        }
      }
    }
  }
}

// Backward, second launch: dC rows [m0, m0 + BM) x columns [n0, n0 + BN) of batch b,
//   dC = rinv_c (G^T p^ - C rinv_c coldot),  p^ = P rinv_p,
// with coldot of the block's classes summed from the row blocks' partials in a fixed order; the
// blocks of batch 0 and the first column tile also sum dw, db over batches and row blocks.
// dC null: dC not wanted, the grid is those blocks only (dw, db).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dclass_kernel(const T* __restrict__ G, const T* __restrict__ P, const float* __restrict__ rinv_p,
                  const T* __restrict__ C, const float* __restrict__ rinv_c, const float* __restrict__ colpart,
                  const float* __restrict__ wpart, const float* __restrict__ bpart, float* __restrict__ dw,
                  float* __restrict__ db, T* __restrict__ dC, int B, int Np, int K, int D, int nblocks) {
  SF_STATIC_SHARED(T, As, BM * LDS);
  SF_STATIC_SHARED(T, Bs, BN * LDS);
  SF_STATIC_SHARED(float, coldot_s, BM);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t b = blockIdx.z;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
  if (tid < BM && m0 + tid < K) {
    const int c = m0 + tid;
    if (dC) {
      float cd = 0.f;
      for (int j = 0; j < nblocks; ++j) cd += colpart[(b * nblocks + j) * K + c];
      coldot_s[tid] = cd;
    }
    if (wpart && b == 0 && blockIdx.x == 0) {
      float w = 0.f, bb = 0.f;
      for (int bi = 0; bi < B; ++bi)
        for (int j = 0; j < nblocks; ++j) {
          const int64_t i = (int64_t(bi) * nblocks + j) * K + c;
          w += wpart[i], bb += bpart[i];
        }
      dw[c] = w, db[c] = bb;
    }
  }
  if (!dC) return;  // (uniform over the grid)
  const T* Gb = G + b * Np * int64_t(K);
  const T* Pb = P + b * Np * int64_t(D);
  const float* rp = rinv_p + b * Np;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < Np; k0 += BK) {
    __syncthreads();
#pragma unroll
    for (int e = 0; e < BM * BK / kThreads; ++e) {
      const int idx = tid + kThreads * e, m = idx % BM, k = idx / BM;  // coalesced along G's classes
      T v = sf::from_float<T>(0.f);
      if (m0 + m < K && k0 + k < Np) v = Gb[int64_t(k0 + k) * K + m0 + m];
      As[m * LDS + k] = v;
    }
    stage_scaled_b(Bs, Pb, rp, k0, n0, Np, D);
    __syncthreads();
    warp_tile(acc, As, Bs, warp, lane);
  }
  const int wm = (warp & 1) * 16, wn = (warp >> 1) * 32;
  const T* Cb = C + b * K * int64_t(D);
  T* dCb = dC + b * K * int64_t(D);
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = wm + sf::acc_row(lane, i), n = n0 + wn + nt * 8 + sf::acc_col(lane, i);
      if (m0 + m < K && n < D) {
        const float rc = rinv_c[b * K + m0 + m];
        const int64_t o = int64_t(m0 + m) * D + n;
        dCb[o] = sf::from_float<T>(rc * (acc[nt][i] - sf::to_float(Cb[o]) * rc * coldot_s[m]));
      }
    }
  }
}

int padded_classes(int K) { return int(sf::ceil_div(K, 4) * 4); }

// Dynamic shared memory of the forward (rinv_c; with the LayerNorm the block's [BM][Kpad] scores)
// and of the backward's dpatch_kernel (rinv_c and the [BM][Kpad] scores, always).
size_t forward_dynamic_smem(int K, bool norm) {
  return (class_tiles_len(K) + (norm ? size_t(BM) * padded_classes(K) : 0)) * sizeof(float);
}
size_t backward_dynamic_smem(int K) { return (class_tiles_len(K) + size_t(BM) * padded_classes(K)) * sizeof(float); }

// Shared memory per block, static plus dynamic, of the largest kernel a call runs: the backward's
// dpatch_kernel (its static tiles and row statistics), which needs at least what the forward
// does.  The one owner of the K limit: Python asks (mask_similarity_shared_memory) and falls back
// with the reason where a device gives a block less.
size_t block_smem_bytes(int K, size_t element_bytes) {
  return size_t(BM + BN) * LDS * element_bytes + 6 * BM * sizeof(float) + backward_dynamic_smem(K);
}

}  // namespace

#include "sf_torch.h"

namespace {

void check_inputs(const at::Tensor& P, const at::Tensor& C) {
  SF_CHECK_INPUT(P, 3);
  SF_CHECK_INPUT(C, 3);
  SF_CHECK_FLOAT(P);
  SF_CHECK_SAME_DTYPE(C, P);
  TORCH_CHECK(C.size(0) == P.size(0) && C.size(2) == P.size(2), "classes must be (B, K, D) like patches");
  TORCH_CHECK(C.size(1) < (int64_t(1) << 24), "classes: K must be < 2^24, got ", C.size(1));
  const size_t need = block_smem_bytes(int(C.size(1)), C.element_size());
  const int64_t limit = sf::shared_memory_per_block(C.device().index());
  TORCH_CHECK(int64_t(need) <= limit, "mask_similarity: K=", C.size(1), " classes need ", need,
              " bytes of shared memory per block; this device gives ", limit);
  TORCH_CHECK(P.size(1) < (int64_t(1) << 31) && P.size(2) < (int64_t(1) << 31), "Np and D must be < 2^31");
}

// [bytes per block the kernels need for K classes of dtype, bytes CUDA device `device` gives].
std::vector<int64_t> shared_memory(int64_t classes, at::ScalarType dtype, int64_t device) {
  TORCH_CHECK(classes >= 1 && classes < (int64_t(1) << 24), "classes: K must be in [1, 2^24), got ", classes);
  return {int64_t(block_smem_bytes(int(classes), c10::elementSize(dtype))), sf::shared_memory_per_block(device)};
}

const float* optional_ptr(const std::optional<at::Tensor>& t, int64_t K, const char* name) {
  if (!t.has_value()) return nullptr;
  SF_CHECK_DTYPE(*t, at::kFloat);
  TORCH_CHECK(t->is_contiguous() && t->numel() == K, name, " must be a contiguous (K,) float32 tensor");
  return t->data_ptr<float>();
}

at::Tensor forward(const at::Tensor& P, const at::Tensor& C, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& bias, bool norm, double eps) {
  check_inputs(P, C);
  SF_DEVICE_GUARD(P);
  const int64_t B = P.size(0), Np = P.size(1), K = C.size(1), D = P.size(2);
  at::Tensor out = at::empty({B, Np, K}, P.options());
  const float* w = optional_ptr(weight, K, "norm_weight");
  const float* bi = optional_ptr(bias, K, "norm_bias");
  const int Kpad = padded_classes(int(K));
  const size_t smem = forward_dynamic_smem(int(K), norm);
  const dim3 grid(unsigned(sf::ceil_div(Np, BM)), unsigned(B));
  SF_DISPATCH_FLOAT(P.scalar_type(), "mask_similarity", [&] {
    auto kernel = norm ? similarity_kernel<scalar_t, true> : similarity_kernel<scalar_t, false>;
    SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
    SF_LAUNCH(kernel, grid, kThreads, smem, sf::current_stream(), sf::data_ptr<scalar_t>(P),
              sf::data_ptr<scalar_t>(C), w, bi, sf::data_ptr<scalar_t>(out), int(Np),
              int(K), int(D), Kpad, float(eps));
  });
  SF_CHECK_LAUNCH();
  return out;
}

// Returns dP, dC and, with norm, dw and db (float32; empty tensors otherwise).  need_dp, need_dc:
// autograd's needs_input_grad; a gradient not needed is returned unwritten (the caller drops it).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& P,
                                                                    const at::Tensor& C,
                                                                    const std::optional<at::Tensor>& weight,
                                                                    bool norm, double eps, bool need_dp,
                                                                    bool need_dc) {
  check_inputs(P, C);
  SF_CHECK_INPUT(grad, 3);
  SF_CHECK_SAME_DTYPE(grad, P);
  SF_DEVICE_GUARD(P);
  const int64_t B = P.size(0), Np = P.size(1), K = C.size(1), D = P.size(2);
  TORCH_CHECK(grad.size(0) == B && grad.size(1) == Np && grad.size(2) == K, "grad must be (B, Np, K)");
  const float* w = optional_ptr(weight, K, "norm_weight");
  const int nblocks = int(sf::ceil_div(Np, BM));
  const int Kpad = padded_classes(int(K));
  const size_t smem = backward_dynamic_smem(int(K));
  auto f32 = P.options().dtype(at::kFloat);
  // The dC intermediates (G, the inverse norms, the coldot partials) only when dC is needed.
  at::Tensor rinv_p = need_dc ? at::empty({B, Np}, f32) : at::Tensor();
  at::Tensor rinv_c = need_dc ? at::empty({B, K}, f32) : at::Tensor();
  at::Tensor colpart = need_dc ? at::empty({B, nblocks, K}, f32) : at::Tensor();
  at::Tensor wpart = norm ? at::empty({B, nblocks, K}, f32) : at::Tensor();
  at::Tensor bpart = norm ? at::empty({B, nblocks, K}, f32) : at::Tensor();
  at::Tensor dw = norm ? at::empty({K}, f32) : at::Tensor(), db = norm ? at::empty({K}, f32) : at::Tensor();
  at::Tensor G = need_dc ? at::empty({B, Np, K}, P.options()) : at::Tensor();
  at::Tensor dP = at::empty_like(P), dC = at::empty_like(C);
  auto fptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  cudaStream_t stream = sf::current_stream();
  SF_DISPATCH_FLOAT(P.scalar_type(), "mask_similarity", [&] {
    using T = scalar_t;
    T* g = need_dc ? sf::data_ptr<T>(G) : nullptr;
    auto dpatch = norm ? dpatch_kernel<T, true> : dpatch_kernel<T, false>;
    SF_ALLOW_DYNAMIC_SMEM(dpatch, smem);
    SF_LAUNCH(dpatch, dim3(nblocks, unsigned(B)), kThreads, smem, stream, sf::data_ptr<T>(P), sf::data_ptr<T>(C),
              sf::data_ptr<T>(grad), w, g, need_dp ? sf::data_ptr<T>(dP) : nullptr, fptr(rinv_p), fptr(rinv_c),
              fptr(colpart), fptr(wpart), fptr(bpart), int(Np), int(K), int(D), Kpad, float(eps));
    SF_CHECK_LAUNCH();
    // Without dC, only the blocks summing dw, db (batch 0, column tile 0), and none without norm.
    const dim3 grid = need_dc ? dim3(unsigned(sf::ceil_div(D, BN)), unsigned(sf::ceil_div(K, BM)), unsigned(B))
                              : dim3(1, unsigned(sf::ceil_div(K, BM)), 1);
    if (need_dc || norm) {
      SF_LAUNCH(dclass_kernel<T>, grid, kThreads, 0, stream, g, sf::data_ptr<T>(P), fptr(rinv_p), sf::data_ptr<T>(C),
                fptr(rinv_c), fptr(colpart), fptr(wpart), fptr(bpart), fptr(dw), fptr(db),
                need_dc ? sf::data_ptr<T>(dC) : nullptr, int(B), int(Np), int(K), int(D), nblocks);
      SF_CHECK_LAUNCH();
    }
  });
  return {dP, dC, dw, db};
}

}  // namespace

SF_TORCH_LIBRARY_FRAGMENT(m) {
  m.def("mask_similarity_forward(Tensor patches, Tensor classes, Tensor? norm_weight, Tensor? norm_bias, "
        "bool norm, float eps) -> Tensor");
  m.def("mask_similarity_backward(Tensor grad, Tensor patches, Tensor classes, Tensor? norm_weight, bool norm, "
        "float eps, bool need_dp=True, bool need_dc=True) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("mask_similarity_shared_memory(int classes, ScalarType dtype, int device) -> int[]",
        &shared_memory);
}

SF_TORCH_LIBRARY_IMPL(m) {
  m.impl("mask_similarity_forward", &forward);
  m.impl("mask_similarity_backward", &backward);
}
