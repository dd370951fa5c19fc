// SegViT ATM cross-attention, forward and backward (SPEC.md section 3).
//
//   S_h = (q_h k_h^T) * scale;  out_h = dropout(softmax(S_h)) v_h;  M = sum_h S_h / h
//
// q: (B, h, Nq, d); k, v: (B, h, Nk, d); out (B, h, Nq, d); M (B, Nq, Nk) in q's
// dtype, taken before softmax and dropout (as the official code).  q, k, v (and the
// gradients dO, dM) are read in place with any batch / head / row strides (64-bit offsets),
// the last dim contiguous; out, M and the gradients dq, dk, dv are written contiguous.
//
// Forward: block (query tile of BM = 16 rows, key range, batch item) handles EVERY head of
// that tile and range in two passes over the range (as the Triton kernel): pass 1, key tiles
// outer / heads inner, completes the head sum M of each key tile's logits (exact, written
// once) and every head's row max / sum of exponentials; pass 2, heads outer / key tiles inner,
// accumulates P v with the final statistics (no rescaling).  S is computed twice, k read twice
// in the block.  With one key range (the whole of Nk) the block writes out and the row
// logsumexp, no workspace; with several it writes per-head fp32 partials (output normalised
// over the range, range logsumexp) and a combine kernel merges the ranges in order
// (deterministic).  The range count comes from the caller (semask_fast/backends/cuda/
// atm_attention.py: plan_splits, a roofline model).
// fp16 / bf16 products (forward: S = q k^T, P v; backward: S, dP = dO v^T, P^T dO, dS^T q,
// dS k) run on tensor cores (sf_mma.cuh, fp32 accumulation); fp32 stays on FFMA.
// (B, h, Nq, Nk) never exists in memory.
// Backward (deterministic, no atomics), per head as flash attention:
//   delta_i = rowsum(dO_i * O_i);  dS = P * (f dP' - delta) + dM / h;
//   dK, dV: a block per key tile loops over query tiles; dQ: a block per
//   query tile loops over key tiles.
// Dropout: sf_dropout.cuh with element index ((b * h + head) * Nq + i) * Nk + j, evaluated in
// forward and backward.

#include "sf_common.cuh"
#include "sf_dropout.cuh"
#include "sf_reduce.cuh"
#include "sf_tile.cuh"
#include "sf_warp_gemm.cuh"

#include <cstdint>
#include <type_traits>

namespace sf_atm_attention {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;
constexpr int BM = kWarps * kRowsPerWarp;
constexpr int BN = 32;
// Minimum resident blocks given to __launch_bounds__ where ptxas, left to its own occupancy
// target, keeps the registers at 64-80 and spills (measured on sm_80/sm_90): the fp32 dq
// kernel gets up to 128 registers (at head_dim 128 its shared memory allows 3 blocks per SM
// on sm_80, 4 on sm_90); the forward kernels ask for 1 (the fp32 one's shared memory, not its
// registers, bounds its occupancy; the tensor-core one at head_dim 64 spilled on sm_90 at the
// 128 registers ptxas chose otherwise).
constexpr int kDqMinBlocks = 4;
constexpr float kNegInf = -__builtin_huge_valf();

// A (B, h, n, d) input read in place: batch, head and row strides in elements, the last dim
// contiguous (e.g. q, k, v as permuted views of one fused projection: no copy on the host).
struct Rows {
  const void* data;
  int64_t b, h, r;
};

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

template <int DP>
SF_DEVICE_INLINE float dot_row(const float* a, const float* b) {
  float s = 0.f;
#pragma unroll 8
  for (int t = 0; t < DP; ++t) s = fmaf(a[t], b[t], s);
  return s;
}

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
      const int64_t bh = b * p.heads + hd;
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
        for (int jj = 0; jj < BN; ++jj) {
          const float pj = __shfl_sync(0xffffffffu, pd, jj);
#pragma unroll
          for (int c = 0; c < C; ++c) acc[c] = fmaf(pj, vs[jj * (DP + 1) + lane + 32 * c], acc[c]);
        }
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
      const int64_t bh = b * p.heads + hd;
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
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[nt][e] = 0.f;

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

// --------------------------------------------------------------- backward --
// delta for every dtype; the dK/dV and dQ kernels of this section are the fp32 (FFMA) path.
// A warp per row (b, head, i) of B * h * Nq: out is contiguous, dO read in place.
template <typename T>
__global__ void __launch_bounds__(kThreads) atm_attention_delta_kernel(Params p, const T* __restrict__ out,
                                                                       float* __restrict__ delta) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.batch * p.heads * p.nq) return;  // whole warp leaves together
  const int64_t bh = row / p.nq, b = bh / p.heads;
  const HeadRows<T> dout = head_rows<T>(p.dout, b, bh - b * p.heads);
  const float s = sf::warp_dot(out + row * p.d, dout.data + (row - bh * p.nq) * dout.rs, p.d, lane);
  if (lane == 0) delta[row] = s;
}

struct Grads {
  float pd, ds;
};

// P, its dropped value and dS for row `row` of the staged query tile, key j.
template <typename T, int DP>
SF_DEVICE_INLINE Grads recompute(const Params& p, const float* qs, const float* dos, const float* ks, const float* vs,
                                 const T* dmask, int64_t b, int64_t bh, int row, int i, int j, float lse_i,
                                 float delta_i) {
  Grads g{0.f, 0.f};
  if (i >= p.nq || j >= p.nk) return g;
  const int lane = j % BN;
  const float s = dot_row<DP>(qs + row * DP, ks + lane * (DP + 1)) * p.scale;
  const float prob = __expf(s - lse_i);
  const float f = dropout_factor(p, (static_cast<uint64_t>(bh) * p.nq + i) * p.nk + j);
  const float dp = dot_row<DP>(dos + row * DP, vs + lane * (DP + 1));
  g.pd = prob * f;
  g.ds = prob * (dp * f - delta_i) + dmask_at(p, dmask, b, i, j) * p.inv_heads;
  return g;
}

template <int DP>
SF_HOST_DEVICE constexpr int dkv_smem_floats() {
  return 2 * BN * (DP + 1) + 2 * BM * DP + 2 * BM * (BN + 1) + 2 * BM;
}

// grid (B * h, ceil(Nk / BN)).
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) atm_attention_dkv_kernel(Params p, const T* __restrict__ dmask,
                                                                     const float* __restrict__ lse,
                                                                     const float* __restrict__ delta,
                                                                     T* __restrict__ dk, T* __restrict__ dv) {
  SF_DYNAMIC_SHARED(float, smem);
  float* ks = smem;
  float* vs = ks + BN * (DP + 1);
  float* qs = vs + BN * (DP + 1);
  float* dos = qs + BM * DP;
  float* ps = dos + BM * DP;
  float* dss = ps + BM * (BN + 1);
  float* lses = dss + BM * (BN + 1);
  float* deltas = lses + BM;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x, b = blockIdx.x / static_cast<unsigned>(p.heads);  // 32-bit division
  const int64_t hd = bh - b * p.heads;
  const int k0 = blockIdx.y * BN;
  const int64_t kbase = bh * p.nk * p.d;  // dk, dv: contiguous
  load_tile<float, T, DP>(p, ks, DP + 1, head_rows<T>(p.k, b, hd), k0, BN, p.nk);
  load_tile<float, T, DP>(p, vs, DP + 1, head_rows<T>(p.v, b, hd), k0, BN, p.nk);

  constexpr int C = DP / 32;
  constexpr int KPW = BN / kWarps;
  float dka[KPW][C], dva[KPW][C];
#pragma unroll
  for (int a = 0; a < KPW; ++a)
#pragma unroll
    for (int c = 0; c < C; ++c) dka[a][c] = dva[a][c] = 0.f;

  const int j = k0 + lane;
  for (int q0 = 0; q0 < p.nq; q0 += BM) {
    __syncthreads();
    load_tile<float, T, DP>(p, qs, DP, head_rows<T>(p.q, b, hd), q0, BM, p.nq);
    load_tile<float, T, DP>(p, dos, DP, head_rows<T>(p.dout, b, hd), q0, BM, p.nq);
    for (int e = threadIdx.x; e < BM; e += kThreads) {
      const bool ok = q0 + e < p.nq;
      lses[e] = ok ? lse[bh * p.nq + q0 + e] : 0.f;
      deltas[e] = ok ? delta[bh * p.nq + q0 + e] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r;
      const Grads g = recompute<T, DP>(p, qs, dos, ks, vs, dmask, b, bh, row, q0 + row, j, lses[row], deltas[row]);
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
    if (key >= p.nk) continue;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int t = lane + 32 * c;
      if (t >= p.d) continue;
      const int64_t at = kbase + static_cast<int64_t>(key) * p.d + t;
      dk[at] = sf::from_float<T>(dka[a][c] * p.scale);
      dv[at] = sf::from_float<T>(dva[a][c]);
    }
  }
}

template <int DP>
SF_HOST_DEVICE constexpr int dq_smem_floats() {
  return 2 * BN * (DP + 1) + 2 * BM * DP + 2 * BM;
}

// grid (B * h, ceil(Nq / BM)).
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads, kDqMinBlocks) atm_attention_dq_kernel(Params p, const T* __restrict__ dmask,
                                                                    const float* __restrict__ lse,
                                                                    const float* __restrict__ delta,
                                                                    T* __restrict__ dq) {
  SF_DYNAMIC_SHARED(float, smem);
  float* ks = smem;
  float* vs = ks + BN * (DP + 1);
  float* qs = vs + BN * (DP + 1);
  float* dos = qs + BM * DP;
  float* lses = dos + BM * DP;
  float* deltas = lses + BM;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x, b = blockIdx.x / static_cast<unsigned>(p.heads);  // 32-bit division
  const int64_t hd = bh - b * p.heads;
  const int q0 = blockIdx.y * BM;
  const int64_t qbase = bh * p.nq * p.d;  // dq: contiguous
  load_tile<float, T, DP>(p, qs, DP, head_rows<T>(p.q, b, hd), q0, BM, p.nq);
  load_tile<float, T, DP>(p, dos, DP, head_rows<T>(p.dout, b, hd), q0, BM, p.nq);
  for (int e = threadIdx.x; e < BM; e += kThreads) {
    const bool ok = q0 + e < p.nq;
    lses[e] = ok ? lse[bh * p.nq + q0 + e] : 0.f;
    deltas[e] = ok ? delta[bh * p.nq + q0 + e] : 0.f;
  }
  constexpr int C = DP / 32;
  float acc[kRowsPerWarp][C];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) acc[r][c] = 0.f;

  for (int k0 = 0; k0 < p.nk; k0 += BN) {
    __syncthreads();
    load_tile<float, T, DP>(p, ks, DP + 1, head_rows<T>(p.k, b, hd), k0, BN, p.nk);
    load_tile<float, T, DP>(p, vs, DP + 1, head_rows<T>(p.v, b, hd), k0, BN, p.nk);
    __syncthreads();
    const int j = k0 + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r;
      const Grads g = recompute<T, DP>(p, qs, dos, ks, vs, dmask, b, bh, row, q0 + row, j, lses[row], deltas[row]);
      for (int jj = 0; jj < BN; ++jj) {
        const float sj = __shfl_sync(0xffffffffu, g.ds, jj);
#pragma unroll
        for (int c = 0; c < C; ++c) acc[r][c] = fmaf(sj, ks[jj * (DP + 1) + lane + 32 * c], acc[r][c]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = q0 + warp * kRowsPerWarp + r;
    if (i >= p.nq) continue;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int t = lane + 32 * c;
      if (t < p.d) dq[qbase + static_cast<int64_t>(i) * p.d + t] = sf::from_float<T>(acc[r][c] * p.scale);
    }
  }
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
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dka[nt][e] = dva[nt][e] = 0.f;

  for (int q0 = 0; q0 < p.nq; q0 += MBN) {
    __syncthreads();  // the previous tile's readers are done
    load_tile<T, T, DP>(p, qs, LD, head_rows<T>(p.q, b, hd), q0, MBN, p.nq);
    load_tile<T, T, DP>(p, dos, LD, head_rows<T>(p.dout, b, hd), q0, MBN, p.nq);
    for (int e = threadIdx.x; e < MBN; e += kThreads) {
      const bool ok = q0 + e < p.nq;
      lses[e] = ok ? lse[bh * p.nq + q0 + e] : 0.f;
      deltas[e] = ok ? delta[bh * p.nq + q0 + e] : 0.f;
    }
    __syncthreads();
    float pt[ST][4], dst[ST][4];  // S^T, then P^T (dropped); dP^T, then dS^T
    sf::zero_acc<ST>(pt);
    sf::zero_acc<ST>(dst);
    sf::mma_abt2<T, ST, KS>(pt, sf::RowsA<T>{ks + warp * 16 * LD, LD}, qs, dst, sf::RowsA<T>{vs + warp * 16 * LD, LD},
                            dos, LD, lane);
#pragma unroll
    for (int t = 0; t < ST; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = keys[e >> 1], col = t * 8 + 2 * t4 + (e & 1), i = q0 + col;
        float pd = 0.f, ds = 0.f;
        if (i < p.nq && j < p.nk) {
          const float prob = __expf(pt[t][e] * p.scale - lses[col]);
          const float f = dropout_factor(p, (static_cast<uint64_t>(bh) * p.nq + i) * p.nk + j);
          pd = prob * f;
          ds = prob * (dst[t][e] * f - deltas[col]) + dmask_at(p, dmask, b, i, j) * p.inv_heads;
        }
        pt[t][e] = pd;
        dst[t][e] = ds;
      }
    sf::mma_ab2<T, MBN / 16, NT>(dva, sf::AccA<T>{pt}, dos, dka, sf::AccA<T>{dst}, qs, LD, lane);
  }
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    const int j = keys[h2];
    if (j >= p.nk) continue;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int t = nt * 8 + 2 * t4 + c;
        if (t >= p.d) continue;
        const int64_t at = kbase + static_cast<int64_t>(j) * p.d + t;
        dk[at] = sf::from_float<T>(dka[nt][2 * h2 + c] * p.scale);
        dv[at] = sf::from_float<T>(dva[nt][2 * h2 + c]);
      }
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
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;

  for (int k0 = warp * MBN; k0 < p.nk; k0 += kWarps * MBN) {
    __syncwarp();  // the previous tile's readers are done
    stage_tile<T, T, DP>(p, ks, LD, head_rows<T>(p.k, b, hd), k0, MBN, p.nk, lane, 32);
    stage_tile<T, T, DP>(p, vs, LD, head_rows<T>(p.v, b, hd), k0, MBN, p.nk, lane, 32);
    __syncwarp();
    float s[ST][4], dp[ST][4];
    sf::zero_acc<ST>(s);
    sf::zero_acc<ST>(dp);
    sf::mma_abt2<T, ST, KS>(s, sf::FragsA{qf}, ks, dp, sf::FragsA{df}, vs, LD, lane);
#pragma unroll
    for (int t = 0; t < ST; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h2 = e >> 1, i = rows[h2], j = k0 + t * 8 + 2 * t4 + (e & 1);
        float ds = 0.f;
        if (i < p.nq && j < p.nk) {
          const float prob = __expf(s[t][e] * p.scale - lse_r[h2]);
          const float f = dropout_factor(p, (static_cast<uint64_t>(bh) * p.nq + i) * p.nk + j);
          ds = prob * (dp[t][e] * f - delta_r[h2]) + dmask_at(p, dmask, b, i, j) * p.inv_heads;
        }
        s[t][e] = ds;
      }
    sf::mma_ab<T, MBN / 16, NT>(acc, sf::AccA<T>{s}, ks, LD, lane);
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

// ---------------------------------------------------------------- launchers --
using sf::ceil_div;

template <typename T, int DP>
void forward(const Params& p, const FwdDest<T>& dst, T* mask_logits, cudaStream_t stream) {
  SF_CHECK(p.batch <= 65535 && p.splits <= 65535, "atm_attention: batch and split count must be at most 65535");
  const size_t smem = fwd_smem_bytes<T, DP>(p.heads);
  const dim3 grid(ceil_div(p.nq, BM), static_cast<unsigned>(p.splits), static_cast<unsigned>(p.batch));
  if constexpr (std::is_same_v<T, float>) {
    auto kernel = atm_attention_fwd_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
    SF_LAUNCH(kernel, grid, dim3(fwd_warps<T, DP>() * 32), smem, stream, p, dst, mask_logits);
  } else {
    auto kernel = atm_attention_fwd_mma_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
    SF_LAUNCH(kernel, grid, dim3(fwd_warps<T, DP>() * 32), smem, stream, p, dst, mask_logits);
  }
  if (p.splits > 1) {
    const int64_t rows = p.batch * p.heads * p.nq;
    SF_LAUNCH(atm_attention_combine_kernel<T>, dim3(ceil_div(rows, kWarps)), dim3(kThreads), 0, stream, dst.part_o,
              dst.part_lse, p.splits, rows, p.d, dst.out, dst.lse);
  }
  SF_CHECK_LAUNCH();
}

template <typename T, int DP>
// dq, or dk with dv, may be null: not wanted (autograd's needs_input_grad), its kernel not launched.
void backward(const Params& p, const T* out, const T* dmask, const float* lse, float* delta, T* dq, T* dk, T* dv,
              cudaStream_t stream) {
  const int64_t rows = p.batch * p.heads * p.nq;
  SF_LAUNCH(atm_attention_delta_kernel<T>, dim3(ceil_div(rows, kWarps)), dim3(kThreads), 0, stream, p, out, delta);
  const unsigned bh = static_cast<unsigned>(p.batch * p.heads);
  if constexpr (std::is_same_v<T, float>) {
    const size_t smem_kv = sizeof(float) * dkv_smem_floats<DP>();
    auto kv = atm_attention_dkv_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(kv, smem_kv);
    if (dk)
      SF_LAUNCH(kv, dim3(bh, ceil_div(p.nk, BN)), dim3(kThreads), smem_kv, stream, p, dmask, lse, delta, dk, dv);
    const size_t smem_q = sizeof(float) * dq_smem_floats<DP>();
    auto qk = atm_attention_dq_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(qk, smem_q);
    if (dq) SF_LAUNCH(qk, dim3(bh, ceil_div(p.nq, BM)), dim3(kThreads), smem_q, stream, p, dmask, lse, delta, dq);
  } else {
    const size_t smem_kv = dkv_mma_smem_bytes<DP>();
    auto kv = atm_attention_dkv_mma_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(kv, smem_kv);
    if (dk)
      SF_LAUNCH(kv, dim3(bh, ceil_div(p.nk, MBM)), dim3(kThreads), smem_kv, stream, p, dmask, lse, delta, dk, dv);
    const size_t smem_q = dq_mma_smem_bytes<DP>();
    auto qk = atm_attention_dq_mma_kernel<T, DP>;
    SF_ALLOW_DYNAMIC_SMEM(qk, smem_q);
    if (dq) SF_LAUNCH(qk, dim3(bh, ceil_div(p.nq, BM)), dim3(kThreads), smem_q, stream, p, dmask, lse, delta, dq);
  }
  SF_CHECK_LAUNCH();
}

}  // namespace sf_atm_attention

// ----------------------------------------------------------------- bindings --
#include "sf_torch.h"

#include <ATen/ops/empty_like.h>

#include <tuple>
#include <type_traits>

namespace sf_atm_attention {

template <typename F>
void dispatch(at::ScalarType dtype, int64_t d, F&& f) {
  SF_DISPATCH_FLOAT(dtype, "atm_attention", [&] {
    if (d <= 32) f(scalar_t{}, std::integral_constant<int, 32>{});
    else if (d <= 64) f(scalar_t{}, std::integral_constant<int, 64>{});
    else f(scalar_t{}, std::integral_constant<int, 128>{});
  });
}

// [bytes of shared memory a forward block needs for the dtype, head_dim and heads (every head's
// row statistics, the warps' tiles), bytes CUDA device `device` gives a block]: the one owner of
// this limit (Python falls back with the reason where the need exceeds the device's).
std::vector<int64_t> shared_memory(at::ScalarType dtype, int64_t head_dim, int64_t heads, int64_t device) {
  TORCH_CHECK(head_dim >= 1 && head_dim <= 128 && heads >= 1, "atm_attention: head_dim must be in 1..128 and heads "
              ">= 1, got ", head_dim, " and ", heads);
  int64_t need = 0;
  dispatch(dtype, head_dim,
           [&](auto tag, auto dp) { need = fwd_smem_bytes<decltype(tag), decltype(dp)::value>(heads); });
  return {need, sf::shared_memory_per_block(device)};
}

// Inputs are read in place with any strides but the last (q, k, v, dO: (B, h, n, d); dM: (B, Nq,
// Nk)), e.g. permuted views of one fused projection; the host copies only a non-unit last stride.
#define SF_CHECK_ROWS(t, n)                                                                                        \
  SF_CHECK_DEVICE(t);                                                                                              \
  SF_CHECK_DIM(t, n);                                                                                              \
  TORCH_CHECK((t).size((n) - 1) == 1 || (t).stride((n) - 1) == 1, "atm_attention: " #t " must have a contiguous " \
              "last dim (other strides are free), got strides ", (t).strides())

inline Rows rows_of(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// stage_tile's 16-byte chunks need whole chunks per row and 16-byte aligned rows: the base and
// every stride of a dim with more than one index a 16-byte multiple (a view with a storage
// offset, or a slice of odd width, may not be).
inline bool chunk_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t dim = 0; dim + 1 < t.dim(); ++dim)
    if (t.size(dim) > 1 && (t.stride(dim) * t.element_size()) % 16 != 0) return false;
  return true;
}

Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, double dropout_p,
                   const at::Tensor& seed) {
  SF_CHECK_ROWS(q, 4);
  SF_CHECK_ROWS(k, 4);
  SF_CHECK_ROWS(v, 4);
  SF_CHECK_FLOAT(q);
  SF_CHECK_SAME_DTYPE(k, q);
  SF_CHECK_SAME_DTYPE(v, q);
  TORCH_CHECK(v.sizes() == k.sizes(), "atm_attention: v must have k's shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "atm_attention: k must be (B, h, Nk, d) matching q");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= 128, "atm_attention: head_dim must be in 1..128, got ", q.size(3));
  Params p{};
  p.q = rows_of(q);
  p.k = rows_of(k);
  p.v = rows_of(v);
  p.batch = q.size(0);
  p.heads = static_cast<int>(q.size(1));
  p.nq = static_cast<int>(q.size(2));
  p.nk = static_cast<int>(k.size(2));
  p.d = static_cast<int>(q.size(3));
  p.scale = static_cast<float>(scale);
  p.dropout_p = static_cast<float>(dropout_p);
  p.keep_scale = p.dropout_p < 1.f ? 1.f / (1.f - p.dropout_p) : 0.f;
  p.inv_heads = 1.f / static_cast<float>(p.heads);
  p.seed = sf::seed_ptr(seed, q);
  p.vec = (q.size(3) * q.element_size()) % 16 == 0 && chunk_aligned(q) && chunk_aligned(k) && chunk_aligned(v);
  return p;
}

// `splits` key ranges of ceil(tiles / splits) key tiles each; the caller picks a count that
// leaves no range empty (semask_fast/backends/cuda/atm_attention.py: plan_splits).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_op(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale, double dropout_p,
                                                          const at::Tensor& seed, int64_t splits) {
  Params p = make_params(q, k, v, scale, dropout_p, seed);
  const int64_t tiles = sf::ceil_div(p.nk, BN);
  TORCH_CHECK(splits >= 1 && splits <= tiles, "atm_attention: splits must be in 1..", tiles, ", got ", splits);
  const int64_t per_split = sf::ceil_div(tiles, splits);
  TORCH_CHECK(sf::ceil_div(tiles, per_split) == splits, "atm_attention: ", splits, " splits of ", tiles,
              " key tiles leave a split empty");
  p.splits = static_cast<int>(splits);
  p.split_keys = static_cast<int>(per_split * BN);
  SF_DEVICE_GUARD(q);
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous whatever q's strides
  at::Tensor mask_logits = at::empty({q.size(0), q.size(2), k.size(2)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  at::Tensor part_o, part_lse;
  if (splits > 1) {
    const int64_t rows = q.size(0) * q.size(1) * q.size(2);
    part_o = at::empty({splits, rows, q.size(3)}, lse.options());
    part_lse = at::empty({splits, rows}, lse.options());
  }
  dispatch(q.scalar_type(), q.size(3), [&](auto tag, auto dp) {
    using T = decltype(tag);
    const FwdDest<T> dst{sf::data_ptr<T>(out), lse.data_ptr<float>(),
                         splits > 1 ? part_o.data_ptr<float>() : nullptr,
                         splits > 1 ? part_lse.data_ptr<float>() : nullptr};
    forward<T, decltype(dp)::value>(p, dst, sf::data_ptr<T>(mask_logits), sf::current_stream());
  });
  return {out, mask_logits, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor& dout, const at::Tensor& dmask,
                                                           const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& out,
                                                           const at::Tensor& lse, double scale, double dropout_p,
                                                           const at::Tensor& seed, bool need_dq, bool need_dkv) {
  Params p = make_params(q, k, v, scale, dropout_p, seed);
  SF_DEVICE_GUARD(q);
  SF_CHECK_ROWS(dout, 4);
  SF_CHECK_ROWS(dmask, 3);
  SF_CHECK_INPUT(out, 4);
  SF_CHECK_INPUT(lse, 3);
  SF_CHECK_SAME_DTYPE(dout, q);
  SF_CHECK_SAME_DTYPE(dmask, q);
  SF_CHECK_DTYPE(lse, at::kFloat);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "atm_attention: dout/out must match q");
  TORCH_CHECK(dmask.size(0) == q.size(0) && dmask.size(1) == q.size(2) && dmask.size(2) == k.size(2),
              "atm_attention: dmask must be (B, Nq, Nk)");
  p.dout = rows_of(dout);
  p.dmask_b = dmask.stride(0);
  p.dmask_r = dmask.stride(1);
  p.vec = p.vec && chunk_aligned(dout);
  // Contiguous gradients whatever the inputs' strides.
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor delta = at::empty_like(lse);
  dispatch(q.scalar_type(), q.size(3), [&](auto tag, auto dp) {
    using T = decltype(tag);
    // Gradients autograd does not need are returned unwritten (the caller drops them).
    backward<T, decltype(dp)::value>(p, sf::data_ptr<T>(out), sf::data_ptr<T>(dmask), lse.data_ptr<float>(),
                                     delta.data_ptr<float>(), need_dq ? sf::data_ptr<T>(dq) : nullptr,
                                     need_dkv ? sf::data_ptr<T>(dk) : nullptr, need_dkv ? sf::data_ptr<T>(dv) : nullptr,
                                     sf::current_stream());
  });
  return {dq, dk, dv};
}

}  // namespace sf_atm_attention

SF_TORCH_LIBRARY_FRAGMENT(m) {
  m.def("atm_attention_forward(Tensor q, Tensor k, Tensor v, float scale, float dropout_p, Tensor seed, int splits) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("atm_attention_backward(Tensor dout, Tensor dmask_logits, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, float scale, float dropout_p, Tensor seed, bool need_dq, bool need_dkv) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("atm_attention_shared_memory(ScalarType dtype, int head_dim, int heads, int device) -> int[]",
        &sf_atm_attention::shared_memory);
}

SF_TORCH_LIBRARY_IMPL(m) {
  m.impl("atm_attention_forward", &sf_atm_attention::forward_op);
  m.impl("atm_attention_backward", &sf_atm_attention::backward_op);
}
