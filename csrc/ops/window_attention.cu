// Swin (shifted-)window attention, forward and backward (SPEC.md section 1).
//
//   out = dropout(softmax(scale * q k^T + bias + mask)) v     per window and head
//
// q, k, v, out: (B_, h, N, d), window index fastest inside B_.  q, k, v and dO are read in
// place with any window / head / row strides (64-bit offsets), the last dim contiguous (the timm
// drop-in passes permuted views of one fused projection); out and the gradients are written
// contiguous.
// The relative-position bias is gathered from the fp32 table with the official
// index computed in-kernel; the SW-MSA mask is either computed in-kernel from
// (grid, window, shift) with region ids (reference.shift_region_ids) or read
// from an explicit fp32 (nW, N, N) mask.  Nothing of size N x N per window is
// written to global memory: the forward keeps an online softmax over key tiles
// and saves the fp32 row logsumexp; the backward recomputes the probabilities.
//
// Layout of the work (FFMA path, fp32 accumulation for every dtype):
//   * a block is 4 warps; a query tile is BM = 16 rows, 4 rows per warp;
//   * a key tile is BN = 32 keys, one key per lane for the logits, so row
//     max / sum are warp shuffles, and P v is a shuffle-broadcast loop where a
//     lane owns head-dim columns lane, lane+32, ...;
//   * head_dim is padded to DP in {32, 64, 128} in shared memory (zeros).
// Backward, deterministic (no float atomics):
//   1. delta_i = rowsum(dO_i * O_i);
//   2. dK, dV: a block owns a key tile and loops over the query tiles;
//   3. dQ: a block owns a query tile of one head (tensor-core path: 64 of the
//      h * N rows of a window, heads packed) and loops over a chunk of
//      windows; it also sums dS[i, j] over the chunk's windows into its own
//      slice of a (chunks, h, N, N) fp32 buffer (the chunk's first window
//      writes every element, the others add: each element has exactly one
//      owner thread, so no clearing pass and no atomics);
//   4. table gradient: a block per (table row, head) sums the buffer's (i, j)
//      pairs with that index in a fixed order (fixed-shape tree reduction).
//   Windows of N <= 64 tokens and head_dim <= 64 (every Swin stage; fp16 / bf16 on
//   tensor cores, fp32 with FFMA) run 1., 2. and 3. as one fused kernel instead (a
//   block holds a whole (window, head): q, k, v, dO read once), which also folds dS
//   onto the table rows, so its partials are (chunks, h, table rows) and step 4 is a
//   plain sum over the chunks.
//   The result is bitwise reproducible run to run.  Only the gradients autograd needs are
//   computed: without dK, dV no dkv kernel runs (the fused kernel skips their products); without
//   dQ the dq kernels (run for the table gradient alone) and the fused kernel skip the dS K
//   product and its stores.
// Dropout: keep(element) = philox(seed, element index) >= p, with the element
// index ((b_ * h + head) * N + i) * N + j; forward and backward evaluate the
// same hash, so no mask is stored.

#include "sf_common.cuh"
#include "sf_dropout.cuh"
#include "sf_reduce.cuh"
#include "sf_tile.cuh"
#include "sf_warp_gemm.cuh"

#include <cstdint>
#include <type_traits>

namespace sf_window_attention {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;
constexpr int BM = kWarps * kRowsPerWarp;  // query rows per tile
constexpr int BN = 32;                     // keys per tile
constexpr float kNegInf = -__builtin_huge_valf();

// A (B_, h, N, d) input read in place: window, head and row strides in elements, the last dim
// contiguous.
struct Rows {
  const void* data;
  int64_t b, h, r;
};

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
using sf::group_max;
using sf::group_sum;
using sf::warp_max;
using sf::warp_sum;

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

template <int DP>
SF_DEVICE_INLINE float dot_row(const float* a, const float* b) {
  float s = 0.f;
#pragma unroll 8
  for (int t = 0; t < DP; ++t) s = fmaf(a[t], b[t], s);
  return s;
}

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
      const float m_new = fmaxf(m[r], warp_max(x));
      // A row whose logits are all -inf so far keeps m = -inf: guard the exps.
      const float alpha = m[r] == kNegInf ? 0.f : __expf(m[r] - m_new);
      const float prob = x == kNegInf ? 0.f : __expf(x - m_new);
      l[r] = l[r] * alpha + warp_sum(prob);
      m[r] = m_new;
      const float pd = prob * dropout_factor(p, (static_cast<uint64_t>(bh) * p.n + i) * p.n + j);
#pragma unroll
      for (int c = 0; c < C; ++c) o[r][c] *= alpha;
      for (int jj = 0; jj < BN; ++jj) {
        const float pj = __shfl_sync(0xffffffffu, pd, jj);
#pragma unroll
        for (int c = 0; c < C; ++c) o[r][c] = fmaf(pj, vs[jj * DP + lane + 32 * c], o[r][c]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = q0 + warp * kRowsPerWarp + r;
    if (i >= p.n) continue;
    const float inv = 1.f / l[r];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int t = lane + 32 * c;
      if (t < p.d) out[base + static_cast<int64_t>(i) * p.d + t] = sf::from_float<T>(o[r][c] * inv);
    }
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
  const int64_t total = p.batch * p.heads * p.n;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * MBM;
  const int rows_here = static_cast<int>(total - r0 < MBM ? total - r0 : MBM);
  const int64_t seg0 = r0 / p.n, seg1 = (r0 + rows_here - 1) / p.n;
  const int64_t key0 = seg0 * p.n, key_end = (seg1 + 1) * p.n;  // flat keys of the block's segments

  load_flat_rows<T, DP>(qs, LD, p, p.q, r0, MBM, rows_here);
  const int trows = table_rows(p);
  if (tb) {
    const int segs = static_cast<int>(seg1 - seg0 + 1);
    for (int e = threadIdx.x; e < segs * trows; e += kMmaWarps * 32)
      tb[e] = p.table[static_cast<int64_t>(e % trows) * p.heads + (seg0 + e / trows) % p.heads];
  }
  __syncthreads();
  uint32_t qf[KS][4];
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) sf::load_a_frag<T>(qf[kk], qs + warp * 16 * LD + kk * 16, LD, lane);

  // The warp's rows and the flat key range of their segments (empty for a warp past the end).
  const int wrows = rows_here - warp * 16;
  const int64_t wkey0 = wrows > 0 ? (r0 + warp * 16) / p.n * p.n : 0;
  const int64_t wkey_end = wrows > 0 ? ((r0 + warp * 16 + (wrows < 16 ? wrows : 16) - 1) / p.n + 1) * p.n : 0;
  int64_t rows[2], seg_key0[2];
  int ii[2], ww_[2];
  RowInfo ri[2];
  const float* tbr[2];
  float m[2], l[2];
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
    m[h2] = kNegInf;
    l[h2] = 0.f;
  }
  float o[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nt][e] = 0.f;

  for (int64_t k0 = key0; k0 < key_end; k0 += MBN) {
    const int keys_here = static_cast<int>(key_end - k0 < MBN ? key_end - k0 : MBN);
    __syncthreads();  // the previous tile's readers are done
    load_flat_rows<T, DP>(ks, LD, p, p.k, k0, MBN, keys_here);
    load_flat_rows<T, DP>(vs, LD, p, p.v, k0, MBN, keys_here);
    __syncthreads();
    bool live[ST];  // the 8-key sub-tile meets the warp's segments (uniform over the warp)
#pragma unroll
    for (int st = 0; st < ST; ++st) live[st] = k0 + st * 8 < wkey_end && k0 + st * 8 + 8 > wkey0;
    float s[ST][4];
    sf::zero_acc<ST>(s);
    sf::mma_abt<T, ST, KS>(s, sf::FragsA{qf}, ks, LD, lane, [&](int st) { return live[st]; });
    float mx[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int st = 0; st < ST; ++st)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h2 = e >> 1;
        const int64_t jj = k0 + st * 8 + 2 * t4 + (e & 1) - seg_key0[h2];  // key index inside the row's segment
        const int j = static_cast<int>(jj);
        const float x = (live[st] && jj >= 0 && jj < p.n)
                            ? logit(p, tbr[h2], ww_[h2], ii[h2], j, ri[h2], row_info(p, ww_[h2], j), s[st][e])
                            : kNegInf;
        s[st][e] = x;
        mx[h2] = fmaxf(mx[h2], x);
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
        const int j = static_cast<int>(k0 + st * 8 + 2 * t4 + (e & 1) - seg_key0[h2]);
        const float prob = s[st][e] == kNegInf ? 0.f : __expf(s[st][e] - m_new[h2]);
        sum[h2] += prob;
        // Dropout element index ((b_ * h + head) * N + i) * N + j = row * N + j.
        s[st][e] = prob == 0.f ? 0.f : prob * dropout_factor(p, static_cast<uint64_t>(rows[h2]) * p.n + j);
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
    sf::mma_ab<T, MBN / 16, NT>(o, sf::AccA<T>{s}, vs, LD, lane,  // P is zero off the live tiles
                                [&](int kk) { return live[2 * kk] || live[2 * kk + 1]; });
  }

#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    if (warp * 16 + g + 8 * h2 >= rows_here) continue;
    const int64_t row = rows[h2];
    const float inv = 1.f / l[h2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int t = nt * 8 + 2 * t4 + c;
        if (t < p.d) out[row * p.d + t] = sf::from_float<T>(o[nt][2 * h2 + c] * inv);
      }
    if (t4 == 0) lse[row] = m[h2] + logf(l[h2]);
  }
}

// --------------------------------------------------------------- backward --
// delta_i = sum_t dO[i, t] * O[i, t]: one warp per flat row (b_, head, i); out is contiguous, dO
// read in place.
template <typename T>
__global__ void __launch_bounds__(kThreads) window_attention_delta_kernel(Params p, const T* __restrict__ out,
                                                                          float* __restrict__ delta) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.batch * p.heads * p.n) return;  // whole warp leaves together
  const int64_t bh = row / p.n, b = bh / p.heads;
  const T* dout = segment_rows<T>(p.dout, b, bh - b * p.heads) + (row - bh * p.n) * p.dout.r;
  const float s = sf::warp_dot(out + row * p.d, dout, p.d, lane);
  if (lane == 0) delta[row] = s;
}

// Recompute, for row `row` of the staged query tile and key j = k0 + lane:
// P (after softmax), the dropout factor, and dS = P * (f * dP' - delta).
struct Grads {
  float pd;  // dropped, rescaled probability (what multiplies v)
  float ds;  // gradient of the logit
};

template <int DP>
SF_DEVICE_INLINE Grads recompute(const Params& p, const float* tb, const float* qs, const float* dos,
                                 const float* ks, const float* vs, int ldk, int64_t bh, int w, int row, int i,
                                 int j, const RowInfo& ri, const RowInfo& rj, float lse_i, float delta_i) {
  Grads g{0.f, 0.f};
  if (i >= p.n || j >= p.n) return g;
  const int lane = j % BN;
  const float x = logit(p, tb, w, i, j, ri, rj, dot_row<DP>(qs + row * DP, ks + lane * ldk));
  const float prob = __expf(x - lse_i);
  const float f = dropout_factor(p, (static_cast<uint64_t>(bh) * p.n + i) * p.n + j);
  const float dp = dot_row<DP>(dos + row * DP, vs + lane * ldk);
  g.pd = prob * f;
  g.ds = prob * (dp * f - delta_i);
  return g;
}

template <int DP>
SF_HOST_DEVICE constexpr int dkv_smem_floats_fixed() {
  return 2 * BN * (DP + 1) + 2 * BM * DP + 2 * BM * (BN + 1) + 2 * BM;
}

// grid (B_ * h, ceil(N / BN)): dK, dV of one key tile.
template <typename T, int DP>
// minBlocks = 1: without it ptxas capped this kernel's registers for occupancy and spilled (sm_80, sm_90).
__global__ void __launch_bounds__(kThreads, 1) window_attention_dkv_kernel(Params p, const float* __restrict__ lse,
                                                                        const float* __restrict__ delta,
                                                                        T* __restrict__ dk, T* __restrict__ dv) {
  SF_DYNAMIC_SHARED(float, smem);
  float* ks = smem;                     // [BN][DP + 1]
  float* vs = ks + BN * (DP + 1);       // [BN][DP + 1]
  float* qs = vs + BN * (DP + 1);       // [BM][DP]
  float* dos = qs + BM * DP;            // [BM][DP]
  float* ps = dos + BM * DP;            // [BM][BN + 1]
  float* dss = ps + BM * (BN + 1);      // [BM][BN + 1]
  float* lses = dss + BM * (BN + 1);    // [BM]
  float* deltas = lses + BM;            // [BM]
  float* tb = p.table ? deltas + BM : nullptr;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x, b = bh / p.heads;
  const int head = static_cast<int>(bh - b * p.heads);
  const int w = static_cast<int>(b % p.nw);
  const int k0 = blockIdx.y * BN;
  const int64_t base = bh * p.n * p.d;  // dk, dv: contiguous

  load_tile<T, DP>(ks, DP + 1, segment_rows<T>(p.k, b, head), p.k.r, k0, BN, p.n, p.d);
  load_tile<T, DP>(vs, DP + 1, segment_rows<T>(p.v, b, head), p.v.r, k0, BN, p.n, p.d);
  if (tb) load_table(tb, p, head);

  constexpr int C = DP / 32;
  constexpr int KPW = BN / kWarps;  // keys accumulated per warp
  float dka[KPW][C], dva[KPW][C];
#pragma unroll
  for (int a = 0; a < KPW; ++a)
#pragma unroll
    for (int c = 0; c < C; ++c) dka[a][c] = dva[a][c] = 0.f;

  const int j = k0 + lane;
  const RowInfo rj = row_info(p, w, j);
  for (int q0 = 0; q0 < p.n; q0 += BM) {
    __syncthreads();  // previous tile's readers are done
    load_tile<T, DP>(qs, DP, segment_rows<T>(p.q, b, head), p.q.r, q0, BM, p.n, p.d);
    load_tile<T, DP>(dos, DP, segment_rows<T>(p.dout, b, head), p.dout.r, q0, BM, p.n, p.d);
    for (int e = threadIdx.x; e < BM; e += kThreads) {
      const bool ok = q0 + e < p.n;
      lses[e] = ok ? lse[bh * p.n + q0 + e] : 0.f;
      deltas[e] = ok ? delta[bh * p.n + q0 + e] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r, i = q0 + row;
      const Grads g = recompute<DP>(p, tb, qs, dos, ks, vs, DP + 1, bh, w, row, i, j, row_info(p, w, i), rj,
                                    lses[row], deltas[row]);
      ps[row * (BN + 1) + lane] = g.pd;
      dss[row * (BN + 1) + lane] = g.ds;
    }
    __syncthreads();
#pragma unroll
    for (int a = 0; a < KPW; ++a) {
      const int key = warp * KPW + a;
      for (int row = 0; row < BM; ++row) {
        const float pv = ps[row * (BN + 1) + key], sv = dss[row * (BN + 1) + key];
#pragma unroll
        for (int c = 0; c < C; ++c) {
          dva[a][c] = fmaf(pv, dos[row * DP + lane + 32 * c], dva[a][c]);
          dka[a][c] = fmaf(sv, qs[row * DP + lane + 32 * c], dka[a][c]);
        }
      }
    }
  }

#pragma unroll
  for (int a = 0; a < KPW; ++a) {
    const int key = k0 + warp * KPW + a;
    if (key >= p.n) continue;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int t = lane + 32 * c;
      if (t >= p.d) continue;
      const int64_t at = base + static_cast<int64_t>(key) * p.d + t;
      dk[at] = sf::from_float<T>(dka[a][c] * p.scale);
      dv[at] = sf::from_float<T>(dva[a][c]);
    }
  }
}

template <int DP>
SF_HOST_DEVICE constexpr int dq_smem_floats_fixed() {
  return 2 * BN * (DP + 1) + 2 * BM * DP + 2 * BM;
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
  float* ks = smem;                     // [BN][DP + 1]
  float* vs = ks + BN * (DP + 1);       // [BN][DP + 1]
  float* qs = vs + BN * (DP + 1);       // [BM][DP]
  float* dos = qs + BM * DP;            // [BM][DP]
  float* lses = dos + BM * DP;          // [BM]
  float* deltas = lses + BM;            // [BM]
  float* tb = p.table ? deltas + BM : nullptr;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int head = static_cast<int>(blockIdx.x % p.heads);
  const int64_t chunk = blockIdx.x / p.heads;
  const int q0 = blockIdx.y * BM;
  if (tb) load_table(tb, p, head);
  float* part = dsum ? dsum + (chunk * p.heads + head) * p.n * p.n : nullptr;

  constexpr int C = DP / 32;
  const int64_t b_end = (chunk + 1) * per_chunk < p.batch ? (chunk + 1) * per_chunk : p.batch;
  for (int64_t b = chunk * per_chunk; b < b_end; ++b) {
    const bool first = b == chunk * per_chunk;  // writes the partial sums, later windows add
    const int64_t bh = b * p.heads + head;
    const int w = static_cast<int>(b % p.nw);
    const int64_t base = bh * p.n * p.d;  // dq: contiguous
    const T* kg = segment_rows<T>(p.k, b, head);
    const T* vg = segment_rows<T>(p.v, b, head);
    __syncthreads();  // previous window's readers are done
    load_tile<T, DP>(qs, DP, segment_rows<T>(p.q, b, head), p.q.r, q0, BM, p.n, p.d);
    load_tile<T, DP>(dos, DP, segment_rows<T>(p.dout, b, head), p.dout.r, q0, BM, p.n, p.d);
    for (int e = threadIdx.x; e < BM; e += kThreads) {
      const bool ok = q0 + e < p.n;
      lses[e] = ok ? lse[bh * p.n + q0 + e] : 0.f;
      deltas[e] = ok ? delta[bh * p.n + q0 + e] : 0.f;
    }
    float acc[kRowsPerWarp][C];
    RowInfo ri[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      ri[r] = row_info(p, w, q0 + warp * kRowsPerWarp + r);
#pragma unroll
      for (int c = 0; c < C; ++c) acc[r][c] = 0.f;
    }
    for (int k0 = 0; k0 < p.n; k0 += BN) {
      __syncthreads();
      load_tile<T, DP>(ks, DP + 1, kg, p.k.r, k0, BN, p.n, p.d);
      load_tile<T, DP>(vs, DP + 1, vg, p.v.r, k0, BN, p.n, p.d);
      __syncthreads();
      const int j = k0 + lane;
      const RowInfo rj = row_info(p, w, j);
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int row = warp * kRowsPerWarp + r, i = q0 + row;
        const Grads g = recompute<DP>(p, tb, qs, dos, ks, vs, DP + 1, bh, w, row, i, j, ri[r], rj, lses[row],
                                      deltas[row]);
        if (part && i < p.n && j < p.n) {
          float* at = part + static_cast<int64_t>(i) * p.n + j;
          *at = first ? g.ds : *at + g.ds;
        }
        if constexpr (!DQ) continue;
        for (int jj = 0; jj < BN; ++jj) {
          const float sj = __shfl_sync(0xffffffffu, g.ds, jj);
#pragma unroll
          for (int c = 0; c < C; ++c) acc[r][c] = fmaf(sj, ks[jj * (DP + 1) + lane + 32 * c], acc[r][c]);
        }
      }
    }
    if constexpr (!DQ) continue;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int i = q0 + warp * kRowsPerWarp + r;
      if (i >= p.n) continue;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int t = lane + 32 * c;
        if (t < p.d) dq[base + static_cast<int64_t>(i) * p.d + t] = sf::from_float<T>(acc[r][c] * p.scale);
      }
    }
  }
}

// grid (table rows, h): dtable[r, head] = sum over chunks and over the (i, j)
// pairs of index r of dsum[chunk, head, i, j].  Each thread sums a fixed
// strided subset in a fixed order, then a fixed-shape tree: deterministic.
__global__ void __launch_bounds__(kThreads) window_attention_table_grad_kernel(const float* __restrict__ dsum,
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
  const int64_t total = p.batch * p.heads * p.n;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * MBM;
  const int keys_here = static_cast<int>(total - k0 < MBM ? total - k0 : MBM);
  const int64_t seg0 = k0 / p.n, seg1 = (k0 + keys_here - 1) / p.n;
  const int64_t q_begin = seg0 * p.n, q_end = (seg1 + 1) * p.n;  // flat queries of the block's segments
  load_flat_rows<T, DP>(ks, LD, p, p.k, k0, MBM, keys_here);
  load_flat_rows<T, DP>(vs, LD, p, p.v, k0, MBM, keys_here);
  const int trows = table_rows(p);
  if (tb) {
    const int segs = static_cast<int>(seg1 - seg0 + 1);
    for (int e = threadIdx.x; e < segs * trows; e += kMmaWarps * 32)
      tb[e] = p.table[static_cast<int64_t>(e % trows) * p.heads + (seg0 + e / trows) % p.heads];
  }

  // The warp's keys and the flat query range of their segments (empty for a warp past the end).
  const int wkeys = keys_here - warp * 16;
  const int64_t wq0 = wkeys > 0 ? (k0 + warp * 16) / p.n * p.n : 0;
  const int64_t wq_end = wkeys > 0 ? ((k0 + warp * 16 + (wkeys < 16 ? wkeys : 16) - 1) / p.n + 1) * p.n : 0;
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
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dka[nt][e] = dva[nt][e] = 0.f;

  for (int64_t q0 = q_begin; q0 < q_end; q0 += MBN) {
    const int q_here = static_cast<int>(q_end - q0 < MBN ? q_end - q0 : MBN);
    __syncthreads();  // the previous tile's readers are done (first time: publishes the keys above)
    load_flat_rows<T, DP>(qs, LD, p, p.q, q0, MBN, q_here);
    load_flat_rows<T, DP>(dos, LD, p, p.dout, q0, MBN, q_here);
    for (int e = threadIdx.x; e < MBN; e += kMmaWarps * 32) {
      const bool ok = e < q_here;
      lses[e] = ok ? lse[q0 + e] : 0.f;
      deltas[e] = ok ? delta[q0 + e] : 0.f;
    }
    __syncthreads();
    bool live[ST];  // the 8-query sub-tile meets the warp's segments (uniform over the warp)
#pragma unroll
    for (int t = 0; t < ST; ++t) live[t] = q0 + t * 8 < wq_end && q0 + t * 8 + 8 > wq0;
    // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys x MBN queries.
    float st_[ST][4], dpt[ST][4];
    sf::zero_acc<ST>(st_);
    sf::zero_acc<ST>(dpt);
    sf::mma_abt2<T, ST, KS>(st_, sf::RowsA<T>{ks + warp * 16 * LD, LD}, qs, dpt, sf::RowsA<T>{vs + warp * 16 * LD, LD},
                            dos, LD, lane, [&](int t) { return live[t]; });
#pragma unroll
    for (int t = 0; t < ST; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h2 = e >> 1, col = t * 8 + 2 * t4 + (e & 1);
        const int64_t ii = q0 + col - seg_q0[h2];  // query index inside the key's segment
        float pd = 0.f, ds = 0.f;
        if (live[t] && ii >= 0 && ii < p.n) {
          const int i = static_cast<int>(ii), j = jk[h2];
          const float x = logit(p, tbk[h2], wk[h2], i, j, row_info(p, wk[h2], i), rk[h2], st_[t][e]);
          const float prob = __expf(x - lses[col]);
          // Dropout element index ((b_ * h + head) * N + i) * N + j = flat query row * N + j.
          const float f = dropout_factor(p, static_cast<uint64_t>(q0 + col) * p.n + j);
          pd = prob * f;
          ds = prob * (dpt[t][e] * f - deltas[col]);
        }
        st_[t][e] = pd;
        dpt[t][e] = ds;
      }
    // dV += P^T dO, dK += dS^T Q (k = the tile's queries; P and dS are zero off the live tiles).
    sf::mma_ab2<T, MBN / 16, NT>(dva, sf::AccA<T>{st_}, dos, dka, sf::AccA<T>{dpt}, qs, LD, lane,
                                 [&](int kk) { return live[2 * kk] || live[2 * kk + 1]; });
  }
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    const int local = warp * 16 + g + 8 * h2;
    if (local >= keys_here) continue;
    const int64_t key = k0 + local;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int t = nt * 8 + 2 * t4 + c;
        if (t >= p.d) continue;
        const int64_t at = key * p.d + t;
        dk[at] = sf::from_float<T>(dka[nt][2 * h2 + c] * p.scale);
        dv[at] = sf::from_float<T>(dva[nt][2 * h2 + c]);
      }
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
    for (int e = threadIdx.x; e < MBM; e += kMmaWarps * 32) {
      const bool ok = e < rows_here;
      lses[e] = ok ? lse[wbase + r0 + e] : 0.f;
      deltas[e] = ok ? delta[wbase + r0 + e] : 0.f;
    }
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
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;

    for (int k0 = 0; k0 < span; k0 += MBN) {
      const int keys_here = span - k0 < MBN ? span - k0 : MBN;
      __syncthreads();
      load_flat_rows<T, DP>(ks, LD, p, p.k, wbase + key0 + k0, MBN, keys_here);
      load_flat_rows<T, DP>(vs, LD, p, p.v, wbase + key0 + k0, MBN, keys_here);
      __syncthreads();
      bool live[ST];  // the 8-key sub-tile meets the warp's heads (uniform over the warp)
#pragma unroll
      for (int t = 0; t < ST; ++t) live[t] = k0 + t * 8 < wkey_end && k0 + t * 8 + 8 > wkey0;
      float s[ST][4], dp[ST][4];
      sf::zero_acc<ST>(s);
      sf::zero_acc<ST>(dp);
      sf::mma_abt2<T, ST, KS>(s, sf::FragsA{qf}, ks, dp, sf::FragsA{df}, vs, LD, lane, [&](int t) { return live[t]; });
#pragma unroll
      for (int t = 0; t < ST; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h2 = e >> 1, i = ii[h2];
          const int j = k0 + t * 8 + 2 * t4 + (e & 1) - seg_key0[h2];  // key index inside the row's head
          float ds = 0.f;
          if (live[t] && j >= 0 && j < p.n) {
            const int row = r0 + warp * 16 + g + 8 * h2;  // (head, i) inside the window
            const float x = logit(p, tbr[h2], w, i, j, ri[h2], row_info(p, w, j), s[t][e]);
            const float prob = __expf(x - lse_r[h2]);
            const float f = dropout_factor(p, static_cast<uint64_t>(wbase + row) * p.n + j);
            ds = prob * (dp[t][e] * f - delta_r[h2]);
            if (part) {  // one owner thread per element; every (row, j < N) is visited once per window
              float* at = part + static_cast<int64_t>(row) * p.n + j;
              *at = first ? ds : *at + ds;
            }
          }
          s[t][e] = ds;
        }
      if (dq)
        sf::mma_ab<T, MBN / 16, NT>(acc, sf::AccA<T>{s}, ks, LD, lane,  // dS is zero off the live tiles
                                    [&](int kk) { return live[2 * kk] || live[2 * kk + 1]; });
    }
    if (!dq) continue;
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int local = warp * 16 + g + 8 * h2;
      if (local >= rows_here) continue;
      const int64_t row = wbase + r0 + local;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int t = nt * 8 + 2 * t4 + c;
          if (t < p.d) dq[row * p.d + t] = sf::from_float<T>(acc[nt][2 * h2 + c] * p.scale);
        }
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

// 16-byte and 8-byte shared-memory vectors of the fp32 products (one LDS.128 / LDS.64).
struct alignas(16) F4 {
  float v[4];
};
struct alignas(8) F2 {
  float x, y;
};
SF_DEVICE_INLINE F4 lds4(const float* s) { return *reinterpret_cast<const F4*>(s); }
SF_DEVICE_INLINE F2 lds2(const float* s) { return *reinterpret_cast<const F2*>(s); }

// The warp tile products of the fused kernel.  Every accumulator is a 16 x 8k tile in the mma
// layout (sf_mma.cuh): acc[tile][e] is row g + 8 (e / 2), column 8 tile + 2 t4 + e % 2 of the
// warp's tile (g = lane / 4, t4 = lane % 4).  Shared-memory layout of the kernel:
//   qs, ks, dos [FN][LD], vs [FN][VLD] (rows = tokens, zero padded past N and d);
//   ps [FN][LP] P, dss [FN][LP] dS (dS[i][j] at dss[i * LP + j]).
// fp16 / bf16 (this primary template): mma.sync m16n8k16; the warp's dS stays in registers as
// the A operand of dQ = dS K; P is stored [i][j] and read transposed for dV.
template <typename T, int DP>
struct FusedProducts {
  static constexpr int LD = DP + 8, LP = FN + 8, VLD = LD;  // +16 bytes: fragment loads spread over the banks
  static constexpr bool kFfma = false;
  static constexpr int KS = DP / 16, NT = DP / 8, ST = FN / 8;

  // S = Q K^T and dP = dO V^T for the warp's 16 rows x the window's keys (keys >= N stay 0).
  static SF_DEVICE_INLINE void scores(float s[ST][4], float dp[ST][4], const T* qs, const T* dos, const T* ks,
                                      const T* vs, int warp, int lane, int n) {
    sf::zero_acc<ST>(s);
    sf::zero_acc<ST>(dp);
    sf::mma_abt2<T, ST, KS>(s, sf::RowsA<T>{qs + warp * 16 * LD, LD}, ks, dp, sf::RowsA<T>{dos + warp * 16 * LD, LD},
                            vs, LD, lane, [n](int t) { return t * 8 < n; });  // keys past the window stay 0
  }

  // acc = dS K for the warp's rows; dS from the registers ds (as `scores` left S), rounded to T.
  static SF_DEVICE_INLINE void dq(float acc[NT][4], const float ds[ST][4], const T* /*dss*/, const T* ks, int /*warp*/,
                                  int lane, int n) {
    sf::zero_acc<NT>(acc);
    sf::mma_ab<T, FN / 16, NT>(acc, sf::AccA<T>{ds}, ks, LD, lane, [n](int kk) { return kk * 16 < n; });
  }

  // dva = P^T dO and dka = dS^T Q for the warp's 16 keys (k = the window's rows).
  static SF_DEVICE_INLINE void dkv(float dva[NT][4], float dka[NT][4], const T* ps, const T* dss, const T* dos,
                                   const T* qs, int warp, int lane, int n) {
    sf::zero_acc<NT>(dva);
    sf::zero_acc<NT>(dka);
    sf::mma_ab2<T, FN / 16, NT>(dva, sf::ColsA<T>{ps + warp * 16, LP}, dos, dka, sf::ColsA<T>{dss + warp * 16, LP}, qs,
                                LD, lane, [n](int kk) { return kk * 16 < n; });
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
template <int DP>
struct FusedProducts<float, DP> {
  static constexpr int LD = DP + 4, LP = FN + 4, VLD = LD > LP ? LD : LP;
  static constexpr bool kFfma = true;
  static constexpr int NT = DP / 8, ST = FN / 8;

  static SF_DEVICE_INLINE void scores(float s[ST][4], float dp[ST][4], const float* qs, const float* dos,
                                      const float* ks, const float* vs, int warp, int lane, int n) {
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int t = 0; t < ST; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[t][e] = dp[t][e] = 0.f;
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
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
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
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dva[nt][e] = dka[nt][e] = 0.f;
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
    // delta_i = sum_t dO[i, t] * O[i, t] (as window_attention_delta_kernel): a warp per row.
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
            float pd = 0.f, ds = 0.f;
            if (i < n && j < n) {
              const float x = logit(p, tb, w, i, j, ri, row_info(p, w, j), s[t][e]);
              const float prob = __expf(x - lse_i);
              const float f = dropout_factor(p, static_cast<uint64_t>(row0 + i) * n + j);
              pd = prob * f;
              ds = prob * (dp[t][e] * f - delta_i);
            }
            ps[F::kFfma ? j * LP + i : i * LP + j] = sf::from_float<T>(pd);
            dss[i * LP + j] = sf::from_float<T>(ds);
            if (!F::kFfma && dsf) dsf[i * DSF_LD + j] = ds;
            s[t][e] = ds;
          }
      }
      if (dq) {
        // dQ = dS K for the warp's rows.
        float acc[NT][4];
        F::dq(acc, s, dss, ks, warp, lane, n);
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
          const int i = warp * 16 + g + 8 * h2;
          if (i >= n) continue;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int t = nt * 8 + 2 * t4 + c;
              if (t < p.d) dq[(row0 + i) * p.d + t] = sf::from_float<T>(acc[nt][2 * h2 + c] * p.scale);
            }
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
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int t = nt * 8 + 2 * t4 + c;
            if (t >= p.d) continue;
            const int64_t at = (row0 + j) * p.d + t;
            dk[at] = sf::from_float<T>(dka[nt][2 * h2 + c] * p.scale);
            dv[at] = sf::from_float<T>(dva[nt][2 * h2 + c]);
          }
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
__global__ void __launch_bounds__(kThreads) window_attention_table_fold_sum_kernel(const float* __restrict__ tpart,
                                                                                   float* __restrict__ dtable,
                                                                                   int64_t chunks, int heads,
                                                                                   int trows) {
  const int e = blockIdx.x * kThreads + threadIdx.x;
  if (e >= trows * heads) return;
  const int r = e / heads, head = e % heads;
  float s = 0.f;
  for (int64_t c = 0; c < chunks; ++c) s += tpart[(c * heads + head) * trows + r];
  dtable[e] = s;
}

// The fused kernel serves the shape (any dtype): one tile of keys, head_dim <= 64, and a table
// the fold's threads cover ((2Wh-1)(2Ww-1) <= 256 rows: every window of <= 64 tokens).
inline bool fused_backward(const Params& p) {
  return p.n <= FN && p.d <= 64 && table_rows(p) <= kFoldRows * kMmaWarps * 32;
}

// ---------------------------------------------------------------- launchers --
using sf::ceil_div;

template <typename T, int DP>
void forward(const Params& p, T* out, float* lse, cudaStream_t stream) {
  if constexpr (!std::is_same<T, float>::value) {
    // fp16 / bf16: tensor cores.
    // Packed rows: a block's MBM rows touch at most (MBM - 1) / N + 2 segments, each with its table column.
    const int max_segments = (MBM - 1) / p.n + 2;
    const size_t smem = fwd_mma_smem_bytes_fixed<DP>() + sizeof(float) * (p.table ? max_segments * table_rows(p) : 0);
    auto kernel = window_attention_fwd_mma_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
    SF_LAUNCH(kernel, dim3(static_cast<unsigned>(ceil_div(p.batch * p.heads * p.n, MBM))), dim3(kMmaWarps * 32), smem,
              stream, p, out, lse);
  } else {
    const size_t smem = sizeof(float) * (fwd_smem_floats_fixed<DP>() + (p.table ? table_rows(p) : 0));
    auto kernel = window_attention_fwd_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
    SF_LAUNCH(kernel, dim3(static_cast<unsigned>(p.batch * p.heads), ceil_div(p.n, BM)), dim3(kThreads), smem, stream,
              p, out, lse);
  }
  SF_CHECK_LAUNCH();
}

// dq, or dk with dv, may be null: not wanted (autograd's needs_input_grad); a dkv kernel runs only
// for dk, dv, a dq kernel for dq or the table's partials (dsum).
template <typename T, int DP>
void backward(const Params& p, const T* out, const float* lse, float* delta, T* dq, T* dk, T* dv,
              float* dsum, int64_t chunks, int64_t per_chunk, float* dtable, cudaStream_t stream) {
  const int64_t rows = p.batch * p.heads * p.n;
  const bool fused = fused_backward(p);
  if (!fused)  // the fused kernel computes delta itself
    SF_LAUNCH(window_attention_delta_kernel<T>, dim3(ceil_div(rows, kWarps)), dim3(kThreads), 0, stream, p, out, delta);
  const size_t tsm = p.table ? table_rows(p) : 0;
  if (fused) {
    if constexpr (DP <= 64) {
      // dsum: the (chunks, h, table rows) folded partials.
      const size_t smem = fused_smem_bytes<T, DP>(p.table != nullptr, table_rows(p));
      auto kernel = window_attention_bwd_fused_kernel<T, DP>;
      SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
      SF_LAUNCH(kernel, dim3(static_cast<unsigned>(chunks), p.heads), dim3(kMmaWarps * 32), smem, stream, p, out,
                lse, dq, dk, dv, dsum, per_chunk);
      if (dtable)
        SF_LAUNCH(window_attention_table_fold_sum_kernel, dim3(ceil_div(static_cast<int64_t>(tsm) * p.heads, kThreads)),
                  dim3(kThreads), 0, stream, dsum, dtable, chunks, p.heads, table_rows(p));
    }
  } else if constexpr (!std::is_same<T, float>::value) {
    // fp16 / bf16: tensor cores.
    // Packed keys: a block's MBM keys touch at most (MBM - 1) / N + 2 segments, each with its table column.
    const size_t smem_kv = bwd_mma_smem_bytes_fixed<DP>() + sizeof(float) * ((MBM - 1) / p.n + 2) * tsm;
    auto kv = window_attention_dkv_mma_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(kv, smem_kv);
    if (dk)
      SF_LAUNCH(kv, dim3(static_cast<unsigned>(ceil_div(p.batch * p.heads * p.n, MBM))), dim3(kMmaWarps * 32),
                smem_kv, stream, p, lse, delta, dk, dv);
    // Packed heads: MBM rows of a window touch at most min(h, (MBM - 1) / N + 2) heads.
    const int q_heads = (MBM - 1) / p.n + 2 < p.heads ? (MBM - 1) / p.n + 2 : p.heads;
    const size_t smem_q = bwd_mma_smem_bytes_fixed<DP>() + sizeof(float) * q_heads * tsm;
    auto qk = window_attention_dq_mma_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(qk, smem_q);
    if (dq || dsum)
      SF_LAUNCH(qk, dim3(static_cast<unsigned>(chunks), ceil_div(static_cast<int64_t>(p.heads) * p.n, MBM)),
                dim3(kMmaWarps * 32), smem_q, stream, p, lse, delta, dq, dsum, per_chunk);
  } else {
    const size_t smem_kv = sizeof(float) * (dkv_smem_floats_fixed<DP>() + tsm);
    auto kv = window_attention_dkv_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(kv, smem_kv);
    if (dk)
      SF_LAUNCH(kv, dim3(static_cast<unsigned>(p.batch * p.heads), ceil_div(p.n, BN)), dim3(kThreads), smem_kv, stream,
                p, lse, delta, dk, dv);
    const size_t smem_q = sizeof(float) * (dq_smem_floats_fixed<DP>() + tsm);
    auto qk = dq ? window_attention_dq_kernel<T, DP, true> : window_attention_dq_kernel<T, DP, false>;
    SF_ALLOW_DYNAMIC_SMEM(qk, smem_q);
    if (dq || dsum)
      SF_LAUNCH(qk, dim3(static_cast<unsigned>(chunks * p.heads), ceil_div(p.n, BM)), dim3(kThreads), smem_q, stream,
                p, lse, delta, dq, dsum, per_chunk);
  }
  if (dtable && !fused)
    SF_LAUNCH(window_attention_table_grad_kernel, dim3(table_rows(p), p.heads), dim3(kThreads), 0, stream, dsum,
              dtable, chunks, p.heads, p.n, p.wh, p.ww);
  SF_CHECK_LAUNCH();
}

}  // namespace sf_window_attention

// ----------------------------------------------------------------- bindings --
#include "sf_torch.h"

#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>

namespace sf_window_attention {

template <typename F>
void dispatch(const at::Tensor& q, F&& f) {
  const int64_t d = q.size(3);
  SF_DISPATCH_FLOAT(q.scalar_type(), "window_attention", [&] {
    if (d <= 32) f(scalar_t{}, std::integral_constant<int, 32>{});
    else if (d <= 64) f(scalar_t{}, std::integral_constant<int, 64>{});
    else f(scalar_t{}, std::integral_constant<int, 128>{});
  });
}

// Inputs are read in place with any strides but the last (q, k, v, dO: (B_, h, N, d)), e.g.
// permuted views of one fused projection; the host copies only a non-unit last stride.
#define SF_CHECK_ROWS(t)                                                                                      \
  SF_CHECK_DEVICE(t);                                                                                         \
  SF_CHECK_DIM(t, 4);                                                                                         \
  TORCH_CHECK((t).size(3) == 1 || (t).stride(3) == 1, "window_attention: " #t " must have a contiguous last " \
              "dim (other strides are free), got strides ", (t).strides())

inline Rows rows_of(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& mask, int64_t wh,
                   int64_t ww, int64_t grid_h, int64_t grid_w, int64_t shift_h, int64_t shift_w, double scale,
                   double mask_value, double dropout_p, const at::Tensor& seed) {
  SF_CHECK_ROWS(q);
  SF_CHECK_ROWS(k);
  SF_CHECK_ROWS(v);
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "window_attention: k and v must have q's shape");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "window_attention: q, k, v must share a dtype");
  TORCH_CHECK(q.size(2) == wh * ww, "window_attention: N = ", q.size(2), " is not Wh*Ww = ", wh * ww);
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= 128, "window_attention: head_dim must be in 1..128, got ", q.size(3));
  Params p{};
  p.q = rows_of(q);
  p.k = rows_of(k);
  p.v = rows_of(v);
  p.batch = q.size(0);
  p.heads = static_cast<int>(q.size(1));
  p.n = static_cast<int>(q.size(2));
  p.d = static_cast<int>(q.size(3));
  p.wh = static_cast<int>(wh);
  p.ww = static_cast<int>(ww);
  p.nw = 1;
  p.nw_cols = 1;
  if (table) {
    SF_CHECK_INPUT(*table, 2);
    TORCH_CHECK(table->scalar_type() == at::kFloat, "window_attention: bias_table must be float32 here");
    TORCH_CHECK(table->size(0) == (2 * wh - 1) * (2 * ww - 1) && table->size(1) == q.size(1),
                "window_attention: bias_table must be ((2Wh-1)(2Ww-1), heads)");
    p.table = table->data_ptr<float>();
  }
  if (mask) {
    SF_CHECK_INPUT(*mask, 3);
    TORCH_CHECK(mask->scalar_type() == at::kFloat, "window_attention: mask must be float32 here");
    TORCH_CHECK(mask->size(1) == p.n && mask->size(2) == p.n && p.batch % mask->size(0) == 0,
                "window_attention: mask must be (nW, N, N) with nW dividing B_");
    TORCH_CHECK(shift_h == 0 && shift_w == 0, "window_attention: mask and shift are exclusive");
    p.mask = mask->data_ptr<float>();
    p.nw = static_cast<int>(mask->size(0));
  }
  if (shift_h || shift_w) {
    TORCH_CHECK(grid_h > 0 && grid_w > 0 && p.batch % (grid_h * grid_w) == 0,
                "window_attention: a shift needs a grid whose window count divides B_");
    p.shifted = 1;
    p.nw = static_cast<int>(grid_h * grid_w);
    p.nw_cols = static_cast<int>(grid_w);
    p.hp = static_cast<int>(grid_h * wh);
    p.wp = static_cast<int>(grid_w * ww);
    p.shift_h = static_cast<int>(shift_h);
    p.shift_w = static_cast<int>(shift_w);
  }
  p.scale = static_cast<float>(scale);
  p.mask_value = static_cast<float>(mask_value);
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = sf::seed_ptr(seed, q);
  return p;
}

std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const std::optional<at::Tensor>& table,
                                              const std::optional<at::Tensor>& mask, int64_t wh, int64_t ww,
                                              int64_t grid_h, int64_t grid_w, int64_t shift_h, int64_t shift_w,
                                              double scale, double mask_value, double dropout_p,
                                              const at::Tensor& seed) {
  const Params p = make_params(q, k, v, table, mask, wh, ww, grid_h, grid_w, shift_h, shift_w, scale, mask_value,
                               dropout_p, seed);
  SF_DEVICE_GUARD(q);
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous whatever q's strides
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  dispatch(q, [&](auto tag, auto dp) {
    using T = decltype(tag);
    forward<T, decltype(dp)::value>(p, reinterpret_cast<T*>(out.data_ptr()), lse.data_ptr<float>(),
                                    sf::current_stream());
  });
  return {out, lse};
}

// need_dq, need_dkv, need_table: autograd's needs_input_grad; dq, dk, dv not needed are returned
// unwritten (the caller drops them).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& mask, int64_t wh,
    int64_t ww, int64_t grid_h, int64_t grid_w, int64_t shift_h, int64_t shift_w, double scale, double mask_value,
    double dropout_p, const at::Tensor& seed, int64_t windows_per_chunk, bool need_dq, bool need_dkv,
    bool need_table) {
  Params p = make_params(q, k, v, table, mask, wh, ww, grid_h, grid_w, shift_h, shift_w, scale, mask_value,
                         dropout_p, seed);
  SF_DEVICE_GUARD(q);
  SF_CHECK_ROWS(dout);
  TORCH_CHECK(windows_per_chunk >= 1, "window_attention: windows_per_chunk must be >= 1, got ", windows_per_chunk);
  SF_CHECK_INPUT(out, 4);
  SF_CHECK_INPUT(lse, 3);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "window_attention: dout/out must match q");
  SF_CHECK_SAME_DTYPE(dout, q);
  p.dout = rows_of(dout);
  // Contiguous gradients whatever the inputs' strides.
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  const bool fused = fused_backward(p);
  at::Tensor delta = fused ? at::Tensor() : at::empty_like(lse);  // the fused kernel keeps delta in shared memory
  // The table gradient goes through per-chunk partial sums of dS over chunks of
  // `windows_per_chunk` consecutive windows (the plan is the caller's: a function of the
  // shape, so the summation order is reproducible): (chunks, h, N, N), or (chunks, h, table
  // rows) already folded by the fused kernel.  The kernels write every element, so the
  // buffer is not cleared.
  const int64_t per_chunk = std::min(windows_per_chunk, p.batch);
  const int64_t chunks = (p.batch + per_chunk - 1) / per_chunk;
  // A table that needs no gradient (frozen) still biases the scores, but no partial is written
  // and neither reduction runs.
  const bool want_table = table && need_table;
  at::Tensor dsum, dtable;
  if (want_table) {
    if (fused)
      dsum = at::empty({chunks, p.heads, table_rows(p)}, q.options().dtype(at::kFloat));
    else
      dsum = at::empty({chunks, p.heads, p.n, p.n}, q.options().dtype(at::kFloat));
    dtable = at::empty_like(*table);
  } else {
    dtable = at::empty({0}, q.options().dtype(at::kFloat));
  }
  dispatch(q, [&](auto tag, auto dp) {
    using T = decltype(tag);
    backward<T, decltype(dp)::value>(
        p, reinterpret_cast<const T*>(out.data_ptr()), lse.data_ptr<float>(), fused ? nullptr : delta.data_ptr<float>(),
        need_dq ? reinterpret_cast<T*>(dq.data_ptr()) : nullptr,
        need_dkv ? reinterpret_cast<T*>(dk.data_ptr()) : nullptr,
        need_dkv ? reinterpret_cast<T*>(dv.data_ptr()) : nullptr,
        want_table ? dsum.data_ptr<float>() : nullptr, chunks, per_chunk,
        want_table ? dtable.data_ptr<float>() : nullptr,
        sf::current_stream());
  });
  return {dq, dk, dv, dtable};
}

}  // namespace sf_window_attention

SF_TORCH_LIBRARY_FRAGMENT(m) {
  m.def("window_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? bias_table, Tensor? mask, int wh, int ww, "
        "int grid_h, int grid_w, int shift_h, int shift_w, float scale, float mask_value, float dropout_p, "
        "Tensor seed) -> (Tensor, Tensor)");
  m.def("window_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? bias_table, Tensor? mask, int wh, int ww, int grid_h, int grid_w, int shift_h, int shift_w, "
        "float scale, float mask_value, float dropout_p, Tensor seed, int windows_per_chunk, bool need_dq, "
        "bool need_dkv, bool need_table) -> (Tensor, Tensor, Tensor, Tensor)");
}

SF_TORCH_LIBRARY_IMPL(m) {
  m.impl("window_attention_forward", &sf_window_attention::forward_op);
  m.impl("window_attention_backward", &sf_window_attention::backward_op);
}
