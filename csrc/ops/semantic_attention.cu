// SeMask semantic attention, forward and backward (SPEC.md section 2).
//
//   out = softmax(Sq Sk^T) Yv      (one head, no scale)
//
// sq, sk: (B_, N, K) with K the number of classes (the inner dimension of the
// logits, 150 on ADE20K, 19 on Cityscapes); yv, out: (B_, N, C), C up to 1536.
//
// fp16 / bf16 run every product, forward and backward, on tensor cores (the
// "tensor cores" sections below); fp32 runs the FFMA path, so it stays exact.
// Layout of the FFMA path (fp32 accumulation):
//   * query tiles of BM = 16 rows (4 per warp), key tiles of BN = 32 keys (one
//     per lane) so row max / sum are warp shuffles;
//   * the class dimension K is staged whole in shared memory, padded to
//     KP = 32 * ceil(K / 32) with zeros (a lane owns K-columns lane + 32u);
//   * C is tiled over blocks: a forward block owns CT = 32 * CPL output columns
//     and recomputes the (cheap, K-deep) logits of its query tile.
// Forward keeps an online softmax over key tiles and saves the fp32 row
// logsumexp; N x N never reaches global memory.  Backward (deterministic, no
// atomics), one launch of two kinds of blocks: dSq per query tile, and dYv per
// (key tile, C tile of dYv); the key tile's block of C tile 0 also computes dSk,
// taking its dYv tile's dO chunks from those it stages for dP.  The blocks computing
// dP = dO Yv^T (over C in chunks of CC columns) compute delta_i = rowsum(dO_i * O_i)
// of the query rows they use, so no block depends on another and Sq, Sk, Yv, dO are
// read by a single kernel for all three gradients.  Only the gradients autograd needs
// are computed: the grid holds dSq blocks only for dSq, the dYv blocks of C tiles past
// the first only for dYv; without dSk no block computes dP for the keys, without dYv
// the key blocks store no dYv (the tensor-core ones do not accumulate it either).

#include "sf_common.cuh"
#include "sf_reduce.cuh"
#include "sf_tile.cuh"
#include "sf_warp_gemm.cuh"

#include <cstdint>
#include <type_traits>

namespace sf_semantic_attention {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;
constexpr int BM = kWarps * kRowsPerWarp;
constexpr int BN = 32;
constexpr int CC = 64;  // C-chunk of the dP = dO Yv^T products in backward
constexpr float kNegInf = -__builtin_huge_valf();

struct Params {
  const void* sq;
  const void* sk;
  const void* yv;
  int64_t batch;
  int n, k, c;
  int kp;  // K padded to a multiple of 32
  // Batch and row strides in elements (the last dim is contiguous): the column views of one
  // fused q/k/v projection are read in place.
  int64_t sq_b, sq_r, sk_b, sk_r, yv_b, yv_r;
};

using sf::group_max;
using sf::group_sum;
using sf::warp_max;
using sf::warp_sum;

// Stage rows [row0, row0 + rows) x cols [col0, col0 + width) of an (n, cols) matrix with row
// stride rs as fp32 with leading dimension ld, zero padded.
template <typename T>
SF_DEVICE_INLINE void load_tile(float* dst, int ld, const T* src, int64_t rs, int row0, int rows, int n, int col0,
                                int width, int cols) {
  sf::stage_tile<float>(dst, ld, src, rs, row0, rows, n, col0, width, cols, threadIdx.x, kThreads);
}

SF_DEVICE_INLINE float dot(const float* a, const float* b, int len) {
  float s = 0.f;
#pragma unroll 4
  for (int t = 0; t < len; ++t) s = fmaf(a[t], b[t], s);
  return s;
}

// Leading dimension of a key tile: odd, so lane j reading row j is conflict-free.
SF_HOST_DEVICE inline int key_ld(int width) { return width | 1; }

// ---------------------------------------------------------------- forward --
SF_HOST_DEVICE inline int64_t fwd_smem_floats(int kp, int ct) {
  return static_cast<int64_t>(BM) * kp + BN * key_ld(kp) + BN * ct;
}

// grid (B_ * ceil(C / CT), ceil(N / BM)).
template <typename T, int CPL>
// minBlocks = 1: without it ptxas capped this kernel's registers for occupancy and spilled (sm_80).
__global__ void __launch_bounds__(kThreads, 1) semantic_attention_fwd_kernel(Params p, T* __restrict__ out,
                                                                          float* __restrict__ lse) {
  constexpr int CT = 32 * CPL;
  SF_DYNAMIC_SHARED(float, smem);
  const int ldk = key_ld(p.kp);
  float* qs = smem;               // [BM][KP]
  float* ks = qs + BM * p.kp;     // [BN][ldk]
  float* vs = ks + BN * ldk;      // [BN][CT]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int ctiles = (p.c + CT - 1) / CT;
  const int64_t b = blockIdx.x / ctiles;
  const int c0 = static_cast<int>(blockIdx.x % ctiles) * CT;
  const int q0 = blockIdx.y * BM;
  const T* sqg = static_cast<const T*>(p.sq) + b * p.sq_b;
  const T* skg = static_cast<const T*>(p.sk) + b * p.sk_b;
  const T* yvg = static_cast<const T*>(p.yv) + b * p.yv_b;
  load_tile<T>(qs, p.kp, sqg, p.sq_r, q0, BM, p.n, 0, p.kp, p.k);

  float m[kRowsPerWarp], l[kRowsPerWarp], o[kRowsPerWarp][CPL];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = kNegInf;
    l[r] = 0.f;
#pragma unroll
    for (int u = 0; u < CPL; ++u) o[r][u] = 0.f;
  }
  for (int k0 = 0; k0 < p.n; k0 += BN) {
    __syncthreads();
    load_tile<T>(ks, ldk, skg, p.sk_r, k0, BN, p.n, 0, p.kp, p.k);
    load_tile<T>(vs, CT, yvg, p.yv_r, k0, BN, p.n, c0, CT, p.c);
    __syncthreads();
    const int j = k0 + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r, i = q0 + row;
      const float s = dot(qs + row * p.kp, ks + lane * ldk, p.k);
      const float x = (i < p.n && j < p.n) ? s : kNegInf;
      const float m_new = fmaxf(m[r], warp_max(x));
      const float alpha = m[r] == kNegInf ? 0.f : __expf(m[r] - m_new);
      const float prob = x == kNegInf ? 0.f : __expf(x - m_new);
      l[r] = l[r] * alpha + warp_sum(prob);
      m[r] = m_new;
#pragma unroll
      for (int u = 0; u < CPL; ++u) o[r][u] *= alpha;
      for (int jj = 0; jj < BN; ++jj) {
        const float pj = __shfl_sync(0xffffffffu, prob, jj);
#pragma unroll
        for (int u = 0; u < CPL; ++u) o[r][u] = fmaf(pj, vs[jj * CT + lane + 32 * u], o[r][u]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = q0 + warp * kRowsPerWarp + r;
    if (i >= p.n) continue;
    const float inv = 1.f / l[r];
#pragma unroll
    for (int u = 0; u < CPL; ++u) {
      const int col = c0 + lane + 32 * u;
      if (col < p.c) out[(b * p.n + i) * p.c + col] = sf::from_float<T>(o[r][u] * inv);
    }
    if (lane == 0 && c0 == 0) lse[b * p.n + i] = m[r] + logf(l[r]);
  }
}

// ------------------------------------------------- forward, tensor cores --
// fp16 / bf16: S = Sq Sk^T and P Yv on tensor cores (sf::mma_m16n8k16_f32, fp32
// accumulation).  A warp owns 16 query rows (MBM = 64 per block), key tiles of
// MBN = 32 keys; K is padded to a multiple of 16 in shared memory and the A
// fragments of Sq are read from shared memory at every key tile (K up to 256
// would not fit in registers next to the output accumulators).  The logits stay
// in the accumulator layout (lane: rows g, g + 8; columns 2t, 2t + 1), the
// probabilities become the A operand of P Yv in registers, rounded to the
// input dtype as flash attention does.  A block owns CT = 8 * NT output columns.
constexpr int kMmaWarps = 4;
constexpr int MBM = 16 * kMmaWarps;
constexpr int MBN = 32;

SF_HOST_DEVICE inline int mma_kp(int k) { return (k + 15) / 16 * 16; }
SF_HOST_DEVICE inline int mma_ld(int width) { return width + 8; }  // rows 16 bytes apart

SF_HOST_DEVICE inline int64_t fwd_mma_smem_bytes(int k, int ct) {
  return 2 * (static_cast<int64_t>(MBM + MBN) * mma_ld(mma_kp(k)) + MBN * mma_ld(ct));
}

// Stage rows [row0, row0 + rows) x cols [col0, col0 + width) of an (n, cols) matrix with row
// stride rs in its dtype, zero padded.
template <typename T>
SF_DEVICE_INLINE void load_tile_raw(T* dst, int ld, const T* src, int64_t rs, int row0, int rows, int n, int col0,
                                    int width, int cols) {
  sf::stage_tile<T>(dst, ld, src, rs, row0, rows, n, col0, width, cols, threadIdx.x, kMmaWarps * 32);
}

// grid (B_ * ceil(C / CT), ceil(N / MBM)), block kMmaWarps * 32.
template <typename T, int NT>
__global__ void __launch_bounds__(kMmaWarps * 32) semantic_attention_fwd_mma_kernel(Params p, T* __restrict__ out,
                                                                                    float* __restrict__ lse) {
  constexpr int CT = 8 * NT;
  constexpr int ST = MBN / 8;
  const int kp = mma_kp(p.k), ldk = mma_ld(kp), ks_steps = kp / 16;
  constexpr int LDV = CT + 8;
  SF_DYNAMIC_SHARED(T, smem);
  T* qs = smem;              // [MBM][ldk]
  T* ks = qs + MBM * ldk;    // [MBN][ldk]
  T* vs = ks + MBN * ldk;    // [MBN][LDV]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t4 = lane & 3;
  const int ctiles = (p.c + CT - 1) / CT;
  const int64_t b = blockIdx.x / ctiles;
  const int c0 = static_cast<int>(blockIdx.x % ctiles) * CT;
  const int q0 = blockIdx.y * MBM;
  const T* sqg = static_cast<const T*>(p.sq) + b * p.sq_b;
  const T* skg = static_cast<const T*>(p.sk) + b * p.sk_b;
  const T* yvg = static_cast<const T*>(p.yv) + b * p.yv_b;
  load_tile_raw<T>(qs, ldk, sqg, p.sq_r, q0, MBM, p.n, 0, kp, p.k);

  int rows[2];
  float m[2], l[2];
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    rows[h2] = q0 + warp * 16 + g + 8 * h2;
    m[h2] = kNegInf;
    l[h2] = 0.f;
  }
  float o[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nt][e] = 0.f;

  for (int k0 = 0; k0 < p.n; k0 += MBN) {
    __syncthreads();  // the previous tile's readers are done (and, first time, qs is published below)
    load_tile_raw<T>(ks, ldk, skg, p.sk_r, k0, MBN, p.n, 0, kp, p.k);
    load_tile_raw<T>(vs, LDV, yvg, p.yv_r, k0, MBN, p.n, c0, CT, p.c);
    __syncthreads();
    float s[ST][4];
    sf::zero_acc<ST>(s);
    sf::mma_abt<T, ST>(s, sf::RowsA<T>{qs + warp * 16 * ldk, ldk}, ks, ldk, lane, sf::AllLive{}, ks_steps);
    float mx[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int st = 0; st < ST; ++st)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h2 = e >> 1, j = k0 + st * 8 + 2 * t4 + (e & 1);
        if (rows[h2] >= p.n || j >= p.n) s[st][e] = kNegInf;
        mx[h2] = fmaxf(mx[h2], s[st][e]);
      }
    float alpha[2], m_new[2], sum[2] = {0.f, 0.f};
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      m_new[h2] = fmaxf(m[h2], group_max(mx[h2]));
      alpha[h2] = m[h2] == kNegInf ? 0.f : __expf(m[h2] - m_new[h2]);
    }
#pragma unroll
    for (int st = 0; st < ST; ++st)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h2 = e >> 1;
        s[st][e] = s[st][e] == kNegInf ? 0.f : __expf(s[st][e] - m_new[h2]);
        sum[h2] += s[st][e];
      }
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      l[h2] = l[h2] * alpha[h2] + group_sum(sum[h2]);
      m[h2] = m_new[h2];
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[nt][e] *= alpha[e >> 1];
    sf::mma_ab<T, MBN / 16, NT>(o, sf::AccA<T>{s}, vs, LDV, lane);
  }
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    const int i = rows[h2];
    if (i >= p.n) continue;
    const float inv = 1.f / l[h2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = c0 + nt * 8 + 2 * t4 + c;
        if (col < p.c) out[(b * p.n + i) * p.c + col] = sf::from_float<T>(o[nt][2 * h2 + c] * inv);
      }
    if (t4 == 0 && c0 == 0) lse[b * p.n + i] = m[h2] + logf(l[h2]);
  }
}

// --------------------------------------------------------------- backward --
// delta_i = rowsum(dO_i * O_i) of rows [row0, row0 + rows) of one batch entry (out, dout at that
// entry), one warp per row, into shared deltas[] (0 past n); the caller's next barrier publishes it.
// Each block computes the delta of the query rows it uses (a C-long dot per row, next to the
// C-long dP of each of its rows), so no block waits for another's.
template <typename T, int NumThreads>
SF_DEVICE_INLINE void row_deltas(const T* out, const T* dout, int c, int row0, int rows, int n, float* deltas) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < rows; r += NumThreads / 32) {
    const int row = row0 + r;
    const int64_t at = static_cast<int64_t>(row) * c;
    const float s = sf::warp_dot(out + at, dout + at, row < n ? c : 0, lane);  // whole warp: the shuffles see every lane
    if (lane == 0) deltas[r] = s;
  }
}

// Stage the C chunk [c0, c0 + CC) of the dO rows of query tile q0 and (with_y) of the Yv rows of
// key tile k0, between barriers (block-wide: every thread must call it).
template <typename T>
SF_DEVICE_INLINE void stage_dp_chunk(const Params& p, const T* dog, const T* yvg, int q0, int k0, int c0, float* dos,
                                     float* ys, bool with_y) {
  __syncthreads();  // the previous chunk's readers are done
  load_tile<T>(dos, CC, dog, p.c, q0, BM, p.n, c0, CC, p.c);
  if (with_y) load_tile<T>(ys, CC + 1, yvg, p.yv_r, k0, BN, p.n, c0, CC, p.c);
  __syncthreads();
}

// dP of the staged chunk added for the 4 rows of this warp against key `lane` of the key tile.
SF_DEVICE_INLINE void dp_chunk_rows(const float* dos, const float* ys, float (&dp)[kRowsPerWarp]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) dp[r] += dot(dos + (warp * kRowsPerWarp + r) * CC, ys + lane * (CC + 1), CC);
}

// dYv columns per lane of the dSk kernel's C tile (DCT = 128 columns, DCT / CC chunks).
constexpr int DCPL = 4, DCT = 32 * DCPL;

SF_HOST_DEVICE inline int64_t dk_smem_floats(int kp) {
  return static_cast<int64_t>(BM) * kp + BN * key_ld(kp) + BM * CC + BN * (CC + 1) + 2 * BM * (BN + 1) + 2 * BM;
}

// dYv of the key tile k0 and the C tile from cv0, and (C tile 0) dSk of the key tile, with dP over
// all of C (and delta of each query tile); the dO chunks of the dYv tile serve both.  dsk null: no
// dP, no dSk; dyv null: no dYv stored (its accumulation over the staged chunks stays: skipping it
// cost the kernel registers, and with them an SM's third block, sm_80 / sm_90).
template <typename T, int KPL>
SF_DEVICE_INLINE void dk_block(const Params& p, const T* __restrict__ out, const T* __restrict__ dout,
                               const float* __restrict__ lse, T* __restrict__ dsk, T* __restrict__ dyv, float* smem,
                               int64_t b, int cv0, int k0) {
  const int ldk = key_ld(p.kp);
  float* qs = smem;                    // [BM][KP]
  float* ks = qs + BM * p.kp;          // [BN][ldk]
  float* dos = ks + BN * ldk;          // [BM][CC]
  float* ys = dos + BM * CC;           // [BN][CC + 1]
  float* ps = ys + BN * (CC + 1);      // [BM][BN + 1] P of the tile pair
  float* dss = ps + BM * (BN + 1);     // [BM][BN + 1]
  float* lses = dss + BM * (BN + 1);   // [BM]
  float* deltas = lses + BM;           // [BM]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool grad_block = cv0 == 0 && dsk;  // computes dP and dSk too (uniform over the block)
  const T* sqg = static_cast<const T*>(p.sq) + b * p.sq_b;
  const T* skg = static_cast<const T*>(p.sk) + b * p.sk_b;
  const T* yvg = static_cast<const T*>(p.yv) + b * p.yv_b;
  const T* dog = dout + b * p.n * p.c;
  load_tile<T>(ks, ldk, skg, p.sk_r, k0, BN, p.n, 0, p.kp, p.k);

  constexpr int KPW = BN / kWarps;
  float acc[KPW][KPL], accv[KPW][DCPL];
#pragma unroll
  for (int a = 0; a < KPW; ++a) {
#pragma unroll
    for (int u = 0; u < KPL; ++u) acc[a][u] = 0.f;
#pragma unroll
    for (int u = 0; u < DCPL; ++u) accv[a][u] = 0.f;
  }
  const int j = k0 + lane;
  for (int q0 = 0; q0 < p.n; q0 += BM) {
    __syncthreads();  // the previous tile's readers are done
    load_tile<T>(qs, p.kp, sqg, p.sq_r, q0, BM, p.n, 0, p.kp, p.k);
    for (int e = threadIdx.x; e < BM; e += kThreads) lses[e] = q0 + e < p.n ? lse[b * p.n + q0 + e] : 0.f;
    if (grad_block) row_deltas<T, kThreads>(out + b * p.n * p.c, dog, p.c, q0, BM, p.n, deltas);
    __syncthreads();
    float prob[kRowsPerWarp], dp[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r, i = q0 + row;
      prob[r] = (i < p.n && j < p.n) ? __expf(dot(qs + row * p.kp, ks + lane * ldk, p.k) - lses[row]) : 0.f;
      ps[row * (BN + 1) + lane] = prob[r];  // published by the next chunk's barriers
      dp[r] = 0.f;
    }
    // The dO chunks of the dYv tile, unrolled (their accumulator columns are named at compile time).
#pragma unroll
    for (int ci = 0; ci < DCT / CC; ++ci) {
      const int c0 = cv0 + ci * CC;
      if (c0 >= p.c) break;  // uniform over the block
      stage_dp_chunk<T>(p, dog, yvg, q0, k0, c0, dos, ys, grad_block);
      if (grad_block) dp_chunk_rows(dos, ys, dp);
#pragma unroll
      for (int a = 0; a < KPW; ++a) {
        const int key = warp * KPW + a;
        for (int row = 0; row < BM; ++row) {
          const float pv = ps[row * (BN + 1) + key];
#pragma unroll
          for (int u = 0; u < CC / 32; ++u)
            accv[a][ci * (CC / 32) + u] = fmaf(pv, dos[row * CC + lane + 32 * u], accv[a][ci * (CC / 32) + u]);
        }
      }
    }
    if (!grad_block) continue;  // a dYv-only block (C tile > 0, or no dSk wanted)
    for (int c0 = DCT; c0 < p.c; c0 += CC) {  // dP over the rest of C
      stage_dp_chunk<T>(p, dog, yvg, q0, k0, c0, dos, ys, true);
      dp_chunk_rows(dos, ys, dp);
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r;
      dss[row * (BN + 1) + lane] = prob[r] * (dp[r] - deltas[row]);
    }
    __syncthreads();
#pragma unroll
    for (int a = 0; a < KPW; ++a) {
      const int key = warp * KPW + a;
      for (int row = 0; row < BM; ++row) {
        const float sv = dss[row * (BN + 1) + key];
#pragma unroll
        for (int u = 0; u < KPL; ++u) acc[a][u] = fmaf(sv, qs[row * p.kp + lane + 32 * u], acc[a][u]);
      }
    }
  }
#pragma unroll
  for (int a = 0; a < KPW; ++a) {
    const int key = k0 + warp * KPW + a;
    if (key >= p.n) continue;
    if (grad_block) {
#pragma unroll
      for (int u = 0; u < KPL; ++u) {
        const int col = lane + 32 * u;
        if (col < p.k) dsk[(b * p.n + key) * p.k + col] = sf::from_float<T>(acc[a][u]);
      }
    }
    if (!dyv) continue;
#pragma unroll
    for (int u = 0; u < DCPL; ++u) {
      const int col = cv0 + lane + 32 * u;
      if (col < p.c) dyv[(b * p.n + key) * p.c + col] = sf::from_float<T>(accv[a][u]);
    }
  }
}

// dSq of the query tile q0 (and delta of its rows).  Its shared memory is a prefix of dk_block's.
template <typename T, int KPL>
SF_DEVICE_INLINE void dq_block(const Params& p, const T* __restrict__ out, const T* __restrict__ dout,
                               const float* __restrict__ lse, T* __restrict__ dsq, float* smem, int64_t b, int q0) {
  const int ldk = key_ld(p.kp);
  float* qs = smem;                    // [BM][KP]
  float* ks = qs + BM * p.kp;          // [BN][ldk]
  float* dos = ks + BN * ldk;          // [BM][CC]
  float* ys = dos + BM * CC;           // [BN][CC + 1]
  float* lses = ys + BN * (CC + 1);    // [BM]
  float* deltas = lses + BM;           // [BM]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* sqg = static_cast<const T*>(p.sq) + b * p.sq_b;
  const T* skg = static_cast<const T*>(p.sk) + b * p.sk_b;
  const T* yvg = static_cast<const T*>(p.yv) + b * p.yv_b;
  const T* dog = dout + b * p.n * p.c;
  load_tile<T>(qs, p.kp, sqg, p.sq_r, q0, BM, p.n, 0, p.kp, p.k);
  for (int e = threadIdx.x; e < BM; e += kThreads) lses[e] = q0 + e < p.n ? lse[b * p.n + q0 + e] : 0.f;
  row_deltas<T, kThreads>(out + b * p.n * p.c, dog, p.c, q0, BM, p.n, deltas);
  float acc[kRowsPerWarp][KPL];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int u = 0; u < KPL; ++u) acc[r][u] = 0.f;
  for (int k0 = 0; k0 < p.n; k0 += BN) {
    __syncthreads();  // previous key tile's readers are done
    load_tile<T>(ks, ldk, skg, p.sk_r, k0, BN, p.n, 0, p.kp, p.k);
    float dp[kRowsPerWarp] = {};
    for (int c0 = 0; c0 < p.c; c0 += CC) {  // the first chunk's barriers publish ks
      stage_dp_chunk<T>(p, dog, yvg, q0, k0, c0, dos, ys, true);
      dp_chunk_rows(dos, ys, dp);
    }
    const int j = k0 + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r, i = q0 + row;
      float ds = 0.f;
      if (i < p.n && j < p.n) {
        const float prob = __expf(dot(qs + row * p.kp, ks + lane * ldk, p.k) - lses[row]);
        ds = prob * (dp[r] - deltas[row]);
      }
      // unroll 8: without it ptxas spilled here next to dk_block (KPL = 5, sm_80).
#pragma unroll 8
      for (int jj = 0; jj < BN; ++jj) {
        const float sj = __shfl_sync(0xffffffffu, ds, jj);
#pragma unroll
        for (int u = 0; u < KPL; ++u) acc[r][u] = fmaf(sj, ks[jj * ldk + lane + 32 * u], acc[r][u]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = q0 + warp * kRowsPerWarp + r;
    if (i >= p.n) continue;
#pragma unroll
    for (int u = 0; u < KPL; ++u) {
      const int col = lane + 32 * u;
      if (col < p.k) dsq[(b * p.n + i) * p.k + col] = sf::from_float<T>(acc[r][u]);
    }
  }
}

// C tiles of `ct` columns whose key blocks run: every one with dYv, the first alone for dSk only.
SF_HOST_DEVICE inline int key_c_tiles(int c, int ct, bool dsk, bool dyv) {
  return dyv ? (c + ct - 1) / ct : dsk ? 1 : 0;
}

// Per batch entry: the query tiles (with dSq), then the key tiles of each C tile of dYv (dSk too in
// C tile 0); one launch, so Sq, Sk, Yv, dO are read by one kernel for all three gradients.
SF_HOST_DEVICE inline int bwd_blocks_per_entry(int n, int c, bool dsq, bool dsk, bool dyv) {
  return (dsq ? (n + BM - 1) / BM : 0) + key_c_tiles(c, DCT, dsk, dyv) * ((n + BN - 1) / BN);
}

// grid (B_ * bwd_blocks_per_entry(N, C, ...)), dynamic shared memory dk_smem_floats (dq_block uses a
// prefix).  A null gradient pointer: not wanted, its blocks not in the grid.
template <typename T, int KPL>
// minBlocks = 1: without it ptxas capped KPL = 1 at 48 registers and spilled (sm_90).
__global__ void __launch_bounds__(kThreads, 1) semantic_attention_bwd_kernel(Params p, const T* __restrict__ out,
                                                                             const T* __restrict__ dout,
                                                                             const float* __restrict__ lse,
                                                                             T* __restrict__ dsq, T* __restrict__ dsk,
                                                                             T* __restrict__ dyv) {
  SF_DYNAMIC_SHARED(float, smem);
  const int per = bwd_blocks_per_entry(p.n, p.c, dsq, dsk, dyv);
  const int qtiles = dsq ? (p.n + BM - 1) / BM : 0, ktiles = (p.n + BN - 1) / BN;
  const int64_t b = blockIdx.x / per;
  const int slot = static_cast<int>(blockIdx.x % per);
  if (slot < qtiles) {
    dq_block<T, KPL>(p, out, dout, lse, dsq, smem, b, slot * BM);
  } else {
    const int s = slot - qtiles;
    dk_block<T, KPL>(p, out, dout, lse, dsk, dyv, smem, b, s / ktiles * DCT, s % ktiles * BN);
  }
}

// ------------------------------------------------ backward, tensor cores --
// fp16 / bf16: every backward product on tensor cores (sf::mma_m16n8k16_f32, fp32
// accumulation), the decomposition of the FFMA path.  A block owns MBM = 64 "owner"
// rows (16 per warp) and loops over tiles of MBN = 32 "other" rows:
//   KEYS:  owners = keys, S^T = Sk Sq^T, P^T = exp(S^T - lse); dYv += P^T dO over one C
//        tile of 8 * NTV = 128 columns (a block per key block and C tile, in one launch);
//        the block of C tile 0 also computes dSk, with dP^T = Yv dO^T over all of C, and
//        takes the dO chunks of its dYv tile from those staged for dP^T;
//   !KEYS: owners = queries (dSq), S = Sq Sk^T, dP = dO Yv^T;
//        dS = P (dP - delta) with lse, delta of the query, acc += dS (others' Sq or Sk);
//        dP is recomputed over C in chunks of MCC columns staged in shared memory.
// K is staged padded to kp (a multiple of 32) with zeros; the dSq / dSk accumulators
// cover KT = kp columns.  P and dS are rounded to the input dtype to become A
// operands (as in the forward and flash attention).
constexpr int MCC = 64;

SF_HOST_DEVICE inline int64_t dqk_mma_smem_bytes(int kp) {
  return 2 * static_cast<int64_t>(MBM + MBN) * (mma_ld(kp) + mma_ld(MCC)) + 4 * 2 * MBM;
}

// dSq (!KEYS) of the MBM query rows from r0, or (KEYS) dYv of the MBM keys from r0 and the C tile
// from cv0, and (C tile 0) their dSk.  Blocks computing dP (dSq, and dSk in C tile 0) compute the
// delta of the query rows they use.  KEYS: grad (dSk) or dyv null, that gradient is not wanted.
template <typename T, int KT, bool KEYS, int NTV>
SF_DEVICE_INLINE void dqk_mma_block(const Params& p, const T* __restrict__ out, const T* __restrict__ dout,
                                    const float* __restrict__ lse, T* __restrict__ grad, T* __restrict__ dyv, T* smem,
                                    int64_t b, int cv0, int r0) {
  static_assert(KEYS == (NTV > 0) && NTV % (MCC / 8) == 0, "the KEYS kernel holds dYv of a C tile of whole C chunks");
  constexpr int NTK = KT / 8, ST = MBN / 8, LDC = MCC + 8;
  const int ldk = mma_ld(p.kp), ks_steps = p.kp / 16;
  T* oa = smem;             // [MBM][ldk] owners' Sk (KEYS) or Sq
  T* xa = oa + MBM * ldk;   // [MBN][ldk] others' Sq (KEYS) or Sk
  T* oc = xa + MBN * ldk;   // [MBM][LDC] owners' Yv (KEYS) or dO, one C chunk
  T* xc = oc + MBM * LDC;   // [MBN][LDC] others' dO (KEYS) or Yv, one C chunk
  float* lses = reinterpret_cast<float*>(xc + MBN * LDC);  // per query of the block: [MBN] (KEYS) or [MBM]
  float* deltas = lses + MBM;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t4 = lane & 3;
  constexpr int CTV = 8 * (NTV > 0 ? NTV : 1);  // dYv columns of a KEYS block
  const bool grad_block = cv0 == 0 && grad;  // computes dP and the dSq / dSk rows (uniform over the block)
  const T* sqg = static_cast<const T*>(p.sq) + b * p.sq_b;
  const T* skg = static_cast<const T*>(p.sk) + b * p.sk_b;
  const T* yvg = static_cast<const T*>(p.yv) + b * p.yv_b;
  const T* dog = dout + b * p.n * p.c;
  const T* own_a = KEYS ? skg : sqg;
  const T* oth_a = KEYS ? sqg : skg;
  const T* own_c = KEYS ? yvg : dog;
  const T* oth_c = KEYS ? dog : yvg;
  const int64_t own_a_r = KEYS ? p.sk_r : p.sq_r, oth_a_r = KEYS ? p.sq_r : p.sk_r;
  const int64_t own_c_r = KEYS ? p.yv_r : p.c, oth_c_r = KEYS ? p.c : p.yv_r;
  // lse of `rows` queries from row0 into shared memory, and (dP blocks) their delta.
  auto load_stats = [&](int row0, int rows) {
    for (int e = threadIdx.x; e < rows; e += kMmaWarps * 32) lses[e] = row0 + e < p.n ? lse[b * p.n + row0 + e] : 0.f;
    if (grad_block) row_deltas<T, kMmaWarps * 32>(out + b * p.n * p.c, dog, p.c, row0, rows, p.n, deltas);
  };
  load_tile_raw<T>(oa, ldk, own_a, own_a_r, r0, MBM, p.n, 0, p.kp, p.k);
  if constexpr (!KEYS) load_stats(r0, MBM);
  int rows[2];
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) rows[h2] = r0 + warp * 16 + g + 8 * h2;
  float acc[NTK][4], accv[NTV > 0 ? NTV : 1][4];
#pragma unroll
  for (int nt = 0; nt < NTK; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
#pragma unroll
  for (int nt = 0; nt < NTV; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) accv[nt][e] = 0.f;

  for (int x0 = 0; x0 < p.n; x0 += MBN) {
    __syncthreads();  // the previous tile's readers of xa (and the stats) are done
    load_tile_raw<T>(xa, ldk, oth_a, oth_a_r, x0, MBN, p.n, 0, p.kp, p.k);
    if constexpr (KEYS) load_stats(x0, MBN);
    __syncthreads();
    float s[ST][4], dp[ST][4];
    sf::zero_acc<ST>(s);
    sf::zero_acc<ST>(dp);
    sf::mma_abt<T, ST>(s, sf::RowsA<T>{oa + warp * 16 * ldk, ldk}, xa, ldk, lane, sf::AllLive{}, ks_steps);
    // S -> P (0 outside the sequence), the probabilities of dS = P (dP - delta) below.
#pragma unroll
    for (int st = 0; st < ST; ++st)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h2 = e >> 1, col = st * 8 + 2 * t4 + (e & 1);
        const int sr = KEYS ? col : warp * 16 + g + 8 * h2;  // the query's slot in lses / deltas
        s[st][e] = (rows[h2] < p.n && x0 + col < p.n) ? __expf(s[st][e] - lses[sr]) : 0.f;
      }
    uint32_t pa[MBN / 16][4];  // P^T as A fragments of dYv, rounded to T (as in the forward): KEYS only
    if constexpr (KEYS) {
      if (dyv) {
#pragma unroll
        for (int kk = 0; kk < MBN / 16; ++kk) sf::acc_to_a_frag<T>(pa[kk], s[2 * kk], s[2 * kk + 1]);
      }
    }
    // Stage one C chunk from c0: the others' (dO when KEYS) in xc and, for dP, the owners' in oc.
    auto stage_chunk = [&](int c0, bool for_dp) {
      __syncthreads();  // the previous chunk's readers are done
      if (for_dp) load_tile_raw<T>(oc, LDC, own_c, own_c_r, r0, MBM, p.n, c0, MCC, p.c);
      load_tile_raw<T>(xc, LDC, oth_c, oth_c_r, x0, MBN, p.n, c0, MCC, p.c);
      __syncthreads();
    };
    // dP += the chunk's dO Yv^T.
    auto dp_mma = [&]() { sf::mma_abt<T, ST, MCC / 16>(dp, sf::RowsA<T>{oc + warp * 16 * LDC, LDC}, xc, LDC, lane); };
    // C chunks: all of C for dP (grad blocks); the block's dYv tile for dYv (KEYS).
    const int c_end = grad_block ? p.c : min(p.c, cv0 + CTV);
    for (int c0 = grad_block ? 0 : cv0; c0 < c_end; c0 += MCC) {
      stage_chunk(c0, grad_block);
      if (grad_block) dp_mma();
      if constexpr (KEYS) {
        const int ci = dyv ? (c0 - cv0) / MCC : -1;  // the chunk's place in the dYv tile (past it, or no dYv: none)
#pragma unroll
        for (int cc = 0; cc < NTV / (MCC / 8); ++cc) {
          if (cc != ci) continue;  // a compile-time cc names the chunk's accumulators
          sf::mma_ab<T, MBN / 16, MCC / 8>(accv + cc * (MCC / 8), sf::FragsA{pa}, xc, LDC, lane);
        }
      }
    }
    if (!grad_block) continue;  // a dYv-only block (KEYS: C tile > 0, or no dSk wanted)
#pragma unroll
    for (int st = 0; st < ST; ++st)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h2 = e >> 1, col = st * 8 + 2 * t4 + (e & 1);
        const int sr = KEYS ? col : warp * 16 + g + 8 * h2;
        s[st][e] *= dp[st][e] - deltas[sr];
      }
    sf::mma_ab<T, MBN / 16, NTK>(acc, sf::AccA<T>{s}, xa, ldk, lane);
  }
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    const int row = rows[h2];
    if (row >= p.n) continue;
    if (grad_block) {
#pragma unroll
      for (int nt = 0; nt < NTK; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = nt * 8 + 2 * t4 + c;
          if (col < p.k) grad[(b * p.n + row) * p.k + col] = sf::from_float<T>(acc[nt][2 * h2 + c]);
        }
    }
    if (!dyv) continue;
#pragma unroll
    for (int nt = 0; nt < NTV; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = cv0 + nt * 8 + 2 * t4 + c;
        if (col < p.c) dyv[(b * p.n + row) * p.c + col] = sf::from_float<T>(accv[nt][2 * h2 + c]);
      }
  }
}

// dYv columns of one KEYS block: 16 n-tiles (128 columns) of accumulators.
constexpr int kDyvTiles = 16;

// Blocks per batch entry and 64-row block: the dSq block (with dSq), then the key blocks of the C tiles.
SF_HOST_DEVICE inline int mma_bwd_slots(int c, bool dsq, bool dsk, bool dyv) {
  return (dsq ? 1 : 0) + key_c_tiles(c, 8 * kDyvTiles, dsk, dyv);
}

// grid (B_ * mma_bwd_slots(C, ...), ceil(N / MBM)), block kMmaWarps * 32: per batch entry and
// 64-row block, the dSq block, then the dSk / dYv block of each C tile; one launch, so Sq, Sk, Yv,
// dO are read by one kernel for all three gradients.  A null gradient pointer: not wanted, its
// blocks not in the grid.
template <typename T, int KT>
// minBlocks = 1: without it ptxas capped KEYS KT = 96 at 128 registers and spilled (sm_80).
__global__ void __launch_bounds__(kMmaWarps * 32, 1) semantic_attention_bwd_mma_kernel(
    Params p, const T* __restrict__ out, const T* __restrict__ dout, const float* __restrict__ lse,
    T* __restrict__ dsq, T* __restrict__ dsk, T* __restrict__ dyv) {
  SF_DYNAMIC_SHARED(T, smem);
  constexpr int CTV = 8 * kDyvTiles;
  const int slots = mma_bwd_slots(p.c, dsq, dsk, dyv), qslots = dsq ? 1 : 0;
  const int64_t b = blockIdx.x / slots;
  const int slot = static_cast<int>(blockIdx.x % slots), r0 = blockIdx.y * MBM;
  if (slot < qslots) dqk_mma_block<T, KT, false, 0>(p, out, dout, lse, dsq, static_cast<T*>(nullptr), smem, b, 0, r0);
  else dqk_mma_block<T, KT, true, kDyvTiles>(p, out, dout, lse, dsk, dyv, smem, b, (slot - qslots) * CTV, r0);
}

// ---------------------------------------------------------------- launchers --
using sf::ceil_div;

template <typename T, int CPL>
void forward(const Params& p, T* out, float* lse, cudaStream_t stream) {
  if constexpr (!std::is_same<T, float>::value) {
    // fp16 / bf16: tensor cores, C tiles of 64 or 128 columns.
    auto launch = [&](auto kernel, int ct) {
      const size_t smem = fwd_mma_smem_bytes(p.k, ct);
      SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
      SF_LAUNCH(kernel, dim3(static_cast<unsigned>(p.batch * ceil_div(p.c, ct)), ceil_div(p.n, MBM)), dim3(kMmaWarps * 32),
                smem, stream, p, out, lse);
    };
    if (p.c > 64) launch(semantic_attention_fwd_mma_kernel<T, 16>, 128);
    else launch(semantic_attention_fwd_mma_kernel<T, 8>, 64);
  } else {
    const size_t smem = sizeof(float) * fwd_smem_floats(p.kp, 32 * CPL);
    auto kernel = semantic_attention_fwd_kernel<T, CPL>;
    SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
    SF_LAUNCH(kernel, dim3(static_cast<unsigned>(p.batch * ceil_div(p.c, 32 * CPL)), ceil_div(p.n, BM)), dim3(kThreads),
              smem, stream, p, out, lse);
  }
  SF_CHECK_LAUNCH();
}

// The backward in one launch (dSq blocks and dSk / dYv blocks side by side).  dsq, dsk or dyv may
// be null: not wanted (autograd's needs_input_grad), the blocks serving only it not launched.
template <typename T, int KPL>
void backward(const Params& p, const T* out, const T* dout, const float* lse, T* dsq, T* dsk, T* dyv,
              cudaStream_t stream) {
  if (!dsq && !dsk && !dyv) return;  // an empty grid is no launch
  if constexpr (!std::is_same<T, float>::value) {
    // fp16 / bf16: tensor cores, the accumulators cover KT = kp = 32 * KPL columns.
    const size_t smem = dqk_mma_smem_bytes(p.kp);
    auto kernel = semantic_attention_bwd_mma_kernel<T, 32 * KPL>;
    SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
    SF_LAUNCH(kernel, dim3(static_cast<unsigned>(p.batch * mma_bwd_slots(p.c, dsq, dsk, dyv)), ceil_div(p.n, MBM)),
              dim3(kMmaWarps * 32), smem, stream, p, out, dout, lse, dsq, dsk, dyv);
  } else {
    const size_t smem = sizeof(float) * dk_smem_floats(p.kp);
    auto kernel = semantic_attention_bwd_kernel<T, KPL>;
    SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
    SF_LAUNCH(kernel, dim3(static_cast<unsigned>(p.batch * bwd_blocks_per_entry(p.n, p.c, dsq, dsk, dyv))),
              dim3(kThreads), smem, stream, p, out, dout, lse, dsq, dsk, dyv);
  }
  SF_CHECK_LAUNCH();
}

}  // namespace sf_semantic_attention

// ----------------------------------------------------------------- bindings --
#include "sf_torch.h"

#include <tuple>
#include <type_traits>

namespace sf_semantic_attention {

// Largest class count served: the K tile is staged whole, and beyond KP = 160 the dSq
// accumulators of the backward spill registers (ptxas, sm_80 / sm_90).
constexpr int kMaxClasses = 160;

template <int I, typename F>
void with_int(int value, F&& f) {
  // value in 1..I: calls f(std::integral_constant<int, value>).
  if constexpr (I >= 1) {
    if (value == I) return f(std::integral_constant<int, I>{});
    with_int<I - 1>(value, f);
  }
}

// sq, sk, yv may be strided in the batch and row dims (column views of one fused projection);
// their rows must be contiguous.
#define SF_CHECK_ROWS(t)       \
  SF_CHECK_DEVICE(t);          \
  SF_CHECK_DIM(t, 3);          \
  TORCH_CHECK((t).size(2) == 1 || (t).stride(2) == 1, "semantic_attention: " #t " must have a contiguous last dim " \
              "(batch and row strides are free), got strides ", (t).strides())

Params make_params(const at::Tensor& sq, const at::Tensor& sk, const at::Tensor& yv) {
  SF_CHECK_ROWS(sq);
  SF_CHECK_ROWS(sk);
  SF_CHECK_ROWS(yv);
  SF_CHECK_FLOAT(sq);
  SF_CHECK_SAME_DTYPE(sk, sq);
  SF_CHECK_SAME_DTYPE(yv, sq);
  TORCH_CHECK(sk.sizes() == sq.sizes(), "semantic_attention: sk must have sq's shape");
  TORCH_CHECK(yv.size(0) == sq.size(0) && yv.size(1) == sq.size(1), "semantic_attention: yv must be (B_, N, C)");
  TORCH_CHECK(sq.size(2) >= 1 && sq.size(2) <= kMaxClasses, "semantic_attention: K must be in 1..", kMaxClasses,
              ", got ", sq.size(2));
  Params p{};
  p.sq = sq.data_ptr();
  p.sk = sk.data_ptr();
  p.yv = yv.data_ptr();
  p.batch = sq.size(0);
  p.n = static_cast<int>(sq.size(1));
  p.k = static_cast<int>(sq.size(2));
  p.c = static_cast<int>(yv.size(2));
  p.kp = (p.k + 31) / 32 * 32;
  p.sq_b = sq.stride(0);
  p.sq_r = sq.stride(1);
  p.sk_b = sk.stride(0);
  p.sk_r = sk.stride(1);
  p.yv_b = yv.stride(0);
  p.yv_r = yv.stride(1);
  return p;
}

// Output columns per lane: C tiles of up to 128 columns.
inline int cols_per_lane(int c) { return c >= 128 ? 4 : (c + 31) / 32; }

std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& sq, const at::Tensor& sk, const at::Tensor& yv) {
  const Params p = make_params(sq, sk, yv);
  SF_DEVICE_GUARD(sq);
  at::Tensor out = at::empty(yv.sizes(), yv.options());  // contiguous whatever yv's strides
  at::Tensor lse = at::empty({sq.size(0), sq.size(1)}, sq.options().dtype(at::kFloat));
  SF_DISPATCH_FLOAT(sq.scalar_type(), "semantic_attention", [&] {
    with_int<4>(cols_per_lane(p.c), [&](auto cpl) {
      forward<scalar_t, decltype(cpl)::value>(p, sf::data_ptr<scalar_t>(out), lse.data_ptr<float>(),
                                              sf::current_stream());
    });
  });
  return {out, lse};
}

// need_dsq, need_dsk, need_dyv: autograd's needs_input_grad; a gradient not needed is returned
// unwritten (the caller drops it).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor& dout, const at::Tensor& sq,
                                                           const at::Tensor& sk, const at::Tensor& yv,
                                                           const at::Tensor& out, const at::Tensor& lse,
                                                           bool need_dsq, bool need_dsk, bool need_dyv) {
  const Params p = make_params(sq, sk, yv);
  SF_DEVICE_GUARD(sq);
  SF_CHECK_INPUT(dout, 3);
  SF_CHECK_INPUT(out, 3);
  SF_CHECK_INPUT(lse, 2);
  SF_CHECK_SAME_DTYPE(dout, sq);
  SF_CHECK_DTYPE(lse, at::kFloat);
  TORCH_CHECK(dout.sizes() == yv.sizes() && out.sizes() == yv.sizes(), "semantic_attention: dout/out must match yv");
  // Contiguous gradients whatever the inputs' strides (the kernels write rows of k / c elements).
  at::Tensor dsq = at::empty(sq.sizes(), sq.options()), dsk = at::empty(sk.sizes(), sk.options());
  at::Tensor dyv = at::empty(yv.sizes(), yv.options());
  SF_DISPATCH_FLOAT(sq.scalar_type(), "semantic_attention", [&] {
    with_int<kMaxClasses / 32>(p.kp / 32, [&](auto kpl) {
      backward<scalar_t, decltype(kpl)::value>(p, sf::data_ptr<scalar_t>(out), sf::data_ptr<scalar_t>(dout),
                                               lse.data_ptr<float>(), need_dsq ? sf::data_ptr<scalar_t>(dsq) : nullptr,
                                               need_dsk ? sf::data_ptr<scalar_t>(dsk) : nullptr,
                                               need_dyv ? sf::data_ptr<scalar_t>(dyv) : nullptr, sf::current_stream());
    });
  });
  return {dsq, dsk, dyv};
}

}  // namespace sf_semantic_attention

SF_TORCH_LIBRARY_FRAGMENT(m) {
  m.def("semantic_attention_forward(Tensor sq, Tensor sk, Tensor yv) -> (Tensor, Tensor)");
  m.def("semantic_attention_backward(Tensor dout, Tensor sq, Tensor sk, Tensor yv, Tensor out, Tensor lse, "
        "bool need_dsq=True, bool need_dsk=True, bool need_dyv=True) -> (Tensor, Tensor, Tensor)");
}

SF_TORCH_LIBRARY_IMPL(m) {
  m.impl("semantic_attention_forward", &sf_semantic_attention::forward_op);
  m.impl("semantic_attention_backward", &sf_semantic_attention::backward_op);
}
