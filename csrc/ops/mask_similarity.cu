// mask_similarity: Segmenter's masks S = (P / |P|) (C / |C|)^T, optionally LayerNorm over the
// K classes (`mask_norm`), forward and backward (SPEC.md section 4, reference.mask_similarity).
//
// P: (B, Np, D) patches, C: (B, K, D) classes, out: (B, Np, K).  No epsilon in the norms, as the
// official code.  All arithmetic in fp32; fp16/bf16 products on tensor cores (sf_mma.cuh), fp32
// products with FFMA.  The normalisation is folded into the GEMMs: S = rinv_p * (P C^T) * rinv_c.
//
// Forward
//   rinv_kernel          rinv_c = 1 / |C_k|                       (one warp per row)
//   similarity_kernel    one block per (b, 32 rows of P): loops over K in 64-column tiles and D in
//                        32-deep tiles staged in shared memory; |P_n| comes from the staged tiles;
//                        with LayerNorm the 32 x K rows of S stay in shared memory for the epilogue.
// Backward (dY -> dP, dC, dw, db)
//   dscore_kernel        recomputes S rows in shared memory, then dS (LayerNorm backward),
//                        rowdot_n = sum_k dS S (= p^.dp^), and per-block column partials of
//                        sum_n dS S (= c^.dc^), sum dY s^ (dw), sum dY (db)
//   reduce_kernel        sums the column partials in a fixed order (deterministic)
//   grad_gemm_kernel     dP = rinv_p (dS c^ - P rinv_p rowdot),  dC = rinv_c (dS^T p^ - C rinv_c coldot)
#include <type_traits>

#include "sf_common.cuh"
#include "sf_mma.cuh"

namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int BM = 32;         // rows per block
constexpr int BN = 64;         // columns per tile
constexpr int BK = 32;         // depth per staged tile
constexpr int LDS = BK + 8;    // smem row stride: even (32-bit fragment loads), skews banks
constexpr int kMaxClasses = 1024;

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
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[4];
      sf::load_a_frag(a, As + wm * LDS + kk, LDS, lane);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        uint32_t b[2];
        sf::load_b_frag(b, Bs + (wn + nt * 8) * LDS + kk, LDS, lane);
        sf::mma_m16n8k16_f32<T>(acc[nt], a, b, acc[nt]);
      }
    }
  }
}

SF_DEVICE_INLINE float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, m);
  return v;
}

// rinv[r] = 1 / |x_r| for rows of length D.
template <typename T>
__global__ void __launch_bounds__(kThreads) rinv_kernel(const T* __restrict__ x, float* __restrict__ rinv,
                                                         int64_t rows, int D) {
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (r >= rows) return;  // whole warps leave together: no barrier follows
  float s = 0.f;
  for (int d = lane; d < D; d += 32) {
    const float v = sf::to_float(x[r * D + d]);
    s = fmaf(v, v, s);
  }
  s = warp_sum(s);
  if (lane == 0) rinv[r] = 1.f / sqrtf(s);
}

// S rows [m0, m0 + BM) of batch b, scaled to cosines, delivered tile by tile to `emit(r, c, s)`.
// Computes rinv_p of these rows from the staged tiles into rinv_s (smem, BM floats).
template <typename T, typename Emit>
SF_DEVICE_INLINE void cosine_rows(const T* __restrict__ P, const T* __restrict__ C, const float* __restrict__ rinv_c,
                                  int64_t b, int m0, int Np, int K, int D, T* As, T* Bs, float* rinv_s, Emit emit) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const T* Pb = P + b * Np * int64_t(D);
  const T* Cb = C + b * K * int64_t(D);
  float sq[BM * BK / kThreads];  // this thread's partial |P|^2 of rows warp + 4 e
  for (int e = 0; e < BM * BK / kThreads; ++e) sq[e] = 0.f;
  for (int n0 = 0; n0 < K; n0 += BN) {
    float acc[4][4] = {};
    for (int d0 = 0; d0 < D; d0 += BK) {
      __syncthreads();  // the previous tiles are consumed
#pragma unroll
      for (int e = 0; e < BM * BK / kThreads; ++e) {
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
      for (int e = 0; e < BN * BK / kThreads; ++e) {
        const int n = warp + 4 * e, k = lane;
        T v = sf::from_float<T>(0.f);
        if (n0 + n < K && d0 + k < D) v = Cb[int64_t(n0 + n) * D + d0 + k];
        Bs[n * LDS + k] = v;
      }
      __syncthreads();
      warp_tile(acc, As, Bs, warp, lane);
    }
    if (n0 == 0) {
      for (int e = 0; e < BM * BK / kThreads; ++e) {
        const float s = warp_sum(sq[e]);
        if (lane == 0) rinv_s[warp + 4 * e] = 1.f / sqrtf(s);
      }
      __syncthreads();
    }
    const int wm = (warp & 1) * 16, wn = (warp >> 1) * 32;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = wm + sf::acc_row(lane, i), c = n0 + wn + nt * 8 + sf::acc_col(lane, i);
        if (m0 + r < Np && c < K) emit(r, c, acc[nt][i] * rinv_s[r] * rinv_c[b * K + c]);
      }
    }
  }
}

// out[b, m0 + r, :] for one block of rows; with NORM the LayerNorm over K as epilogue.
template <typename T, bool NORM>
__global__ void __launch_bounds__(kThreads)
    similarity_kernel(const T* __restrict__ P, const T* __restrict__ C, const float* __restrict__ rinv_c,
                      const float* __restrict__ weight, const float* __restrict__ bias, T* __restrict__ out, int Np,
                      int K, int D, int Kpad, float eps) {
  __shared__ __align__(16) T As[BM * LDS];
  __shared__ __align__(16) T Bs[BN * LDS];
  __shared__ float rinv_s[BM];
  SF_DYNAMIC_SHARED(float, S);  // NORM: [BM][Kpad] cosines
  const int64_t b = blockIdx.y;
  const int m0 = blockIdx.x * BM;
  T* outb = out + b * Np * int64_t(K);
  cosine_rows<T>(P, C, rinv_c, b, m0, Np, K, D, As, Bs, rinv_s, [&](int r, int c, float s) {
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
      float mean = 0.f;
      for (int c = lane; c < K; c += 32) mean += row[c];
      mean = warp_sum(mean) / K;
      float var = 0.f;
      for (int c = lane; c < K; c += 32) var += (row[c] - mean) * (row[c] - mean);
      const float rstd = 1.f / sqrtf(warp_sum(var) / K + eps);
      for (int c = lane; c < K; c += 32) {
        float y = (row[c] - mean) * rstd;
        if (weight) y *= weight[c];
        if (bias) y += bias[c];
        outb[int64_t(m0 + r) * K + c] = sf::from_float<T>(y);
      }
    }
  }
}

// Backward, first step (see the file comment).  Per block of rows: G = dS (in T, the A operand of
// the gradient GEMMs), rinv_p, rowdot; column partials (fixed order) for coldot, dw, db.
template <typename T, bool NORM>
// minBlocks = 1: without it ptxas capped this kernel's registers for occupancy and spilled (sm_90).
__global__ void __launch_bounds__(kThreads, 1)
    dscore_kernel(const T* __restrict__ P, const T* __restrict__ C, const float* __restrict__ rinv_c,
                  const T* __restrict__ dY, const float* __restrict__ weight, T* __restrict__ G,
                  float* __restrict__ rinv_p, float* __restrict__ rowdot, float* __restrict__ colpart,
                  float* __restrict__ wpart, float* __restrict__ bpart, int Np, int K, int D, int Kpad, float eps) {
  __shared__ __align__(16) T As[BM * LDS];
  __shared__ __align__(16) T Bs[BN * LDS];
  __shared__ float rinv_s[BM], mean_s[BM], rstd_s[BM], a1_s[BM], a2_s[BM];
  SF_DYNAMIC_SHARED(float, S);  // [BM][Kpad] cosines
  const int64_t b = blockIdx.y;
  const int m0 = blockIdx.x * BM;
  cosine_rows<T>(P, C, rinv_c, b, m0, Np, K, D, As, Bs, rinv_s, [&](int r, int c, float s) { S[r * Kpad + c] = s; });
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* dYb = dY + b * Np * int64_t(K);
  auto dscore_of = [&](int r, int c, float& shat, float& dy) {
    // dS for element (r, c) once the row statistics are in shared memory.
    const float s = S[r * Kpad + c];
    dy = sf::to_float(dYb[int64_t(m0 + r) * K + c]);
    if constexpr (NORM) {
      shat = (s - mean_s[r]) * rstd_s[r];
      const float dshat = weight ? dy * weight[c] : dy;
      return rstd_s[r] * (dshat - a1_s[r] - shat * a2_s[r]);
    } else {
      shat = s;
      return dy;
    }
  };
  // Row pass: one warp per row.
  for (int r = warp; r < BM; r += kThreads / 32) {
    if (m0 + r >= Np) break;
    const float* row = S + r * Kpad;
    if constexpr (NORM) {
      float mean = 0.f;
      for (int c = lane; c < K; c += 32) mean += row[c];
      mean = warp_sum(mean) / K;
      float var = 0.f;
      for (int c = lane; c < K; c += 32) var += (row[c] - mean) * (row[c] - mean);
      const float rstd = 1.f / sqrtf(warp_sum(var) / K + eps);
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
    for (int c = lane; c < K; c += 32) {
      float shat, dy;
      // The dot uses dS as rounded into G, the operand of the dP GEMM it is subtracted from.
      const T ds = sf::from_float<T>(dscore_of(r, c, shat, dy));
      dot = fmaf(sf::to_float(ds), row[c], dot);
      G[(b * Np + m0 + r) * int64_t(K) + c] = ds;
    }
    dot = warp_sum(dot);
    if (lane == 0) {
      rowdot[b * Np + m0 + r] = dot;
      rinv_p[b * Np + m0 + r] = rinv_s[r];
    }
  }
  __syncthreads();
  // Column pass: one thread per class, rows in order.
  const int64_t part = (b * gridDim.x + blockIdx.x) * int64_t(K);
  const int rows = min(BM, Np - m0);
  for (int c = threadIdx.x; c < K; c += kThreads) {
    float cd = 0.f, dw = 0.f, db = 0.f;
#pragma unroll 1  // unrolled, the non-LayerNorm variant ran out of registers on sm_90
    for (int r = 0; r < rows; ++r) {
      float shat, dy;
      const float ds = sf::to_float(sf::from_float<T>(dscore_of(r, c, shat, dy)));  // as in G
      cd = fmaf(ds, S[r * Kpad + c], cd);
      dw = fmaf(dy, shat, dw);
      db += dy;
    }
    colpart[part + c] = cd;
    if constexpr (NORM) {
      wpart[part + c] = dw;
      bpart[part + c] = db;
    }
  }
}

// coldot[b, k] = sum over row blocks; dw[k], db[k] = sum over batches and row blocks; fixed order.
__global__ void __launch_bounds__(kThreads)
    reduce_kernel(const float* __restrict__ colpart, const float* __restrict__ wpart, const float* __restrict__ bpart,
                  float* __restrict__ coldot, float* __restrict__ dw, float* __restrict__ db, int B, int nblocks,
                  int K) {
  const int c = blockIdx.x * kThreads + threadIdx.x;
  if (c >= K) return;
  float w = 0.f, bb = 0.f;
  for (int b = 0; b < B; ++b) {
    float cd = 0.f;
    for (int j = 0; j < nblocks; ++j) {
      const int64_t i = (int64_t(b) * nblocks + j) * K + c;
      cd += colpart[i];
      if (wpart) w += wpart[i], bb += bpart[i];
    }
    coldot[int64_t(b) * K + c] = cd;
  }
  if (wpart) dw[c] = w, db[c] = bb;
}

// out[b] (M x D) = rinv_y (A X^ - Y rinv_y dot), A = G[b] (TRANS_A false: M = Np rows, depth K)
// or G[b]^T (TRANS_A true: M = K rows, depth Np); X^ = X * rinv_x (depth x D), Y (M x D).
template <typename T, bool TRANS_A>
__global__ void __launch_bounds__(kThreads)
    grad_gemm_kernel(const T* __restrict__ G, const T* __restrict__ X, const float* __restrict__ rinv_x,
                     const T* __restrict__ Y, const float* __restrict__ rinv_y, const float* __restrict__ dot,
                     T* __restrict__ out, int M, int depth, int D, int Np, int K) {
  __shared__ __align__(16) T As[BM * LDS];
  __shared__ __align__(16) T Bs[BN * LDS];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t b = blockIdx.z;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
  const T* Gb = G + b * Np * int64_t(K);
  const T* Xb = X + b * depth * int64_t(D);
  const float* rx = rinv_x + b * depth;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < depth; k0 += BK) {
    __syncthreads();
#pragma unroll
    for (int e = 0; e < BM * BK / kThreads; ++e) {
      const int idx = tid + kThreads * e;
      // Coalesced along G's contiguous dimension: k for G[b], m for G[b]^T.
      const int m = TRANS_A ? idx % BM : idx / BK, k = TRANS_A ? idx / BM : idx % BK;
      T v = sf::from_float<T>(0.f);
      if (m0 + m < M && k0 + k < depth)
        v = TRANS_A ? Gb[int64_t(k0 + k) * K + m0 + m] : Gb[int64_t(m0 + m) * K + k0 + k];
      As[m * LDS + k] = v;
    }
#pragma unroll
    for (int e = 0; e < BN * BK / kThreads; ++e) {
      const int idx = tid + kThreads * e;
      const int n = idx % BN, k = idx / BN;  // coalesced along D
      float v = 0.f;
      if (n0 + n < D && k0 + k < depth) v = sf::to_float(Xb[int64_t(k0 + k) * D + n0 + n]) * rx[k0 + k];
      Bs[n * LDS + k] = sf::from_float<T>(v);
    }
    __syncthreads();
    warp_tile(acc, As, Bs, warp, lane);
  }
  const int wm = (warp & 1) * 16, wn = (warp >> 1) * 32;
  const T* Yb = Y + b * M * int64_t(D);
  T* outb = out + b * M * int64_t(D);
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = m0 + wm + sf::acc_row(lane, i), n = n0 + wn + nt * 8 + sf::acc_col(lane, i);
      if (m < M && n < D) {
        const float ry = rinv_y[b * M + m];
        const int64_t o = int64_t(m) * D + n;
        outb[o] = sf::from_float<T>(ry * (acc[nt][i] - sf::to_float(Yb[o]) * ry * dot[b * M + m]));
      }
    }
  }
}

int padded_classes(int K) { return int(sf::ceil_div(K, 4) * 4); }

}  // namespace

#include "sf_torch.h"

namespace {

void check_inputs(const at::Tensor& P, const at::Tensor& C) {
  SF_CHECK_INPUT(P, 3);
  SF_CHECK_INPUT(C, 3);
  SF_CHECK_FLOAT(P);
  SF_CHECK_SAME_DTYPE(C, P);
  TORCH_CHECK(C.size(0) == P.size(0) && C.size(2) == P.size(2), "classes must be (B, K, D) like patches");
  TORCH_CHECK(C.size(1) <= kMaxClasses, "mask_similarity kernels support K <= ", kMaxClasses, ", got ", C.size(1));
  TORCH_CHECK(P.size(1) < (int64_t(1) << 31) && P.size(2) < (int64_t(1) << 31), "Np and D must be < 2^31");
}

const float* optional_ptr(const std::optional<at::Tensor>& t, int64_t K, const char* name) {
  if (!t.has_value()) return nullptr;
  SF_CHECK_DTYPE(*t, at::kFloat);
  TORCH_CHECK(t->is_contiguous() && t->numel() == K, name, " must be a contiguous (K,) float32 tensor");
  return t->data_ptr<float>();
}

at::Tensor rinv_rows(const at::Tensor& x) {
  at::Tensor r = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  const int64_t rows = x.size(0) * x.size(1);
  if (rows == 0) return r;
  SF_DISPATCH_FLOAT(x.scalar_type(), "mask_similarity", [&] {
    SF_LAUNCH(rinv_kernel<scalar_t>, int(sf::ceil_div(rows, kThreads / 32)), kThreads, 0, sf::current_stream(),
              sf::data_ptr<scalar_t>(x), r.data_ptr<float>(), rows, int(x.size(2)));
  });
  SF_CHECK_LAUNCH();
  return r;
}

at::Tensor forward(const at::Tensor& P, const at::Tensor& C, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& bias, bool norm, double eps) {
  check_inputs(P, C);
  SF_DEVICE_GUARD(P);
  const int64_t B = P.size(0), Np = P.size(1), K = C.size(1), D = P.size(2);
  at::Tensor out = at::empty({B, Np, K}, P.options());
  const float* w = optional_ptr(weight, K, "norm_weight");
  const float* bi = optional_ptr(bias, K, "norm_bias");
  at::Tensor rinv_c = rinv_rows(C);
  const int Kpad = padded_classes(int(K));
  const size_t smem = norm ? size_t(BM) * Kpad * sizeof(float) : 0;
  const dim3 grid(unsigned(sf::ceil_div(Np, BM)), unsigned(B));
  SF_DISPATCH_FLOAT(P.scalar_type(), "mask_similarity", [&] {
    auto kernel = norm ? similarity_kernel<scalar_t, true> : similarity_kernel<scalar_t, false>;
    SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
    SF_LAUNCH(kernel, grid, kThreads, smem, sf::current_stream(), sf::data_ptr<scalar_t>(P),
              sf::data_ptr<scalar_t>(C), rinv_c.data_ptr<float>(), w, bi, sf::data_ptr<scalar_t>(out), int(Np),
              int(K), int(D), Kpad, float(eps));
  });
  SF_CHECK_LAUNCH();
  return out;
}

// Returns dP, dC and, with norm, dw and db (float32; empty tensors otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& P,
                                                                    const at::Tensor& C,
                                                                    const std::optional<at::Tensor>& weight,
                                                                    bool norm, double eps) {
  check_inputs(P, C);
  SF_CHECK_INPUT(grad, 3);
  SF_CHECK_SAME_DTYPE(grad, P);
  SF_DEVICE_GUARD(P);
  const int64_t B = P.size(0), Np = P.size(1), K = C.size(1), D = P.size(2);
  TORCH_CHECK(grad.size(0) == B && grad.size(1) == Np && grad.size(2) == K, "grad must be (B, Np, K)");
  const float* w = optional_ptr(weight, K, "norm_weight");
  const int nblocks = int(sf::ceil_div(Np, BM));
  const int Kpad = padded_classes(int(K));
  const size_t smem = size_t(BM) * Kpad * sizeof(float);
  auto f32 = P.options().dtype(at::kFloat);
  at::Tensor rinv_c = rinv_rows(C);
  at::Tensor rinv_p = at::empty({B, Np}, f32), rowdot = at::empty({B, Np}, f32), coldot = at::empty({B, K}, f32);
  at::Tensor colpart = at::empty({B, nblocks, K}, f32);
  at::Tensor wpart = norm ? at::empty({B, nblocks, K}, f32) : at::Tensor();
  at::Tensor bpart = norm ? at::empty({B, nblocks, K}, f32) : at::Tensor();
  at::Tensor dw = norm ? at::empty({K}, f32) : at::Tensor(), db = norm ? at::empty({K}, f32) : at::Tensor();
  at::Tensor G = at::empty({B, Np, K}, P.options());
  at::Tensor dP = at::empty_like(P), dC = at::empty_like(C);
  auto fptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  cudaStream_t stream = sf::current_stream();
  SF_DISPATCH_FLOAT(P.scalar_type(), "mask_similarity", [&] {
    using T = scalar_t;
    auto dscore = norm ? dscore_kernel<T, true> : dscore_kernel<T, false>;
    SF_ALLOW_DYNAMIC_SMEM(dscore, smem);
    SF_LAUNCH(dscore, dim3(nblocks, unsigned(B)), kThreads, smem, stream, sf::data_ptr<T>(P), sf::data_ptr<T>(C),
              rinv_c.data_ptr<float>(), sf::data_ptr<T>(grad), w, sf::data_ptr<T>(G), rinv_p.data_ptr<float>(),
              rowdot.data_ptr<float>(), colpart.data_ptr<float>(), fptr(wpart), fptr(bpart), int(Np), int(K),
              int(D), Kpad, float(eps));
    SF_CHECK_LAUNCH();
    SF_LAUNCH(reduce_kernel, int(sf::ceil_div(K, kThreads)), kThreads, 0, stream, colpart.data_ptr<float>(),
              fptr(wpart), fptr(bpart), coldot.data_ptr<float>(), fptr(dw), fptr(db), int(B), nblocks, int(K));
    SF_CHECK_LAUNCH();
    // dP = rinv_p (G c^ - P rinv_p rowdot): M = Np, depth K.
    auto dp_kernel = grad_gemm_kernel<T, false>, dc_kernel = grad_gemm_kernel<T, true>;
    SF_LAUNCH(dp_kernel, dim3(unsigned(sf::ceil_div(D, BN)), unsigned(nblocks), unsigned(B)),
              kThreads, 0, stream, sf::data_ptr<T>(G), sf::data_ptr<T>(C), rinv_c.data_ptr<float>(),
              sf::data_ptr<T>(P), rinv_p.data_ptr<float>(), rowdot.data_ptr<float>(), sf::data_ptr<T>(dP), int(Np),
              int(K), int(D), int(Np), int(K));
    SF_CHECK_LAUNCH();
    // dC = rinv_c (G^T p^ - C rinv_c coldot): M = K, depth Np.
    SF_LAUNCH(dc_kernel, dim3(unsigned(sf::ceil_div(D, BN)), unsigned(sf::ceil_div(K, BM)), unsigned(B)), kThreads, 0, stream,
              sf::data_ptr<T>(G), sf::data_ptr<T>(P), rinv_p.data_ptr<float>(), sf::data_ptr<T>(C),
              rinv_c.data_ptr<float>(), coldot.data_ptr<float>(), sf::data_ptr<T>(dC), int(K), int(Np), int(D),
              int(Np), int(K));
    SF_CHECK_LAUNCH();
  });
  return {dP, dC, dw, db};
}

}  // namespace

SF_TORCH_LIBRARY_FRAGMENT(m) {
  m.def("mask_similarity_forward(Tensor patches, Tensor classes, Tensor? norm_weight, Tensor? norm_bias, "
        "bool norm, float eps) -> Tensor");
  m.def("mask_similarity_backward(Tensor grad, Tensor patches, Tensor classes, Tensor? norm_weight, bool norm, "
        "float eps) -> (Tensor, Tensor, Tensor, Tensor)");
}

SF_TORCH_LIBRARY_IMPL(m) {
  m.impl("mask_similarity_forward", &forward);
  m.impl("mask_similarity_backward", &backward);
}
