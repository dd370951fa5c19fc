// The kernels of Swin (shifted-)window attention on the CPU (window_attention.cpp describes them and
// binds them; it alone includes this file: an anonymous namespace keeps them private to that
// op's library, like sf_cpu.h's hidden symbols).
#pragma once

#include "sf_cpu.h"
#include "window_attention_tokens.h"
#include <numeric>

namespace {

using namespace sf::cpu;

struct Problem {
  int64_t batch;  // B_ windows
  int heads, n, d;
  int wh, ww;
  // Shift mask from region ids (grid > 0), or an explicit mask (mask_windows > 0), or neither.
  int grid_h, grid_w, shift_h, shift_w;
  int mask_windows;
  // Converted to the compute type where used (fp64 keeps every bit); the dropout hash compares
  // in fp32 (as on the GPU), its multiplier 1 / (1 - p) is taken in the compute type.
  double scale, mask_value, dropout_p;
  uint64_t seed;
  // The logits' scale in base-2 units (see Logits).
  double logit_scale() const { return scale * kLog2e<double>; }
  int table_rows() const { return (2 * wh - 1) * (2 * ww - 1); }
  bool shifted() const { return grid_h > 0; }
};

// Region id (0..8) of token t of window w, as reference.shift_region_ids.
inline int region_id(const Problem& p, int64_t w, int t) {
  const int hp = p.grid_h * p.wh, wp = p.grid_w * p.ww;
  const int y = int(w / p.grid_w) * p.wh + t / p.ww;
  const int x = int(w % p.grid_w) * p.ww + t % p.ww;
  const int ry = p.shift_h ? (y >= hp - p.wh) + (y >= hp - p.shift_h) : 0;
  const int rx = p.shift_w ? (x >= wp - p.ww) + (x >= wp - p.shift_w) : 0;
  return ry * 3 + rx;
}

// Relative-position index of (query i, key j), as reference.relative_position_index.
inline int relative_index(const Problem& p, int i, int j) {
  const int dy = i / p.ww - j / p.ww + p.wh - 1, dx = i % p.ww - j % p.ww + p.ww - 1;
  return dy * (2 * p.ww - 1) + dx;
}

// Per-call constants.  The logits' additive part (bias + mask) takes few distinct values: one per
// head without a mask, one per (corner pattern, head) with the shift mask (a window's region ids
// depend only on whether it is in the last window row and / or column), one per (mask window,
// head) with an explicit mask.  Each is stored once in S^T layout (N x Np, zero in padded lanes)
// and starts the accumulators of the S^T product.  Logits are kept in base-2 units (times
// log2(e), as the scale: Problem::logit_scale), so the softmax takes 2^x; the row logsumexp
// leaves the kernel in natural units.
template <typename T>
struct Logits {
  const Problem& p;
  int np;
  int patterns = 0;
  static constexpr size_t kReusedTileBytes = size_t(4) << 20;
  T* init = nullptr;            // (patterns, h, N, Np), or null: no bias and no mask
  std::vector<T> owned;         // init's storage when it is not the thread's scratch
  Logits(const Logits&) = delete;  // init may point into owned
  std::vector<int> rel;         // (N, N): table row of (i, j), indexed [j * N + i]

  Logits(const Problem& p_, int np_, const T* table, const T* mask) : p(p_), np(np_) {
    const int n = p.n, heads = p.heads;
    rel.resize(size_t(n) * n);
    for (int j = 0; j < n; ++j)  // each query window row: consecutive table rows (no divisions per pair)
      for (int ty = 0; ty < p.wh; ++ty)
        std::iota(rel.begin() + size_t(j) * n + ty * p.ww, rel.begin() + size_t(j) * n + (ty + 1) * p.ww,
                  relative_index(p, ty * p.ww, j));
    patterns = mask ? p.mask_windows : p.shifted() ? 4 : 1;
    if (!table && !mask && !p.shifted()) return;
    // What a pattern adds to every head: the shift mask (region ids of a window in the first or
    // last window row / column) or the explicit mask, in S^T layout; built before the heads so the
    // (pattern, head) tiles below are copies of table runs and an add.  This is the call's fixed
    // cost (a shifted 3-head, one-window call: 53 -> 36 us with the divisions and branches per
    // pair gone and the tiles in reused scratch).
    std::vector<T> added(mask || p.shifted() ? size_t(patterns) * n * n : 0, T(0));
    std::vector<int> region(n);
    for (int pat = 0; pat < patterns && !added.empty(); ++pat) {
      T* a = added.data() + size_t(pat) * n * n;
      if (mask) {
        for (int j = 0; j < n; ++j)
          for (int i = 0; i < n; ++i) a[size_t(j) * n + i] = mask[(int64_t(pat) * n + i) * n + j];
      } else {
        const int64_t wy = (pat & 2) ? p.grid_h - 1 : 0, wx = (pat & 1) ? p.grid_w - 1 : 0;
        for (int t = 0; t < n; ++t) region[t] = region_id(p, wy * p.grid_w + wx, t);
        for (int j = 0; j < n; ++j)
          for (int i = 0; i < n; ++i) a[size_t(j) * n + i] = region[i] != region[j] ? T(p.mask_value) : T(0);
      }
    }
    // Up to a few MiB in the calling thread's scratch (kept between calls: a fresh allocation is
    // mapped anew per call and its first-touch page faults cost more than filling it; the tasks
    // use slot 0); larger (many explicit-mask windows) in memory owned by this call.
    const size_t elems = size_t(patterns) * heads * n * np;
    if (elems * sizeof(T) <= kReusedTileBytes) {
      init = scratch<T>(7, elems);
    } else {
      owned.resize(elems);
      init = owned.data();
    }
    parallel_for(int64_t(patterns) * heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> column(table ? p.table_rows() : 0);  // the table's column of a head
      for (int64_t task = begin; task < end; ++task) {
        const int pat = int(task / heads), h = int(task % heads);
        for (int r = 0; r < int(column.size()); ++r) column[r] = table[int64_t(r) * heads + h];
        const T* a = added.empty() ? nullptr : added.data() + size_t(pat) * n * n;
        T* tile = init + size_t(task) * n * np;
        for (int j = 0; j < n; ++j) {
          T* row = tile + size_t(j) * np;
          if (table) {  // the queries of one window row read consecutive table rows (rel)
            for (int ty = 0; ty < p.wh; ++ty) {
              const T* src = column.data() + rel[size_t(j) * n + ty * p.ww];
              for (int tx = 0; tx < p.ww; ++tx) row[ty * p.ww + tx] = src[tx];
            }
          } else {
            std::fill(row, row + n, T(0));
          }
          if (a) {
            const T* aj = a + size_t(j) * n;
            for (int i = 0; i < n; ++i) row[i] = (row[i] + aj[i]) * kLog2e<T>;
          } else {
            for (int i = 0; i < n; ++i) row[i] *= kLog2e<T>;
          }
          std::fill(row + n, row + np, T(0));
        }
      }
    });
  }

  // The additive tile of window b_, head h (nullptr: zero).
  const T* tile(int64_t b_, int h) const {
    if (!init) return nullptr;
    int pat = 0;
    if (p.mask_windows) {
      pat = int(b_ % p.mask_windows);
    } else if (p.shifted()) {
      const int64_t w = b_ % (int64_t(p.grid_h) * p.grid_w);
      pat = 2 * (w / p.grid_w == p.grid_h - 1) + (w % p.grid_w == p.grid_w - 1);
    }
    return init + (size_t(pat) * p.heads + h) * p.n * np;
  }
};

// Scratch layout of a task: named tiles carved out of one per-thread buffer.
template <typename T>
struct Tiles {
  T* base;
  size_t used = 0;
  T* take(size_t n) {
    T* p = base + used;
    used += round_up(int64_t(n), 64 / sizeof(T));  // keep tiles cache-line aligned
    return p;
  }
};

// A tile of token rows as a product operand: rows at ptr + t * ld.
template <typename T>
struct Operand {
  const T* ptr;
  int64_t ld;
};

// n rows of d elements -> dst (d <= dp), converted to T, zero columns up to dp.
template <typename S, typename T>
inline void copy_row(T* __restrict__ dst, const S* __restrict__ src, int d, int dp) {
  constexpr int L = kLanes<T>;
  int c = 0;
  if constexpr (std::is_same_v<S, T>) {
    for (; c + L <= d; c += L) vstore(dst + c, vload(src + c));
    for (; c < d; ++c) dst[c] = src[c];
  } else {
    load_row(dst, src, d);
    c = d;
  }
  for (; c < dp; ++c) dst[c] = T(0);
}

// The rows of a token tensor as an operand: read in place when they are equally spaced rows of
// the compute type (and, for a B operand or a transpose, fill whole vectors), else staged into
// tile (N x dp).  Listed rows can be equally spaced too (an image-mode window as wide as the
// image).
template <typename S, typename T>
inline Operand<T> rows_operand(const TokenRows<const S>& rows, int n, int d, int dp, bool vector_columns, T* tile) {
  if constexpr (std::is_same_v<S, T>) {
    if (!vector_columns || d == dp) {
      if (rows.listed.empty()) return {rows.base, rows.ld};
      const int64_t ld = n > 1 ? rows[1] - rows[0] : dp;
      bool uniform = true;
      for (int t = 2; t < n && uniform; ++t) uniform = rows[t] == rows[0] + t * ld;
      if (uniform) return {rows[0], ld};
    }
  }
  for (int t = 0; t < n; ++t) copy_row(tile + size_t(t) * dp, rows[t], d, dp);
  return {tile, dp};
}

// Where a product writes rows bound for `rows`: in place when they are strided rows of the
// compute type that fill whole vectors (the window mode's outputs and gradients), else into the
// staging tile, which the caller then writes row by row.
template <typename T>
struct Target {
  T* ptr;
  int64_t ld;
};
template <typename S, typename T>
inline Target<T> in_place(const TokenRows<S>& rows, int d, int dp, T* tile) {
  if constexpr (std::is_same_v<S, T>) {
    if (rows.listed.empty() && rows.base && d == dp) return {rows.base, rows.ld};
  }
  return {tile, dp};
}

// dst[0:d] = src[0:d] * scale in the storage type.
template <typename S, typename T>
inline void write_row(S* __restrict__ dst, const T* __restrict__ src, int d, T scale) {
  constexpr int L = kLanes<T>;
  if constexpr (std::is_same_v<S, T>) {
    const Vec<T> s = vsplat(scale);
    int c = 0;
    for (; c + L <= d; c += L) vstore(dst + c, vload(src + c) * s);
    for (; c < d; ++c) dst[c] = src[c] * scale;
  } else {
    store_row(dst, src, d, scale);
  }
}

// Fills f[j][i] (N x Np) with the dropout multipliers of (window b_, head h).
template <typename T>
inline void dropout_factors(T* f, const Problem& p, int np, int64_t b_, int h) {
  const uint64_t base = uint64_t((b_ * p.heads + h) * p.n) * uint64_t(p.n);
  const T keep = T(1) / (T(1) - T(p.dropout_p));
  for (int j = 0; j < p.n; ++j)
    for (int i = 0; i < np; ++i)
      f[size_t(j) * np + i] =
          i < p.n && dropout_factor(p.seed, base + uint64_t(i) * p.n + j, float(p.dropout_p)) != 0.f ? keep : T(0);
}

// Queries scored in S^T's vector lanes: all of them rounded up to whole vectors, unless only a few
// (at most half a vector) spill past the last whole vector.  Those few are scored as rows
// (s_i = (scale q_i) K^T, keys in lanes) instead: a padded vector of lanes costs N d FMAs, a row
// N d / L (Swin's N = 49 is 3 vectors and one query).
template <typename T>
inline int lane_queries(int n) {
  constexpr int L = kLanes<T>;
  const int spill = n % L;
  return spill > 0 && spill <= L / 2 ? n - spill : int(round_up(n, L));
}

// s[j] = scale a . b_j for the N rows b_j of an operand, keys in lanes (zero past N): each block of
// L rows gives L dot-product vectors, folded into one by hsum_lanes.  a and the rows of b: dp
// elements (whole vectors, zero past d).
template <typename T>
inline void row_dots(const T* a, Operand<T> b, int n, int np, int dp, T scale, T* s) {
  constexpr int L = kLanes<T>;
  for (int j0 = 0; j0 < np; j0 += L) {
    Vec<T> dots[L];
    for (int t = 0; t < L; ++t) {
      Vec<T> acc{};
      if (j0 + t < n) {
        const T* bj = b.ptr + (j0 + t) * b.ld;
        for (int c = 0; c < dp; c += L) acc += vload(bj + c) * vload(a + c);
      }
      dots[t] = acc;
    }
    vstore(s + j0, hsum_lanes<T>(dots) * scale);
  }
}

// Row i of the task's logits, s_i = scale q_i K^T + the additive tile's terms (its column i),
// keys in lanes; -inf past N.
template <typename T>
inline void row_logits(int i, int n, int np, int dp, Operand<T> q, Operand<T> k, T scale, const T* init, T* s) {
  row_dots(q.ptr + i * q.ld, k, n, np, dp, scale, s);
  if (init)
    for (int j = 0; j < n; ++j) s[j] += init[size_t(j) * np + i];
  std::fill(s + n, s + np, -std::numeric_limits<T>::infinity());
}

// Column i of an S^T-layout tile (N x Np) = the row s.
template <typename T>
inline void scatter_column(T* tile, int n, int np, int i, const T* s) {
  for (int j = 0; j < n; ++j) tile[size_t(j) * np + i] = s[j];
}

// The row queries [nl, n) of a forward task: logits, softmax, P to the S^T tile's lanes nl.. as
// the lane path leaves it, with lse and 1/l.
template <typename T>
inline void row_query_softmax(int n, int nl, int np, int dp, Operand<T> q, Operand<T> k, T scale, const T* init,
                              T* s, T* st, T* lse_lanes, T* inv_l) {
  constexpr int L = kLanes<T>;
  for (int i = nl; i < n; ++i) {
    row_logits(i, n, np, dp, q, k, scale, init, s);
    Vec<T> m = vsplat(-std::numeric_limits<T>::infinity());
    for (int j = 0; j < np; j += L) m = vmax<T>(m, vload(s + j));
    const T mx = hmax<T>(m);
    Vec<T> l{};
    for (int j = 0; j < np; j += L) {
      const Vec<T> e = vexp2_nonpositive(vload(s + j) - mx);
      vstore(s + j, e);
      l += e;
    }
    const T sum = hsum<T>(l);
    scatter_column(st, n, np, i, s);
    lse_lanes[i] = mx * kLn2<T> + std::log(sum);
    inv_l[i] = T(1) / sum;
  }
}

// With row queries the products leave the lanes past N of S^T-layout tiles unwritten: zero them
// once per thread (nothing writes them later), so lane-wise passes never meet stale values.
template <typename T>
inline void zero_pad_lanes(T* tile, int n, int np) {
  for (int j = 0; j < n; ++j) std::fill(tile + size_t(j) * np + n, tile + size_t(j + 1) * np, T(0));
}

// --------------------------------------------------------------- forward --
template <typename S, typename Tokens>
void forward(const Problem& p, const Tokens& tokens, const Logits<acc_t<S>>& lg, acc_t<S>* lse) {
  using T = acc_t<S>;
  constexpr int L = kLanes<T>;
  const int n = p.n, d = p.d, np = int(round_up(n, L)), dp = int(round_up(d, L));
  const int nl = lane_queries<T>(n), row_queries = std::max(0, n - nl);
  const size_t tile_elems = size_t(dp) * np + 4 * size_t(n) * dp + 2 * size_t(n) * np + 5 * size_t(np) + 1024;
  parallel_for(p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    Tiles<T> tiles{scratch<T>(0, tile_elems)};
    T* qt = tiles.take(size_t(dp) * np);
    T* srow = tiles.take(np);  // a row query's logits, then P
    T* qtile = tiles.take(size_t(n) * dp);
    T* ktile = tiles.take(size_t(n) * dp);
    T* vtile = tiles.take(size_t(n) * dp);
    T* oacc = tiles.take(size_t(n) * dp);
    T* st = tiles.take(size_t(n) * np);
    T* drop = p.dropout_p > 0 ? tiles.take(size_t(n) * np) : nullptr;
    T* inv_l = tiles.take(np);
    T* lse_lanes = tiles.take(np);
    if (row_queries) zero_pad_lanes(st, n, np);
    Rows<S> rows(n, Tokens::kListed), next_rows(n, Tokens::kListed);  // this task's and the next one's
    tokens.rows(begin / p.heads, int(begin % p.heads), rows);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b_ = task / p.heads;
      const int h = int(task % p.heads);
      NextTaskPrefetch next;
      if (task + 1 < end) {
        tokens.rows((task + 1) / p.heads, int((task + 1) % p.heads), next_rows);
        prefetch_rows(next_rows, n, d, next);
      }
      const Operand<T> q = rows_operand(rows.q, n, d, dp, true, qtile);
      const Operand<T> k = rows_operand(rows.k, n, d, dp, row_queries > 0, ktile);
      const Operand<T> v = rows_operand(rows.v, n, d, dp, true, vtile);
      const T* init = lg.tile(b_, h);
      transpose(q.ptr, q.ld, std::min(n, nl), dp, qt, np, T(p.logit_scale()));
      product<T>(n, nl, d, k.ptr, k.ld, 1, qt, np, st, np, false, init, &next);
      if (row_queries) row_query_softmax(n, nl, np, dp, q, k, T(p.logit_scale()), init, srow, st, lse_lanes, inv_l);
      // Softmax down the key rows, every lane query at once.
      for (int i = 0; i < nl; i += L) {
        const Vec<T> m = column_max(st + i, np, n, vsplat(-std::numeric_limits<T>::infinity()));
        Vec<T> l{};
        for (int j = 0; j < n; ++j) {
          const Vec<T> e = vexp2_nonpositive(vload(st + size_t(j) * np + i) - m);
          vstore(st + size_t(j) * np + i, e);
          l += e;
        }
        vstore(lse_lanes + i, m * kLn2<T> + vlog(l));
        vstore(inv_l + i, T(1) / l);
      }
      std::copy(lse_lanes, lse_lanes + n, lse + (b_ * p.heads + h) * n);
      if (drop) {
        dropout_factors(drop, p, np, b_, h);
        for (size_t e = 0; e < size_t(n) * np; e += L) vstore(st + e, vload(st + e) * vload(drop + e));
      }
      // O[i][:] = sum_j P[i][j] V[j][:] / l_i: P^T read as A(i, j) = st[j * np + i].
      const Target<T> o = in_place(rows.out, d, dp, oacc);
      product<T>(n, dp, n, st, 1, np, v.ptr, v.ld, o.ptr, o.ld, false, nullptr, &next, inv_l);
      if (o.ptr == oacc)
        for (int i = 0; i < n; ++i)
          if (rows.out[i]) write_row(rows.out[i], oacc + size_t(i) * dp, d, T(1));
      std::swap(rows, next_rows);
    }
  });
}

// -------------------------------------------------------------- backward --
// Windows per chunk of the table / qkv_bias gradient: a function of the shape only (so the
// summation order, hence every bit of the result, does not depend on the thread count), with
// about kChunkTasks (chunk, head) tasks to balance the threads.
constexpr int64_t kChunkTasks = 256;
inline int64_t windows_per_chunk(int64_t batch, int heads) {
  const int64_t chunks = std::min<int64_t>(batch, std::max<int64_t>(1, (kChunkTasks + heads - 1) / heads));
  return (batch + chunks - 1) / chunks;
}

// Writes gradient rows staged in acc; a row without a destination (pad token) is added to pad_acc.
template <typename S, typename T>
inline void write_grad_rows(const TokenRows<S>& dst, const T* acc, int n, int d, int dp, T* pad_acc) {
  for (int t = 0; t < n; ++t) {
    if (S* row = dst[t]) {
      write_row(row, acc + size_t(t) * dp, d, T(1));
    } else {
      for (int c = 0; c < d; ++c) pad_acc[c] += acc[size_t(t) * dp + c];
    }
  }
}

// One gradient's rows: [scale *] the product run(target), written in place or staged and written.
template <typename S, typename T, typename Run>
inline void gradient_rows(const TokenRows<S>& dst, int n, int d, int dp, T* tile, T* pad_acc, Run&& run) {
  const Target<T> t = in_place(dst, d, dp, tile);
  run(t);
  if (t.ptr == tile) write_grad_rows(dst, tile, n, d, dp, pad_acc);
}

// Which gradients a backward call computes (autograd's needs_input_grad): dQ, dK and dV (dS is
// needed by any of them); the table and pad partials are null when not wanted.
struct Needs {
  bool dq = true, dkv = true;
};

template <typename S, typename Tokens, typename Grads>
void backward(const Problem& p, const Tokens& tokens, const Grads& grads, const Logits<acc_t<S>>& lg,
              const acc_t<S>* lse, Needs needs, acc_t<S>* table_partials, acc_t<S>* pad_partials) {
  using T = acc_t<S>;
  constexpr int L = kLanes<T>;
  const int n = p.n, d = p.d, np = int(round_up(n, L)), dp = int(round_up(d, L));
  const int64_t per_chunk = windows_per_chunk(p.batch, p.heads);
  const int64_t chunks = (p.batch + per_chunk - 1) / per_chunk;
  const int rows_of_table = p.table_rows();
  const int nl = lane_queries<T>(n), row_queries = std::max(0, n - nl);
  const size_t tile_elems = 2 * size_t(dp) * np + 5 * size_t(n) * dp + 4 * size_t(n) * np + 3 * size_t(dp) +
                            5 * size_t(np) + 1024;
  parallel_for(chunks * p.heads, 1, [&](int64_t begin, int64_t end) {
    Tiles<T> tiles{scratch<T>(0, tile_elems)};
    T* qt = tiles.take(size_t(dp) * np);   // (Q scale)^T
    T* dot = tiles.take(size_t(dp) * np);  // dO^T
    T* qtile = tiles.take(size_t(n) * dp);
    T* ktile = tiles.take(size_t(n) * dp);
    T* vtile = tiles.take(size_t(n) * dp);
    T* dotile = tiles.take(size_t(n) * dp);
    T* acc = tiles.take(size_t(n) * dp);   // one gradient's rows at a time
    T* st = tiles.take(size_t(n) * np);    // S^T, then P^T
    T* dpt = tiles.take(size_t(n) * np);   // dP^T, then dS^T
    T* drop = tiles.take(size_t(n) * np);  // dropout multipliers, then P^T dropped
    T* ds_sum = tiles.take(size_t(n) * np);
    T* pad_acc = tiles.take(3 * size_t(dp));
    T* lse_lanes = tiles.take(np);
    T* delta = tiles.take(np);
    T* srow = tiles.take(np);  // a row query's P, then dP
    T* scales = tiles.take(np);  // the logits' scale per row: dQ and dK are scale dS K, scale dS^T Q
    std::fill(scales, scales + np, T(p.scale));
    if (row_queries) {
      zero_pad_lanes(st, n, np);
      zero_pad_lanes(dpt, n, np);
    }
    Rows<S> rows(n, Tokens::kListed), next_rows(n, Tokens::kListed);  // this window's and the next one's
    GradRows<S> g(n, Grads::kListed), next_g(n, Grads::kListed);
    const bool want_table = table_partials != nullptr;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task / p.heads;
      const int h = int(task % p.heads);
      if (want_table) std::fill(ds_sum, ds_sum + size_t(n) * np, T(0));
      std::fill(pad_acc, pad_acc + 3 * dp, T(0));
      const int64_t chunk_end = std::min(p.batch, (chunk + 1) * per_chunk);
      tokens.rows(chunk * per_chunk, h, rows);
      grads.rows(chunk * per_chunk, h, g);
      for (int64_t b_ = chunk * per_chunk; b_ < chunk_end; ++b_) {
        NextTaskPrefetch next;  // the next window of this head
        if (b_ + 1 < chunk_end) {
          tokens.rows(b_ + 1, h, next_rows);
          grads.rows(b_ + 1, h, next_g);
          prefetch_rows(next_rows, n, d, next);
          prefetch_rows(next_g, n, d, next);
        }
        const Operand<T> q = rows_operand(rows.q, n, d, dp, true, qtile);
        const Operand<T> k = rows_operand(rows.k, n, d, dp, true, ktile);
        const Operand<T> v = rows_operand(rows.v, n, d, dp, row_queries > 0, vtile);
        const Operand<T> dout = rows_operand(g.dout, n, d, dp, true, dotile);
        transpose(q.ptr, q.ld, std::min(n, nl), dp, qt, np, T(p.logit_scale()));
        transpose(dout.ptr, dout.ld, std::min(n, nl), dp, dot, np);
        const T* lse_row = lse + (b_ * p.heads + h) * n;
        for (int i = 0; i < np; ++i) {
          // base-2 units, as the logits; P = 0 in pad lanes
          lse_lanes[i] = i < n ? lse_row[i] * kLog2e<T> : std::numeric_limits<T>::infinity();
        }
        const T* init = lg.tile(b_, h);
        product<T>(n, nl, d, k.ptr, k.ld, 1, qt, np, st, np, false, init, &next);
        for (int j = 0; j < n; ++j)
          for (int i = 0; i < nl; i += L) {
            T* s = st + size_t(j) * np + i;
            vstore(s, vexp2_nonpositive(vload(s) - vload(lse_lanes + i)));
          }
        for (int i = nl; i < n; ++i) {
          row_logits(i, n, np, dp, q, k, T(p.logit_scale()), init, srow);
          for (int j = 0; j < np; j += L) vstore(srow + j, vexp2_nonpositive(vload(srow + j) - lse_lanes[i]));
          scatter_column(st, n, np, i, srow);
        }
        // dP^T[j][i] = V[j] . dO[i]
        product<T>(n, nl, d, v.ptr, v.ld, 1, dot, np, dpt, np, false, nullptr, &next);
        for (int i = nl; i < n; ++i) {
          row_dots(dout.ptr + i * dout.ld, v, n, np, dp, T(1), srow);
          scatter_column(dpt, n, np, i, srow);
        }
        const T* pv = st;  // the P^T that multiplied V in forward
        if (p.dropout_p > 0) {
          dropout_factors(drop, p, np, b_, h);
          for (size_t e = 0; e < size_t(n) * np; e += L) {
            const Vec<T> f = vload(drop + e);
            vstore(dpt + e, vload(dpt + e) * f);
            vstore(drop + e, vload(st + e) * f);
          }
          pv = drop;
        }
        // dV[j] = sum_i P[i][j] dO[i]
        if (needs.dkv)
          gradient_rows(g.dv, n, d, dp, acc, pad_acc + 2 * dp, [&](Target<T> t) {
            product<T>(n, dp, n, pv, np, 1, dout.ptr, dout.ld, t.ptr, t.ld, false, nullptr, &next);
          });
        // delta[i] = rowsum(dO O)[i] = sum_j P[i][j] dP[i][j] / sum_j P[i][j] (dP with the dropout
        // factors; the sum of P is 1, up to the recomputed P's error), from the tiles in the compute
        // type: not from the output rounded to S (in a half type that rounding, times dO, is the
        // whole of dS where P is nearly one-hot), and O is not read.  The division cancels an error
        // the row's P share: exp(s - lse) with large logits is off by lse's rounding, relative 1e-5
        // at logits near 120, and that error times |dP| (not |dP - delta|) would reach dS.
        for (int i = 0; i < np; i += L) {
          Vec<T> weighted{}, total{};
          for (int j = 0; j < n; ++j) {
            const Vec<T> pj = vload(st + size_t(j) * np + i);
            weighted += pj * vload(dpt + size_t(j) * np + i);
            total += pj;
          }
          vstore(delta + i, weighted / total);
        }
        std::fill(delta + n, delta + np, T(0));  // pad lanes: 0 / 0
        // dS^T = P^T (dP^T - delta)
        for (int j = 0; j < n; ++j)
          for (int i = 0; i < np; i += L) {
            const size_t e = size_t(j) * np + i;
            vstore(dpt + e, vload(st + e) * (vload(dpt + e) - vload(delta + i)));
          }
        if (want_table)
          for (size_t e = 0; e < size_t(n) * np; e += L) vstore(ds_sum + e, vload(ds_sum + e) + vload(dpt + e));
        // dQ[i] = scale sum_j dS[i][j] K[j]
        if (needs.dq)
          gradient_rows(g.dq, n, d, dp, acc, pad_acc, [&](Target<T> t) {
            product<T>(n, dp, n, dpt, 1, np, k.ptr, k.ld, t.ptr, t.ld, false, nullptr, &next, scales);
          });
        // dK[j] = scale sum_i dS[i][j] Q[i]
        if (needs.dkv)
          gradient_rows(g.dk, n, d, dp, acc, pad_acc + dp, [&](Target<T> t) {
            product<T>(n, dp, n, dpt, np, 1, q.ptr, q.ld, t.ptr, t.ld, false, nullptr, &next, scales);
          });
        std::swap(rows, next_rows);
        std::swap(g, next_g);
      }
      if (want_table) {
        T* part = table_partials + (chunk * p.heads + h) * rows_of_table;
        std::fill(part, part + rows_of_table, T(0));
        for (int j = 0; j < n; ++j)
          for (int i = 0; i < n; ++i) part[lg.rel[size_t(j) * n + i]] += ds_sum[size_t(j) * np + i];
      }
      if (pad_partials) {
        // (chunk, 3, h, d): the q, k, v parts of qkv_bias this head reads.
        for (int which = 0; which < 3; ++which)
          std::copy(pad_acc + which * dp, pad_acc + which * dp + d,
                    pad_partials + ((chunk * 3 + which) * p.heads + h) * d);
      }
    }
  });
}

// Sums partials (chunks, rows) over the chunks in order -> (rows).
template <typename T>
void sum_chunks(const T* partials, int64_t chunks, int64_t rows, T* out) {
  for (int64_t r = 0; r < rows; ++r) out[r] = T(0);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t r = 0; r < rows; ++r) out[r] += partials[c * rows + r];
}

}  // namespace
