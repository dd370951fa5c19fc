// ATM attention (csrc/ops/atm_attention.cu): parameters, staging and the forward kernels.
#pragma once

#include "sf_common.cuh"
#include "sf_attention.cuh"
#include "sf_tile.cuh"

#include <cstdint>
#include <type_traits>

namespace sf_atm_attention {

using namespace sf::ffma_tiling;
// Minimum resident blocks given to __launch_bounds__ where ptxas, left to its own occupancy
// target, keeps the registers at 64-80 and spills (measured on sm_80/sm_90): the fp32 dq
// kernel gets up to 128 registers (at head_dim 128 its shared memory allows 3 blocks per SM
// on sm_80, 4 on sm_90); the forward kernels ask for 1 (the fp32 one's shared memory, not its
// registers, bounds its occupancy; the tensor-core one at head_dim 64 spilled on sm_90 at the
// 128 registers ptxas chose otherwise).
constexpr int kDqMinBlocks = 4;
using sf::kNegInf;

using sf::Rows;  // (B, h, n, d) inputs read in place

// The rows of head `hd` of batch item `b` of a Rows input: base pointer and row stride.
template <typename T>
struct HeadRows {
  const T* data;
  int64_t rs;
};

template <typename T>
SF_DEVICE_INLINE HeadRows<T> head_rows(const Rows& x, int64_t b, int64_t hd) {
  return {static_cast<const T*>(x.data) + b * x.b + hd * x.h, x.r};
}

struct Params {
  Rows q, k, v;
  Rows dout;                 // backward only
  int64_t dmask_b, dmask_r;  // backward only: dM's batch and row strides (last dim contiguous)
  int64_t batch;
  int heads, nq, nk, d;
  float scale, dropout_p;
  // 1 / (1 - dropout_p) and 1 / heads, divided once on the host: an IEEE division in a
  // kernel calls a slow-path subroutine whose call site makes ptxas spill.
  float keep_scale, inv_heads;
  const int64_t* seed;  // device memory (sf::seed_ptr)
  int splits, split_keys;  // forward: key ranges of split_keys keys (a multiple of BN)
  bool vec;                // tiles load in 16-byte chunks (see stage_tile)
};

using sf::group_max;
using sf::group_sum;
using sf::warp_max;
using sf::warp_sum;

SF_DEVICE_INLINE float dropout_factor(const Params& p, uint64_t index) {
  return sf::dropout_factor(p.seed, p.dropout_p, p.keep_scale, index);
}

// Stage rows [row0, row0 + rows) x [0, DP) of a head's (n, d) rows into dst (row stride ld, in
// S), zero padded; the threads first, first + step, ... share the work (a warp: lane, 32; the
// block: threadIdx.x, blockDim.x).  With p.vec (d, every stride and every base 16-byte
// multiples: checked by the host) 16-byte chunks (the 16-bit tiles' rows and bases are 16-byte
// aligned, see mma_ld; the fp32 tiles' padded rows are not, and take the chunks apart).
template <typename S, typename T, int DP>
SF_DEVICE_INLINE void stage_tile(const Params& p, S* dst, int ld, HeadRows<T> src, int row0, int rows, int n,
                                 int first, int step) {
  if (p.vec) sf::stage_tile_16b<DP>(dst, ld, src.data, src.rs, row0, rows, n, p.d, first, step);
  else sf::stage_tile<S>(dst, ld, src.data, src.rs, row0, rows, n, 0, DP, p.d, first, step);
}

// The whole (kThreads) block stages a tile.
template <typename S, typename T, int DP>
SF_DEVICE_INLINE void load_tile(const Params& p, S* dst, int ld, HeadRows<T> src, int row0, int rows, int n) {
  stage_tile<S, T, DP>(p, dst, ld, src, row0, rows, n, threadIdx.x, kThreads);
}

// dM[b, i, j] of the (B, Nq, Nk) gradient, read in place.
template <typename T>
SF_DEVICE_INLINE float dmask_at(const Params& p, const T* dmask, int64_t b, int i, int j) {
  return sf::to_float(dmask[b * p.dmask_b + i * p.dmask_r + j]);
}

using sf::dot_row;

// ---------------------------------------------------------------- forward --
// Block (query tile of BM = 16 rows, key range, batch item), every head, two passes over the
// range (as kernels/atm_attention.py):
//   pass 1, key tiles outer / heads inner: S_h of the tile for each head; the head sum of the
//     tile's logits is complete after the tile (M written, final), and each head's running row
//     max / sum of exponentials is updated (shared memory, [heads][BM]);
//   pass 2, heads outer / key tiles inner: P = exp(S - m) with the final row max m, out_h =
//     P v_h / l (no rescaling).
// Only one key tile of head sums is ever live, so the range has no length limit.  The warps
// take heads round-robin (warp w: heads w, w + W, ...).

// Warps per forward block: fp32 with head_dim > 32 stages fp32 tiles that would not fit four
// times in a 99 KiB (sm_86 / sm_89) block.
template <typename T, int DP>
SF_HOST_DEVICE constexpr int fwd_warps() {
  return (sizeof(T) == 4 && DP > 32) ? 2 : 4;
}

// Row stride (elements) of the 16-bit tiles on the tensor-core path: rows 16 bytes apart
// spread the fragment loads over the banks.
template <int DP>
SF_HOST_DEVICE constexpr int mma_ld() {
  return DP + 8;
}

// Shared memory of one warp: q, k, then a region used by pass 1 for the warp's two head-sum
// tiles of the logits (2 x BM x BN fp32: double buffered, one block barrier per key tile) and
// by pass 2 for v (and, fp32, the output rows):
//   fp32 (FFMA): q [BM][DP], k [BN][DP + 1], v [BN][DP + 1], o [BM][DP]  (floats);
//   fp16/bf16 (tensor cores): q [BM][LD], k [BN][LD], v [BN][LD]  (in T).
// Every part is a multiple of 16 bytes.
template <typename T, int DP>
SF_HOST_DEVICE constexpr int64_t fwd_q_bytes() {
  return sizeof(T) == 4 ? 4 * BM * DP : static_cast<int64_t>(sizeof(T)) * BM * mma_ld<DP>();
}
template <typename T, int DP>
SF_HOST_DEVICE constexpr int64_t fwd_k_bytes() {
  return sizeof(T) == 4 ? 4 * BN * (DP + 1) : static_cast<int64_t>(sizeof(T)) * BN * mma_ld<DP>();
}
template <typename T, int DP>
SF_HOST_DEVICE constexpr int64_t fwd_shared_bytes() {
  constexpr int64_t pass2 = sizeof(T) == 4 ? 4 * (BN * (DP + 1) + BM * DP) : fwd_k_bytes<T, DP>();
  constexpr int64_t pass1 = 2 * 4 * BM * BN;
  return pass2 > pass1 ? pass2 : pass1;
}
template <typename T, int DP>
SF_HOST_DEVICE constexpr int64_t fwd_warp_bytes() {
  return fwd_q_bytes<T, DP>() + fwd_k_bytes<T, DP>() + fwd_shared_bytes<T, DP>();
}

// The block: every head's row max and row sum ([heads][BM] each, fp32), then the warps.
template <typename T, int DP>
SF_HOST_DEVICE constexpr int64_t fwd_smem_bytes(int heads) {
  return 2 * 4 * static_cast<int64_t>(heads) * BM + fwd_warps<T, DP>() * fwd_warp_bytes<T, DP>();
}

// Where a block's result for (head, row i) goes: normalised output and logsumexp (one split),
// or the split's fp32 partial (output normalised over the range, range logsumexp) for the
// combine kernel.
template <typename T>
struct FwdDest {
  T* out;
  float* lse;
  float* part_o;    // [splits][B * h * Nq][d]
  float* part_lse;  // [splits][B * h * Nq]
};

// Called by the lanes of one warp for one row; `o(t)` is the row's output before the division
// by the row sum l.
template <typename T, typename O>
SF_DEVICE_INLINE void store_row(const Params& p, const FwdDest<T>& dst, int64_t bh, int i, float m, float l, int lane,
                                O o) {
  const int64_t row = bh * p.nq + i;
  const float inv = __frcp_rn(l);
  if (p.splits == 1) {
    for (int t = lane; t < p.d; t += 32) dst.out[row * p.d + t] = sf::from_float<T>(o(t) * inv);
    if (lane == 0) dst.lse[row] = m + logf(l);
  } else {
    const int64_t prow = static_cast<int64_t>(blockIdx.y) * p.batch * p.heads * p.nq + row;
    for (int t = lane; t < p.d; t += 32) dst.part_o[prow * p.d + t] = o(t) * inv;
    if (lane == 0) dst.part_lse[prow] = m + logf(l);
  }
}

// Position of (row r, key jj of the tile) in a warp's head-sum tile.  FFMA: row-major.
// Tensor cores: the accumulator layout, [8-key group st][fragment element e][lane], so that
// the lanes of a warp update 32 consecutive floats (row-major would put the 8 rows of a
// fragment in one bank), with the lane's row bits XOR-ed by (2 st + e % 2) % 8 so that the
// block's reads of a row of 32 keys hit 32 banks too (unswizzled: 4 banks).
SF_HOST_DEVICE constexpr int msum_slot(int st, int e, int lane) {
  return (st * 4 + e) * 32 + (lane ^ (((2 * st + (e & 1)) & 7) << 2));
}
template <typename T>
SF_HOST_DEVICE constexpr int msum_index(int r, int jj) {
  if constexpr (sizeof(T) == 4) {
    return r * BN + jj;
  } else {
    const int c = jj & 7;
    return msum_slot(jj >> 3, 2 * (r >> 3) + (c & 1), 4 * (r & 7) + (c >> 1));
  }
}

// Warp `warp`'s head-sum tile `buf` (0 or 1) in the block's shared memory.
template <typename T, int DP>
SF_DEVICE_INLINE float* msum_tile(unsigned char* warps, int warp, int buf) {
  return reinterpret_cast<float*>(warps + warp * fwd_warp_bytes<T, DP>() + fwd_q_bytes<T, DP>() +
                                  fwd_k_bytes<T, DP>()) +
         buf * BM * BN;
}

// The head sum of key tile k0: M = (sum over warps, in warp order, of their head sums) / h.
// Called by the whole block after a barrier; warps without a head (h < W) hold nothing.
template <typename T, int DP>
SF_DEVICE_INLINE void write_mask_logits(const Params& p, unsigned char* warps, int buf, T* mask_logits, int64_t b,
                                        int q0, int k0) {
  constexpr int W = fwd_warps<T, DP>();
  const int used = p.heads < W ? p.heads : W;
  for (int e = threadIdx.x; e < BM * BN; e += W * 32) {
    const int r = e / BN, jj = e % BN;
    const int i = q0 + r, j = k0 + jj;
    if (i >= p.nq || j >= p.nk) continue;
    const int at = msum_index<T>(r, jj);
    float s = 0.f;
    for (int w = 0; w < used; ++w) s += msum_tile<T, DP>(warps, w, buf)[at];
    mask_logits[(b * p.nq + i) * p.nk + j] = sf::from_float<T>(s * p.inv_heads);
  }
}

// fp32, FFMA.  A lane owns one key of the tile for the logits and output columns lane + 32 c
// for the accumulation; the output rows live in the warp's shared memory.
// grid (ceil(Nq / BM), splits, B).
template <typename T, int DP>
__global__ void __launch_bounds__(fwd_warps<T, DP>() * 32, 1) atm_attention_fwd_kernel(Params p, FwdDest<T> dst,
                                                                                    T* __restrict__ mask_logits) {
  constexpr int W = fwd_warps<T, DP>();
  constexpr int C = DP / 32;
  SF_DYNAMIC_SHARED(unsigned char, smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int q0 = blockIdx.x * BM, kb = blockIdx.y * p.split_keys;
  const int ke = p.nk - kb < p.split_keys ? p.nk : kb + p.split_keys;
  const int64_t b = blockIdx.z;
  float* mrow = reinterpret_cast<float*>(smem);  // [heads][BM]
  float* lrow = mrow + p.heads * BM;             // [heads][BM]
  unsigned char* warps = smem + 2 * 4 * static_cast<int64_t>(p.heads) * BM;
  float* qs = reinterpret_cast<float*>(warps + warp * fwd_warp_bytes<T, DP>());
  float* ks = qs + BM * DP;
  float* vs = ks + BN * (DP + 1);
  float* os = vs + BN * (DP + 1);
  for (int hd = warp; hd < p.heads; hd += W)
    if (lane < BM) {
      mrow[hd * BM + lane] = kNegInf;
      lrow[hd * BM + lane] = 0.f;
    }

  // Pass 1.
  for (int k0 = kb, buf = 0; k0 < ke; k0 += BN, buf ^= 1) {
    float* msum = msum_tile<T, DP>(warps, warp, buf);
    const int j = k0 + lane;
    for (int hd = warp; hd < p.heads; hd += W) {
      __syncwarp();  // the previous head's readers of q / k, and lane 0's row statistics, are done
      stage_tile<float, T, DP>(p, qs, DP, head_rows<T>(p.q, b, hd), q0, BM, p.nq, lane, 32);
      stage_tile<float, T, DP>(p, ks, DP + 1, head_rows<T>(p.k, b, hd), k0, BN, p.nk, lane, 32);
      __syncwarp();
      for (int r = 0; r < BM; ++r) {
        const float s = dot_row<DP>(qs + r * DP, ks + lane * (DP + 1)) * p.scale;
        msum[r * BN + lane] = hd == warp ? s : msum[r * BN + lane] + s;
        const float x = j < p.nk ? s : kNegInf;
        const float m_old = mrow[hd * BM + r], l_old = lrow[hd * BM + r];
        // The tile holds key k0 < Nk: m_new is finite.
        const float m_new = fmaxf(m_old, warp_max(x));
        const float prob = x == kNegInf ? 0.f : __expf(x - m_new);
        const float l_new = l_old * __expf(m_old - m_new) + warp_sum(prob);  // e^-inf = 0
        // Every lane has read m_old / l_old: lane 0 may overwrite (the shuffles above order no
        // memory access, the __syncwarp does).
        __syncwarp();
        if (lane == 0) {
          mrow[hd * BM + r] = m_new;
          lrow[hd * BM + r] = l_new;
        }
      }
    }
    __syncthreads();  // every warp's head sum of the tile is complete
    write_mask_logits<T, DP>(p, warps, buf, mask_logits, b, q0, k0);
  }
  __syncthreads();  // the head sums are read: pass 2 reuses their memory for v and o

  // Pass 2.
  for (int hd = warp; hd < p.heads; hd += W) {
    const int64_t bh = b * p.heads + hd;
    __syncwarp();  // the previous head's epilogue is done with q / o
    stage_tile<float, T, DP>(p, qs, DP, head_rows<T>(p.q, b, hd), q0, BM, p.nq, lane, 32);
    for (int e = lane; e < BM * DP; e += 32) os[e] = 0.f;
    for (int k0 = kb; k0 < ke; k0 += BN) {
      __syncwarp();  // the previous tile's readers are done
      stage_tile<float, T, DP>(p, ks, DP + 1, head_rows<T>(p.k, b, hd), k0, BN, p.nk, lane, 32);
      stage_tile<float, T, DP>(p, vs, DP + 1, head_rows<T>(p.v, b, hd), k0, BN, p.nk, lane, 32);
      __syncwarp();
      const int j = k0 + lane;
      for (int r = 0; r < BM; ++r) {
        const float s = dot_row<DP>(qs + r * DP, ks + lane * (DP + 1)) * p.scale;
        const float prob = j < p.nk ? __expf(s - mrow[hd * BM + r]) : 0.f;
        const float pd = prob * dropout_factor(p, (static_cast<uint64_t>(bh) * p.nq + q0 + r) * p.nk + j);
        float acc[C];
        float* orow = os + r * DP;
#pragma unroll
        for (int c = 0; c < C; ++c) acc[c] = orow[lane + 32 * c];
        sf::shfl_axpy<C>(acc, pd, vs, DP + 1, lane);
#pragma unroll
        for (int c = 0; c < C; ++c) orow[lane + 32 * c] = acc[c];
      }
    }
    __syncwarp();
    for (int r = 0; r < BM && q0 + r < p.nq; ++r)
      store_row<T>(p, dst, bh, q0 + r, mrow[hd * BM + r], lrow[hd * BM + r], lane,
                   [&](int t) { return os[r * DP + t]; });
  }
}

// fp16 / bf16, tensor cores.  The 16 query rows of a head are A fragments, 32-key tiles of K
// and V are staged in T; the logits stay in the accumulator layout (lane holds rows g, g + 8
// and columns 2t, 2t + 1 of each 8-key tile; g = lane / 4, t = lane % 4), so the row max /
// sum reduce over the 4 lanes of a group and the probabilities become the A operand of P V in
// registers (rounded to T, as flash attention does).  grid (ceil(Nq / BM), splits, B).
template <typename T, int DP>
__global__ void __launch_bounds__(fwd_warps<T, DP>() * 32, 1)
    atm_attention_fwd_mma_kernel(Params p, FwdDest<T> dst, T* __restrict__ mask_logits) {
  constexpr int W = fwd_warps<T, DP>();
  constexpr int LD = mma_ld<DP>();
  constexpr int KS = DP / 16;  // k-steps of q k^T
  constexpr int NT = DP / 8;   // 8-column tiles of the output
  constexpr int ST = BN / 8;   // 8-key tiles of S
  SF_DYNAMIC_SHARED(unsigned char, smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t4 = lane & 3;
  const int q0 = blockIdx.x * BM, kb = blockIdx.y * p.split_keys;
  const int ke = p.nk - kb < p.split_keys ? p.nk : kb + p.split_keys;
  const int64_t b = blockIdx.z;
  float* mrow = reinterpret_cast<float*>(smem);  // [heads][BM]
  float* lrow = mrow + p.heads * BM;             // [heads][BM]
  unsigned char* warps = smem + 2 * 4 * static_cast<int64_t>(p.heads) * BM;
  T* qs = reinterpret_cast<T*>(warps + warp * fwd_warp_bytes<T, DP>());
  T* ks = qs + BM * LD;
  T* vs = ks + BN * LD;
  for (int hd = warp; hd < p.heads; hd += W)
    if (lane < BM) {
      mrow[hd * BM + lane] = kNegInf;
      lrow[hd * BM + lane] = 0.f;
    }

  // S = q_h k_h^T (unscaled) for the staged tiles.
  auto logits = [&](float (&s)[ST][4], const uint32_t (&qf)[KS][4]) {
    sf::zero_acc<ST>(s);
    sf::mma_abt<T, ST, KS>(s, sf::FragsA{qf}, ks, LD, lane);
  };

  // Pass 1.
  for (int k0 = kb, buf = 0; k0 < ke; k0 += BN, buf ^= 1) {
    float* msum = msum_tile<T, DP>(warps, warp, buf);
    for (int hd = warp; hd < p.heads; hd += W) {
      __syncwarp();  // the previous head's readers of q / k, and the row statistics' writers, are done
      stage_tile<T, T, DP>(p, qs, LD, head_rows<T>(p.q, b, hd), q0, BM, p.nq, lane, 32);
      stage_tile<T, T, DP>(p, ks, LD, head_rows<T>(p.k, b, hd), k0, BN, p.nk, lane, 32);
      __syncwarp();
      uint32_t qf[KS][4];
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) sf::load_a_frag<T>(qf[kk], qs + kk * 16, LD, lane);
      float s[ST][4];
      logits(s, qf);
      float mx[2] = {kNegInf, kNegInf};
#pragma unroll
      for (int st = 0; st < ST; ++st)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = st * 8 + 2 * t4 + (e & 1);
          const float x = s[st][e] * p.scale;
          float& ms = msum[msum_slot(st, e, lane)];  // = msum_index<T>(g + 8 (e / 2), col)
          ms = hd == warp ? x : ms + x;
          s[st][e] = k0 + col < p.nk ? x : kNegInf;
          mx[e >> 1] = fmaxf(mx[e >> 1], s[st][e]);
        }
      float m_old[2], l_old[2], m_new[2], sum[2] = {0.f, 0.f};
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        m_old[h2] = mrow[hd * BM + g + 8 * h2];
        l_old[h2] = lrow[hd * BM + g + 8 * h2];
        // The tile holds key k0 < Nk: m_new is finite.
        m_new[h2] = fmaxf(m_old[h2], group_max(mx[h2]));
      }
#pragma unroll
      for (int st = 0; st < ST; ++st)
#pragma unroll
        for (int e = 0; e < 4; ++e) sum[e >> 1] += __expf(s[st][e] - m_new[e >> 1]);  // e^-inf = 0
      float l_new[2];
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) l_new[h2] = l_old[h2] * __expf(m_old[h2] - m_new[h2]) + group_sum(sum[h2]);
      // The 4 lanes of each group have read m_old / l_old (the shuffles order no memory access).
      __syncwarp();
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2)
        if (t4 == 0) {
          mrow[hd * BM + g + 8 * h2] = m_new[h2];
          lrow[hd * BM + g + 8 * h2] = l_new[h2];
        }
    }
    __syncthreads();  // every warp's head sum of the tile is complete
    write_mask_logits<T, DP>(p, warps, buf, mask_logits, b, q0, k0);
  }
  __syncthreads();  // the head sums are read: pass 2 reuses their memory for v

  // Pass 2.
  for (int hd = warp; hd < p.heads; hd += W) {
    const int64_t bh = b * p.heads + hd;
    __syncwarp();  // the previous head's epilogue is done with q / k
    stage_tile<T, T, DP>(p, qs, LD, head_rows<T>(p.q, b, hd), q0, BM, p.nq, lane, 32);
    __syncwarp();
    uint32_t qf[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) sf::load_a_frag<T>(qf[kk], qs + kk * 16, LD, lane);
    const float m[2] = {mrow[hd * BM + g], mrow[hd * BM + g + 8]};
    float o[NT][4];
    sf::zero_acc<NT>(o);

    for (int k0 = kb; k0 < ke; k0 += BN) {
      __syncwarp();  // the previous tile's readers are done
      stage_tile<T, T, DP>(p, ks, LD, head_rows<T>(p.k, b, hd), k0, BN, p.nk, lane, 32);
      stage_tile<T, T, DP>(p, vs, LD, head_rows<T>(p.v, b, hd), k0, BN, p.nk, lane, 32);
      __syncwarp();
      float s[ST][4];
      logits(s, qf);
#pragma unroll
      for (int st = 0; st < ST; ++st)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h2 = e >> 1, i = q0 + g + 8 * h2, j = k0 + st * 8 + 2 * t4 + (e & 1);
          const float prob = j < p.nk ? __expf(s[st][e] * p.scale - m[h2]) : 0.f;
          s[st][e] = prob * dropout_factor(p, (static_cast<uint64_t>(bh) * p.nq + i) * p.nk + j);
        }
      sf::mma_ab<T, BN / 16, NT>(o, sf::AccA<T>{s}, vs, LD, lane);
    }

    // The accumulator rows go through the warp's (now free) k tile as fp32 so that store_row
    // writes each row with all 32 lanes: o [BM][DP] fp32 is 64 DP bytes, the k tile 64 (DP + 8).
    __syncwarp();
    float* ob = reinterpret_cast<float*>(ks);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) ob[(g + 8 * (e >> 1)) * DP + nt * 8 + 2 * t4 + (e & 1)] = o[nt][e];
    __syncwarp();
    for (int r = 0; r < BM && q0 + r < p.nq; ++r)
      store_row<T>(p, dst, bh, q0 + r, mrow[hd * BM + r], lrow[hd * BM + r], lane,
                   [&](int t) { return ob[r * DP + t]; });
  }
}

// Merges the splits of one (b, head, i) row per warp, in split order:
//   m = max_s lse_s;  w_s = e^(lse_s - m);  out = sum_s w_s o_s / sum_s w_s;  lse = m + log sum_s w_s.
template <typename T>
__global__ void __launch_bounds__(kThreads) atm_attention_combine_kernel(const float* __restrict__ part_o,
                                                                         const float* __restrict__ part_lse,
                                                                         int splits, int64_t rows, int d,
                                                                         T* __restrict__ out,
                                                                         float* __restrict__ lse) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warp leaves together
  float m = kNegInf;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, part_lse[s * rows + row]);
  float l = 0.f;
  for (int s = 0; s < splits; ++s) l += __expf(part_lse[s * rows + row] - m);
  const float inv = __frcp_rn(l);
  for (int t = lane; t < d; t += 32) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s)
      acc = fmaf(part_o[(s * rows + row) * d + t], __expf(part_lse[s * rows + row] - m), acc);
    out[row * d + t] = sf::from_float<T>(acc * inv);
  }
  if (lane == 0) lse[row] = m + logf(l);
}

}  // namespace sf_atm_attention
