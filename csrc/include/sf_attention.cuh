// The attention engine every op (window, ATM, semantic) runs: the online softmax (running max,
// rescale, exp, sums, dropout by element index), P V, the final normalisation and logsumexp,
// and the backward recomputation P = e^(x - lse), dS = P (f dP - delta) with the dK / dV and dQ
// products, for the FFMA path (a warp row, one key per lane) and the tensor-core path (a warp's
// 16 rows in the mma accumulator layout, sf_warp_gemm.cuh).  An op supplies its score policy
// as a callable that turns the raw products into logits (window: scale, bias gather, shift or
// explicit mask; ATM: scale; semantic: the K-inner products as they are) or into the gradients
// of one element, and its own tiling, staging and stores.  (ATM's forward keeps its own two
// passes, statistics first, for the exact head sum of the logits; semantic attention's backward
// its own loops over the wide value dim C.)
#pragma once

#include "sf_dropout.cuh"
#include "sf_reduce.cuh"
#include "sf_warp_gemm.cuh"

namespace sf {

constexpr float kNegInf = -__builtin_huge_valf();

// Tiling of the FFMA path (the ops take it with `using namespace sf::ffma_tiling`): blocks of
// kWarps warps, query tiles of BM rows (kRowsPerWarp a warp), key tiles of BN keys (one a lane).
namespace ffma_tiling {
constexpr int kWarps = 4, kThreads = kWarps * 32, kRowsPerWarp = 4, BM = kWarps * kRowsPerWarp, BN = 32;
}  // namespace ffma_tiling

// A (B, h, n, d) input read in place: batch, head and row strides in elements, the last dim
// contiguous (e.g. q, k, v as permuted views of one fused projection: no copy on the host).
struct Rows {
  const void* data;
  int64_t b, h, r;
};

// sum over t < DP of a[t] * b[t] (fp32 rows in shared memory).
template <int DP>
SF_DEVICE_INLINE float dot_row(const float* a, const float* b) {
  float s = 0.f;
#pragma unroll 8
  for (int t = 0; t < DP; ++t) s = fmaf(a[t], b[t], s);
  return s;
}

// -------------------------------------------------------------- stores --
// FFMA layout: v[c] * scale into dst[lane + 32 c] for the columns < cols.
template <typename T, int C>
SF_DEVICE_INLINE void store_lane_row(T* dst, const float v[C], float scale, int cols, int lane) {
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int t = lane + 32 * c;
    if (t < cols) dst[t] = from_float<T>(v[c] * scale);
  }
}

// Accumulator layout: the lane's part of row g + 8 h2 of acc, times scale, into dst[column] for
// the columns < cols.
template <typename T, int NT>
SF_DEVICE_INLINE void store_acc_row(T* dst, const float acc[NT][4], int h2, float scale, int cols, int lane) {
  const int t4 = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int t = nt * 8 + 2 * t4 + c;
      if (t < cols) dst[t] = from_float<T>(acc[nt][2 * h2 + c] * scale);
    }
}

// ------------------------------------------------------------ forward --
// FFMA path: one query row of a warp over a key tile, this lane's key with logit x (-inf:
// masked).  Updates the row's running max m and sum of exponentials l, sets prob = e^(x - m)
// and returns the factor that rescales the row's output so far.  A row whose logits are all
// -inf so far keeps m = -inf: the exps are guarded.
SF_DEVICE_INLINE float softmax_step(float& m, float& l, float x, float& prob) {
  const float m_new = fmaxf(m, warp_max(x));
  const float alpha = m == kNegInf ? 0.f : __expf(m - m_new);
  prob = x == kNegInf ? 0.f : __expf(x - m_new);
  l = l * alpha + warp_sum(prob);
  m = m_new;
  return alpha;
}

// acc[c] += sum over the 32 rows jj of tile of coef(lane jj) * tile[jj * ld + lane + 32 c]: the
// FFMA path's P V (a lane's probability per key) and dS K.
template <int C>
SF_DEVICE_INLINE void shfl_axpy(float acc[C], float coef, const float* tile, int ld, int lane) {
  for (int jj = 0; jj < 32; ++jj) {
    const float cj = __shfl_sync(0xffffffffu, coef, jj);
#pragma unroll
    for (int c = 0; c < C; ++c) acc[c] = fmaf(cj, tile[jj * ld + lane + 32 * c], acc[c]);
  }
}

// Tensor-core path: the online softmax of a warp's 16 rows (a lane's rows g and g + 8: h2 = 0,
// 1) over key tiles of ST 8-key tiles in the accumulator layout.
struct AccSoftmax {
  float m[2] = {kNegInf, kNegInf}, l[2] = {0.f, 0.f};

  // s: the tile's logits (-inf: masked), replaced by the probabilities e^(s - m) times
  // drop(st, e) (the dropout factor of the element); o, the rows' output so far, rescaled.
  template <int ST, int NT, typename Drop>
  SF_DEVICE_INLINE void step(float s[ST][4], float o[NT][4], Drop drop) {
    float mx[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int st = 0; st < ST; ++st)
#pragma unroll
      for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[st][e]);
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
        const float prob = s[st][e] == kNegInf ? 0.f : __expf(s[st][e] - m_new[h2]);
        sum[h2] += prob;
        s[st][e] = prob == 0.f ? 0.f : prob * drop(st, e);
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
  }

  SF_DEVICE_INLINE float lse(int h2) const { return m[h2] + logf(l[h2]); }
};

// One key tile of the tensor-core forward for the warp's 16 rows (A operand a, e.g. Q's
// fragments): S = A K^T over KS k-steps (0: `ksteps`), x = score(st, e, S element) (the logit,
// -inf where masked), the online softmax with drop(st, e), then o += P V.  live(st): the 8-key
// sub-tile meets the warp's rows (warp-uniform; P is zero off the live tiles).
template <typename T, int ST, int KS, int NT, typename A, typename Score, typename Drop, typename Live = AllLive>
SF_DEVICE_INLINE void mma_forward_tile(AccSoftmax& sm, float o[NT][4], const A& a, const T* ks, int ldk, const T* vs,
                                       int ldv, int lane, Score score, Drop drop, Live live = {}, int ksteps = KS) {
  float s[ST][4];
  zero_acc<ST>(s);
  mma_abt<T, ST, KS>(s, a, ks, ldk, lane, live, ksteps);
#pragma unroll
  for (int st = 0; st < ST; ++st)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[st][e] = score(st, e, s[st][e]);
  sm.step<ST, NT>(s, o, drop);
  mma_ab<T, ST / 2, NT>(o, AccA<T>{s}, vs, ldv, lane, [&](int kk) { return live(2 * kk) || live(2 * kk + 1); });
}

// ----------------------------------------------------------- backward --
// The forward's probability P = e^(x - lse) of logit x, recomputed from the row's logsumexp
// (before the dropout factor: evaluated after Philox, it cost the fp32 ATM dK/dV kernel 32
// registers on sm_80, 50 on sm_90).
SF_DEVICE_INLINE float recompute_prob(float x, float lse) { return __expf(x - lse); }

// P's dropped value pd = P f (what multiplied V) and the logit's gradient ds = P (f dP - delta).
struct Grads {
  float pd, ds;
};

SF_DEVICE_INLINE Grads softmax_grads(float prob, float dp, float delta, float f) {
  return {prob * f, prob * (dp * f - delta)};
}

// lse and delta of the flat rows [row0, row0 + count) into shared memory, 0 past `valid` rows;
// threads first, first + step, ... share them.
SF_DEVICE_INLINE void stage_row_stats(float* lses, float* deltas, const float* lse, const float* delta, int64_t row0,
                                      int count, int valid, int first, int step) {
  for (int e = first; e < count; e += step) {
    const bool ok = e < valid;
    lses[e] = ok ? lse[row0 + e] : 0.f;
    deltas[e] = ok ? delta[row0 + e] : 0.f;
  }
}

// FFMA path (ffma_tiling; head_dim padded to DP, a lane owns the columns lane + 32 c, c < DP / 32).
constexpr int kFfmaWarps = ffma_tiling::kWarps, kFfmaBM = ffma_tiling::BM, kFfmaRowsPerWarp = ffma_tiling::kRowsPerWarp;

// The backward's delta = dO . O of every flat row (b * h + head) * n + i of (B, h, n, d) rows, a
// warp a row, blocks of ffma_tiling::kThreads: out contiguous (rows of d), dO read in place.
template <typename T>
__global__ void __launch_bounds__(ffma_tiling::kThreads)
    attention_delta_kernel(Rows dout, const T* __restrict__ out, float* __restrict__ delta, int64_t batch, int heads,
                           int n, int d) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kFfmaWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= batch * heads * n) return;  // whole warp leaves together
  const int64_t bh = row / n, b = bh / heads;
  const T* dr = static_cast<const T*>(dout.data) + b * dout.b + (bh - b * heads) * dout.h + (row - bh * n) * dout.r;
  const float s = warp_dot(out + row * d, dr, d, lane);
  if (lane == 0) delta[row] = s;
}

// Shared memory of an FFMA backward block (fp32): the key tile's k, v [32][DP + 1], the query
// tile's q, dO [kFfmaBM][DP], with Dkv the dK / dV block's P and dS [kFfmaBM][33], then lse and
// delta [kFfmaBM]; `rest` is the op's (e.g. a table column).
template <int DP, bool Dkv>
struct FfmaBwdSmem {
  static constexpr int kFloats = 2 * 32 * (DP + 1) + 2 * kFfmaBM * DP + (Dkv ? 2 * kFfmaBM * 33 : 0) + 2 * kFfmaBM;
  float *ks, *vs, *qs, *dos, *ps, *dss, *lses, *deltas, *rest;
  SF_DEVICE_INLINE explicit FfmaBwdSmem(float* s)
      : ks(s), vs(ks + 32 * (DP + 1)), qs(vs + 32 * (DP + 1)), dos(qs + kFfmaBM * DP), ps(dos + kFfmaBM * DP),
        dss(ps + (Dkv ? kFfmaBM * 33 : 0)), lses(dss + (Dkv ? kFfmaBM * 33 : 0)), deltas(lses + kFfmaBM),
        rest(deltas + kFfmaBM) {}
};

// dK / dV of the block's key tile, looping over the nq query rows of its segment: per query
// tile, stage_q(q0) stages qs, dos [kFfmaBM][DP] (block-wide), lse and delta of the flat rows
// stat_row0 + q0 + ... are staged, grad(row, i, lse_i, delta_i) recomputes row `row` (query i)
// against the lane's key, and the warp's keys warp * KPW + a accumulate dV += P^T dO and
// dK += dS^T Q from ps, dss [kFfmaBM][33] ([row][key]).
template <int DP, typename StageQ, typename Grad>
SF_DEVICE_INLINE void ffma_dkv_loop(float dva[8][DP / 32], float dka[8][DP / 32], const FfmaBwdSmem<DP, true>& sm,
                                    const float* lse, const float* delta, int64_t stat_row0, int nq, StageQ stage_q,
                                    Grad grad) {
  constexpr int KPW = 32 / kFfmaWarps, C = DP / 32;
  static_assert(KPW == 8, "dva, dka: 8 keys a warp");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float *qs = sm.qs, *dos = sm.dos;
  float *ps = sm.ps, *dss = sm.dss, *lses = sm.lses, *deltas = sm.deltas;
#pragma unroll
  for (int a = 0; a < KPW; ++a)
#pragma unroll
    for (int c = 0; c < C; ++c) dka[a][c] = dva[a][c] = 0.f;
  for (int q0 = 0; q0 < nq; q0 += kFfmaBM) {
    __syncthreads();  // the previous tile's readers are done
    stage_q(q0);
    stage_row_stats(lses, deltas, lse, delta, stat_row0 + q0, kFfmaBM, nq - q0, threadIdx.x, kFfmaWarps * 32);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kFfmaRowsPerWarp; ++r) {
      const int row = warp * kFfmaRowsPerWarp + r;
      const Grads g = grad(row, q0 + row, lses[row], deltas[row]);
      ps[row * 33 + lane] = g.pd;
      dss[row * 33 + lane] = g.ds;
    }
    __syncthreads();
#pragma unroll
    for (int a = 0; a < KPW; ++a) {
      const int key = warp * KPW + a;
      for (int row = 0; row < kFfmaBM; ++row) {
        const float pv = ps[row * 33 + key], sv = dss[row * 33 + key];
#pragma unroll
        for (int c = 0; c < C; ++c) {
          dva[a][c] = fmaf(pv, dos[row * DP + lane + 32 * c], dva[a][c]);
          dka[a][c] = fmaf(sv, qs[row * DP + lane + 32 * c], dka[a][c]);
        }
      }
    }
  }
}

// The rows of dK (times scale) and dV of the block's key tile k0 < nk: rows of d columns from
// dk, dv (contiguous).
template <typename T, int DP>
SF_DEVICE_INLINE void ffma_store_kv(T* dk, T* dv, const float dka[8][DP / 32], const float dva[8][DP / 32], int k0,
                                    int nk, int d, float scale) {
  constexpr int KPW = 32 / kFfmaWarps;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int a = 0; a < KPW; ++a) {
    const int key = k0 + warp * KPW + a;
    if (key >= nk) continue;
    store_lane_row<T, DP / 32>(dk + static_cast<int64_t>(key) * d, dka[a], scale, d, lane);
    store_lane_row<T, DP / 32>(dv + static_cast<int64_t>(key) * d, dva[a], 1.f, d, lane);
  }
}

// dS K of the warp's rows over the nk keys of the segment: per key tile, stage_kv(k0) stages
// ks, vs [32][DP + 1] (block-wide; and any per-tile state of the lane's key), ds(r, j) gives dS
// of the warp's row r against the lane's key j, and, with DQ, acc[r] += dS K.
template <int DP, bool DQ, typename StageKV, typename Ds>
SF_DEVICE_INLINE void ffma_dq_loop(float acc[kFfmaRowsPerWarp][DP / 32], const float* ks, int nk, StageKV stage_kv,
                                   Ds ds) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < kFfmaRowsPerWarp; ++r)
#pragma unroll
    for (int c = 0; c < DP / 32; ++c) acc[r][c] = 0.f;
  for (int k0 = 0; k0 < nk; k0 += 32) {
    __syncthreads();  // the previous tile's readers are done
    stage_kv(k0);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kFfmaRowsPerWarp; ++r) {
      const float d = ds(r, k0 + lane);
      if constexpr (DQ) shfl_axpy<DP / 32>(acc[r], d, ks, DP + 1, lane);
    }
  }
}

// One key tile of the tensor-core dK / dV loop for the warp's 16 keys (their K and V rows ka,
// va) x the tile's 8 ST queries (qs, dos): S^T = K Q^T and dP^T = V dO^T, the element's
// Grads = grad(t, e, S^T, dP^T) (zero where masked), then dV += P^T dO and dK += dS^T Q.
// live(t): the 8-query sub-tile meets the warp's keys (warp-uniform).
template <typename T, int ST, int KS, int NT, typename Grad, typename Live = AllLive>
SF_DEVICE_INLINE void mma_dkv_tile(float dva[NT][4], float dka[NT][4], const T* ka, const T* va, const T* qs,
                                   const T* dos, int ld, int lane, Grad grad, Live live = {}) {
  float pt[ST][4], dst[ST][4];  // S^T, then P^T (dropped); dP^T, then dS^T
  zero_acc<ST>(pt);
  zero_acc<ST>(dst);
  mma_abt2<T, ST, KS>(pt, RowsA<T>{ka, ld}, qs, dst, RowsA<T>{va, ld}, dos, ld, lane, live);
#pragma unroll
  for (int t = 0; t < ST; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const Grads g = grad(t, e, pt[t][e], dst[t][e]);
      pt[t][e] = g.pd;
      dst[t][e] = g.ds;
    }
  mma_ab2<T, ST / 2, NT>(dva, AccA<T>{pt}, dos, dka, AccA<T>{dst}, qs, ld, lane,
                         [&](int kk) { return live(2 * kk) || live(2 * kk + 1); });
}

// One key tile of the tensor-core dQ loop for the warp's 16 rows (Q and dO fragments qf, df):
// S = Q K^T and dP = dO V^T, the element's dS = ds(t, e, S, dP) (zero where masked), then, with
// want_dq, acc += dS K.  live as mma_forward_tile.
template <typename T, int ST, int KS, int NT, typename Ds, typename Live = AllLive>
SF_DEVICE_INLINE void mma_dq_tile(float acc[NT][4], const uint32_t (*qf)[4], const uint32_t (*df)[4], const T* ks,
                                  const T* vs, int ld, int lane, bool want_dq, Ds ds, Live live = {}) {
  float s[ST][4], dp[ST][4];
  zero_acc<ST>(s);
  zero_acc<ST>(dp);
  mma_abt2<T, ST, KS>(s, FragsA{qf}, ks, dp, FragsA{df}, vs, ld, lane, live);
#pragma unroll
  for (int t = 0; t < ST; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[t][e] = ds(t, e, s[t][e], dp[t][e]);
  if (want_dq)
    mma_ab<T, ST / 2, NT>(acc, AccA<T>{s}, ks, ld, lane, [&](int kk) { return live(2 * kk) || live(2 * kk + 1); });
}

// The warp's rows q0 + 4 warp + r < nq of dQ (acc times scale) into dq (rows of d, contiguous).
template <typename T, int DP>
SF_DEVICE_INLINE void ffma_store_rows(T* dq, const float acc[kFfmaRowsPerWarp][DP / 32], int q0, int nq, int d,
                                      float scale) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < kFfmaRowsPerWarp; ++r) {
    const int i = q0 + warp * kFfmaRowsPerWarp + r;
    if (i < nq) store_lane_row<T, DP / 32>(dq + static_cast<int64_t>(i) * d, acc[r], scale, d, lane);
  }
}

}  // namespace sf
