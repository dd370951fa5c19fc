// ATM attention (csrc/ops/atm_attention.cu): the backward kernels (score policy: scale, plus dM / h).
#pragma once

#include "sf_atm_attention_fwd.cuh"

namespace sf_atm_attention {

// --------------------------------------------------------------- backward --
// The dK/dV and dQ kernels of this section are the fp32 (FFMA) path; delta, every dtype:
// sf::attention_delta_kernel.
using sf::Grads;

// P, its dropped value and dS (sf::softmax_grads, plus the head sum's dM / h) for row `row` of
// the staged query tile, key j.
template <typename T, int DP>
SF_DEVICE_INLINE Grads recompute(const Params& p, const float* qs, const float* dos, const float* ks, const float* vs,
                                 const T* dmask, int64_t b, int64_t bh, int row, int i, int j, float lse_i,
                                 float delta_i) {
  if (i >= p.nq || j >= p.nk) return {0.f, 0.f};
  const int lane = j % BN;
  const float s = dot_row<DP>(qs + row * DP, ks + lane * (DP + 1)) * p.scale;
  const float prob = sf::recompute_prob(s, lse_i);
  const float f = dropout_factor(p, (static_cast<uint64_t>(bh) * p.nq + i) * p.nk + j);
  Grads g = sf::softmax_grads(prob, dot_row<DP>(dos + row * DP, vs + lane * (DP + 1)), delta_i, f);
  g.ds += dmask_at(p, dmask, b, i, j) * p.inv_heads;
  return g;
}

// grid (B * h, ceil(Nk / BN)).
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) atm_attention_dkv_kernel(Params p, const T* __restrict__ dmask,
                                                                     const float* __restrict__ lse,
                                                                     const float* __restrict__ delta,
                                                                     T* __restrict__ dk, T* __restrict__ dv) {
  SF_DYNAMIC_SHARED(float, smem);
  const sf::FfmaBwdSmem<DP, true> sm(smem);
  const int64_t bh = blockIdx.x, b = blockIdx.x / static_cast<unsigned>(p.heads);  // 32-bit division
  const int64_t hd = bh - b * p.heads;
  const int k0 = blockIdx.y * BN;
  const int64_t kbase = bh * p.nk * p.d;  // dk, dv: contiguous
  load_tile<float, T, DP>(p, sm.ks, DP + 1, head_rows<T>(p.k, b, hd), k0, BN, p.nk);
  load_tile<float, T, DP>(p, sm.vs, DP + 1, head_rows<T>(p.v, b, hd), k0, BN, p.nk);

  float dka[8][DP / 32], dva[8][DP / 32];
  const int j = k0 + threadIdx.x % 32;
  auto stage_q = [&](int q0) {
    load_tile<float, T, DP>(p, sm.qs, DP, head_rows<T>(p.q, b, hd), q0, BM, p.nq);
    load_tile<float, T, DP>(p, sm.dos, DP, head_rows<T>(p.dout, b, hd), q0, BM, p.nq);
  };
  auto grad = [&](int row, int i, float lse_i, float delta_i) {
    return recompute<T, DP>(p, sm.qs, sm.dos, sm.ks, sm.vs, dmask, b, bh, row, i, j, lse_i, delta_i);
  };
  sf::ffma_dkv_loop<DP>(dva, dka, sm, lse, delta, bh * p.nq, p.nq, stage_q, grad);
  sf::ffma_store_kv<T, DP>(dk + kbase, dv + kbase, dka, dva, k0, p.nk, p.d, p.scale);
}

// grid (B * h, ceil(Nq / BM)).
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, kDqMinBlocks) atm_attention_dq_kernel(Params p, const T* __restrict__ dmask,
                                                                    const float* __restrict__ lse,
                                                                    const float* __restrict__ delta,
                                                                    T* __restrict__ dq) {
  SF_DYNAMIC_SHARED(float, smem);
  const sf::FfmaBwdSmem<DP, false> sm(smem);
  const int warp = threadIdx.x / 32;
  const int64_t bh = blockIdx.x, b = blockIdx.x / static_cast<unsigned>(p.heads);  // 32-bit division
  const int64_t hd = bh - b * p.heads;
  const int q0 = blockIdx.y * BM;
  load_tile<float, T, DP>(p, sm.qs, DP, head_rows<T>(p.q, b, hd), q0, BM, p.nq);
  load_tile<float, T, DP>(p, sm.dos, DP, head_rows<T>(p.dout, b, hd), q0, BM, p.nq);
  sf::stage_row_stats(sm.lses, sm.deltas, lse, delta, bh * p.nq + q0, BM, p.nq - q0, threadIdx.x, kThreads);
  auto stage_kv = [&](int k0) {
    load_tile<float, T, DP>(p, sm.ks, DP + 1, head_rows<T>(p.k, b, hd), k0, BN, p.nk);
    load_tile<float, T, DP>(p, sm.vs, DP + 1, head_rows<T>(p.v, b, hd), k0, BN, p.nk);
  };
  auto ds = [&](int r, int j) {
    const int row = warp * kRowsPerWarp + r;
    return recompute<T, DP>(p, sm.qs, sm.dos, sm.ks, sm.vs, dmask, b, bh, row, q0 + row, j, sm.lses[row],
                            sm.deltas[row]).ds;
  };
  float acc[kRowsPerWarp][DP / 32];
  sf::ffma_dq_loop<DP, true>(acc, sm.ks, p.nk, stage_kv, ds);
  sf::ffma_store_rows<T, DP>(dq + bh * p.nq * p.d, acc, q0, p.nq, p.d, p.scale);
}

// ------------------------------------------------ backward, tensor cores --
// fp16 / bf16, the same decomposition as the FFMA path with a warp per 16 keys (dK, dV) or
// 16 query rows (dQ): S, dP and the products with P and dS on tensor cores.  P and dS are
// rounded to T to become A operands (as flash attention does); every product accumulates in
// fp32.
constexpr int MBM = 16 * kWarps;  // keys of a dK/dV block
constexpr int MBN = 32;           // query rows (dK/dV) or keys (dQ) of a tile

template <int DP>
SF_HOST_DEVICE constexpr int dkv_mma_smem_bytes() {
  return 2 * 2 * (MBM + MBN) * mma_ld<DP>() + 4 * 2 * MBN;
}

// q and dO tiles [BM][LD], then every warp's k and v tiles [MBN][LD] (in T); after the key
// loop the warps' fp32 dQ partials [kWarps][BM][DP] reuse the k/v tiles.
template <int DP>
SF_HOST_DEVICE constexpr int dq_mma_smem_bytes() {
  return 2 * (2 * BM + kWarps * 2 * MBN) * mma_ld<DP>();
}

// grid (B * h, ceil(Nk / MBM)): dV = P^T dO and dK = dS^T q * scale for the block's keys,
// looping over query tiles (S^T = k q^T and dP^T = v dO^T: the keys are the rows).
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) atm_attention_dkv_mma_kernel(Params p, const T* __restrict__ dmask,
                                                                         const float* __restrict__ lse,
                                                                         const float* __restrict__ delta,
                                                                         T* __restrict__ dk, T* __restrict__ dv) {
  constexpr int LD = mma_ld<DP>();
  constexpr int KS = DP / 16, NT = DP / 8, ST = MBN / 8;
  SF_DYNAMIC_SHARED(T, smem);
  T* ks = smem;            // [MBM][LD]
  T* vs = ks + MBM * LD;   // [MBM][LD]
  T* qs = vs + MBM * LD;   // [MBN][LD]
  T* dos = qs + MBN * LD;  // [MBN][LD]
  float* lses = reinterpret_cast<float*>(dos + MBN * LD);
  float* deltas = lses + MBN;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t4 = lane & 3;
  const int64_t bh = blockIdx.x, b = blockIdx.x / static_cast<unsigned>(p.heads);  // 32-bit division
  const int64_t hd = bh - b * p.heads;
  const int k0 = blockIdx.y * MBM;
  const int64_t kbase = bh * p.nk * p.d;  // dk, dv: contiguous
  load_tile<T, T, DP>(p, ks, LD, head_rows<T>(p.k, b, hd), k0, MBM, p.nk);
  load_tile<T, T, DP>(p, vs, LD, head_rows<T>(p.v, b, hd), k0, MBM, p.nk);
  int keys[2];
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) keys[h2] = k0 + warp * 16 + g + 8 * h2;
  float dka[NT][4], dva[NT][4];
  sf::zero_acc<NT>(dka);
  sf::zero_acc<NT>(dva);

  for (int q0 = 0; q0 < p.nq; q0 += MBN) {
    __syncthreads();  // the previous tile's readers are done
    load_tile<T, T, DP>(p, qs, LD, head_rows<T>(p.q, b, hd), q0, MBN, p.nq);
    load_tile<T, T, DP>(p, dos, LD, head_rows<T>(p.dout, b, hd), q0, MBN, p.nq);
    sf::stage_row_stats(lses, deltas, lse, delta, bh * p.nq + q0, MBN, p.nq - q0, threadIdx.x, kThreads);
    __syncthreads();
    auto grad = [&](int t, int e, float st, float dpt) {
      const int j = keys[e >> 1], col = t * 8 + 2 * t4 + (e & 1), i = q0 + col;
      if (i >= p.nq || j >= p.nk) return Grads{0.f, 0.f};
      const float prob = sf::recompute_prob(st * p.scale, lses[col]);
      const float f = dropout_factor(p, (static_cast<uint64_t>(bh) * p.nq + i) * p.nk + j);
      Grads g = sf::softmax_grads(prob, dpt, deltas[col], f);
      g.ds += dmask_at(p, dmask, b, i, j) * p.inv_heads;
      return g;
    };
    sf::mma_dkv_tile<T, ST, KS, NT>(dva, dka, ks + warp * 16 * LD, vs + warp * 16 * LD, qs, dos, LD, lane, grad);
  }
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    const int j = keys[h2];
    if (j >= p.nk) continue;
    sf::store_acc_row<T, NT>(dk + kbase + static_cast<int64_t>(j) * p.d, dka, h2, p.scale, p.d, lane);
    sf::store_acc_row<T, NT>(dv + kbase + static_cast<int64_t>(j) * p.d, dva, h2, 1.f, p.d, lane);
  }
}

// grid (B * h, ceil(Nq / BM)): dQ = dS k * scale for the block's 16 query rows (q and dO in
// A fragments of every warp).  The warps take the key tiles round-robin, each staging its own
// k and v tiles, and their dQ partials are added in warp order at the end (deterministic):
// 16-row blocks keep the grid large for SegViT's 150 class tokens.
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) atm_attention_dq_mma_kernel(Params p, const T* __restrict__ dmask,
                                                                        const float* __restrict__ lse,
                                                                        const float* __restrict__ delta,
                                                                        T* __restrict__ dq) {
  constexpr int LD = mma_ld<DP>();
  constexpr int KS = DP / 16, NT = DP / 8, ST = MBN / 8;
  SF_DYNAMIC_SHARED(T, smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T* qs = smem;                                 // [BM][LD]
  T* dos = qs + BM * LD;                        // [BM][LD]
  T* ks = dos + BM * LD + warp * 2 * MBN * LD;  // [MBN][LD], the warp's
  T* vs = ks + MBN * LD;                        // [MBN][LD]
  float* red = reinterpret_cast<float*>(dos + BM * LD);  // [kWarps][BM][DP], after the key loop

  const int g = lane >> 2, t4 = lane & 3;
  const int64_t bh = blockIdx.x, b = blockIdx.x / static_cast<unsigned>(p.heads);  // 32-bit division
  const int64_t hd = bh - b * p.heads;
  const int q0 = blockIdx.y * BM;
  const int64_t qbase = bh * p.nq * p.d;  // dq: contiguous
  load_tile<T, T, DP>(p, qs, LD, head_rows<T>(p.q, b, hd), q0, BM, p.nq);
  load_tile<T, T, DP>(p, dos, LD, head_rows<T>(p.dout, b, hd), q0, BM, p.nq);
  __syncthreads();
  uint32_t qf[KS][4], df[KS][4];
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    sf::load_a_frag<T>(qf[kk], qs + kk * 16, LD, lane);
    sf::load_a_frag<T>(df[kk], dos + kk * 16, LD, lane);
  }
  int rows[2];
  float lse_r[2], delta_r[2];
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    rows[h2] = q0 + g + 8 * h2;
    const bool ok = rows[h2] < p.nq;
    lse_r[h2] = ok ? lse[bh * p.nq + rows[h2]] : 0.f;
    delta_r[h2] = ok ? delta[bh * p.nq + rows[h2]] : 0.f;
  }
  float acc[NT][4];
  sf::zero_acc<NT>(acc);

  for (int k0 = warp * MBN; k0 < p.nk; k0 += kWarps * MBN) {
    __syncwarp();  // the previous tile's readers are done
    stage_tile<T, T, DP>(p, ks, LD, head_rows<T>(p.k, b, hd), k0, MBN, p.nk, lane, 32);
    stage_tile<T, T, DP>(p, vs, LD, head_rows<T>(p.v, b, hd), k0, MBN, p.nk, lane, 32);
    __syncwarp();
    auto ds = [&](int t, int e, float sv, float dpv) {
      const int h2 = e >> 1, i = rows[h2], j = k0 + t * 8 + 2 * t4 + (e & 1);
      if (i >= p.nq || j >= p.nk) return 0.f;
      const float prob = sf::recompute_prob(sv * p.scale, lse_r[h2]);
      const float f = dropout_factor(p, (static_cast<uint64_t>(bh) * p.nq + i) * p.nk + j);
      return sf::softmax_grads(prob, dpv, delta_r[h2], f).ds +
             dmask_at(p, dmask, b, i, j) * p.inv_heads;
    };
    sf::mma_dq_tile<T, ST, KS, NT>(acc, qf, df, ks, vs, LD, lane, true, ds);
  }
  __syncthreads();  // every warp is done with its k/v tiles: red reuses them
  float* mine = red + warp * BM * DP;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) mine[(g + 8 * (e >> 1)) * DP + nt * 8 + 2 * t4 + (e & 1)] = acc[nt][e];
  __syncthreads();
  for (int e = threadIdx.x; e < BM * DP; e += kThreads) {
    const int r = e / DP, t = e % DP, i = q0 + r;
    if (i >= p.nq || t >= p.d) continue;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += red[w * BM * DP + e];
    dq[qbase + static_cast<int64_t>(i) * p.d + t] = sf::from_float<T>(sum * p.scale);
  }
}

}  // namespace sf_atm_attention
