// SegViT ATM cross-attention, forward and backward (SPEC.md section 3).
//
//   S_h = (q_h k_h^T) * scale;  out_h = dropout(softmax(S_h)) v_h;  M = sum_h S_h / h
//
// q: (B, h, Nq, d); k, v: (B, h, Nk, d); out (B, h, Nq, d); M (B, Nq, Nk) in q's
// dtype, taken before softmax and dropout (as the official code).
//
// Forward: a block owns a query tile (BM = 16 rows, 4 rows per warp) of one
// batch item for EVERY head, and walks the key tiles (BN = 32, one key per lane)
// in the outer loop and the heads in the inner loop.  So the head sum of the
// logits stays in registers and M is written once per tile, and the per-head
// online-softmax state (row max, row sum, output accumulator) lives in shared
// memory: a lane owns its output columns, a warp its rows.  (B, h, Nq, Nk) never
// exists in memory.  The fp32 row logsumexp of every head is saved.
// Backward (deterministic, no atomics), per head as flash attention:
//   delta_i = rowsum(dO_i * O_i);  dS = P * (f dP' - delta) + dM / h;
//   dK, dV: a block per key tile loops over query tiles; dQ: a block per
//   query tile loops over key tiles.
// Dropout: keep = philox(seed, ((b * h + head) * Nq + i) * Nk + j) >= p, the same
// hash as window_attention.cu, evaluated in forward and backward.

#include "sf_common.cuh"

#include <cstdint>

namespace sf_atm_attention {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;
constexpr int BM = kWarps * kRowsPerWarp;
constexpr int BN = 32;
constexpr float kNegInf = -__builtin_huge_valf();

struct Params {
  const void* q;
  const void* k;
  const void* v;
  int64_t batch;
  int heads, nq, nk, d;
  float scale, dropout_p;
  uint64_t seed;
};

SF_DEVICE_INLINE float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

SF_DEVICE_INLINE float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

SF_DEVICE_INLINE uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Philox-4x32-10 (first output word), as in window_attention.cu.
SF_DEVICE_INLINE uint32_t philox(uint64_t seed, uint64_t index) {
  uint32_t c0 = static_cast<uint32_t>(index), c1 = static_cast<uint32_t>(index >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = mulhi32(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = mulhi32(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

SF_DEVICE_INLINE float dropout_factor(const Params& p, uint64_t index) {
  if (p.dropout_p <= 0.f) return 1.f;
  const float u = static_cast<float>(philox(p.seed, index) >> 8) * (1.0f / 16777216.0f);
  return u >= p.dropout_p ? 1.f / (1.f - p.dropout_p) : 0.f;
}

template <typename T, int DP>
SF_DEVICE_INLINE void load_tile(float* dst, int ld, const T* src, int row0, int rows, int n, int d) {
  for (int e = threadIdx.x; e < rows * DP; e += kThreads) {
    const int r = e / DP, t = e % DP;
    const int row = row0 + r;
    dst[r * ld + t] = (row < n && t < d) ? sf::to_float(src[static_cast<int64_t>(row) * d + t]) : 0.f;
  }
}

template <int DP>
SF_DEVICE_INLINE float dot_row(const float* a, const float* b) {
  float s = 0.f;
#pragma unroll 8
  for (int t = 0; t < DP; ++t) s = fmaf(a[t], b[t], s);
  return s;
}

// ---------------------------------------------------------------- forward --
// Shared memory (floats): q [h][BM][DP], o [h][BM][DP], k/v [BN][DP + 1], m/l [h][BM].
template <int DP>
SF_HOST_DEVICE inline int64_t fwd_smem_floats(int heads) {
  return 2 * static_cast<int64_t>(heads) * BM * DP + 2 * BN * (DP + 1) + 2 * heads * BM;
}

// grid (ceil(Nq / BM), B).
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) atm_attention_fwd_kernel(Params p, T* __restrict__ out,
                                                                     T* __restrict__ mask_logits,
                                                                     float* __restrict__ lse) {
  SF_DYNAMIC_SHARED(float, smem);
  float* qs = smem;
  float* os = qs + p.heads * BM * DP;
  float* ks = os + p.heads * BM * DP;
  float* vs = ks + BN * (DP + 1);
  float* ms = vs + BN * (DP + 1);
  float* ls = ms + p.heads * BM;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int q0 = blockIdx.x * BM;
  const int64_t b = blockIdx.y;
  constexpr int C = DP / 32;
  for (int hd = 0; hd < p.heads; ++hd)
    load_tile<T, DP>(qs + hd * BM * DP, DP, static_cast<const T*>(p.q) + (b * p.heads + hd) * p.nq * p.d, q0, BM,
                     p.nq, p.d);
  for (int e = threadIdx.x; e < p.heads * BM * DP; e += kThreads) os[e] = 0.f;
  for (int e = threadIdx.x; e < p.heads * BM; e += kThreads) {
    ms[e] = kNegInf;
    ls[e] = 0.f;
  }

  for (int k0 = 0; k0 < p.nk; k0 += BN) {
    const int j = k0 + lane;
    float msum[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) msum[r] = 0.f;
    for (int hd = 0; hd < p.heads; ++hd) {
      const int64_t bh = b * p.heads + hd;
      __syncthreads();  // the previous tile's readers are done
      load_tile<T, DP>(ks, DP + 1, static_cast<const T*>(p.k) + bh * p.nk * p.d, k0, BN, p.nk, p.d);
      load_tile<T, DP>(vs, DP + 1, static_cast<const T*>(p.v) + bh * p.nk * p.d, k0, BN, p.nk, p.d);
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int row = warp * kRowsPerWarp + r, i = q0 + row;
        const bool valid = i < p.nq && j < p.nk;
        const float s = dot_row<DP>(qs + (hd * BM + row) * DP, ks + lane * (DP + 1)) * p.scale;
        msum[r] += s;
        const float x = valid ? s : kNegInf;
        float* mrow = ms + hd * BM + row;
        float* lrow = ls + hd * BM + row;
        const float m_old = *mrow, l_old = *lrow;
        const float m_new = fmaxf(m_old, warp_max(x));
        const float alpha = m_old == kNegInf ? 0.f : __expf(m_old - m_new);
        const float prob = x == kNegInf ? 0.f : __expf(x - m_new);
        const float l_new = l_old * alpha + warp_sum(prob);
        // Every lane read m_old/l_old before the shuffles above: lane 0 may overwrite.
        if (lane == 0) {
          *mrow = m_new;
          *lrow = l_new;
        }
        const float pd = prob * dropout_factor(p, (static_cast<uint64_t>(bh) * p.nq + i) * p.nk + j);
        float acc[C];
        float* orow = os + (hd * BM + row) * DP;
#pragma unroll
        for (int c = 0; c < C; ++c) acc[c] = orow[lane + 32 * c] * alpha;
        for (int jj = 0; jj < BN; ++jj) {
          const float pj = __shfl_sync(0xffffffffu, pd, jj);
#pragma unroll
          for (int c = 0; c < C; ++c) acc[c] = fmaf(pj, vs[jj * (DP + 1) + lane + 32 * c], acc[c]);
        }
#pragma unroll
        for (int c = 0; c < C; ++c) orow[lane + 32 * c] = acc[c];
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int i = q0 + warp * kRowsPerWarp + r;
      if (i < p.nq && j < p.nk)
        mask_logits[(b * p.nq + i) * p.nk + j] = sf::from_float<T>(msum[r] / static_cast<float>(p.heads));
    }
  }

  __syncthreads();  // last m/l writes by lane 0 of each warp
  for (int hd = 0; hd < p.heads; ++hd) {
    const int64_t bh = b * p.heads + hd;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r, i = q0 + row;
      if (i >= p.nq) continue;
      const float l = ls[hd * BM + row];
      const float inv = 1.f / l;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int t = lane + 32 * c;
        if (t < p.d) out[(bh * p.nq + i) * p.d + t] = sf::from_float<T>(os[(hd * BM + row) * DP + t] * inv);
      }
      if (lane == 0) lse[bh * p.nq + i] = ms[hd * BM + row] + logf(l);
    }
  }
}

// --------------------------------------------------------------- backward --
template <typename T>
__global__ void __launch_bounds__(kThreads) atm_attention_delta_kernel(const T* __restrict__ out,
                                                                       const T* __restrict__ dout,
                                                                       float* __restrict__ delta, int64_t rows, int d) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warp leaves together
  float s = 0.f;
  for (int t = lane; t < d; t += 32) s += sf::to_float(out[row * d + t]) * sf::to_float(dout[row * d + t]);
  s = warp_sum(s);
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
  g.ds = prob * (dp * f - delta_i) + sf::to_float(dmask[(b * p.nq + i) * p.nk + j]) / static_cast<float>(p.heads);
  return g;
}

template <int DP>
SF_HOST_DEVICE constexpr int dkv_smem_floats() {
  return 2 * BN * (DP + 1) + 2 * BM * DP + 2 * BM * (BN + 1) + 2 * BM;
}

// grid (B * h, ceil(Nk / BN)).
template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) atm_attention_dkv_kernel(Params p, const T* __restrict__ dout,
                                                                     const T* __restrict__ dmask,
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
  const int64_t bh = blockIdx.x, b = bh / p.heads;
  const int k0 = blockIdx.y * BN;
  const int64_t qbase = bh * p.nq * p.d, kbase = bh * p.nk * p.d;
  load_tile<T, DP>(ks, DP + 1, static_cast<const T*>(p.k) + kbase, k0, BN, p.nk, p.d);
  load_tile<T, DP>(vs, DP + 1, static_cast<const T*>(p.v) + kbase, k0, BN, p.nk, p.d);

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
    load_tile<T, DP>(qs, DP, static_cast<const T*>(p.q) + qbase, q0, BM, p.nq, p.d);
    load_tile<T, DP>(dos, DP, dout + qbase, q0, BM, p.nq, p.d);
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
__global__ void __launch_bounds__(kThreads) atm_attention_dq_kernel(Params p, const T* __restrict__ dout,
                                                                    const T* __restrict__ dmask,
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
  const int64_t bh = blockIdx.x, b = bh / p.heads;
  const int q0 = blockIdx.y * BM;
  const int64_t qbase = bh * p.nq * p.d, kbase = bh * p.nk * p.d;
  load_tile<T, DP>(qs, DP, static_cast<const T*>(p.q) + qbase, q0, BM, p.nq, p.d);
  load_tile<T, DP>(dos, DP, dout + qbase, q0, BM, p.nq, p.d);
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
    load_tile<T, DP>(ks, DP + 1, static_cast<const T*>(p.k) + kbase, k0, BN, p.nk, p.d);
    load_tile<T, DP>(vs, DP + 1, static_cast<const T*>(p.v) + kbase, k0, BN, p.nk, p.d);
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

// ---------------------------------------------------------------- launchers --
inline unsigned cdiv(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

template <typename T, int DP>
void forward(const Params& p, T* out, T* mask_logits, float* lse, cudaStream_t stream) {
  const size_t smem = sizeof(float) * fwd_smem_floats<DP>(p.heads);
  auto kernel = atm_attention_fwd_kernel<T, DP>;
  SF_ALLOW_DYNAMIC_SMEM(kernel, smem);
  SF_LAUNCH(kernel, dim3(cdiv(p.nq, BM), static_cast<unsigned>(p.batch)), dim3(kThreads), smem, stream, p, out,
            mask_logits, lse);
  SF_CHECK_LAUNCH();
}

template <typename T, int DP>
void backward(const Params& p, const T* out, const T* dout, const T* dmask, const float* lse, float* delta, T* dq,
              T* dk, T* dv, cudaStream_t stream) {
  const int64_t rows = p.batch * p.heads * p.nq;
  SF_LAUNCH(atm_attention_delta_kernel<T>, dim3(cdiv(rows, kWarps)), dim3(kThreads), 0, stream, out, dout, delta,
            rows, p.d);
  const size_t smem_kv = sizeof(float) * dkv_smem_floats<DP>();
  auto kv = atm_attention_dkv_kernel<T, DP>;
  SF_ALLOW_DYNAMIC_SMEM(kv, smem_kv);
  SF_LAUNCH(kv, dim3(static_cast<unsigned>(p.batch * p.heads), cdiv(p.nk, BN)), dim3(kThreads), smem_kv, stream, p,
            dout, dmask, lse, delta, dk, dv);
  const size_t smem_q = sizeof(float) * dq_smem_floats<DP>();
  auto qk = atm_attention_dq_kernel<T, DP>;
  SF_ALLOW_DYNAMIC_SMEM(qk, smem_q);
  SF_LAUNCH(qk, dim3(static_cast<unsigned>(p.batch * p.heads), cdiv(p.nq, BM)), dim3(kThreads), smem_q, stream, p,
            dout, dmask, lse, delta, dq);
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
void dispatch(const at::Tensor& q, F&& f) {
  const int64_t d = q.size(3);
  SF_DISPATCH_FLOAT(q.scalar_type(), "atm_attention", [&] {
    if (d <= 32) f(scalar_t{}, std::integral_constant<int, 32>{});
    else if (d <= 64) f(scalar_t{}, std::integral_constant<int, 64>{});
    else f(scalar_t{}, std::integral_constant<int, 128>{});
  });
}

Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, double dropout_p,
                   int64_t seed) {
  SF_CHECK_INPUT(q, 4);
  SF_CHECK_INPUT(k, 4);
  SF_CHECK_INPUT(v, 4);
  SF_CHECK_FLOAT(q);
  SF_CHECK_SAME_DTYPE(k, q);
  SF_CHECK_SAME_DTYPE(v, q);
  TORCH_CHECK(v.sizes() == k.sizes(), "atm_attention: v must have k's shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "atm_attention: k must be (B, h, Nk, d) matching q");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= 128, "atm_attention: head_dim must be in 1..128, got ", q.size(3));
  Params p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.batch = q.size(0);
  p.heads = static_cast<int>(q.size(1));
  p.nq = static_cast<int>(q.size(2));
  p.nk = static_cast<int>(k.size(2));
  p.d = static_cast<int>(q.size(3));
  p.scale = static_cast<float>(scale);
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_op(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale, double dropout_p,
                                                          int64_t seed) {
  const Params p = make_params(q, k, v, scale, dropout_p, seed);
  SF_DEVICE_GUARD(q);
  at::Tensor out = at::empty_like(q);
  at::Tensor mask_logits = at::empty({q.size(0), q.size(2), k.size(2)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  dispatch(q, [&](auto tag, auto dp) {
    using T = decltype(tag);
    forward<T, decltype(dp)::value>(p, sf::data_ptr<T>(out), sf::data_ptr<T>(mask_logits), lse.data_ptr<float>(),
                                    sf::current_stream());
  });
  return {out, mask_logits, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor& dout, const at::Tensor& dmask,
                                                           const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& out,
                                                           const at::Tensor& lse, double scale, double dropout_p,
                                                           int64_t seed) {
  const Params p = make_params(q, k, v, scale, dropout_p, seed);
  SF_DEVICE_GUARD(q);
  SF_CHECK_INPUT(dout, 4);
  SF_CHECK_INPUT(dmask, 3);
  SF_CHECK_INPUT(out, 4);
  SF_CHECK_INPUT(lse, 3);
  SF_CHECK_SAME_DTYPE(dout, q);
  SF_CHECK_SAME_DTYPE(dmask, q);
  SF_CHECK_DTYPE(lse, at::kFloat);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "atm_attention: dout/out must match q");
  TORCH_CHECK(dmask.size(0) == q.size(0) && dmask.size(1) == q.size(2) && dmask.size(2) == k.size(2),
              "atm_attention: dmask must be (B, Nq, Nk)");
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor delta = at::empty_like(lse);
  dispatch(q, [&](auto tag, auto dp) {
    using T = decltype(tag);
    backward<T, decltype(dp)::value>(p, sf::data_ptr<T>(out), sf::data_ptr<T>(dout), sf::data_ptr<T>(dmask),
                                     lse.data_ptr<float>(), delta.data_ptr<float>(), sf::data_ptr<T>(dq),
                                     sf::data_ptr<T>(dk), sf::data_ptr<T>(dv), sf::current_stream());
  });
  return {dq, dk, dv};
}

}  // namespace sf_atm_attention

SF_TORCH_LIBRARY_FRAGMENT(m) {
  m.def("atm_attention_forward(Tensor q, Tensor k, Tensor v, float scale, float dropout_p, int seed) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("atm_attention_backward(Tensor dout, Tensor dmask_logits, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, float scale, float dropout_p, int seed) -> (Tensor, Tensor, Tensor)");
}

SF_TORCH_LIBRARY_IMPL(m) {
  m.impl("atm_attention_forward", &sf_atm_attention::forward_op);
  m.impl("atm_attention_backward", &sf_atm_attention::backward_op);
}
