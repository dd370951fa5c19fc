// SegViT ATM cross-attention on the CPU, forward and backward (SPEC.md section 3).
//
//   S_h = (q_h k_h^T) * scale;  out_h = dropout(softmax(S_h)) v_h;  M = sum_h S_h / h
//
// q (B, h, Nq, d); k, v (B, h, Nk, d), contiguous, float or double (the Python side converts
// fp16 / bf16 to fp32 and pads d to a multiple of 16 with zeros).  out (B, h, Nq, d) and M
// (B, Nq, Nk); M is taken before softmax and dropout.  No (B, h, Nq, Nk) tensor exists.
//
// Forward: a task per (batch item, block of class tokens: all of them unless threads would idle),
// every head inside.  Scores are computed transposed, S_h^T = k_h (scale q_h)^T (keys as rows,
// queries as vector lanes), from the scaled q^T of every head staged once per task.  Per key
// block of 32 keys the heads run in order: the head sum of the block's logits accumulates in a
// tile (written to M once, after the last head) and the column max is taken, both by the S^T
// product's register blocks (ColumnStats), and each head's online softmax (statistics down the
// columns) accumulates out_h = P v_h in a tile.
// Backward: a task per (batch item, range of key blocks), every head and every query inside,
// S = q k^T (queries as rows, keys as lanes) from k^T and v^T staged once per key block and head:
//   P = exp(S - lse), dP = (dO v^T) * D, dS = scale (P (dP - delta) + dM / h),
//   delta = rowsum(dO * out), D the dropout multiplier (0 or 1 / (1 - p));
//   dV = (P D)^T dO and dK = dS^T q complete in the task; dQ = dS k summed over the task's key
//   blocks, over several ranges through partials added in range order.
// Dropout keeps element (b, head, i, j) when philox(seed, ((b h + head) Nq + i) Nk + j) clears p,
// the hash of the GPU kernels, so a seed replays on every backend.  The backward's blocking
// depends on the shape only; the forward's query blocking also on the thread count, but no sum
// runs across class tokens: results are bitwise the same for any thread count.

#include "sf_cpu.h"
#include "sf_cpu_matrix.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace sf_cpu_atm {

using namespace sf::cpu;
using sf::cpu::matrix::serves;

constexpr int kKeyBlock = 32;        // forward: keys per online-softmax step (the S^T and head-sum tiles stay in L1)
constexpr int kBwdKeyBlock = 64;     // backward: keys per block (vector lanes of S)
constexpr int kBwdQueryBlock = 160;  // backward: class tokens per block (rows of S)
constexpr int64_t kBwdTasks = 16;    // backward: key ranges per batch item, at least this many tasks in all

// Philox-4x32-10 (sf::cpu::philox, bit for bit) of kLanes<float> counters index0 + t * stride at
// once, lane t.  AVX-512: the 32 x 32 -> 64-bit products of even and odd lanes by vpmuludq;
// otherwise in 64-bit lanes.
typedef uint32_t U32 __attribute__((vector_size(SF_CPU_VEC_BYTES)));

#if defined(__AVX512F__)
// High and low halves of x * m, lane by lane.
inline __m512i mul_wide(__m512i x, __m512i m, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(x, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  return _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

inline U32 philox_lanes(uint64_t seed, uint64_t index0, uint64_t stride) {
  alignas(64) uint64_t index[16];
  for (int t = 0; t < 16; ++t) index[t] = index0 + uint64_t(t) * stride;
  const __m512i first = _mm512_load_si512(index), second = _mm512_load_si512(index + 8);
  const __m512i lo_words = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i hi_words = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  __m512i c0 = _mm512_permutex2var_epi32(first, lo_words, second);
  __m512i c1 = _mm512_permutex2var_epi32(first, hi_words, second);
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  const __m512i m0 = _mm512_set1_epi32(int(0xD2511F53u)), m1 = _mm512_set1_epi32(int(0xCD9E8D57u));
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    __m512i lo0, lo1;
    const __m512i hi0 = mul_wide(c0, m0, &lo0), hi1 = mul_wide(c2, m1, &lo1);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(int(k0)));
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(int(k1)));
    c1 = lo1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return (U32)c0;
}
#else
typedef uint64_t U64 __attribute__((vector_size(2 * SF_CPU_VEC_BYTES)));

inline U32 philox_lanes(uint64_t seed, uint64_t index0, uint64_t stride) {
  U64 index;
  for (int t = 0; t < kLanes<float>; ++t) index[t] = index0 + uint64_t(t) * stride;
  U32 c0 = __builtin_convertvector(index, U32), c1 = __builtin_convertvector(index >> 32, U32), c2{}, c3{};
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const U64 p0 = __builtin_convertvector(c0, U64) * uint64_t(0xD2511F53u);
    const U64 p1 = __builtin_convertvector(c2, U64) * uint64_t(0xCD9E8D57u);
    const U32 n0 = __builtin_convertvector(p1 >> 32, U32) ^ c1 ^ k0;
    const U32 n2 = __builtin_convertvector(p0 >> 32, U32) ^ c3 ^ k1;
    c1 = __builtin_convertvector(p1, U32);
    c3 = __builtin_convertvector(p0, U32);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}
#endif

template <typename T>
struct Problem {
  const T *q, *k, *v;
  int64_t batch;
  int heads, nq, nk, d;
  T scale;
  float dropout_p;
  T keep_scale;  // 1 / (1 - p) in the compute type (so fp64 matches the fp64 reference exactly)
  uint64_t seed;

  int64_t q_offset(int64_t b, int h) const { return (b * heads + h) * nq * int64_t(d); }
  int64_t k_offset(int64_t b, int h) const { return (b * heads + h) * nk * int64_t(d); }
  // Dropout multiplier of element (b, head, i, j): keep_scale or 0, kept as on the GPU (the hash of
  // index ((b h + head) Nq + i) Nk + j compared with p in fp32).
  uint64_t element(int64_t b, int h, int i, int j) const {
    return ((uint64_t(b) * heads + h) * nq + i) * uint64_t(nk) + j;
  }
  T dropout(int64_t b, int h, int i, int j) const {
    return dropout_factor(seed, element(b, h, i, j), dropout_p) != 0.f ? keep_scale : T(0);
  }
  // The multipliers of kLanes<T> elements from (b, head, i, j) on: class tokens i, i + 1, ... (a
  // row of S^T) with step_classes, else keys j, j + 1, ... (a row of S).  float: the hash in lanes.
  Vec<T> dropout_lanes(int64_t b, int h, int i, int j, bool step_classes) const {
    const uint64_t index0 = element(b, h, i, j), stride = step_classes ? uint64_t(nk) : 1;
    if constexpr (std::is_same_v<T, float>) {
      const U32 bits = philox_lanes(seed, index0, stride) >> 8;
      const Vec<float> u = __builtin_convertvector(bits, Vec<float>) * (1.0f / 16777216.0f);
      return u >= dropout_p ? vsplat(keep_scale) : Vec<float>{};
    } else {
      Vec<T> f;
      for (int t = 0; t < kLanes<T>; ++t)
        f[t] = dropout_factor(seed, index0 + t * stride, dropout_p) != 0.f ? keep_scale : T(0);
      return f;
    }
  }
};

// ---------------------------------------------------------------- forward --
template <typename T>
void forward_task(const Problem<T>& p, int64_t b, int i0, int nq, T* out, T* lse, T* mask_logits) {
  constexpr int L = kLanes<T>;
  const int H = p.heads, d = p.d, ld = int(round_up(nq, L)), nv = ld / L;
  const Blocks keys = balanced(p.nk, kKeyBlock);
  T* qt = scratch<T>(0, size_t(H) * d * ld);    // [h][d][ld], scaled
  T* st = scratch<T>(1, size_t(keys.size) * ld);  // S_h^T, then P_h^T
  T* mt = scratch<T>(2, size_t(keys.size) * ld);  // head sum of S^T
  T* o = scratch<T>(3, size_t(H) * nq * d);       // [h][nq][d]
  T* stats = scratch<T>(4, size_t(2 * H + 2) * ld);  // m, l [h][ld]; alpha, the block's new max [ld]
  T* m = stats;
  T* l = m + size_t(H) * ld;
  T* alpha = l + size_t(H) * ld;
  T* m_new = alpha + ld;
  for (int h = 0; h < H; ++h)
    transpose(p.q + p.q_offset(b, h) + int64_t(i0) * d, d, nq, d, qt + size_t(h) * d * ld, ld, p.scale);
  std::fill(m, m + size_t(H) * ld, -std::numeric_limits<T>::infinity());
  std::fill(l, l + size_t(H) * ld, T(0));
  const T inv_heads = T(1) / T(H);

  for (int kb = 0; kb < keys.count; ++kb) {
    const int j0 = kb * keys.size, nk = std::min(keys.size, p.nk - j0);
    for (int h = 0; h < H; ++h) {
      const T* kh = p.k + p.k_offset(b, h) + int64_t(j0) * d;
      const T* vh = p.v + p.k_offset(b, h) + int64_t(j0) * d;
      T* mh = m + size_t(h) * ld;
      T* lh = l + size_t(h) * ld;
      // The head sum of the logits and the column max, taken by the product's register blocks.
      std::copy_n(mh, ld, m_new);
      product_with_stats<T>(nk, ld, d, kh, d, 1, qt + size_t(h) * d * ld, ld, st, ld, {m_new, mt, h == 0});
      for (int v = 0; v < nv; ++v)
        online_softmax_block(st + v * L, ld, nk, vload(m_new + v * L), mh + v * L, lh + v * L, alpha + v * L);
      if (p.dropout_p > 0.f) {  // lanes past nq: multipliers of no element, on unused columns
        for (int j = 0; j < nk; ++j)
          for (int i = 0; i < ld; i += L) {
            T* e = st + int64_t(j) * ld + i;
            vstore(e, vload(e) * p.dropout_lanes(b, h, i0 + i, j0 + j, true));
          }
      }
      T* oh = o + size_t(h) * nq * d;
      if (kb > 0) {  // d is a multiple of the lanes (the Python side pads it to 16)
        for (int i = 0; i < nq; ++i) {
          const T f = alpha[i];
          if (f != T(1))
            for (int c = 0; c < d; c += L) vstore(oh + int64_t(i) * d + c, vload(oh + int64_t(i) * d + c) * f);
        }
      }
      product<T>(nq, d, nk, st, 1, ld, vh, d, oh, d, kb > 0);
    }
    T* mrow = mask_logits + (b * p.nq + i0) * int64_t(p.nk) + j0;
    // M rows = (mt / h)^T: whole groups of L keys transposed in registers, the rest one by one.
    const int keys_whole = nk / L * L;
    for (int j = 0; j < keys_whole; j += L)
      for (int i = 0; i < nq; i += L)
        transpose_block<T, false>(mt + int64_t(j) * ld + i, ld, L, mrow + int64_t(i) * p.nk + j, p.nk,
                                  std::min(L, nq - i), inv_heads);
    for (int i = 0; i < nq; ++i)
      for (int j = keys_whole; j < nk; ++j) mrow[int64_t(i) * p.nk + j] = mt[int64_t(j) * ld + i] * inv_heads;
  }
  for (int h = 0; h < H; ++h) {
    const int64_t row0 = (b * H + h) * p.nq + i0;
    const T* oh = o + size_t(h) * nq * d;
    for (int i = 0; i < nq; ++i) {
      const T lh = l[size_t(h) * ld + i], inv = T(1) / lh;
      for (int c = 0; c < d; ++c) out[(row0 + i) * d + c] = oh[int64_t(i) * d + c] * inv;
      lse[row0 + i] = m[size_t(h) * ld + i] + std::log(lh);
    }
  }
}

// --------------------------------------------------------------- backward --
template <typename T>
struct Grads {
  const T *dout, *dmask, *lse, *delta;
  T *dk, *dv;
  T* dq_part;  // [ranges][B][h][Nq][d]
  bool need_dq, need_dkv;  // autograd's needs_input_grad: the others are not computed
};

template <typename T>
void backward_task(const Problem<T>& p, const Grads<T>& g, int64_t b, int range, int kb0, int kb1,
                   const Blocks& keys, const Blocks& queries) {
  constexpr int L = kLanes<T>;
  const int H = p.heads, d = p.d, bn = int(round_up(keys.size, L)), bm = queries.size;
  T* kt = scratch<T>(0, size_t(2) * d * bn);  // k^T, v^T of the block and head
  T* vt = kt + size_t(d) * bn;
  T* s = scratch<T>(1, size_t(2) * bm * bn);  // S then P D; dP then dS
  T* ds = s + size_t(bm) * bn;
  T* dk = scratch<T>(2, size_t(2) * keys.size * d);
  T* dv = dk + size_t(keys.size) * d;
  const T inv_heads = T(1) / T(H);
  const bool dropout = p.dropout_p > 0.f;

  for (int kb = kb0; kb < kb1; ++kb) {
    const int j0 = kb * keys.size, nk = std::min(keys.size, p.nk - j0);
    for (int h = 0; h < H; ++h) {
      const T* kh = p.k + p.k_offset(b, h) + int64_t(j0) * d;
      const T* vh = p.v + p.k_offset(b, h) + int64_t(j0) * d;
      transpose(kh, d, nk, d, kt, bn);  // columns past round_up(nk): stale, masked as padding keys
      transpose(vh, d, nk, d, vt, bn);
      T* part = g.dq_part + ((int64_t(range) * p.batch + b) * H + h) * p.nq * int64_t(d);
      for (int qb = 0; qb < queries.count; ++qb) {
        const int i0 = qb * queries.size, nq = std::min(queries.size, p.nq - i0);
        const int64_t row0 = (b * H + h) * p.nq + i0;
        const T* qh = p.q + row0 * d;
        const T* doh = g.dout + row0 * d;
        product<T>(nq, bn, d, qh, d, 1, kt, bn, s, bn);
        product<T>(nq, bn, d, doh, d, 1, vt, bn, ds, bn);
        const Vec<T> scale = vsplat(p.scale), mean = vsplat(inv_heads);
        for (int i = 0; i < nq; ++i) {
          const Vec<T> lse = vsplat(g.lse[row0 + i]), delta = vsplat(g.delta[row0 + i]);
          T* srow = s + int64_t(i) * bn;
          T* drow = ds + int64_t(i) * bn;
          const T* dm = g.dmask + (b * p.nq + i0 + i) * int64_t(p.nk) + j0;
          int j = 0;
          for (; j + L <= nk; j += L) {
            const Vec<T> prob = vexp(vload(srow + j) * scale - lse);
            const Vec<T> f = dropout ? p.dropout_lanes(b, h, i0 + i, j0 + j, false) : vsplat(T(1));
            vstore(srow + j, prob * f);
            vstore(drow + j, scale * (prob * (vload(drow + j) * f - delta) + vload(dm + j) * mean));
          }
          for (; j < nk; ++j) {
            const T prob = sexp(srow[j] * p.scale - g.lse[row0 + i]);
            const T f = dropout ? p.dropout(b, h, i0 + i, j0 + j) : T(1);
            srow[j] = prob * f;
            drow[j] = p.scale * (prob * (drow[j] * f - g.delta[row0 + i]) + dm[j] * inv_heads);
          }
          for (int j = nk; j < bn; ++j) srow[j] = drow[j] = T(0);  // padding keys
        }
        if (g.need_dkv) {
          product<T>(nk, d, nq, s, 1, bn, doh, d, dv, d, qb > 0);
          product<T>(nk, d, nq, ds, 1, bn, qh, d, dk, d, qb > 0);
        }
        if (g.need_dq) product<T>(nq, d, nk, ds, bn, 1, kh, d, part + int64_t(i0) * d, d, kb > kb0);
      }
      if (g.need_dkv) {
        const int64_t krow = p.k_offset(b, h) + int64_t(j0) * d;
        std::memcpy(g.dk + krow, dk, sizeof(T) * nk * d);
        std::memcpy(g.dv + krow, dv, sizeof(T) * nk * d);
      }
    }
  }
}

// ---------------------------------------------------------------- bindings --
template <typename F>
void dispatch_compute(at::ScalarType dtype, F&& f) {
  if (dtype == at::kDouble) f(double{});
  else f(float{});
}

// ---------------------------------------------- bf16 / fp16 on the matrix unit --
// Inputs of a reduced type where sf_cpu_matrix.h serves it (head_dim zero padded to a multiple of
// 16 by the caller, as for fp32): every product on the matrix unit, the softmax in fp32, a block of
// class tokens against every key at once.  Forward, a task per (batch item, block of class tokens),
// every head inside: the heads' scaled logits sum into the block's M tile in fp32; P (dropped,
// unnormalised) is rounded to the input type for P v.  Backward, a task per (batch item, head):
// per block of class tokens S and dP recomputed, delta = rowsum(P dP) / rowsum(P) from the fp32
// tiles, dS = scale (P (dP - delta) + dM / h) rounded for its products; dQ complete per block,
// dK^T = q^T dS and dV^T = dO^T (P D) accumulated in fp32 over the blocks in order.
namespace reduced {

using namespace sf::cpu::matrix;
namespace matrix = sf::cpu::matrix;

inline Problem<float> dropout_problem(const at::Tensor& q, const at::Tensor& k, double scale, double dropout_p,
                                      int64_t seed) {
  return {nullptr, nullptr, nullptr, q.size(0), int(q.size(1)), int(q.size(2)), int(k.size(2)), int(q.size(3)),
          float(scale), float(dropout_p), 1.0f / (1.0f - float(dropout_p)), uint64_t(seed)};
}

// Multiplies row i of a (keys in lanes) tile by the dropout multipliers of (b, h, i, 0..).
inline void drop_row(float* row, const Problem<float>& p, int64_t b, int h, int i, int64_t ld) {
  for (int j = 0; j < ld; j += kLanes<float>) vstore(row + j, vload(row + j) * p.dropout_lanes(b, h, i, j, false));
}

template <typename S>
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, double dropout_p,
             int64_t seed, at::Tensor& out, at::Tensor& mask_logits, at::Tensor& lse) {
  const Problem<float> p = dropout_problem(q, k, scale, dropout_p, seed);
  const int64_t batch = p.batch;
  const int heads = p.heads, nq = p.nq, nk = p.nk, d = p.d;
  const int mb = query_block(nk), blocks = (nq + mb - 1) / mb;
  const int64_t lk = tile_ld(nk), ld = tile_ld(d), lp = even(nk);
  const int64_t keys_size = packed_size(d, nk), pack_size = keys_size + packed_size(nk, d);
  const S* qp = q.data_ptr<S>();
  const S* kp = k.data_ptr<S>();
  const S* vp = v.data_ptr<S>();
  S* o = out.data_ptr<S>();
  S* ml = mask_logits.data_ptr<S>();
  float* ls = lse.data_ptr<float>();
  // k^T (d x Nk) and v (Nk x d) of every (batch item, head), packed in a pass before.
  at::Tensor packs = pooled_empty({batch * heads, pack_size}, q.options());
  S* packed = packs.data_ptr<S>();
  parallel_for(batch * heads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      pack_transposed(packed + t * pack_size, kp + t * nk * int64_t(d), d, nk, d);
      matrix::pack_rows(packed + t * pack_size + keys_size, vp + t * nk * int64_t(d), d, nk, d);
    }
  });
  const float inv_heads = 1.0f / float(heads);
  parallel_for(batch * blocks, 1, [&](int64_t t0, int64_t t1) {
    Session session;
    float* logits = scratch<float>(0, size_t(mb) * lk);
    float* macc = scratch<float>(1, size_t(mb) * lk);  // the heads' sum of the logits
    float* acc = scratch<float>(2, size_t(mb) * ld);
    float* inv = scratch<float>(3, size_t(mb));
    S* ps = scratch<S>(0, size_t(mb) * lp);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / blocks;
      const int i0 = int(t % blocks) * mb, m = std::min(mb, nq - i0);
      for (int h = 0; h < heads; ++h) {
        const int64_t bh = b * heads + h;
        product(m, nk, d, qp + (bh * nq + i0) * int64_t(d), d, packed + bh * pack_size, logits, lk, false);
        const Vec<float> sc = vsplat(p.scale);
        for (int i = 0; i < m; ++i) {
          float* row = logits + i * lk;
          float* mrow = macc + i * lk;
          for (int64_t j = 0; j < lk; j += kLanes<float>) {
            const Vec<float> x = vload(row + j) * sc;
            vstore(row + j, x);
            vstore(mrow + j, h ? vload(mrow + j) + x : x);
          }
          float mx;
          const float sum = exp_row(row, nk, lk, mx, false);
          ls[bh * nq + i0 + i] = mx + std::log(sum);
          inv[i] = 1.0f / sum;
          if (p.dropout_p > 0.f) drop_row(row, p, b, h, i0 + i, lk);
          store_row(ps + i * lp, row, lp);
        }
        product(m, d, nk, ps, lp, packed + bh * pack_size + keys_size, acc, ld, false);
        for (int i = 0; i < m; ++i) {
          const Vec<float> s = vsplat(inv[i]);
          for (int64_t j = 0; j < ld; j += kLanes<float>) vstore(acc + i * ld + j, vload(acc + i * ld + j) * s);
          store_row(o + (bh * nq + i0 + i) * int64_t(d), acc + i * ld, d);
        }
      }
      const Vec<float> s = vsplat(inv_heads);
      for (int i = 0; i < m; ++i) {
        float* mrow = macc + i * lk;
        for (int64_t j = 0; j < lk; j += kLanes<float>) vstore(mrow + j, vload(mrow + j) * s);
        store_row(ml + (b * nq + i0 + i) * int64_t(nk), mrow, nk);
      }
    }
  });
}

template <typename S>
void backward(const at::Tensor& dout, const at::Tensor& dmask, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& lse, double scale, double dropout_p, int64_t seed, at::Tensor& dq,
              at::Tensor& dk, at::Tensor& dv, bool need_dq, bool need_dkv) {
  const Problem<float> p = dropout_problem(q, k, scale, dropout_p, seed);
  const int heads = p.heads, nq = p.nq, nk = p.nk, d = p.d;
  const int mb = query_block(nk), blocks = (nq + mb - 1) / mb;
  const int64_t lk = tile_ld(nk), ld = tile_ld(d), lp = even(nk), wm = round_up(mb, kLanes<float>);
  const int64_t keys_t = packed_size(d, nk), keys = packed_size(nk, d), values_t = packed_size(d, nk);
  const S* qp = q.data_ptr<S>();
  const S* kp = k.data_ptr<S>();
  const S* vp = v.data_ptr<S>();
  const S* gp = dout.data_ptr<S>();
  const S* gm = dmask.data_ptr<S>();
  const float* ls = lse.data_ptr<float>();
  const bool dropout = p.dropout_p > 0.f;
  const float inv_heads = 1.0f / float(heads);
  parallel_for(p.batch * heads, 1, [&](int64_t t0, int64_t t1) {
    Session session;
    S* packed = scratch<S>(0, size_t(keys_t + keys + values_t));
    S* k_t = packed;               // k^T (d x Nk): the logits
    S* k_rows = packed + keys_t;   // k (Nk x d): dQ = dS k
    S* v_t = k_rows + keys;        // v^T (d x Nk): dP = dO v^T
    S* ds_s = scratch<S>(1, size_t(mb) * lp);
    S* b_op = scratch<S>(2, size_t(packed_size(mb, nk)));
    S* a_op = scratch<S>(3, size_t(d) * even(mb));
    float* st = scratch<float>(0, size_t(mb) * lk);   // logits, then P (then P D)
    float* dpt = scratch<float>(1, size_t(mb) * lk);  // dP, then dS
    float* dq_t = scratch<float>(2, size_t(mb) * ld);
    float* dk_t = scratch<float>(3, size_t(d) * lk);
    float* dv_t = scratch<float>(4, size_t(d) * lk);
    float* tmp = scratch<float>(5, size_t(2 * round_up(d, kLanes<float>) * wm));
    float* dm = scratch<float>(6, size_t(lk));
    for (int64_t bh = t0; bh < t1; ++bh) {
      const int64_t b = bh / heads;
      const int h = int(bh % heads);
      const S* qb = qp + bh * nq * int64_t(d);
      const S* gb = gp + bh * nq * int64_t(d);
      const S* kb = kp + bh * nk * int64_t(d);
      pack_transposed(k_t, kb, d, nk, d);
      if (need_dq) matrix::pack_rows(k_rows, kb, d, nk, d);
      pack_transposed(v_t, vp + bh * nk * int64_t(d), d, nk, d);
      for (int blk = 0; blk < blocks; ++blk) {
        const int i0 = blk * mb, m = std::min(mb, nq - i0);
        product(m, nk, d, qb + i0 * int64_t(d), d, k_t, st, lk, false);
        product(m, nk, d, gb + i0 * int64_t(d), d, v_t, dpt, lk, false);
        const Vec<float> sc = vsplat(p.scale), mean = vsplat(inv_heads);
        for (int i = 0; i < m; ++i) {
          float* pr = st + i * lk;
          float* dr = dpt + i * lk;
          for (int64_t j = 0; j < lk; j += kLanes<float>) vstore(pr + j, vload(pr + j) * sc);
          float mx = ls[bh * nq + i0 + i];
          const float total = exp_row(pr, nk, lk, mx, true);
          if (dropout) drop_row(dr, p, b, h, i0 + i, lk);  // dP D: the gradient of the dropped P
          Vec<float> weighted{};
          for (int64_t j = 0; j < lk; j += kLanes<float>) weighted += vload(pr + j) * vload(dr + j);
          const Vec<float> delta = vsplat(hsum<float>(weighted) / total);  // / rowsum(P), as semantic's
          load_row(dm, gm + (b * nq + i0 + i) * int64_t(nk), nk);
          std::fill(dm + nk, dm + lk, 0.0f);
          for (int64_t j = 0; j < lk; j += kLanes<float>)
            vstore(dr + j, sc * (vload(pr + j) * (vload(dr + j) - delta) + vload(dm + j) * mean));
          if (need_dq) store_row(ds_s + i * lp, dr, lp);
          if (dropout && need_dkv) drop_row(pr, p, b, h, i0 + i, lk);  // P D, the factor of dV
        }
        if (need_dq) {
          product(m, d, nk, ds_s, lp, k_rows, dq_t, ld, false);
          S* dst = dq.data_ptr<S>() + (bh * nq + i0) * int64_t(d);
          for (int i = 0; i < m; ++i) store_row(dst + int64_t(i) * d, dq_t + i * ld, d);
        }
        if (need_dkv) {  // dK^T += q_blk^T dS, dV^T += dO_blk^T (P D)
          a_transposed(a_op, qb + i0 * int64_t(d), d, m, d, tmp);
          matrix::pack_rows(b_op, dpt, lk, m, nk);
          product(d, nk, m, a_op, even(m), b_op, dk_t, lk, blk > 0);
          a_transposed(a_op, gb + i0 * int64_t(d), d, m, d, tmp);
          matrix::pack_rows(b_op, st, lk, m, nk);
          product(d, nk, m, a_op, even(m), b_op, dv_t, lk, blk > 0);
        }
      }
      if (need_dkv) {
        write_transposed(dk.data_ptr<S>() + bh * nk * int64_t(d), dk_t, lk, nk, d, tmp);
        write_transposed(dv.data_ptr<S>() + bh * nk * int64_t(d), dv_t, lk, nk, d, tmp);
      }
    }
  });
}

}  // namespace reduced

template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                        double dropout_p, int64_t seed) {
  return {q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), q.size(0), int(q.size(1)), int(q.size(2)),
          int(k.size(2)), int(q.size(3)), T(scale), float(dropout_p), T(1) / (T(1) - T(dropout_p)),
          uint64_t(seed)};
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double dropout_p) {
  SF_CPU_CHECK_INPUT(q, 4);
  SF_CPU_CHECK_INPUT(k, 4);
  SF_CPU_CHECK_INPUT(v, 4);
  SF_CPU_CHECK_SAME_DTYPE(k, q);
  SF_CPU_CHECK_SAME_DTYPE(v, q);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble || serves(q.scalar_type()),
              "atm_attention: the cpu kernels take float32 or float64 (float16 / bfloat16 where the matrix unit "
              "serves them), got ", q.scalar_type());
  TORCH_CHECK(v.sizes() == k.sizes(), "atm_attention: v must have k's shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "atm_attention: k must be (B, h, Nk, d) matching q");
  TORCH_CHECK(q.size(1) >= 1 && q.size(2) >= 1 && k.size(2) >= 1, "atm_attention: empty heads, Nq or Nk");
  TORCH_CHECK(q.size(3) % 16 == 0, "atm_attention: the cpu kernels take head_dim a multiple of 16 (zero padded), got ",
              q.size(3));
  TORCH_CHECK(q.size(2) < (int64_t(1) << 31) && k.size(2) < (int64_t(1) << 31), "atm_attention: Nq, Nk below 2^31");
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "atm_attention: dropout_p must be in [0, 1), got ", dropout_p);
  SF_CPU_CHECK_CONTIGUOUS(q);
  SF_CPU_CHECK_CONTIGUOUS(k);
  SF_CPU_CHECK_CONTIGUOUS(v);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_op(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale, double dropout_p,
                                                          int64_t seed) {
  check_inputs(q, k, v, dropout_p);
  at::Tensor out = pooled_empty(q.sizes(), q.options());
  at::Tensor mask_logits = pooled_empty({q.size(0), q.size(2), k.size(2)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)},
                             q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  if (serves(q.scalar_type())) {
    sf::cpu::matrix::dispatch(q.scalar_type(), [&](auto tag) {
      reduced::forward<decltype(tag)>(q, k, v, scale, dropout_p, seed, out, mask_logits, lse);
    });
    return {out, mask_logits, lse};
  }
  // Every class token in one task unless that leaves threads idle: a task reads all of k and v
  // of its batch item.  Results do not depend on this blocking (no sum runs across query rows).
  const int nq = int(q.size(2));
  const int per_item = int(std::clamp<int64_t>((at::get_num_threads() + q.size(0) - 1) / q.size(0), 1, nq));
  const Blocks queries = balanced(nq, (nq + per_item - 1) / per_item);
  dispatch_compute(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const Problem<T> p = make_problem<T>(q, k, v, scale, dropout_p, seed);
    T* o = out.data_ptr<T>();
    T* ls = lse.data_ptr<T>();
    T* ml = mask_logits.data_ptr<T>();
    parallel_for(p.batch * queries.count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int i0 = int(t % queries.count) * queries.size;
        forward_task(p, t / queries.count, i0, std::min(queries.size, p.nq - i0), o, ls, ml);
      }
    });
  });
  return {out, mask_logits, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor& dout, const at::Tensor& dmask,
                                                           const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const std::optional<at::Tensor>& out,
                                                           const at::Tensor& lse, double scale, double dropout_p,
                                                           int64_t seed, bool need_dq, bool need_dkv) {
  check_inputs(q, k, v, dropout_p);
  SF_CPU_CHECK_INPUT(dout, 4);
  SF_CPU_CHECK_INPUT(dmask, 3);
  SF_CPU_CHECK_INPUT(lse, 3);
  for (const at::Tensor* t : {&dout, &dmask}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "atm_attention: gradients must have q's dtype");
    TORCH_CHECK(t->is_contiguous(), "atm_attention: gradients must be contiguous");
  }
  TORCH_CHECK(lse.scalar_type() == (q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat) && lse.is_contiguous(),
              "atm_attention: lse must be contiguous float32 (float64 for float64 inputs)");
  TORCH_CHECK(dout.sizes() == q.sizes(), "atm_attention: dout must match q");
  TORCH_CHECK(dmask.size(0) == q.size(0) && dmask.size(1) == q.size(2) && dmask.size(2) == k.size(2),
              "atm_attention: dmask must be (B, Nq, Nk)");
  TORCH_CHECK(lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "atm_attention: lse must be (B, h, Nq)");
  at::Tensor dq = pooled_empty(q.sizes(), q.options()), dk = pooled_empty(k.sizes(), k.options());
  at::Tensor dv = pooled_empty(v.sizes(), v.options());
  if (serves(q.scalar_type())) {  // out is not read: delta comes from the recomputed tiles
    sf::cpu::matrix::dispatch(q.scalar_type(), [&](auto tag) {
      reduced::backward<decltype(tag)>(dout, dmask, q, k, v, lse, scale, dropout_p, seed, dq, dk, dv, need_dq,
                                       need_dkv);
    });
    return {dq, dk, dv};
  }
  TORCH_CHECK(out.has_value() && out->scalar_type() == q.scalar_type() && out->is_contiguous() &&
                  out->sizes() == q.sizes(),
              "atm_attention: out (the forward's output, contiguous, q's shape and dtype) is needed here");
  const int nk = int(k.size(2)), d = int(q.size(3));
  const Blocks keys = balanced(nk, kBwdKeyBlock), queries = balanced(int(q.size(2)), kBwdQueryBlock);
  const int64_t batch = q.size(0);
  // Key ranges per batch item: a fixed function of the shape (never of the thread count).
  const int ranges_wanted = int(std::min<int64_t>(keys.count, (kBwdTasks + batch - 1) / batch));
  const int per_range = (keys.count + ranges_wanted - 1) / ranges_wanted;
  const int ranges = (keys.count + per_range - 1) / per_range;
  dispatch_compute(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const Problem<T> p = make_problem<T>(q, k, v, scale, dropout_p, seed);
    at::Tensor delta = at::empty(lse.sizes(), lse.options());
    const T* o = out->data_ptr<T>();
    const T* go = dout.data_ptr<T>();
    T* dl = delta.data_ptr<T>();
    parallel_for(delta.numel(), 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T acc = 0;
        for (int c = 0; c < d; ++c) acc += o[r * d + c] * go[r * d + c];
        dl[r] = acc;
      }
    });
    const bool partials = ranges > 1 && need_dq;
    at::Tensor part = partials ? pooled_empty({ranges, q.size(0), q.size(1), q.size(2), d}, q.options()) : dq;
    const Grads<T> g{go, dmask.data_ptr<T>(), lse.data_ptr<T>(), dl, dk.data_ptr<T>(), dv.data_ptr<T>(),
                     part.data_ptr<T>(), need_dq, need_dkv};
    parallel_for(batch * ranges, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int r = int(t % ranges), kb0 = r * per_range;
        backward_task(p, g, t / ranges, r, kb0, std::min(keys.count, kb0 + per_range), keys, queries);
      }
    });
    if (partials) {
      const T* src = part.data_ptr<T>();
      T* dst = dq.data_ptr<T>();
      const int64_t n = dq.numel();
      parallel_for(n, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end; ++e) {
          T acc = src[e];
          for (int r = 1; r < ranges; ++r) acc += src[r * n + e];
          dst[e] = acc;
        }
      });
    }
  });
  return {dq, dk, dv};
}

}  // namespace sf_cpu_atm

SF_CPU_LIBRARY(m) {
  m.def("atm_attention_forward(Tensor q, Tensor k, Tensor v, float scale, float dropout_p, int seed) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("atm_attention_backward(Tensor dout, Tensor dmask_logits, Tensor q, Tensor k, Tensor v, Tensor? out, "
        "Tensor lse, float scale, float dropout_p, int seed, bool need_dq, bool need_dkv) -> (Tensor, Tensor, Tensor)");
  SF_CPU_MATRIX_UNIT_QUERY(m, "atm_attention");
}

SF_CPU_LIBRARY_IMPL(m) {
  m.impl("atm_attention_forward", &sf_cpu_atm::forward_op);
  m.impl("atm_attention_backward", &sf_cpu_atm::backward_op);
}
