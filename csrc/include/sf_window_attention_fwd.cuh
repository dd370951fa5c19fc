// Window attention (csrc/ops/window_attention.cu): parameters, score policy (bias gather, shift /
// explicit mask, scale) and the forward kernels.
#pragma once

#include "sf_common.cuh"
#include "sf_attention.cuh"
#include "sf_fused_products.cuh"
#include "sf_tile.cuh"

#include <cstdint>
#include <type_traits>

namespace sf_window_attention {

using namespace sf::ffma_tiling;
using sf::kNegInf;

using sf::Rows;  // (B_, h, N, d) inputs read in place

struct Params {
  Rows q, k, v;
  Rows dout;           // backward only
  const float* table;  // ((2Wh-1)(2Ww-1), h) or nullptr
  const float* mask;   // (nW, N, N) or nullptr
  int64_t batch;       // B_ = B * nW
  int heads, n, d;
  int wh, ww;
  int nw, nw_cols;     // windows per image, windows per grid row (shift mode)
  int hp, wp;          // padded grid in tokens (shift mode)
  int shift_h, shift_w;
  int shifted;         // 1: compute the shift mask from the region ids
  float scale, mask_value, dropout_p;
  const int64_t* seed;  // device memory (sf::seed_ptr)
};

// ---------------------------------------------------------------- helpers --
// Multiplier of an attention probability under dropout: 1/(1-p) if kept, else 0.
SF_DEVICE_INLINE float dropout_factor(const Params& p, uint64_t index) {
  return sf::dropout_factor(p.seed, p.dropout_p, 1.f / (1.f - p.dropout_p), index);
}

// Region id (0..8) of token t of window w (shift mode), as reference.shift_region_ids.
SF_DEVICE_INLINE int region_id(const Params& p, int w, int t) {
  const int y = (w / p.nw_cols) * p.wh + t / p.ww;
  const int x = (w % p.nw_cols) * p.ww + t % p.ww;
  const int ry = p.shift_h ? (y >= p.hp - p.wh) + (y >= p.hp - p.shift_h) : 0;
  const int rx = p.shift_w ? (x >= p.wp - p.ww) + (x >= p.wp - p.shift_w) : 0;
  return ry * 3 + rx;
}

SF_HOST_DEVICE inline int table_rows(const Params& p) { return (2 * p.wh - 1) * (2 * p.ww - 1); }

// Logit of (i, j) in window w given the raw dot product; -inf outside the window.
// tb is the head's table column staged in shared memory.
struct RowInfo {
  int y, x, region;
};

SF_DEVICE_INLINE RowInfo row_info(const Params& p, int w, int t) {
  RowInfo r;
  r.y = t / p.ww;
  r.x = t % p.ww;
  r.region = p.shifted ? region_id(p, w, t) : 0;
  return r;
}

SF_DEVICE_INLINE float logit(const Params& p, const float* tb, int w, int i, int j, const RowInfo& ri,
                             const RowInfo& rj, float dot) {
  float x = dot * p.scale;
  if (tb) x += tb[(ri.y - rj.y + p.wh - 1) * (2 * p.ww - 1) + (ri.x - rj.x + p.ww - 1)];
  if (p.shifted) x += ri.region == rj.region ? 0.f : p.mask_value;
  if (p.mask) x += p.mask[(static_cast<int64_t>(w) * p.n + i) * p.n + j];
  return x;
}

// The rows of head `head` of window b_ of a Rows input (row stride x.r).
template <typename T>
SF_DEVICE_INLINE const T* segment_rows(const Rows& x, int64_t b, int64_t head) {
  return static_cast<const T*>(x.data) + b * x.b + head * x.h;
}

// Stage rows [row0, row0 + rows) x [0, DP) of a (n, d) matrix (rows rs apart) as fp32, zero padded.
template <typename T, int DP>
SF_DEVICE_INLINE void load_tile(float* dst, int ld, const T* src, int64_t rs, int row0, int rows, int n, int d) {
  sf::stage_tile<float>(dst, ld, src, rs, row0, rows, n, 0, DP, d, threadIdx.x, kThreads);
}

SF_DEVICE_INLINE void load_table(float* tb, const Params& p, int head) {
  const int rows = table_rows(p);
  for (int e = threadIdx.x; e < rows; e += kThreads) tb[e] = p.table[static_cast<int64_t>(e) * p.heads + head];
}

using sf::dot_row;

// ---------------------------------------------------------------- forward --
// grid (B_ * h, ceil(N / BM)); dynamic smem: see fwd_smem_floats.
template <int DP>
SF_HOST_DEVICE constexpr int fwd_smem_floats_fixed() {
  return BM * DP + BN * (DP + 1) + BN * DP;
}

template <typename T, int DP>
// minBlocks = 1: without it ptxas capped this kernel's registers for occupancy and spilled (sm_80).
__global__ void __launch_bounds__(kThreads, 1) window_attention_fwd_kernel(Params p, T* __restrict__ out,
                                                                        float* __restrict__ lse) {
  SF_DYNAMIC_SHARED(float, smem);
  float* qs = smem;                 // [BM][DP]
  float* ks = qs + BM * DP;         // [BN][DP + 1]
  float* vs = ks + BN * (DP + 1);   // [BN][DP]
  float* tb = p.table ? vs + BN * DP : nullptr;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / p.heads;
  const int head = static_cast<int>(bh - b * p.heads);
  const int w = static_cast<int>(b % p.nw);
  const int q0 = blockIdx.y * BM;
  const int64_t base = bh * p.n * p.d;  // out: contiguous
  const T* qg = segment_rows<T>(p.q, b, head);
  const T* kg = segment_rows<T>(p.k, b, head);
  const T* vg = segment_rows<T>(p.v, b, head);

  load_tile<T, DP>(qs, DP, qg, p.q.r, q0, BM, p.n, p.d);
  if (tb) load_table(tb, p, head);

  constexpr int C = DP / 32;
  float m[kRowsPerWarp], l[kRowsPerWarp], o[kRowsPerWarp][C];
  RowInfo ri[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = kNegInf;
    l[r] = 0.f;
    ri[r] = row_info(p, w, q0 + warp * kRowsPerWarp + r);
#pragma unroll
    for (int c = 0; c < C; ++c) o[r][c] = 0.f;
  }

  for (int k0 = 0; k0 < p.n; k0 += BN) {
    __syncthreads();  // the previous tile's readers are done
    load_tile<T, DP>(ks, DP + 1, kg, p.k.r, k0, BN, p.n, p.d);
    load_tile<T, DP>(vs, DP, vg, p.v.r, k0, BN, p.n, p.d);
    __syncthreads();
    const int j = k0 + lane;
    const RowInfo rj = row_info(p, w, j);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r, i = q0 + row;
      const float dot = dot_row<DP>(qs + row * DP, ks + lane * (DP + 1));
      // Padded rows and keys stay -inf (their table/mask indices are out of range).
      const float x = (i < p.n && j < p.n) ? logit(p, tb, w, i, j, ri[r], rj, dot) : kNegInf;
      float prob;
      const float alpha = sf::softmax_step(m[r], l[r], x, prob);
      const float pd = prob * dropout_factor(p, (static_cast<uint64_t>(bh) * p.n + i) * p.n + j);
#pragma unroll
      for (int c = 0; c < C; ++c) o[r][c] *= alpha;
      sf::shfl_axpy<C>(o[r], pd, vs, DP, lane);
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = q0 + warp * kRowsPerWarp + r;
    if (i >= p.n) continue;
    sf::store_lane_row<T, C>(out + base + static_cast<int64_t>(i) * p.d, o[r], 1.f / l[r], p.d, lane);
    if (lane == 0) lse[bh * p.n + i] = m[r] + logf(l[r]);
  }
}

// ------------------------------------------------- forward, tensor cores --
// fp16 / bf16: the two products run on tensor cores (sf::mma_m16n8k16_f32, fp32
// accumulation).  A warp owns 16 query rows, a block MBM = 64; K and V tiles of
// MBN = 32 keys are staged in shared memory in the input dtype.  The logits stay
// in the accumulator layout (lane holds rows g, g + 8 and columns 2t, 2t + 1 of
// each 8-key tile; g = lane / 4, t = lane % 4), so row max / sum reduce over the
// 4 lanes of a group, and the probabilities become the A operand of P V without
// leaving registers (rounded to the input dtype, as flash attention does).
//
// Rows are packed: q, k, v, out are taken as (B_ * h * N, d) matrices of flat rows
// (b_ * h + head) * N + i (q, k, v read in place by load_flat_rows) and a block owns the flat
// rows [R0, R0 + MBM), whatever (window, head) "segments" (bh = row / N) they belong to, so a
// 7x7 window (N = 49) no longer leaves 15 of 64 rows idle.  The keys loop over the flat rows
// of the segments the block touches; a logit whose query and key lie in different segments is
// -inf, and a warp skips the 8-key sub-tiles outside its own segments (a warp-uniform branch).
constexpr int kMmaWarps = 4;
constexpr int MBM = 16 * kMmaWarps;
constexpr int MBN = 32;

template <int DP>
SF_HOST_DEVICE constexpr int mma_ld() {
  return DP + 8;  // halves: rows 16 bytes apart, fragment loads spread over the banks
}

template <int DP>
SF_HOST_DEVICE constexpr int fwd_mma_smem_bytes_fixed() {
  return 2 * (MBM + 2 * MBN) * mma_ld<DP>();
}

// Stage rows [row0, row0 + rows) x [0, DP) of a (n, d) matrix (rows rs apart) in its own dtype,
// zero padded.
template <typename T, int DP>
SF_DEVICE_INLINE void load_tile_raw(T* dst, int ld, const T* src, int64_t rs, int row0, int rows, int n, int d) {
  sf::stage_tile<T>(dst, ld, src, rs, row0, rows, n, 0, DP, d, threadIdx.x, kMmaWarps * 32);
}

// Stage the flat rows [row0, row0 + rows) of x (flat row (b_ * h + head) * N + i, read in place) x
// [0, DP) in their own dtype, zero padded past `valid` rows and d columns.  A thread keeps one
// column (the block's threads are a multiple of DP) and steps its row's (b_, head, i) without
// dividing: two divisions per call, not per element.
template <typename T, int DP>
SF_DEVICE_INLINE void load_flat_rows(T* dst, int ld, const Params& p, const Rows& x, int64_t row0, int rows,
                                     int valid) {
  constexpr int kStep = kMmaWarps * 32 / DP;  // rows a pass of the block covers
  static_assert(kMmaWarps * 32 % DP == 0, "a thread keeps one column");
  const int t = threadIdx.x % DP;
  int r = threadIdx.x / DP;
  const int64_t seg = (row0 + r) / p.n;
  int64_t b = seg / p.heads;
  int head = static_cast<int>(seg - b * p.heads), i = static_cast<int>(row0 + r - seg * p.n);
  const T* src = static_cast<const T*>(x.data) + t;
  for (; r < rows; r += kStep) {
    dst[r * ld + t] = r < valid && t < p.d ? src[b * x.b + head * x.h + i * x.r] : sf::from_float<T>(0.f);
    for (i += kStep; i >= p.n; i -= p.n)
      if (++head == p.heads) {
        head = 0;
        ++b;
      }
  }
}

// The MBM flat rows [r0, r0 + here) a tensor-core block owns (packed, whatever segments they
// belong to), the segments seg0..seg1 they touch and the flat rows [begin, end) of those
// segments; wbegin, wend: the same range for the warp's 16 rows (empty for a warp past the end).
struct PackedBlock {
  int64_t r0, seg0, seg1, begin, end, wbegin, wend;
  int here;
};

SF_DEVICE_INLINE PackedBlock packed_block(const Params& p, int warp) {
  PackedBlock b;
  const int64_t total = p.batch * p.heads * p.n;
  b.r0 = static_cast<int64_t>(blockIdx.x) * MBM;
  b.here = static_cast<int>(total - b.r0 < MBM ? total - b.r0 : MBM);
  b.seg0 = b.r0 / p.n;
  b.seg1 = (b.r0 + b.here - 1) / p.n;
  b.begin = b.seg0 * p.n;
  b.end = (b.seg1 + 1) * p.n;
  const int wrows = b.here - warp * 16;
  b.wbegin = wrows > 0 ? (b.r0 + warp * 16) / p.n * p.n : 0;
  b.wend = wrows > 0 ? ((b.r0 + warp * 16 + (wrows < 16 ? wrows : 16) - 1) / p.n + 1) * p.n : 0;
  return b;
}

// The table columns of the heads of segments seg0..seg1, [segment - seg0][table rows] (block-wide).
SF_DEVICE_INLINE void load_segment_tables(float* tb, const Params& p, int64_t seg0, int64_t seg1) {
  const int trows = table_rows(p), segs = static_cast<int>(seg1 - seg0 + 1);
  for (int e = threadIdx.x; e < segs * trows; e += kMmaWarps * 32)
    tb[e] = p.table[static_cast<int64_t>(e % trows) * p.heads + (seg0 + e / trows) % p.heads];
}

// grid (ceil(B_ * h * N / MBM)), block kMmaWarps * 32; dynamic smem: fwd_mma_smem_bytes.
template <typename T, int DP>
// minBlocks = 1: without it ptxas capped this kernel's registers for occupancy and spilled (sm_80).
__global__ void __launch_bounds__(kMmaWarps * 32, 1) window_attention_fwd_mma_kernel(Params p, T* __restrict__ out,
                                                                                     float* __restrict__ lse) {
  constexpr int LD = mma_ld<DP>();
  constexpr int KS = DP / 16;   // k-steps of Q K^T
  constexpr int NT = DP / 8;    // 8-column tiles of O
  constexpr int ST = MBN / 8;   // 8-key tiles of S
  SF_DYNAMIC_SHARED(T, smem);
  T* qs = smem;                // [MBM][LD]
  T* ks = qs + MBM * LD;       // [MBN][LD]
  T* vs = ks + MBN * LD;       // [MBN][LD]
  float* tb = p.table ? reinterpret_cast<float*>(vs + MBN * LD) : nullptr;  // [segments][table rows]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t4 = lane & 3;
  const PackedBlock pb = packed_block(p, warp);  // the block's rows; the keys: their segments' rows
  const int64_t r0 = pb.r0, seg0 = pb.seg0, key0 = pb.begin, key_end = pb.end, wkey0 = pb.wbegin, wkey_end = pb.wend;
  const int rows_here = pb.here;

  load_flat_rows<T, DP>(qs, LD, p, p.q, r0, MBM, rows_here);
  const int trows = table_rows(p);
  if (tb) load_segment_tables(tb, p, seg0, pb.seg1);
  __syncthreads();
  uint32_t qf[KS][4];
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) sf::load_a_frag<T>(qf[kk], qs + warp * 16 * LD + kk * 16, LD, lane);

  int64_t rows[2], seg_key0[2];
  int ii[2], ww_[2];
  RowInfo ri[2];
  const float* tbr[2];
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    const int local = warp * 16 + g + 8 * h2;
    rows[h2] = r0 + local;
    const int64_t seg = rows[h2] / p.n;
    seg_key0[h2] = local < rows_here ? seg * p.n : -(int64_t(1) << 40);  // padded rows match no key
    ii[h2] = static_cast<int>(rows[h2] - seg * p.n);
    ww_[h2] = static_cast<int>((seg / p.heads) % p.nw);
    ri[h2] = row_info(p, ww_[h2], ii[h2]);
    tbr[h2] = tb ? tb + (seg - seg0) * trows : nullptr;
  }
  sf::AccSoftmax sm;
  float o[NT][4];
  sf::zero_acc<NT>(o);

  for (int64_t k0 = key0; k0 < key_end; k0 += MBN) {
    const int keys_here = static_cast<int>(key_end - k0 < MBN ? key_end - k0 : MBN);
    __syncthreads();  // the previous tile's readers are done
    load_flat_rows<T, DP>(ks, LD, p, p.k, k0, MBN, keys_here);
    load_flat_rows<T, DP>(vs, LD, p, p.v, k0, MBN, keys_here);
    __syncthreads();
    bool live[ST];  // the 8-key sub-tile meets the warp's segments (uniform over the warp)
#pragma unroll
    for (int st = 0; st < ST; ++st) live[st] = k0 + st * 8 < wkey_end && k0 + st * 8 + 8 > wkey0;
    // Logits of keys outside the row's segment are -inf.
    auto score = [&](int st, int e, float dot) {
      const int h2 = e >> 1;
      const int64_t jj = k0 + st * 8 + 2 * t4 + (e & 1) - seg_key0[h2];  // key index inside the row's segment
      const int j = static_cast<int>(jj);
      return (live[st] && jj >= 0 && jj < p.n)
                 ? logit(p, tbr[h2], ww_[h2], ii[h2], j, ri[h2], row_info(p, ww_[h2], j), dot)
                 : kNegInf;
    };
    // Dropout element index ((b_ * h + head) * N + i) * N + j = row * N + j.
    auto drop = [&](int st, int e) {
      const int h2 = e >> 1;
      const int j = static_cast<int>(k0 + st * 8 + 2 * t4 + (e & 1) - seg_key0[h2]);
      return dropout_factor(p, static_cast<uint64_t>(rows[h2]) * p.n + j);
    };
    sf::mma_forward_tile<T, ST, KS, NT>(sm, o, sf::FragsA{qf}, ks, LD, vs, LD, lane, score, drop,
                                        [&](int st) { return live[st]; });
  }

#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    if (warp * 16 + g + 8 * h2 >= rows_here) continue;
    const int64_t row = rows[h2];
    sf::store_acc_row<T, NT>(out + row * p.d, o, h2, 1.f / sm.l[h2], p.d, lane);
    if (t4 == 0) lse[row] = sm.lse(h2);
  }
}

}  // namespace sf_window_attention
