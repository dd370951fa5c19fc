// Semantic attention (csrc/ops/semantic_attention.cu): the backward kernels.
#pragma once

#include "sf_semantic_attention_fwd.cuh"

namespace sf_semantic_attention {

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
      prob[r] = (i < p.n && j < p.n) ? sf::recompute_prob(dot(qs + row * p.kp, ks + lane * ldk, p.k), lses[row]) : 0.f;
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
      dss[row * (BN + 1) + lane] = sf::softmax_grads(prob[r], dp[r], deltas[row], 1.f).ds;  // no dropout
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
        const float prob = sf::recompute_prob(dot(qs + row * p.kp, ks + lane * ldk, p.k), lses[row]);
        ds = sf::softmax_grads(prob, dp[r], deltas[row], 1.f).ds;  // no dropout
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
        s[st][e] = (rows[h2] < p.n && x0 + col < p.n) ? sf::recompute_prob(s[st][e], lses[sr]) : 0.f;
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
        s[st][e] = sf::softmax_grads(s[st][e], dp[st][e], deltas[sr], 1.f).ds;  // no dropout
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

}  // namespace sf_semantic_attention
