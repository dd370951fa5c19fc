// Window attention (csrc/ops/window_attention.cu): the backward kernels.
#pragma once

#include "sf_window_attention_fwd.cuh"

namespace sf_window_attention {

// --------------------------------------------------------------- backward --
// (delta: sf::attention_delta_kernel.)
// Recompute, for row `row` of the staged query tile and key j = k0 + lane, the dropped
// probability and dS (sf::softmax_grads).
using sf::Grads;

template <int DP>
SF_DEVICE_INLINE Grads recompute(const Params& p, const float* tb, const float* qs, const float* dos,
                                 const float* ks, const float* vs, int ldk, int64_t bh, int w, int row, int i,
                                 int j, const RowInfo& ri, const RowInfo& rj, float lse_i, float delta_i) {
  if (i >= p.n || j >= p.n) return {0.f, 0.f};
  const int lane = j % BN;
  const float x = logit(p, tb, w, i, j, ri, rj, dot_row<DP>(qs + row * DP, ks + lane * ldk));
  const float prob = sf::recompute_prob(x, lse_i);
  const float f = dropout_factor(p, (static_cast<uint64_t>(bh) * p.n + i) * p.n + j);
  return sf::softmax_grads(prob, dot_row<DP>(dos + row * DP, vs + lane * ldk), delta_i, f);
}

// grid (B_ * h, ceil(N / BN)): dK, dV of one key tile.
template <typename T, int DP>
// minBlocks = 1: without it ptxas capped this kernel's registers for occupancy and spilled (sm_80, sm_90).
__global__ void __launch_bounds__(kThreads, 1) window_attention_dkv_kernel(Params p, const float* __restrict__ lse,
                                                                        const float* __restrict__ delta,
                                                                        T* __restrict__ dk, T* __restrict__ dv) {
  SF_DYNAMIC_SHARED(float, smem);
  const sf::FfmaBwdSmem<DP, true> sm(smem);
  float* tb = p.table ? sm.rest : nullptr;
  const int lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x, b = bh / p.heads;
  const int head = static_cast<int>(bh - b * p.heads);
  const int w = static_cast<int>(b % p.nw);
  const int k0 = blockIdx.y * BN;
  const int64_t base = bh * p.n * p.d;  // dk, dv: contiguous

  load_tile<T, DP>(sm.ks, DP + 1, segment_rows<T>(p.k, b, head), p.k.r, k0, BN, p.n, p.d);
  load_tile<T, DP>(sm.vs, DP + 1, segment_rows<T>(p.v, b, head), p.v.r, k0, BN, p.n, p.d);
  if (tb) load_table(tb, p, head);

  float dka[8][DP / 32], dva[8][DP / 32];
  const int j = k0 + lane;
  const RowInfo rj = row_info(p, w, j);
  auto stage_q = [&](int q0) {
    load_tile<T, DP>(sm.qs, DP, segment_rows<T>(p.q, b, head), p.q.r, q0, BM, p.n, p.d);
    load_tile<T, DP>(sm.dos, DP, segment_rows<T>(p.dout, b, head), p.dout.r, q0, BM, p.n, p.d);
  };
  auto grad = [&](int row, int i, float lse_i, float delta_i) {
    return recompute<DP>(p, tb, sm.qs, sm.dos, sm.ks, sm.vs, DP + 1, bh, w, row, i, j, row_info(p, w, i), rj, lse_i,
                         delta_i);
  };
  sf::ffma_dkv_loop<DP>(dva, dka, sm, lse, delta, bh * p.n, p.n, stage_q, grad);
  sf::ffma_store_kv<T, DP>(dk + base, dv + base, dka, dva, k0, p.n, p.d, p.scale);
}

// grid (h * chunks, ceil(N / BM)): dQ of one query tile for every window of a
// chunk of `per_chunk` consecutive windows; with a table, also the chunk's
// partial sum of dS into dsum (chunks, h, N, N): the first window writes, the others add.
// DQ false (dq not wanted): the table's partials alone; a template flag, not a null test (that
// made ptxas spill the dQ variant on sm_90).
template <typename T, int DP, bool DQ>
__global__ void __launch_bounds__(kThreads) window_attention_dq_kernel(Params p, const float* __restrict__ lse,
                                                                       const float* __restrict__ delta,
                                                                       T* __restrict__ dq, float* __restrict__ dsum,
                                                                       int64_t per_chunk) {
  SF_DYNAMIC_SHARED(float, smem);
  const sf::FfmaBwdSmem<DP, false> sm(smem);
  float* tb = p.table ? sm.rest : nullptr;
  const int warp = threadIdx.x / 32;
  const int head = static_cast<int>(blockIdx.x % p.heads);
  const int64_t chunk = blockIdx.x / p.heads;
  const int q0 = blockIdx.y * BM;
  if (tb) load_table(tb, p, head);
  float* part = dsum ? dsum + (chunk * p.heads + head) * p.n * p.n : nullptr;

  const int64_t b_end = (chunk + 1) * per_chunk < p.batch ? (chunk + 1) * per_chunk : p.batch;
  for (int64_t b = chunk * per_chunk; b < b_end; ++b) {
    const bool first = b == chunk * per_chunk;  // writes the partial sums, later windows add
    const int64_t bh = b * p.heads + head;
    const int w = static_cast<int>(b % p.nw);
    __syncthreads();  // previous window's readers are done
    load_tile<T, DP>(sm.qs, DP, segment_rows<T>(p.q, b, head), p.q.r, q0, BM, p.n, p.d);
    load_tile<T, DP>(sm.dos, DP, segment_rows<T>(p.dout, b, head), p.dout.r, q0, BM, p.n, p.d);
    sf::stage_row_stats(sm.lses, sm.deltas, lse, delta, bh * p.n + q0, BM, p.n - q0, threadIdx.x, kThreads);
    RowInfo ri[kRowsPerWarp], rj;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) ri[r] = row_info(p, w, q0 + warp * kRowsPerWarp + r);
    auto stage_kv = [&](int k0) {
      load_tile<T, DP>(sm.ks, DP + 1, segment_rows<T>(p.k, b, head), p.k.r, k0, BN, p.n, p.d);
      load_tile<T, DP>(sm.vs, DP + 1, segment_rows<T>(p.v, b, head), p.v.r, k0, BN, p.n, p.d);
      rj = row_info(p, w, k0 + threadIdx.x % 32);
    };
    auto ds = [&](int r, int j) {
      const int row = warp * kRowsPerWarp + r, i = q0 + row;
      const float d = recompute<DP>(p, tb, sm.qs, sm.dos, sm.ks, sm.vs, DP + 1, bh, w, row, i, j, ri[r], rj,
                                    sm.lses[row], sm.deltas[row]).ds;
      if (part && i < p.n && j < p.n) {
        float* at = part + static_cast<int64_t>(i) * p.n + j;
        *at = first ? d : *at + d;
      }
      return d;
    };
    float acc[kRowsPerWarp][DP / 32];
    sf::ffma_dq_loop<DP, DQ>(acc, sm.ks, p.n, stage_kv, ds);
    if constexpr (DQ) sf::ffma_store_rows<T, DP>(dq + bh * p.n * p.d, acc, q0, p.n, p.d, p.scale);
  }
}

// grid (table rows, h): dtable[r, head] = sum over chunks and over the (i, j)
// pairs of index r of dsum[chunk, head, i, j].  Each thread sums a fixed
// strided subset in a fixed order, then a fixed-shape tree: deterministic.
// static (as the fold below): every generated instance unit of window_attention.cu includes this
// header (semask_fast/_build.py), and neither kernel is a template.
static __global__ void __launch_bounds__(kThreads) window_attention_table_grad_kernel(const float* __restrict__ dsum,
                                                                                      float* __restrict__ dtable,
                                                                                      int64_t chunks, int heads, int n,
                                                                                      int wh, int ww) {
  SF_STATIC_SHARED(float, red, kThreads);
  const int r = blockIdx.x, head = blockIdx.y;
  const int dy = r / (2 * ww - 1) - (wh - 1), dx = r % (2 * ww - 1) - (ww - 1);
  // Query rows yi with yj = yi - dy inside the window, likewise for x.
  const int y_lo = dy > 0 ? dy : 0, y_hi = dy > 0 ? wh : wh + dy;
  const int x_lo = dx > 0 ? dx : 0, x_hi = dx > 0 ? ww : ww + dx;
  const int ny = y_hi - y_lo, nx = x_hi - x_lo;
  const int64_t pairs = static_cast<int64_t>(ny) * nx;
  float s = 0.f;
  for (int64_t e = threadIdx.x; e < chunks * pairs; e += kThreads) {
    const int64_t chunk = e / pairs;
    const int pr = static_cast<int>(e % pairs);
    const int yi = y_lo + pr / nx, xi = x_lo + pr % nx;
    const int i = yi * ww + xi, j = (yi - dy) * ww + (xi - dx);
    s += dsum[((chunk * heads + head) * n + i) * n + j];
  }
  red[threadIdx.x] = s;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) red[threadIdx.x] += red[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) dtable[static_cast<int64_t>(r) * heads + head] = red[0];
}

// ------------------------------------------------ backward, tensor cores --
// fp16 / bf16, same decomposition as the FFMA path.  The probabilities and dS are
// rounded to the input dtype to become A operands (as flash attention does);
// every product accumulates in fp32.

template <int DP>
SF_HOST_DEVICE constexpr int bwd_mma_smem_bytes_fixed() {
  return 2 * 2 * (MBM + MBN) * mma_ld<DP>() + 4 * 2 * MBM;
}

// grid (ceil(B_ * h * N / MBM)): packed keys, as the forward packs rows: the block owns the
// flat keys [K0, K0 + MBM) (a warp 16 of them) and loops over query tiles of MBN flat rows
// of the segments those keys belong to; pairs of different segments contribute nothing.
template <typename T, int DP>
__global__ void __launch_bounds__(kMmaWarps * 32) window_attention_dkv_mma_kernel(
    Params p, const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv) {
  constexpr int LD = mma_ld<DP>();
  constexpr int KS = DP / 16, NT = DP / 8, ST = MBN / 8;
  SF_DYNAMIC_SHARED(T, smem);
  T* ks = smem;               // [MBM][LD]  keys of the block
  T* vs = ks + MBM * LD;      // [MBM][LD]
  T* qs = vs + MBM * LD;      // [MBN][LD]  query tile
  T* dos = qs + MBN * LD;     // [MBN][LD]
  float* lses = reinterpret_cast<float*>(dos + MBN * LD);  // [MBN]
  float* deltas = lses + MBN;                              // [MBN]
  float* tb = p.table ? lses + 2 * MBM : nullptr;          // [segments][table rows]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t4 = lane & 3;
  const PackedBlock pb = packed_block(p, warp);  // the block's keys; the queries: their segments' rows
  const int64_t k0 = pb.r0, seg0 = pb.seg0, q_begin = pb.begin, q_end = pb.end, wq0 = pb.wbegin, wq_end = pb.wend;
  const int keys_here = pb.here;
  load_flat_rows<T, DP>(ks, LD, p, p.k, k0, MBM, keys_here);
  load_flat_rows<T, DP>(vs, LD, p, p.v, k0, MBM, keys_here);
  const int trows = table_rows(p);
  if (tb) load_segment_tables(tb, p, seg0, pb.seg1);
  int64_t seg_q0[2];
  int jk[2], wk[2];
  RowInfo rk[2];
  const float* tbk[2];
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    const int local = warp * 16 + g + 8 * h2;
    const int64_t seg = (k0 + local) / p.n;
    seg_q0[h2] = local < keys_here ? seg * p.n : -(int64_t(1) << 40);  // padded keys match no query
    jk[h2] = static_cast<int>(k0 + local - seg * p.n);
    wk[h2] = static_cast<int>((seg / p.heads) % p.nw);
    rk[h2] = row_info(p, wk[h2], jk[h2]);
    tbk[h2] = tb ? tb + (seg - seg0) * trows : nullptr;
  }
  float dka[NT][4], dva[NT][4];
  sf::zero_acc<NT>(dka);
  sf::zero_acc<NT>(dva);

  for (int64_t q0 = q_begin; q0 < q_end; q0 += MBN) {
    const int q_here = static_cast<int>(q_end - q0 < MBN ? q_end - q0 : MBN);
    __syncthreads();  // the previous tile's readers are done (first time: publishes the keys above)
    load_flat_rows<T, DP>(qs, LD, p, p.q, q0, MBN, q_here);
    load_flat_rows<T, DP>(dos, LD, p, p.dout, q0, MBN, q_here);
    sf::stage_row_stats(lses, deltas, lse, delta, q0, MBN, q_here, threadIdx.x, kMmaWarps * 32);
    __syncthreads();
    bool live[ST];  // the 8-query sub-tile meets the warp's segments (uniform over the warp)
#pragma unroll
    for (int t = 0; t < ST; ++t) live[t] = q0 + t * 8 < wq_end && q0 + t * 8 + 8 > wq0;
    // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys x MBN queries; P and dS are zero off
    // the live tiles.
    auto grad = [&](int t, int e, float st, float dpt) {
      const int h2 = e >> 1, col = t * 8 + 2 * t4 + (e & 1);
      const int64_t ii = q0 + col - seg_q0[h2];  // query index inside the key's segment
      if (!live[t] || ii < 0 || ii >= p.n) return Grads{0.f, 0.f};
      const int i = static_cast<int>(ii), j = jk[h2];
      const float x = logit(p, tbk[h2], wk[h2], i, j, row_info(p, wk[h2], i), rk[h2], st);
      const float prob = sf::recompute_prob(x, lses[col]);
      // Dropout element index ((b_ * h + head) * N + i) * N + j = flat query row * N + j.
      const float f = dropout_factor(p, static_cast<uint64_t>(q0 + col) * p.n + j);
      return sf::softmax_grads(prob, dpt, deltas[col], f);
    };
    sf::mma_dkv_tile<T, ST, KS, NT>(dva, dka, ks + warp * 16 * LD, vs + warp * 16 * LD, qs, dos, LD, lane, grad,
                                    [&](int t) { return live[t]; });
  }
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    const int local = warp * 16 + g + 8 * h2;
    if (local >= keys_here) continue;
    const int64_t key = k0 + local;
    sf::store_acc_row<T, NT>(dk + key * p.d, dka, h2, p.scale, p.d, lane);
    sf::store_acc_row<T, NT>(dv + key * p.d, dva, h2, 1.f, p.d, lane);
  }
}

// grid (chunks, ceil(h * N / MBM)): the block owns MBM of the h * N rows of a window (the
// rows of consecutive heads are packed, as in the forward; a head is a segment) and loops
// over the windows of its chunk; a warp owns 16 rows and, per window, loops over key
// tiles of the heads its rows belong to (see the FFMA dq kernel for the dsum partials:
// a (head, i) row has one owner thread in the chunk, so plain writes and adds suffice).
// dq null: the table's partials alone.
template <typename T, int DP>
// minBlocks = 1: without it ptxas capped this kernel's registers for occupancy and spilled (sm_80).
__global__ void __launch_bounds__(kMmaWarps * 32, 1) window_attention_dq_mma_kernel(
    Params p, const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dq,
    float* __restrict__ dsum, int64_t per_chunk) {
  constexpr int LD = mma_ld<DP>();
  constexpr int KS = DP / 16, NT = DP / 8, ST = MBN / 8;
  SF_DYNAMIC_SHARED(T, smem);
  T* qs = smem;               // [MBM][LD]
  T* dos = qs + MBM * LD;     // [MBM][LD]
  T* ks = dos + MBM * LD;     // [MBN][LD]
  T* vs = ks + MBN * LD;      // [MBN][LD]
  float* lses = reinterpret_cast<float*>(vs + MBN * LD);  // [MBM]
  float* deltas = lses + MBM;                             // [MBM]
  float* tb = p.table ? deltas + MBM : nullptr;           // [heads of the block][table rows]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t4 = lane & 3;
  const int64_t chunk = blockIdx.x;
  const int window_rows = p.heads * p.n;
  const int r0 = blockIdx.y * MBM;  // first row of the block inside a window's h * N rows
  const int rows_here = window_rows - r0 < MBM ? window_rows - r0 : MBM;
  const int head0 = r0 / p.n, head1 = (r0 + rows_here - 1) / p.n;
  const int key0 = head0 * p.n, span = (head1 + 1) * p.n - key0;  // keys of the block's heads
  const int trows = table_rows(p);
  if (tb)
    for (int e = threadIdx.x; e < (head1 - head0 + 1) * trows; e += kMmaWarps * 32)
      tb[e] = p.table[static_cast<int64_t>(e % trows) * p.heads + head0 + e / trows];
  float* part = dsum ? dsum + chunk * window_rows * p.n : nullptr;  // (h, N, N) slice of the chunk

  // The warp's rows, their heads and the key range of those heads (empty past the end).
  const int wrows = rows_here - warp * 16;
  const int wkey0 = wrows > 0 ? (r0 + warp * 16) / p.n * p.n - key0 : 0;
  const int wkey_end = wrows > 0 ? ((r0 + warp * 16 + (wrows < 16 ? wrows : 16) - 1) / p.n + 1) * p.n - key0 : 0;
  int ii[2], seg_key0[2];
  const float* tbr[2];
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    const int local = warp * 16 + g + 8 * h2, head = (r0 + local) / p.n;
    ii[h2] = r0 + local - head * p.n;
    seg_key0[h2] = local < rows_here ? head * p.n - key0 : -(1 << 30);  // padded rows match no key
    tbr[h2] = tb ? tb + (head - head0) * trows : nullptr;
  }

  const int64_t b_end = (chunk + 1) * per_chunk < p.batch ? (chunk + 1) * per_chunk : p.batch;
  for (int64_t b = chunk * per_chunk; b < b_end; ++b) {
    const bool first = b == chunk * per_chunk;  // writes the partial sums, later windows add
    const int w = static_cast<int>(b % p.nw);
    const int64_t wbase = b * window_rows;  // flat row of the window's first (head 0, token 0) row
    __syncthreads();  // the previous window's readers are done
    load_flat_rows<T, DP>(qs, LD, p, p.q, wbase + r0, MBM, rows_here);
    load_flat_rows<T, DP>(dos, LD, p, p.dout, wbase + r0, MBM, rows_here);
    sf::stage_row_stats(lses, deltas, lse, delta, wbase + r0, MBM, rows_here, threadIdx.x, kMmaWarps * 32);
    __syncthreads();
    uint32_t qf[KS][4], df[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      sf::load_a_frag<T>(qf[kk], qs + warp * 16 * LD + kk * 16, LD, lane);
      sf::load_a_frag<T>(df[kk], dos + warp * 16 * LD + kk * 16, LD, lane);
    }
    RowInfo ri[2];
    float lse_r[2], delta_r[2];
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      ri[h2] = row_info(p, w, ii[h2]);
      lse_r[h2] = lses[warp * 16 + g + 8 * h2];
      delta_r[h2] = deltas[warp * 16 + g + 8 * h2];
    }
    float acc[NT][4];
    sf::zero_acc<NT>(acc);

    for (int k0 = 0; k0 < span; k0 += MBN) {
      const int keys_here = span - k0 < MBN ? span - k0 : MBN;
      __syncthreads();
      load_flat_rows<T, DP>(ks, LD, p, p.k, wbase + key0 + k0, MBN, keys_here);
      load_flat_rows<T, DP>(vs, LD, p, p.v, wbase + key0 + k0, MBN, keys_here);
      __syncthreads();
      bool live[ST];  // the 8-key sub-tile meets the warp's heads (uniform over the warp)
#pragma unroll
      for (int t = 0; t < ST; ++t) live[t] = k0 + t * 8 < wkey_end && k0 + t * 8 + 8 > wkey0;
      // dS is zero off the live tiles.
      auto ds = [&](int t, int e, float sv, float dpv) {
        const int h2 = e >> 1, i = ii[h2];
        const int j = k0 + t * 8 + 2 * t4 + (e & 1) - seg_key0[h2];  // key index inside the row's head
        if (!live[t] || j < 0 || j >= p.n) return 0.f;
        const int row = r0 + warp * 16 + g + 8 * h2;  // (head, i) inside the window
        const float x = logit(p, tbr[h2], w, i, j, ri[h2], row_info(p, w, j), sv);
        const float prob = sf::recompute_prob(x, lse_r[h2]);
        const float f = dropout_factor(p, static_cast<uint64_t>(wbase + row) * p.n + j);
        const float d = sf::softmax_grads(prob, dpv, delta_r[h2], f).ds;
        if (part) {  // one owner thread per element; every (row, j < N) is visited once per window
          float* at = part + static_cast<int64_t>(row) * p.n + j;
          *at = first ? d : *at + d;
        }
        return d;
      };
      sf::mma_dq_tile<T, ST, KS, NT>(acc, qf, df, ks, vs, LD, lane, dq != nullptr, ds, [&](int t) { return live[t]; });
    }
    if (!dq) continue;
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int local = warp * 16 + g + 8 * h2;
      if (local < rows_here) sf::store_acc_row<T, NT>(dq + (wbase + r0 + local) * p.d, acc, h2, p.scale, p.d, lane);
    }
  }
}

// ------------------------------------------ backward, one-tile windows, fused --
// Windows of N <= 64 tokens and head_dim <= 64 (every Swin stage), any dtype: a block owns one
// head of a chunk of windows and, per window, holds the whole (window, head) segment in shared
// memory, so S and dP are computed once and q, k, v, dO are read once for delta, dQ, dK and dV
// together (the delta kernel and the two-kernel paths above read dO three times, q, k, v
// twice).  A warp owns 16 query rows for S, dP and dQ = dS K, then 16 keys for dV = P^T dO and
// dK = dS^T Q (P and dS staged in shared memory in the input dtype).  With a table, the block
// folds each window's fp32 dS onto the table rows itself (a thread owns fixed table rows and
// sums their (i, j) pairs in a fixed order), so the partials are (chunks, h, table rows), not
// (chunks, h, N, N).  The products are FusedProducts<T, DP>: tensor cores for fp16 / bf16, FFMA
// for fp32 (exact: no tf32), both leaving their results in the mma accumulator layout, so the
// softmax recomputation, the stores and the fold are one code.  dq null: no dQ = dS K; dk (and dv)
// null: no dV, dK products.
constexpr int FN = 64;  // rows and keys of the one tile

template <typename T, int DP>
using FusedProducts = sf::FusedProducts<T, DP, FN>;

// Bytes of dynamic shared memory of the fused kernel: the tiles (see FusedProducts), lse and
// delta, the fp32 dS of the fold (fp16 / bf16 with a table; fp32 folds dss itself) and the
// head's table column.
template <typename T, int DP>
SF_HOST_DEVICE constexpr size_t fused_smem_bytes(bool table, int trows) {
  using F = FusedProducts<T, DP>;
  const size_t tiles = sizeof(T) * FN * (3 * F::LD + F::VLD + (F::kFfma ? 1 : 2) * F::LP);
  const size_t dsf = table && !F::kFfma ? FN * (FN + 1) : 0;
  return tiles + sizeof(float) * (2 * FN + dsf + (table ? trows : 0));
}

// Table rows owned by a thread of the fused kernel's fold.
constexpr int kFoldRows = 2;

// grid (chunks, h), block kMmaWarps * 32; dynamic smem: fused_smem_bytes.
template <typename T, int DP>
// minBlocks = 1: let ptxas use the registers it needs (occupancy is bound by shared memory).
__global__ void __launch_bounds__(kMmaWarps * 32, 1) window_attention_bwd_fused_kernel(
    Params p, const T* __restrict__ out, const float* __restrict__ lse, T* __restrict__ dq, T* __restrict__ dk,
    T* __restrict__ dv, float* __restrict__ tpart, int64_t per_chunk) {
  using F = FusedProducts<T, DP>;
  constexpr int LD = F::LD, LP = F::LP, NT = F::NT, ST = F::ST;
  SF_DYNAMIC_SHARED(T, smem);
  T* qs = smem;               // [FN][LD]
  T* ks = qs + FN * LD;       // [FN][LD]
  T* vs = ks + FN * LD;       // [FN][VLD]
  T* dos = vs + FN * F::VLD;  // [FN][LD]
  // P (dropped, rescaled): fp16 / bf16 [i][j] in its own tile; fp32 [j][i] over V.
  T* ps = F::kFfma ? vs : dos + FN * LD;
  T* dss = F::kFfma ? dos + FN * LD : ps + FN * LP;       // [FN][LP]  dS, [i][j]
  float* lses = reinterpret_cast<float*>(dss + FN * LP);  // [FN]
  float* deltas = lses + FN;                              // [FN]
  // fp32 dS for the fold: [FN][FN + 1] of its own for fp16 / bf16, dss itself for fp32.
  float* dsf = p.table ? (F::kFfma ? reinterpret_cast<float*>(dss) : deltas + FN) : nullptr;
  constexpr int DSF_LD = F::kFfma ? LP : FN + 1;
  float* tb = p.table ? deltas + FN + (F::kFfma ? 0 : FN * (FN + 1)) : nullptr;  // [table rows]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t4 = lane & 3;
  const int64_t chunk = blockIdx.x;
  const int head = blockIdx.y;
  const int n = p.n, trows = table_rows(p);
  if (tb)
    for (int e = threadIdx.x; e < trows; e += kMmaWarps * 32) tb[e] = p.table[static_cast<int64_t>(e) * p.heads + head];
  float fold[kFoldRows];
#pragma unroll
  for (int r = 0; r < kFoldRows; ++r) fold[r] = 0.f;
  const bool rows_live = warp * 16 < n;  // the warp's 16 rows (and, later, keys) meet the window

  const int64_t b_end = (chunk + 1) * per_chunk < p.batch ? (chunk + 1) * per_chunk : p.batch;
  for (int64_t b = chunk * per_chunk; b < b_end; ++b) {
    const int w = static_cast<int>(b % p.nw);
    const int64_t seg = b * p.heads + head, row0 = seg * n;  // flat row of the segment's token 0
    __syncthreads();  // the previous window's readers are done
    load_tile_raw<T, DP>(qs, LD, segment_rows<T>(p.q, b, head), p.q.r, 0, FN, n, p.d);
    load_tile_raw<T, DP>(ks, LD, segment_rows<T>(p.k, b, head), p.k.r, 0, FN, n, p.d);
    load_tile_raw<T, DP>(vs, LD, segment_rows<T>(p.v, b, head), p.v.r, 0, FN, n, p.d);
    load_tile_raw<T, DP>(dos, LD, segment_rows<T>(p.dout, b, head), p.dout.r, 0, FN, n, p.d);
    for (int e = threadIdx.x; e < FN; e += kMmaWarps * 32) lses[e] = e < n ? lse[row0 + e] : 0.f;
    __syncthreads();  // dO is staged
    // delta_i = sum_t dO[i, t] * O[i, t] (as sf::attention_delta_kernel): a warp per row.
    for (int i = warp; i < FN; i += kMmaWarps) {
      const float s = sf::warp_dot(out + (row0 + i) * p.d, dos + i * LD, i < n ? p.d : 0, lane);
      if (lane == 0) deltas[i] = s;
    }
    __syncthreads();
    float s[ST][4], dp[ST][4];
    if (rows_live) F::scores(s, dp, qs, dos, ks, vs, warp, lane, n);
    if constexpr (F::kFfma) __syncthreads();  // P^T goes over V: every warp's dP is done
    if (rows_live) {
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        const int i = warp * 16 + g + 8 * h2;
        const RowInfo ri = row_info(p, w, i);
        const float lse_i = lses[i], delta_i = deltas[i];
#pragma unroll
        for (int t = 0; t < ST; ++t)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int j = t * 8 + 2 * t4 + c, e = 2 * h2 + c;
            Grads gr{0.f, 0.f};
            if (i < n && j < n) {
              const float x = logit(p, tb, w, i, j, ri, row_info(p, w, j), s[t][e]);
              const float prob = sf::recompute_prob(x, lse_i);
              const float f = dropout_factor(p, static_cast<uint64_t>(row0 + i) * n + j);
              gr = sf::softmax_grads(prob, dp[t][e], delta_i, f);
            }
            ps[F::kFfma ? j * LP + i : i * LP + j] = sf::from_float<T>(gr.pd);
            dss[i * LP + j] = sf::from_float<T>(gr.ds);
            if (!F::kFfma && dsf) dsf[i * DSF_LD + j] = gr.ds;
            s[t][e] = gr.ds;
          }
      }
      if (dq) {
        // dQ = dS K for the warp's rows.
        float acc[NT][4];
        F::dq(acc, s, dss, ks, warp, lane, n);
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
          const int i = warp * 16 + g + 8 * h2;
          if (i < n) sf::store_acc_row<T, NT>(dq + (row0 + i) * p.d, acc, h2, p.scale, p.d, lane);
        }
      }
    }
    __syncthreads();  // P and dS of every row are staged
    if (rows_live && dk) {
      // dV = P^T dO and dK = dS^T Q for the warp's 16 keys.
      float dva[NT][4], dka[NT][4];
      F::dkv(dva, dka, ps, dss, dos, qs, warp, lane, n);
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        const int j = warp * 16 + g + 8 * h2;
        if (j >= n) continue;
        sf::store_acc_row<T, NT>(dk + (row0 + j) * p.d, dka, h2, p.scale, p.d, lane);
        sf::store_acc_row<T, NT>(dv + (row0 + j) * p.d, dva, h2, 1.f, p.d, lane);
      }
    }
    if (dsf) {
      // Table rows r = thread + 128 * k: sum dS over the pairs (i, j) of relative position r,
      // query rows in increasing order (as window_attention_table_grad_kernel enumerates them).
#pragma unroll
      for (int k = 0; k < kFoldRows; ++k) {
        const int r = threadIdx.x + kMmaWarps * 32 * k;
        if (r >= trows) continue;
        const int dy = r / (2 * p.ww - 1) - (p.wh - 1), dx = r % (2 * p.ww - 1) - (p.ww - 1);
        const int y_lo = dy > 0 ? dy : 0, y_hi = dy > 0 ? p.wh : p.wh + dy;
        const int x_lo = dx > 0 ? dx : 0, x_hi = dx > 0 ? p.ww : p.ww + dx;
        float sum = 0.f;
        for (int yi = y_lo; yi < y_hi; ++yi)
          for (int xi = x_lo; xi < x_hi; ++xi)
            sum += dsf[(yi * p.ww + xi) * DSF_LD + (yi - dy) * p.ww + (xi - dx)];
        fold[k] += sum;
      }
    }
  }
  if (tpart) {
#pragma unroll
    for (int k = 0; k < kFoldRows; ++k) {
      const int r = threadIdx.x + kMmaWarps * 32 * k;
      if (r < trows) tpart[(chunk * p.heads + head) * trows + r] = fold[k];
    }
  }
}

// dtable[r, head] = sum over chunks, in order, of tpart[chunk, head, r]: a thread per (r, head).
static __global__ void __launch_bounds__(kThreads)
    window_attention_table_fold_sum_kernel(const float* __restrict__ tpart, float* __restrict__ dtable, int64_t chunks,
                                           int heads, int trows) {
  const int e = blockIdx.x * kThreads + threadIdx.x;
  if (e >= trows * heads) return;
  const int r = e / heads, head = e % heads;
  float s = 0.f;
  for (int64_t c = 0; c < chunks; ++c) s += tpart[(c * heads + head) * trows + r];
  dtable[e] = s;
}

// Whether the fused kernel can serve the shape (any dtype): one tile of keys, head_dim <= 64, and
// a table the fold's threads cover ((2Wh-1)(2Ww-1) <= 256 rows: every window of <= 64 tokens).
// Whether it runs is the caller's plan (backends/cuda/window_attention.py: fused_backward).
inline bool fused_backward_serves(const Params& p) {
  return p.n <= FN && p.d <= 64 && table_rows(p) <= kFoldRows * kMmaWarps * 32;
}

}  // namespace sf_window_attention
