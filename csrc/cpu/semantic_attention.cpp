// SeMask semantic attention on the CPU, forward and backward (SPEC.md: semantic_attention).
//
//   out = softmax(Sq Sk^T) Yv     (no scale);  sq, sk (B_, N, K), yv (B_, N, C)
//
// Inputs are read in place with any batch and row strides (only the last dim must be contiguous:
// SemanticAttention passes column views of one fused projection); float and double (the Python
// side converts fp16 / bf16 to fp32 and rounds the results once).
//
// Forward: a task per (batch item, block of at most 64 queries).  The scores are computed
// transposed, S^T = Sk Sq^T (keys as rows, queries as vector lanes), from Sq^T staged once per
// task, so the softmax statistics of every query are plain vector operations down the rows; an
// online softmax over key blocks of at most 128 keys accumulates O = P V in a per-thread tile.
// Queries past the last whole vector are scored by dot products when they are few (a 7x7
// window: 48 queries in three vectors and the 49th apart, not a padded fourth vector).
// Backward: a task per (batch item, range of key blocks), queries in blocks inside, the scores
// recomputed as S = Sq Sk^T (queries as rows) from Sk^T and Yv^T staged once per key block:
//   P = exp(S - lse), dP = dO Yv^T, dS = P (dP - delta), delta = rowsum(dO * O) (in the task
//   when one key block holds every key, while dO is in the cache; otherwise in a pass before),
//   dYv = P^T dO, dSk = dS^T Sq (both complete in the task), dSq = dS Sk (summed over the
//   task's key blocks; over several ranges through fp32 partials added in range order).
// Every blocking depends on the shape only, so results are bitwise the same for any thread
// count.  Nothing N x N outlives a tile.

#include "sf_cpu.h"
#include "sf_cpu_matrix.h"

#ifdef SF_CPU_X86
#include <immintrin.h>
#endif

namespace sf_cpu_semantic {

using namespace sf::cpu;
using sf::cpu::matrix::serves;

constexpr int kQueryBlock = 64;      // forward: queries per task (vector lanes of S^T)
constexpr int kKeyBlock = 128;       // forward: keys per online-softmax step
constexpr int kBwdKeyBlock = 64;     // backward: keys per block (vector lanes of S)
constexpr int kBwdQueryBlock = 64;   // backward: queries per block
constexpr int64_t kBwdTasks = 16;    // backward: key ranges per batch item, at least this many tasks in all

struct Strides {
  int64_t batch, row;
};
inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1)}; }

// dst[c * ld + r] = src[r * src_rs + c] for r < rows, c < cols; zero for rows <= r < ld.  The
// whole vectors of columns go through sf::cpu::transpose (in registers), the rest one by one.
template <typename T>
inline void stage_transposed(T* __restrict__ dst, int ld, const T* __restrict__ src, int64_t src_rs, int rows,
                             int cols) {
  constexpr int L = kLanes<T>;
  const int cols_whole = cols / L * L, rows_zeroed = int(round_up(rows, L));
  transpose(src, src_rs, rows, cols_whole, dst, ld);
  for (int c = cols_whole; c < cols; ++c) {
    for (int r = 0; r < rows; ++r) dst[int64_t(c) * ld + r] = src[r * src_rs + c];
    std::fill(dst + int64_t(c) * ld + rows, dst + int64_t(c) * ld + rows_zeroed, T(0));
  }
  for (int c = 0; c < cols; ++c) std::fill(dst + int64_t(c) * ld + rows_zeroed, dst + int64_t(c + 1) * ld, T(0));
}

// dst[r * ld + c] = src[r * src_rs + c] for c < cols; zero for cols <= c < ld.
template <typename T>
inline void stage_rows(T* __restrict__ dst, int ld, const T* __restrict__ src, int64_t src_rs, int rows, int cols) {
  for (int r = 0; r < rows; ++r) {
    std::memcpy(dst + int64_t(r) * ld, src + r * src_rs, sizeof(T) * cols);
    std::fill(dst + int64_t(r) * ld + cols, dst + int64_t(r + 1) * ld, T(0));
  }
}

template <typename T>
inline T dot(const T* __restrict__ a, const T* __restrict__ b, int n) {
  constexpr int L = kLanes<T>;
  Vec<T> acc{};
  int t = 0;
  for (; t + L <= n; t += L) acc += vload(a + t) * vload(b + t);
  T s = hsum<T>(acc);
  for (; t < n; ++t) s += a[t] * b[t];
  return s;
}

// Writes rows x cols of src (row stride src_ld), row r times row_scale[r] when given, to the
// contiguous region dst (rows * cols elements).  Plain stores: non-temporal ones into freshly
// allocated outputs made each page fault about twice as costly (windowed backward: 350 -> 280 ms).
template <typename T>
inline void write_rows(T* dst, const T* src, int src_ld, int rows, int cols, const T* row_scale) {
  for (int r = 0; r < rows; ++r) {
    const T f = row_scale ? row_scale[r] : T(1);
    const T* in = src + int64_t(r) * src_ld;
    T* out = dst + int64_t(r) * cols;
    for (int c = 0; c < cols; ++c) out[c] = in[c] * f;
  }
}

// ---------------------------------------------------------------- forward --
template <typename T>
struct FwdArgs {
  const T *sq, *sk, *yv;
  Strides sq_s, sk_s, yv_s;
  int n, k, c;
  T *out, *lse;  // (B_, N, C), (B_, N), contiguous
};

template <typename T>
void forward_task(const FwdArgs<T>& a, int64_t b, int i0, int nq, const Blocks& keys, NextTaskPrefetch& next) {
  constexpr int L = kLanes<T>;
  const int K = a.k, C = a.c, cpad = int(round_up(C, L));
  const int whole = nq / L * L, tail = nq - whole;
  const bool dot_tail = tail > 0 && tail <= L / 4;        // a few queries: dot products, not a vector
  const int qcols = dot_tail ? whole : int(round_up(nq, L));  // columns of the S^T product
  const int ld = int(round_up(nq, L)), nv = ld / L;
  const T* sq = a.sq + b * a.sq_s.batch + int64_t(i0) * a.sq_s.row;
  const T* sk = a.sk + b * a.sk_s.batch;
  const T* yv = a.yv + b * a.yv_s.batch;
  const bool stage_v = C % L != 0;  // P V reads Yv rows as whole vectors

  T* sqt = scratch<T>(0, size_t(K) * std::max(qcols, 1));
  T* st = scratch<T>(1, size_t(keys.size) * ld);
  T* o = scratch<T>(2, size_t(nq) * cpad);
  T* vstage = stage_v ? scratch<T>(3, size_t(keys.size) * cpad) : nullptr;
  T* m = scratch<T>(4, size_t(4) * ld);
  T* l = m + ld;
  T* alpha = l + ld;
  T* inv_l = alpha + ld;
  const int64_t row0 = b * a.n + i0;
  stage_transposed(sqt, qcols, sq, a.sq_s.row, std::min(nq, qcols), K);
  std::fill(m, m + ld, -std::numeric_limits<T>::infinity());
  std::fill(l, l + ld, T(0));

  for (int j0 = 0; j0 < a.n; j0 += keys.size) {
    const int nk = std::min(keys.size, a.n - j0);
    const T* skj = sk + int64_t(j0) * a.sk_s.row;
    if (qcols > 0) product<T>(nk, qcols, K, skj, a.sk_s.row, 1, sqt, qcols, st, ld, false, nullptr, &next);
    if (dot_tail) {
      for (int j = 0; j < nk; ++j) {
        T* row = st + int64_t(j) * ld;
        for (int t = 0; t < tail; ++t) row[whole + t] = dot(skj + j * a.sk_s.row, sq + (whole + t) * a.sq_s.row, K);
        std::fill(row + whole + tail, row + ld, T(0));
      }
    }
    // Online softmax down the columns: P^T = exp(S^T - m_new), running sums rescaled by alpha.
    for (int v = 0; v < nv; ++v) {
      const Vec<T> mx = column_max(st + v * L, ld, nk, vload(m + v * L));
      online_softmax_block(st + v * L, ld, nk, mx, m + v * L, l + v * L, alpha + v * L);
    }
    if (j0 > 0) {
      for (int i = 0; i < nq; ++i) {
        const T f = alpha[i];
        if (f != T(1))
          for (int c = 0; c < cpad; ++c) o[int64_t(i) * cpad + c] *= f;
      }
    }
    const T* vrows = yv + int64_t(j0) * a.yv_s.row;
    int64_t ldv = a.yv_s.row;
    if (stage_v) {
      stage_rows(vstage, cpad, vrows, a.yv_s.row, nk, C);
      vrows = vstage;
      ldv = cpad;
    }
    // The last key block's product writes the output rows, divided by l, in place when they are
    // whole vectors (o then serves as its init: the same row stride).
    const bool last = j0 + nk == a.n, in_place = last && cpad == C;
    if (last)
      for (int i = 0; i < nq; ++i) inv_l[i] = T(1) / l[i];
    if (in_place)
      product<T>(nq, cpad, nk, st, 1, ld, vrows, ldv, a.out + row0 * C, C, false, j0 > 0 ? o : nullptr, &next,
                 inv_l);
    else
      product<T>(nq, cpad, nk, st, 1, ld, vrows, ldv, o, cpad, j0 > 0, nullptr, &next);
    if (last && !in_place) write_rows(a.out + row0 * C, o, cpad, nq, C, inv_l);
  }
  for (int i = 0; i < nq; ++i) a.lse[row0 + i] = m[i] + std::log(l[i]);
}

// --------------------------------------------------------------- backward --
template <typename T>
struct BwdArgs {
  const T *dout, *sq, *sk, *yv, *lse;  // dout (B_, N, C), lse (B_, N): contiguous
  const T* out;    // (B_, N, C) contiguous
  const T* delta;  // rowsum(dO * O) (B_, N); null with a single key block (computed in the task)
  Strides sq_s, sk_s, yv_s;
  int n, k, c;
  T *dsq, *dsk, *dyv;  // (B_, N, K|K|C) contiguous
  T* dsq_part;         // [ranges][B_][N][kpad] partials of dSq, or null: dSq written directly
  int64_t batch;
  bool need_dsq, need_dsk, need_dyv;  // autograd's needs_input_grad: the others are not computed
};

template <typename T>
void backward_task(const BwdArgs<T>& a, int64_t b, int range, int kb0, int kb1, const Blocks& keys,
                   const Blocks& queries, NextTaskPrefetch& next) {
  constexpr int L = kLanes<T>;
  const int K = a.k, C = a.c;
  const int kpad = int(round_up(K, L)), cpad = int(round_up(C, L));
  const int bn = int(round_up(keys.size, L));
  const int bm = queries.size;
  const T* sq = a.sq + b * a.sq_s.batch;
  const T* sk = a.sk + b * a.sk_s.batch;
  const T* yv = a.yv + b * a.yv_s.batch;
  const int64_t row0 = b * a.n;
  const T* dout = a.dout + row0 * C;
  const bool stage_do = C % L != 0;

  T* skt = scratch<T>(0, size_t(K) * bn);
  T* vt = scratch<T>(1, size_t(C) * bn);
  T* skp = scratch<T>(2, size_t(keys.size) * kpad);
  T* dsk = scratch<T>(3, size_t(keys.size) * (kpad + cpad));
  T* dyv = dsk + size_t(keys.size) * kpad;
  T* s = scratch<T>(5, size_t(2) * bm * bn);  // S then P; dP then dS
  T* ds = s + size_t(bm) * bn;
  T* sqp = scratch<T>(6, size_t(bm) * (kpad + cpad));
  T* dop = sqp + size_t(bm) * kpad;
  T* dsq_tile = a.dsq_part ? nullptr : scratch<T>(7, size_t(bm) * kpad);

  for (int kb = kb0; kb < kb1; ++kb) {
    const int j0 = kb * keys.size, nk = std::min(keys.size, a.n - j0);
    stage_transposed(skt, bn, sk + j0 * a.sk_s.row, a.sk_s.row, nk, K);
    stage_transposed(vt, bn, yv + j0 * a.yv_s.row, a.yv_s.row, nk, C);
    stage_rows(skp, kpad, sk + j0 * a.sk_s.row, a.sk_s.row, nk, K);
    const int whole = nk / L * L, tail = nk - whole;
    const bool dot_tail = tail > 0 && tail <= L / 4;  // a few keys: dot products, not a vector
    const int kcols = dot_tail ? whole : bn;           // columns of the S and dP products
    for (int qb = 0; qb < queries.count; ++qb) {
      const int i0 = qb * queries.size, nq = std::min(queries.size, a.n - i0);
      const T* sqi = sq + i0 * a.sq_s.row;
      const T* doi = dout + int64_t(i0) * C;
      if (kcols > 0) {
        product<T>(nq, kcols, K, sqi, a.sq_s.row, 1, skt, bn, s, bn, false, nullptr, &next);
        product<T>(nq, kcols, C, doi, C, 1, vt, bn, ds, bn, false, nullptr, &next);
      }
      if (dot_tail) {
        for (int i = 0; i < nq; ++i)
          for (int j = whole; j < nk; ++j) {
            s[int64_t(i) * bn + j] = dot(sqi + i * a.sq_s.row, sk + (j0 + j) * a.sk_s.row, K);
            ds[int64_t(i) * bn + j] = dot(doi + int64_t(i) * C, yv + (j0 + j) * a.yv_s.row, C);
          }
      }
      for (int i = 0; i < nq; ++i) {
        const Vec<T> lse = vsplat(a.lse[row0 + i0 + i]);
        T* srow = s + int64_t(i) * bn;
        T* drow = ds + int64_t(i) * bn;
        for (int j = 0; j < bn; j += L) vstore(srow + j, vexp(vload(srow + j) - lse));
        for (int j = nk; j < bn; ++j) srow[j] = drow[j] = T(0);  // padding keys
        const Vec<T> delta = vsplat(a.delta ? a.delta[row0 + i0 + i]
                                            : dot(a.out + (row0 + i0 + i) * C, doi + int64_t(i) * C, C));
        for (int j = 0; j < bn; j += L) vstore(drow + j, vload(srow + j) * (vload(drow + j) - delta));
      }
      const bool first = qb == 0;
      const T* dorows = doi;
      int64_t lddo = C;
      if (stage_do) {
        stage_rows(dop, cpad, doi, C, nq, C);
        dorows = dop;
        lddo = cpad;
      }
      // dYv rows that fill whole vectors: the last query block's product writes them in place (the
      // tile as its init: the same row stride).
      const bool dyv_in_place = qb + 1 == queries.count && cpad == C;
      if (a.need_dyv && dyv_in_place)
        product<T>(nk, cpad, nq, s, 1, bn, dorows, lddo, a.dyv + (row0 + j0) * C, C, false, first ? nullptr : dyv,
                   &next);
      else if (a.need_dyv)
        product<T>(nk, cpad, nq, s, 1, bn, dorows, lddo, dyv, cpad, !first, nullptr, &next);
      if (a.need_dsk) {
        stage_rows(sqp, kpad, sqi, a.sq_s.row, nq, K);
        product<T>(nk, kpad, nq, ds, 1, bn, sqp, kpad, dsk, kpad, !first, nullptr, &next);
      }
      if (!a.need_dsq) {
      } else if (a.dsq_part) {
        T* part = a.dsq_part + ((int64_t(range) * a.batch + b) * a.n + i0) * kpad;
        product<T>(nq, kpad, nk, ds, bn, 1, skp, kpad, part, kpad, kb != kb0, nullptr, &next);
      } else {
        product<T>(nq, kpad, nk, ds, bn, 1, skp, kpad, dsq_tile, kpad, false, nullptr, &next);
        write_rows(a.dsq + (row0 + i0) * K, dsq_tile, kpad, nq, K, static_cast<const T*>(nullptr));
      }
    }
    if (a.need_dsk) write_rows(a.dsk + (row0 + j0) * K, dsk, kpad, nk, K, static_cast<const T*>(nullptr));
    if (a.need_dyv && cpad != C) write_rows(a.dyv + (row0 + j0) * C, dyv, cpad, nk, C, static_cast<const T*>(nullptr));
  }
}

// ---------------------------------------------- bf16 / fp16 on the matrix unit --
// Inputs of a reduced type where sf_cpu_matrix.h serves it: every product on the matrix unit, the
// softmax in fp32.  Forward: a task holds a block of queries against every key at once (its m x N
// fp32 logits in per-thread scratch, m smaller as N grows), so the softmax takes two passes without
// rescaling and P, rounded to the input type as the unit takes it (as PyTorch's reduced-precision
// attention rounds it), multiplies Yv in one product over all keys; the output is written rounded,
// and in fp32 too where the backward needs it (keeps_output).
// Backward, a task per batch item, per block of keys against every query (queries in lanes):
// S^T = Sk Sq^T and dP^T = Yv dO^T recomputed, dS^T = P^T (dP^T - delta), delta = rowsum(dO O)
// from the fp32 output (as the converted path takes it) with several key blocks, or from the one
// block's tiles, rowsum(P dP) / rowsum(P) (see window_attention's backward); dSk = dS^T Sq and
// dYv = P^T dO complete per block (products over every query), dSq^T = Sk^T dS^T accumulated in
// fp32 over the key blocks in order (bitwise the same for any thread count) and rounded once.
namespace reduced {

using namespace sf::cpu::matrix;
namespace matrix = sf::cpu::matrix;

constexpr int kKeys = 64;  // backward: keys per block (its S^T and dP^T tiles: 64 x N fp32 each)

// Whether the forward keeps the fp32 output for the backward: only when the backward has several
// key blocks (with one, delta comes from its tiles; SeMask's windows of 49 tokens write no 4-byte
// copy of their output, a third of the forward's memory traffic).
inline bool keeps_output(int n) { return n > kKeys; }

template <typename S>
void forward(const at::Tensor& sq, const at::Tensor& sk, const at::Tensor& yv, at::Tensor& out, at::Tensor& out_wide,
             at::Tensor& lse) {
  const int64_t batch = sq.size(0);
  const int n = int(sq.size(1)), k = int(sq.size(2)), c = int(yv.size(2));
  const int mb = query_block(n), blocks = (n + mb - 1) / mb;
  const int64_t lk = tile_ld(n), lc = tile_ld(c), lp = even(n);
  const int64_t keys_size = packed_size(k, n), pack_size = keys_size + packed_size(n, c);
  const S* q = sq.data_ptr<S>();
  const S* kp = sk.data_ptr<S>();
  const S* vp = yv.data_ptr<S>();
  const Strides qs = strides_of(sq), ks = strides_of(sk), vs = strides_of(yv);
  S* o = out.data_ptr<S>();
  float* lse_p = lse.data_ptr<float>();
  auto pack = [&](int64_t b, S* dst) {  // Sk^T (K x N) and Yv (N x C) of batch item b
    pack_transposed(dst, kp + b * ks.batch, ks.row, n, k);
    pack_rows(dst + keys_size, vp + b * vs.batch, vs.row, n, c);
  };
  // Several blocks of a batch item share its packed Sk^T and Yv: packed in a pass before.
  at::Tensor packs;
  if (blocks > 1) {
    packs = pooled_empty({batch, pack_size}, sq.options());
    parallel_for(batch, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) pack(b, packs.data_ptr<S>() + b * pack_size);
    });
  }
  parallel_for(batch * blocks, 1, [&](int64_t t0, int64_t t1) {
    Session session;
    float* logits = scratch<float>(0, size_t(mb) * lk);
    float* acc = scratch<float>(1, size_t(mb) * lc);
    float* inv = scratch<float>(2, size_t(mb));
    S* p = scratch<S>(0, size_t(mb) * lp);
    S* stage = scratch<S>(1, size_t(mb) * even(k));
    S* local = blocks > 1 ? nullptr : scratch<S>(2, size_t(pack_size));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / blocks;
      const int i0 = int(t % blocks) * mb, m = std::min(mb, n - i0);
      const S* packed = local ? local : packs.data_ptr<S>() + b * pack_size;
      if (local) pack(b, local);
      int64_t lda;
      const S* a = a_rows(q + b * qs.batch + i0 * qs.row, qs.row, m, k, stage, lda);
      product(m, n, k, a, lda, packed, logits, lk, false);
      for (int i = 0; i < m; ++i) {
        float mx;
        const float sum = exp_row(logits + i * lk, n, lk, mx, false);
        store_row(p + i * lp, logits + i * lk, lp);
        lse_p[b * n + i0 + i] = mx + std::log(sum);
        inv[i] = 1.0f / sum;
      }
      product(m, c, n, p, lp, packed + keys_size, acc, lc, false);
      S* dst = o + (b * n + i0) * int64_t(c);
      float* wide = out_wide.numel() ? out_wide.data_ptr<float>() + (b * n + i0) * int64_t(c) : nullptr;
      for (int i = 0; i < m; ++i) {
        const Vec<float> s = vsplat(inv[i]);
        for (int64_t j = 0; j < lc; j += kLanes<float>) vstore(acc + i * lc + j, vload(acc + i * lc + j) * s);
        store_row(dst + int64_t(i) * c, acc + i * lc, c);
        if (wide) std::copy_n(acc + i * lc, c, wide + int64_t(i) * c);
      }
    }
  });
}

template <typename S>
void backward(const at::Tensor& dout, const at::Tensor& sq, const at::Tensor& sk, const at::Tensor& yv,
              const std::optional<at::Tensor>& out, const at::Tensor& lse, at::Tensor& dsq, at::Tensor& dsk,
              at::Tensor& dyv, bool need_dsq, bool need_dsk, bool need_dyv) {
  constexpr int L = kLanes<float>;
  const int64_t batch = sq.size(0);
  const int n = int(sq.size(1)), k = int(sq.size(2)), c = int(yv.size(2));
  const int kb = kKeys;
  const int64_t ln = tile_ld(n), lq = tile_ld(k), lc = tile_ld(c), lp = even(n), lb = even(kb);
  const int64_t q_t = packed_size(k, n), g_t = packed_size(c, n), q_rows = packed_size(n, k);
  const S* q = sq.data_ptr<S>();
  const S* kp = sk.data_ptr<S>();
  const S* vp = yv.data_ptr<S>();
  const S* g = dout.data_ptr<S>();
  const float* o = keeps_output(n) ? out->data_ptr<float>() : nullptr;  // else delta from the tiles
  const float* lse_p = lse.data_ptr<float>();
  const Strides qs = strides_of(sq), ks = strides_of(sk), vs = strides_of(yv);
  parallel_for(batch, 1, [&](int64_t b0, int64_t b1) {
    Session session;
    S* packed = scratch<S>(0, size_t(q_t + g_t + q_rows + packed_size(n, c)));
    S* sq_t = packed;              // Sq^T (K x N): S^T = Sk Sq^T
    S* do_t = sq_t + q_t;          // dO^T (C x N): dP^T = Yv dO^T
    S* sq_rows = do_t + g_t;       // Sq (N x K): dSk = dS^T Sq
    S* do_rows = sq_rows + q_rows; // dO (N x C): dYv = P^T dO
    S* a_op = scratch<S>(1, size_t(kb) * std::max<int64_t>(lp, even(std::max(k, c))) + size_t(k) * lb);
    S* b_op = scratch<S>(2, size_t(packed_size(kb, n)));
    float* st = scratch<float>(0, size_t(kb) * ln);   // S^T, then P^T
    float* dpt = scratch<float>(1, size_t(kb) * ln);  // dP^T, then dS^T
    float* cols = scratch<float>(2, size_t(2 * ln));  // per query: lse in base-2 units, delta
    float* lse2 = cols;
    float* delta = cols + ln;
    float* tile = scratch<float>(3, std::max(size_t(kb) * std::max(lq, lc), size_t(2 * ln)));
    float* dsq_t = scratch<float>(4, size_t(k) * ln);  // dSq^T
    const int64_t wide = round_up(std::max(k, kb), L), wm = round_up(std::max(kb, n), L);
    float* tmp = scratch<float>(5, size_t(2 * wide * wm));
    for (int64_t b = b0; b < b1; ++b) {
      const S* qb = q + b * qs.batch;
      const S* kb_p = kp + b * ks.batch;
      const S* vb = vp + b * vs.batch;
      const S* gb = g + b * n * int64_t(c);
      pack_transposed(sq_t, qb, qs.row, n, k);
      pack_transposed(do_t, gb, c, n, c);
      if (need_dsk) matrix::pack_rows(sq_rows, qb, qs.row, n, k);
      if (need_dyv) matrix::pack_rows(do_rows, gb, c, n, c);
      // Per query: lse (base 2; +inf past N gives P = 0) and delta = rowsum(dO O) from the fp32 output.
      for (int i = 0; i < n; ++i) {
        lse2[i] = lse_p[b * n + i] * kLog2e<float>;
        if (!o) continue;
        load_row(tile, gb + int64_t(i) * c, c);  // tile: free until the key blocks
        delta[i] = dot(tile, o + (b * n + i) * int64_t(c), c);
      }
      std::fill(lse2 + n, lse2 + ln, std::numeric_limits<float>::infinity());
      std::fill(delta + n, delta + ln, 0.0f);
      for (int j0 = 0; j0 < n; j0 += kb) {
        const int m = std::min(kb, n - j0);
        int64_t lda;
        const S* a = a_rows(kb_p + j0 * ks.row, ks.row, m, k, a_op, lda);
        product(m, n, k, a, lda, sq_t, st, ln, false);
        a = a_rows(vb + j0 * vs.row, vs.row, m, c, a_op, lda);
        product(m, n, c, a, lda, do_t, dpt, ln, false);
        const Vec<float> log2e = vsplat(kLog2e<float>);
        if (!o) {  // the one key block: P^T first, delta = rowsum(P dP) / rowsum(P) from the tiles
          float* weighted = tile;  // tile: free until dSk
          float* total = tile + ln;
          std::fill(tile, tile + 2 * ln, 0.0f);
          for (int r = 0; r < m; ++r) {
            float* pr = st + r * ln;
            for (int64_t i = 0; i < ln; i += L) {
              const Vec<float> pv = vexp2_nonpositive(vload(pr + i) * log2e - vload(lse2 + i));
              vstore(pr + i, pv);
              vstore(weighted + i, vload(weighted + i) + pv * vload(dpt + r * ln + i));
              vstore(total + i, vload(total + i) + pv);
            }
          }
          for (int i = 0; i < n; ++i) delta[i] = weighted[i] / total[i];
        }
        for (int r = 0; r < m; ++r) {  // P^T = exp(S^T - lse), dS^T = P^T (dP^T - delta): queries in lanes
          float* pr = st + r * ln;
          float* dr = dpt + r * ln;
          for (int64_t i = 0; i < ln; i += L) {
            const Vec<float> pv = o ? vexp2_nonpositive(vload(pr + i) * log2e - vload(lse2 + i)) : vload(pr + i);
            vstore(pr + i, pv);
            vstore(dr + i, pv * (vload(dr + i) - vload(delta + i)));
          }
        }
        if (need_dsk) {  // dSk rows = dS^T Sq, complete
          for (int r = 0; r < m; ++r) store_row(a_op + r * lp, dpt + r * ln, lp);
          product(m, k, n, a_op, lp, sq_rows, tile, lq, false);
          S* dst = dsk.data_ptr<S>() + (b * n + j0) * int64_t(k);
          for (int r = 0; r < m; ++r) store_row(dst + int64_t(r) * k, tile + r * lq, k);
        }
        if (need_dyv) {  // dYv rows = P^T dO, complete
          for (int r = 0; r < m; ++r) store_row(a_op + r * lp, st + r * ln, lp);
          product(m, c, n, a_op, lp, do_rows, tile, lc, false);
          S* dst = dyv.data_ptr<S>() + (b * n + j0) * int64_t(c);
          for (int r = 0; r < m; ++r) store_row(dst + int64_t(r) * c, tile + r * lc, c);
        }
        if (need_dsq) {  // dSq^T += Sk_blk^T dS^T, in key-block order
          a_transposed(a_op, kb_p + j0 * ks.row, ks.row, m, k, tmp);
          matrix::pack_rows(b_op, dpt, ln, m, n);
          product(k, n, m, a_op, even(m), b_op, dsq_t, ln, j0 > 0);
        }
      }
      if (need_dsq) write_transposed(dsq.data_ptr<S>() + b * n * int64_t(k), dsq_t, ln, n, k, tmp);
    }
  });
}

}  // namespace reduced

// ---------------------------------------------------------------- bindings --
// f(T{}) with T = float or double (fp16 / bf16 arrive converted to float32 unless the matrix unit
// serves them: sf::cpu::matrix::dispatch).
template <typename F>
void dispatch_compute(at::ScalarType dtype, F&& f) {
  if (dtype == at::kDouble) f(double{});
  else f(float{});
}

void check_inputs(const at::Tensor& sq, const at::Tensor& sk, const at::Tensor& yv) {
  SF_CPU_CHECK_INPUT(sq, 3);
  SF_CPU_CHECK_INPUT(sk, 3);
  SF_CPU_CHECK_INPUT(yv, 3);
  SF_CPU_CHECK_SAME_DTYPE(sk, sq);
  SF_CPU_CHECK_SAME_DTYPE(yv, sq);
  TORCH_CHECK(sq.scalar_type() == at::kFloat || sq.scalar_type() == at::kDouble || serves(sq.scalar_type()),
              "semantic_attention: the cpu kernels take float32 or float64 (float16 / bfloat16 where the "
              "matrix unit serves them), got ", sq.scalar_type());
  TORCH_CHECK(sk.sizes() == sq.sizes(), "semantic_attention: sk must have sq's shape (B_, N, K)");
  TORCH_CHECK(yv.size(0) == sq.size(0) && yv.size(1) == sq.size(1), "semantic_attention: yv must be (B_, N, C)");
  TORCH_CHECK(sq.size(1) >= 1 && sq.size(2) >= 1 && yv.size(2) >= 1, "semantic_attention: empty N, K or C");
  constexpr int64_t kIntLimit = int64_t(1) << 31;
  TORCH_CHECK(sq.size(1) < kIntLimit && sq.size(2) < kIntLimit && yv.size(2) < kIntLimit,
              "semantic_attention: N, K and C must be below 2^31");
  SF_CPU_CHECK_CONTIGUOUS_LAST_DIM(sq);
  SF_CPU_CHECK_CONTIGUOUS_LAST_DIM(sk);
  SF_CPU_CHECK_CONTIGUOUS_LAST_DIM(yv);
}

// Returns (out, lse, out_wide): out_wide is the fp32 output of reduced inputs where the backward
// needs it (reduced::keeps_output; out is its rounding), empty otherwise.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_op(const at::Tensor& sq, const at::Tensor& sk,
                                                          const at::Tensor& yv) {
  check_inputs(sq, sk, yv);
  const int64_t batch = sq.size(0);
  const int n = int(sq.size(1));
  at::Tensor out = pooled_empty({batch, n, yv.size(2)}, yv.options());
  at::Tensor lse = at::empty({batch, n}, sq.options().dtype(sq.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  const bool reduced_inputs = serves(sq.scalar_type());
  at::Tensor out_wide = reduced_inputs && reduced::keeps_output(n) ? pooled_empty(out.sizes(), lse.options())
                                                                     : at::empty({0}, lse.options());
  if (batch == 0) return {out, lse, out_wide};
  if (reduced_inputs) {
    sf::cpu::matrix::dispatch(sq.scalar_type(),
                     [&](auto tag) { reduced::forward<decltype(tag)>(sq, sk, yv, out, out_wide, lse); });
    return {out, lse, out_wide};
  }
  const Blocks queries = balanced(n, kQueryBlock), keys = balanced(n, kKeyBlock);
  dispatch_compute(sq.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const FwdArgs<T> a{sq.data_ptr<T>(), sk.data_ptr<T>(), yv.data_ptr<T>(), strides_of(sq), strides_of(sk),
                       strides_of(yv), n, int(sq.size(2)), int(yv.size(2)), out.data_ptr<T>(), lse.data_ptr<T>()};
    parallel_for(batch * queries.count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int qb = int(t % queries.count), i0 = qb * queries.size;
        NextTaskPrefetch next;
        if (t + 1 < end) {  // the next task's query rows, and its keys and values if they change
          const int64_t nb = (t + 1) / queries.count;
          const int ni0 = int((t + 1) % queries.count) * queries.size;
          next.add(a.sq + nb * a.sq_s.batch + ni0 * a.sq_s.row, std::min(queries.size, n - ni0),
                   a.sq_s.row * sizeof(T), a.k * sizeof(T));
          if (nb != t / queries.count) {
            next.add(a.sk + nb * a.sk_s.batch, n, a.sk_s.row * sizeof(T), a.k * sizeof(T));
            next.add(a.yv + nb * a.yv_s.batch, n, a.yv_s.row * sizeof(T), a.c * sizeof(T));
          }
        }
        forward_task(a, t / queries.count, i0, std::min(queries.size, n - i0), keys, next);
      }
    });
  });
  return {out, lse, out_wide};
}

// out: the forward's output (float32 for reduced inputs: its out_wide), where the backward reads it
// (not for reduced inputs whose forward kept none).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor& dout, const at::Tensor& sq,
                                                           const at::Tensor& sk, const at::Tensor& yv,
                                                           const std::optional<at::Tensor>& out,
                                                           const at::Tensor& lse, bool need_dsq, bool need_dsk,
                                                           bool need_dyv) {
  check_inputs(sq, sk, yv);
  SF_CPU_CHECK_INPUT(dout, 3);
  SF_CPU_CHECK_INPUT(lse, 2);
  SF_CPU_CHECK_SAME_DTYPE(dout, sq);
  const bool on_unit = serves(sq.scalar_type());
  if (!on_unit || reduced::keeps_output(int(sq.size(1)))) {
    TORCH_CHECK(out.has_value(), "semantic_attention: the forward's output is needed here");
    const at::Tensor& output = *out;
    SF_CPU_CHECK_INPUT(output, 3);
    TORCH_CHECK(output.scalar_type() == (on_unit ? at::kFloat : sq.scalar_type()),
                "semantic_attention: out must be the forward's ", on_unit ? "float32 output" : "output", ", got ",
                output.scalar_type());
    TORCH_CHECK(output.sizes() == yv.sizes(), "semantic_attention: out must be (B_, N, C)");
    SF_CPU_CHECK_CONTIGUOUS(output);
  }
  TORCH_CHECK(lse.scalar_type() == (sq.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
              "semantic_attention: lse must be float32 (float64 for float64 inputs), got ", lse.scalar_type());
  TORCH_CHECK(dout.sizes() == yv.sizes(), "semantic_attention: dout must be (B_, N, C)");
  TORCH_CHECK(lse.size(0) == sq.size(0) && lse.size(1) == sq.size(1), "semantic_attention: lse must be (B_, N)");
  SF_CPU_CHECK_CONTIGUOUS(dout);
  SF_CPU_CHECK_CONTIGUOUS(lse);
  const int64_t batch = sq.size(0);
  const int n = int(sq.size(1)), k = int(sq.size(2)), c = int(yv.size(2));
  at::Tensor dsq = pooled_empty(sq.sizes(), sq.options()), dsk = pooled_empty(sk.sizes(), sk.options());
  at::Tensor dyv = pooled_empty(yv.sizes(), yv.options());
  if (batch == 0) return {dsq, dsk, dyv};
  if (on_unit) {
    sf::cpu::matrix::dispatch(sq.scalar_type(), [&](auto tag) {
      reduced::backward<decltype(tag)>(dout, sq, sk, yv, out, lse, dsq, dsk, dyv, need_dsq, need_dsk, need_dyv);
    });
    return {dsq, dsk, dyv};
  }
  const Blocks keys = balanced(n, kBwdKeyBlock), queries = balanced(n, kBwdQueryBlock);
  // Key ranges per batch item: a fixed function of the shape (never of the thread count).
  const int ranges_wanted = int(std::min<int64_t>(keys.count, (kBwdTasks + batch - 1) / batch));
  const int per_range = (keys.count + ranges_wanted - 1) / ranges_wanted;
  const int ranges = (keys.count + per_range - 1) / per_range;
  // Several key blocks: delta in a pass before, dSq through per-range partials.
  const bool several_blocks = keys.count > 1, partials = several_blocks && need_dsq;
  dispatch_compute(sq.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const int64_t kpad = round_up(k, kLanes<T>);
    const T* g = dout.data_ptr<T>();
    at::Tensor delta, part;
    if (partials) part = pooled_empty({ranges, batch, n, kpad}, sq.options());
    if (several_blocks) {
      delta = at::empty({batch, n}, lse.options());
      const T* o = out->data_ptr<T>();
      T* dl = delta.data_ptr<T>();
      parallel_for(batch * n, 64, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) dl[r] = dot(o + r * c, g + r * c, c);
      });
    }
    const BwdArgs<T> a{g, sq.data_ptr<T>(), sk.data_ptr<T>(), yv.data_ptr<T>(), lse.data_ptr<T>(),
                       out->data_ptr<T>(), several_blocks ? delta.data_ptr<T>() : nullptr,
                       strides_of(sq), strides_of(sk), strides_of(yv), n, k, c, dsq.data_ptr<T>(),
                       dsk.data_ptr<T>(), dyv.data_ptr<T>(), partials ? part.data_ptr<T>() : nullptr, batch,
                       need_dsq, need_dsk, need_dyv};
    parallel_for(batch * ranges, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int r = int(t % ranges), kb0 = r * per_range;
        NextTaskPrefetch next;
        if (t + 1 < end && (t + 1) / ranges != t / ranges) {  // the next batch item's rows
          const int64_t nb = (t + 1) / ranges;
          next.add(a.sq + nb * a.sq_s.batch, n, a.sq_s.row * sizeof(T), k * sizeof(T));
          next.add(a.sk + nb * a.sk_s.batch, n, a.sk_s.row * sizeof(T), k * sizeof(T));
          next.add(a.yv + nb * a.yv_s.batch, n, a.yv_s.row * sizeof(T), c * sizeof(T));
          next.add(a.dout + nb * n * c, 1, 0, int64_t(n) * c * sizeof(T));
          next.add(a.out + nb * n * c, 1, 0, int64_t(n) * c * sizeof(T));
        }
        backward_task(a, t / ranges, r, kb0, std::min(keys.count, kb0 + per_range), keys, queries, next);
      }
    });
    if (partials) {  // dSq = the ranges' partials added in range order
      const T* p = part.data_ptr<T>();
      T* d = dsq.data_ptr<T>();
      const int64_t range_stride = batch * n * kpad;
      parallel_for(batch * n, 16, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          T* dst = d + row * k;
          std::memcpy(dst, p + row * kpad, sizeof(T) * k);
          for (int r = 1; r < ranges; ++r) {
            const T* src = p + r * range_stride + row * kpad;
            for (int t = 0; t < k; ++t) dst[t] += src[t];
          }
        }
      });
    }
  });
  return {dsq, dsk, dyv};
}

}  // namespace sf_cpu_semantic

SF_CPU_LIBRARY(m) {
  m.def("semantic_attention_forward(Tensor sq, Tensor sk, Tensor yv) -> (Tensor, Tensor, Tensor)");
  m.def("semantic_attention_backward(Tensor dout, Tensor sq, Tensor sk, Tensor yv, Tensor? out, Tensor lse, "
        "bool need_dsq, bool need_dsk, bool need_dyv) -> (Tensor, Tensor, Tensor)");
  SF_CPU_MATRIX_UNIT_QUERY(m, "semantic_attention");
  // Whether the forward on the matrix unit keeps the fp32 output (its third result) for N tokens.
  m.def("semantic_attention_keeps_output(int n) -> bool", [](int64_t n) { return sf_cpu_semantic::reduced::keeps_output(int(n)); });
}

SF_CPU_LIBRARY_IMPL(m) {
  m.impl("semantic_attention_forward", &sf_cpu_semantic::forward_op);
  m.impl("semantic_attention_backward", &sf_cpu_semantic::backward_op);
}
