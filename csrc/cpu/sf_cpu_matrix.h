// Products of bf16 / fp16 operands on the CPU's matrix unit (Intel AMX), accumulated in fp32: what
// the kernels of reduced-precision inputs are made of where the machine has one.  The microkernel
// is oneDNN's batch-reduce GEMM as PyTorch exports it (at::native::cpublas::brgemm, the one its
// own CPU flash attention runs): it generates the tile code for each shape once per thread and
// keeps it.  Where it would not run on the matrix unit (no AMX, AMX without fp16 for half inputs,
// oneDNN turned off with torch.backends.mkldnn), `serves` says no and the kernels take their
// portable fp32 path.
//
// A product C (m x n, fp32) [+]= A (m x k) B (k x n): A row-major in the storage type with k even
// (rows padded with a zero column otherwise), B packed by this header in the layout the unit reads
// (VNNI): [k/2][tile_ld(n)][2], k rounded up to even, the columns past n zero.  C's rows have
// tile_ld(n) columns too (the padding columns receive zeros).  One brgemm call per product (one per
// 32-column block before: SegViT-L's ATM bf16 fwd+bwd 9.9 -> 8.5 ms on 2 SPR cores).
#pragma once

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>

#include "sf_cpu.h"

#pragma GCC visibility push(hidden)
namespace sf::cpu::matrix {

// Whether products of `dtype` run on the matrix unit (asked per call: oneDNN can be switched off).
inline bool serves(at::ScalarType dtype) {
  return (dtype == at::kBFloat16 || dtype == at::kHalf) && at::native::cpublas::could_pack(dtype);
}

// f(S{}) with S the reduced storage type of dtype (bf16 or fp16; a dtype `serves` accepts).
template <typename F>
void dispatch(at::ScalarType dtype, F&& f) {
  if (dtype == at::kBFloat16) f(c10::BFloat16{});
  else f(c10::Half{});
}

// Registers `<op>_matrix_unit(ScalarType dtype) -> bool` in an op's library: whether its kernels
// take dtype as it is, on the unit (the Python side converts it otherwise).
#define SF_CPU_MATRIX_UNIT_QUERY(m, op) \
  m.def(op "_matrix_unit(ScalarType dtype) -> bool", [](at::ScalarType dtype) { return sf::cpu::matrix::serves(dtype); })

inline int64_t even(int64_t k) { return (k + 1) / 2 * 2; }
// Columns of a packed B and of an fp32 C tile (their row stride): n in whole 32-column blocks (two
// 16-column tiles of C), and 16 more where fp32 rows would be a multiple of 2 KiB: the 16 rows of
// a tile at such steps share one or two L1 sets, which cost the global semantic attention's
// logits product (N = 1024) a quarter of its speed.
inline int64_t tile_ld(int64_t n) {
  const int64_t ld = round_up(n, int64_t(32));
  return ld % 512 == 0 ? ld + 16 : ld;
}
// Elements of a packed k x n operand.
inline int64_t packed_size(int64_t k, int64_t n) { return even(k) * tile_ld(n); }

#if defined(__AVX512BW__)
// 32 consecutive values of x as the storage type S, in one register (false: not in this build).
template <typename S, typename X>
inline bool load32(const X* x, __m512i& v) {
  if constexpr (std::is_same_v<X, S>) {
    v = _mm512_loadu_si512(x);
    return true;
  } else if constexpr (std::is_same_v<X, float> && kNarrows16<S>) {
    v = _mm512_inserti64x4(_mm512_castsi256_si512(narrow16<S>(_mm512_loadu_ps(x))),
                           narrow16<S>(_mm512_loadu_ps(x + 16)), 1);
    return true;
  }
  return false;
}
#endif

// B = X, X (k rows x n) with row stride ldx, values converted to S: element (r, c) = X[r][c].
// Pairs of rows are interleaved per column (32 columns of two rows at a time in registers).
template <typename S, typename X>
inline void pack_rows(S* __restrict__ dst, const X* __restrict__ x, int64_t ldx, int64_t k, int64_t n) {
  const int64_t kk = even(k), ld = tile_ld(n);
  for (int64_t r = 0; r < kk; r += 2) {
    S* out = dst + r * ld;
    const X* x0 = x + r * ldx;
    const X* x1 = x0 + ldx;
    const bool second = r + 1 < k;
    int64_t c = 0;
#if defined(__AVX512BW__)
    if (second) {
      // out[2c] = a[c], out[2c + 1] = b[c]: element i of the result takes a[i / 2] or b[i / 2].
      alignas(64) static constexpr uint16_t kLo[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                       8,  40, 9,  41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
      const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
      __m512i a, b;
      for (; c + 32 <= n && load32<S>(x0 + c, a) && load32<S>(x1 + c, b); c += 32) {
        _mm512_storeu_si512(out + 2 * c, _mm512_permutex2var_epi16(a, lo, b));
        _mm512_storeu_si512(out + 2 * c + 32, _mm512_permutex2var_epi16(a, hi, b));
      }
    }
#endif
    for (; c < n; ++c) {
      out[2 * c] = static_cast<S>(x0[c]);
      out[2 * c + 1] = second ? static_cast<S>(x1[c]) : S(0);
    }
    std::fill(out + 2 * n, out + 2 * ld, S(0));
  }
}

// B = X^T, X (n rows x k) with row stride ldx: element (r, c) = X[c][r].  A pair (r, r + 1) of one
// column is two consecutive elements of a row of X: a 32-bit copy.
template <typename S>
inline void pack_transposed(S* __restrict__ dst, const S* __restrict__ x, int64_t ldx, int64_t n, int64_t k) {
  const int64_t kk = even(k), ld = tile_ld(n);
  for (int64_t c = 0; c < n; ++c) {
    const S* row = x + c * ldx;
    S* col = dst + 2 * c;
    int64_t r = 0;
    for (; r + 1 < k; r += 2) std::memcpy(col + r * ld, row + r, 2 * sizeof(S));
    if (r < k) {
      col[r * ld] = row[r];
      col[r * ld + 1] = S(0);
    }
  }
  for (int64_t r = 0; r < kk; r += 2) std::fill(dst + r * ld + 2 * n, dst + (r + 2) * ld, S(0));
}

// C (m x tile_ld(n), ldc) [+]= A (m x even(k), lda) B (packed k x n).
template <typename S>
inline void product(int64_t m, int64_t n, int64_t k, const S* a, int64_t lda, const S* packed, float* c, int64_t ldc,
                    bool accumulate) {
  const int64_t ld = tile_ld(n);
  at::native::cpublas::brgemm(m, ld, even(k), lda, ld, ldc, accumulate, a, packed, c, true);
}

// ------------------------------------------------ attention on the unit --
// What the attention kernels on the unit share: a task holds a block of queries against every key
// (m x N fp32 logits), so the softmax takes two passes with no rescaling.

// Queries per block, from N only: the block's logits (m x N fp32) stay within 256 KiB.
inline int query_block(int n) {
  int m = 64;
  while (m > 16 && int64_t(m) * n * int64_t(sizeof(float)) > (int64_t(256) << 10)) m /= 2;
  return m;
}

// Rows [0, m) of A = x (row stride ldx, k columns) as the unit reads them: in place when k is even,
// else staged with a zero column.
template <typename S>
inline const S* a_rows(const S* x, int64_t ldx, int m, int k, S* stage, int64_t& lda) {
  if (k % 2 == 0) {
    lda = ldx;
    return x;
  }
  lda = even(k);
  for (int r = 0; r < m; ++r) {
    std::copy_n(x + r * ldx, k, stage + r * lda);
    stage[r * lda + k] = S(0);
  }
  return stage;
}

// A = X^T for X (m rows x cols, row stride ldx): (cols x even(m)), zero in the padding column.
// Through fp32 (exact both ways) and the register transpose; tmp: round_up(m, L) * round_up(cols, L)
// * 2 floats.
template <typename S>
inline void a_transposed(S* __restrict__ dst, const S* __restrict__ x, int64_t ldx, int m, int cols, float* tmp) {
  constexpr int L = kLanes<float>;
  const int wc = int(round_up(cols, L)), wm = int(round_up(m, L));
  float* rows = tmp;
  float* t = tmp + int64_t(m) * wc;
  for (int r = 0; r < m; ++r) {
    load_row(rows + int64_t(r) * wc, x + r * ldx, cols);
    std::fill(rows + int64_t(r) * wc + cols, rows + int64_t(r + 1) * wc, 0.0f);
  }
  transpose(rows, wc, m, wc, t, wm);
  for (int c = 0; c < cols; ++c) store_row(dst + c * even(m), t + int64_t(c) * wm, even(m));
}

// dst (n rows x cols, the storage type) = src^T for src (cols rows x ld >= round_up(n, L)), through
// the register transpose a vector of rows at a time; tmp: L * round_up(cols, L) floats.
template <typename S>
inline void write_transposed(S* __restrict__ dst, const float* __restrict__ src, int64_t ld, int n, int cols,
                             float* tmp) {
  constexpr int L = kLanes<float>;
  const int64_t wc = round_up(cols, L);
  for (int j0 = 0; j0 < n; j0 += L) {
    transpose(src + j0, ld, cols, L, tmp, wc);
    for (int j = j0; j < std::min(n, j0 + L); ++j) store_row(dst + int64_t(j) * cols, tmp + (j - j0) * wc, cols);
  }
}

// Row i of a logits tile (ld columns, N real): exp(s - mx) in place, -inf past N giving 0; returns
// the sum.  With lse given, mx = lse (backward); else mx = the row max (returned through mx).
inline float exp_row(float* row, int n, int64_t ld, float& mx, bool given) {
  constexpr int L = kLanes<float>;
  std::fill(row + n, row + ld, -std::numeric_limits<float>::infinity());
  if (!given) {
    Vec<float> m = vsplat(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < ld; j += L) m = vmax<float>(m, vload(row + j));
    mx = hmax<float>(m);
  }
  const Vec<float> shift = vsplat(mx * kLog2e<float>), scale = vsplat(kLog2e<float>);
  Vec<float> sum{};
  for (int64_t j = 0; j < ld; j += L) {
    const Vec<float> e = vexp2_nonpositive(vload(row + j) * scale - shift);
    vstore(row + j, e);
    sum += e;
  }
  return hsum<float>(sum);
}

// Hands the unit's state (tile configuration) back at the end of a thread's run of products.
class Session {
 public:
  Session() = default;
  ~Session() { at::native::cpublas::brgemm_release(true); }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
};

}  // namespace sf::cpu::matrix
#pragma GCC visibility pop
